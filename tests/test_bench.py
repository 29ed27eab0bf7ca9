"""The benchmark scripts run end to end at toy sizes and write their tables (numbers are not asserted)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    "script, args, name",
    [
        ("reference_overhead.py", ["--model", "tiny", "--frames", "5", "--height", "32", "--width", "48",
                                   "--warmup", "0", "--repeats", "1"], "reference_overhead_tiny_cpu"),
        ("reference_overhead.py", ["--family", "wan22", "--model", "tiny", "--frames", "5", "--height", "32",
                                   "--width", "64", "--warmup", "0", "--repeats", "1"],
         "reference_overhead_wan22_tiny_cpu"),
        ("generation.py", ["--model", "tiny", "--frames", "5", "--height", "32", "--width", "48", "--steps", "1",
                           "--lora-rank", "4"], "generation_tiny_cpu"),
        ("train_steps.py", ["--model", "tiny", "--frames", "5", "--height", "32", "--width", "48", "--lora-rank", "4",
                            "--warmup", "0", "--repeats", "1", "--clips", "1"], "training_steps_tiny_cpu"),
        ("train_steps.py", ["--family", "wan22", "--model", "tiny", "--frames", "5", "--height", "64", "--width", "96",
                            "--lora-rank", "4", "--warmup", "0", "--repeats", "1"], "training_steps_wan22_tiny_cpu"),
        ("text_encoder_load.py", ["--model", "tiny", "--repeats", "1"], "text_encoder_load_tiny_cpu"),
    ],
)
def test_bench_script_writes_results(tmp_path, script, args, name):
    result = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / f"{name}.csv")))
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert rows and data["rows"] == rows
    assert data["machine"]["device"] == "cpu"
    assert "|---|" in result.stdout
    if script == "generation.py":  # every speed/memory combination, each compared with the plain run
        combos = {(row["weights"], row["cache"]) for row in rows if "LoRA" not in row["weights"]}
        assert combos == {(w, c) for w in ("precision", "fp8") for c in ("off", "first_block 0.05")}
        assert rows[0]["PSNR dB"] == "exact"  # the plain run against itself: the runs are deterministic
        fp8 = next(row for row in rows if row["weights"] == "fp8" and row["cache"] == "off")
        assert float(fp8["latent max-abs vs plain"]) > 0
