"""Load time and peak RAM of the T5 text encoder: diffusers-folder `text_encoder/` vs single files.

    python bench/text_encoder_load.py                 # tiny preset T5 and a mid T5 (vocab 32128, width 512)
    python bench/text_encoder_load.py --model mid --dtype bf16

Each load runs in a fresh Python process (Linux only): seconds for the load plus one read of every weight
(a same-dtype safetensors load maps the file lazily, so without the read it would look free), and the rise
of the process's peak resident memory over its resident memory right before the load (imports done). Files are written
in ComfyUI's layouts with the test helper `tests/comfy_t5.py` (fp32, fp16, fp8_e4m3fn_scaled).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import benchmark_parser, machine_info, parse, report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from comfy_t5 import write_comfy_t5  # noqa: E402  (bench-only: the file layouts the tests also use)

# Linux: writing 5 to /proc/self/clear_refs resets the peak resident size (VmHWM) to the current one, so
# the peak after the load minus the resident size before it is what the load itself needed at most.
MEASURE = """
import json, sys, time
import torch
from transformers import T5EncoderModel
from sdvgen_core.pipeline import resolve_dtype
from sdvgen_core.text_encoder import load_t5_encoder_file

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

source, dtype = sys.argv[1], resolve_dtype(sys.argv[2])
T5EncoderModel.from_pretrained  # resolve the lazy import before measuring
open("/proc/self/clear_refs", "w").write("5")
before = status_kib("VmRSS")
start = time.perf_counter()
if source.endswith(".safetensors"):
    model = load_t5_encoder_file(source, dtype)
else:
    model = T5EncoderModel.from_pretrained(source, torch_dtype=dtype, use_safetensors=True)
# Read every weight once: a same-dtype safetensors load maps the file lazily, the first forward pays the read.
torch.stack([parameter.sum() for parameter in model.parameters()])
seconds = time.perf_counter() - start
peak_kib = status_kib("VmHWM") - before
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024,
                  "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}))
"""


def t5_encoder(model: str):
    from transformers import T5Config, T5EncoderModel

    from sdvgen_core.presets import EXTRA_IDS, TINY_TEXT_DIM, UNUSED_TABLE_ROWS, TinyModelConfig

    torch.manual_seed(0)
    if model == "tiny":  # sized like the tiny preset's T5 (presets.build_tiny_model), without building the rest
        rows = TinyModelConfig().spm_vocab_size + EXTRA_IDS + UNUSED_TABLE_ROWS
        return T5EncoderModel(T5Config(vocab_size=rows, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    # T5-XXL's vocabulary and layout at width 512, 4 layers: large enough that reading and casting dominate.
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=8,
                                   feed_forward_proj="gated-gelu"))


def measure(source: Path, dtype: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(source), dtype], capture_output=True, text=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_parser(__doc__, frames=1)
    parser.set_defaults(model="tiny")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per source (median reported)")
    args, device, _ = parse(parser)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        encoder = t5_encoder(args.model)
        encoder.save_pretrained(work / "text_encoder", safe_serialization=True)
        sources = {"folder text_encoder/ (fp32)": work / "text_encoder"}
        for layout in ("fp32", "fp16", "fp8_e4m3fn_scaled"):
            write_comfy_t5(encoder, work / f"t5_{layout}.safetensors", layout)
            sources[f"single file {layout}"] = work / f"t5_{layout}.safetensors"
        for name, source in sources.items():
            runs = [measure(source, args.dtype) for _ in range(args.repeats)]
            size = sum(f.stat().st_size for f in ([source] if source.is_file() else source.glob("*.safetensors")))
            rows.append({
                "model": args.model, "source": name, "compute dtype": args.dtype,
                "file MiB": f"{size / 2**20:.1f}",
                "load + read s": f"{statistics.median(r['seconds'] for r in runs):.3f}",
                "peak RAM rise MiB": f"{statistics.median(r['peak_mib'] for r in runs):.1f}",
                "weights MiB": f"{runs[0]['weights_mib']:.1f}",
            })
    report(f"text_encoder_load_{args.model}_{device.type}", rows, machine_info(device), args.out)


if __name__ == "__main__":
    main()
