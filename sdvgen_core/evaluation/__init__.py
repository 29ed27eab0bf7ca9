"""Evaluation harness: generate a fixed set of subject-driven videos and score them as the paper does.

`evalset` reads the eval set file, `generation` makes every (reference, prompt) video resumably,
`metrics` holds CLIP-T / CLIP-I / DINO-I and VBench's dynamic degree and motion smoothness,
`report` writes the CSV / JSON / table / contact sheet, `cli` is `sdvgen evaluate`.
Nothing heavy is imported here.
"""
