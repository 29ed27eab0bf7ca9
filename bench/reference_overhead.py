"""Cost of the reference tokens per denoising step: our transformer with a reference vs stock diffusers T2V.

    python bench/reference_overhead.py                      # CPU, mid-size model (matmuls dominate)
    python bench/reference_overhead.py --model 5b --device cuda --dtype bf16 --height 480 --width 720
    python bench/reference_overhead.py --family wan22        # Wan 2.2 TI2V: reference as an extra latent frame

Both models share one set of random weights; one step = one forward of the CFG batch (2). The measured
time ratio is printed next to the FLOP ratio of the token counts for the same config and size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, parse, interleaved_medians, machine_info, report  # noqa: E402
from models import TRANSFORMER, WAN_TRANSFORMER  # noqa: E402

from sdvgen_core.transformer import SDVGenTransformer3DModel  # noqa: E402
from sdvgen_core.wan_transformer import SDVGenWanTransformer3DModel  # noqa: E402

TEXT_TOKENS = 226
WAN_TEXT_TOKENS = 512


def transformer_flops(width: int, layers: int, tokens: int) -> float:
    """Forward FLOPs of the blocks: q/k/v/out (4 d^2) and the 4x feed-forward (8 d^2) per token, plus attention (4 N^2 d)."""
    return layers * (2 * tokens * 12 * width**2 + 4 * tokens**2 * width)


def flop_overhead(width: int, layers: int, latent_frames: int, tokens_per_frame: int) -> float:
    t2v = TEXT_TOKENS + latent_frames * tokens_per_frame
    return transformer_flops(width, layers, t2v + tokens_per_frame) / transformer_flops(width, layers, t2v) - 1


def wan_flops(width: int, ffn: int, layers: int, tokens: int, text_tokens: int = WAN_TEXT_TOKENS) -> float:
    """Wan block FLOPs: self-attention q/k/v/o (4 d^2) and cross-attention q/o (2 d^2) per video token, the FFN
    (2 d ffn), cross-attention k/v on the text (2 d^2 per text token), and the attention products
    (self 4 N^2 d, cross 4 N L d). Text stays outside the self-attention sequence."""
    per_token = 2 * tokens * (6 * width**2 + 2 * width * ffn) + 2 * text_tokens * 2 * width**2
    return layers * (per_token + 4 * tokens**2 * width + 4 * tokens * text_tokens * width)


def wan_flop_overhead(width: int, ffn: int, layers: int, latent_frames: int, tokens_per_frame: int) -> float:
    video = latent_frames * tokens_per_frame
    return wan_flops(width, ffn, layers, video + tokens_per_frame) / wan_flops(width, ffn, layers, video) - 1


def wan_main(args, device: torch.device, dtype: torch.dtype) -> None:
    config = WAN_TRANSFORMER[args.model]
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**config).to(device, dtype).eval()
    ours = SDVGenWanTransformer3DModel(**config).to(device, dtype).eval()
    ours.load_state_dict(stock.state_dict())

    latent_frames = (args.frames - 1) // 4 + 1
    h, w = args.height // 16, args.width // 16
    tokens_per_frame = (h // 2) * (w // 2)
    video = torch.randn(2, 48, latent_frames, h, w, device=device, dtype=dtype)
    reference = torch.randn(2, 48, 1, h, w, device=device, dtype=dtype)
    text = torch.randn(2, WAN_TEXT_TOKENS, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.full((2, latent_frames * tokens_per_frame), 500.0, device=device)  # TI2V per-token timesteps

    candidates = {
        "stock": lambda: stock(video, timestep, text),
        "ours_no_ref": lambda: ours(video, timestep, text),
        "ours_ref": lambda: ours(video, timestep, text, reference_latents=reference),
    }
    with torch.no_grad():
        medians = interleaved_medians(candidates, device, args.warmup, args.repeats)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    flops = wan_flop_overhead(width, config["ffn_dim"], config["num_layers"], latent_frames, tokens_per_frame)
    measured = medians["ours_ref"] / medians["stock"] - 1
    rows = [{
        "model": f"wan22-{args.model}",
        "size": f"{args.frames}x{args.height}x{args.width}",
        "tokens text/ref/video": f"{WAN_TEXT_TOKENS}/{tokens_per_frame}/{latent_frames * tokens_per_frame}",
        "stock T2V s/step": f"{medians['stock']:.3f}",
        "ours no-ref s/step": f"{medians['ours_no_ref']:.3f}",
        "ours ref s/step": f"{medians['ours_ref']:.3f}",
        "no-ref / stock": f"{medians['ours_no_ref'] / medians['stock']:.3f}",
        "ref overhead": f"{100 * measured:+.1f}%",
        "FLOP overhead": f"{100 * flops:+.1f}%",
        "target (FLOP +3%)": "met" if measured <= flops + 0.03 else "MISSED",
    }]
    five_b = WAN_TRANSFORMER["5b"]
    print(f"Wan2.2-TI2V-5B at 121x704x1280 (31 latent frames of 880 tokens): FLOP overhead of 880 reference tokens = "
          f"{100 * wan_flop_overhead(3072, five_b['ffn_dim'], five_b['num_layers'], 31, 880):+.1f}%")
    report(f"reference_overhead_wan22_{args.model}_{device.type}", rows, machine_info(device), args.out)


def main() -> None:
    parser = benchmark_parser(__doc__, frames=49)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--family", choices=["cogvideox", "wan22"], default="cogvideox",
                        help="backbone (wan22: sizes must be multiples of 32)")
    args, device, dtype = parse(parser)
    if args.family == "wan22":
        return wan_main(args, device, dtype)
    config = dict(TRANSFORMER[args.model], use_rotary_positional_embeddings=True, sample_frames=49)
    torch.manual_seed(0)
    stock = CogVideoXTransformer3DModel(**config).to(device, dtype).eval()
    ours = SDVGenTransformer3DModel(**config).to(device, dtype).eval()
    ours.load_state_dict(stock.state_dict())

    latent_frames = (args.frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    video = torch.randn(2, latent_frames, 16, h, w, device=device, dtype=dtype)
    reference = torch.randn(2, 1, 16, h, w, device=device, dtype=dtype)
    text = torch.randn(2, TEXT_TOKENS, config["text_embed_dim"], device=device, dtype=dtype)
    timestep = torch.full((2,), 500, device=device)
    stock_rope = ours.rotary_embeddings(latent_frames, h, w, device)  # what the stock pipeline passes in

    @torch.no_grad()
    def run_stock():
        return stock(video, text, timestep, image_rotary_emb=stock_rope)

    @torch.no_grad()
    def run_ours_plain():
        return ours(video, text, timestep)

    @torch.no_grad()
    def run_ours_reference():
        return ours(video, text, timestep, reference_latents=reference)

    medians = interleaved_medians(
        {"stock": run_stock, "ours_no_ref": run_ours_plain, "ours_ref": run_ours_reference},
        device, args.warmup, args.repeats,
    )
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens_per_frame = (h // 2) * (w // 2)
    flops = flop_overhead(width, config["num_layers"], latent_frames, tokens_per_frame)
    measured = medians["ours_ref"] / medians["stock"] - 1
    rows = [{
        "model": args.model,
        "size": f"{args.frames}x{args.height}x{args.width}",
        "tokens text/ref/video": f"{TEXT_TOKENS}/{tokens_per_frame}/{latent_frames * tokens_per_frame}",
        "stock T2V s/step": f"{medians['stock']:.3f}",
        "ours no-ref s/step": f"{medians['ours_no_ref']:.3f}",
        "ours ref s/step": f"{medians['ours_ref']:.3f}",
        "no-ref / stock": f"{medians['ours_no_ref'] / medians['stock']:.3f}",
        "ref overhead": f"{100 * measured:+.1f}%",
        "FLOP overhead": f"{100 * flops:+.1f}%",
        "target (FLOP +3%)": "met" if measured <= flops + 0.03 else "MISSED",
    }]
    print(f"CogVideoX-5B at 49x480x720: FLOP overhead of 1350 reference tokens = "
          f"{100 * flop_overhead(3072, 42, 13, 1350):+.1f}%")
    report(f"reference_overhead_{args.model}_{device.type}", rows, machine_info(device), args.out)


if __name__ == "__main__":
    main()
