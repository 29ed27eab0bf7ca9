#!/usr/bin/env bash
# Set up (first run) and generate a video with the embedded tiny preset.
# The tiny preset is randomly initialised: the video is noise; it proves the whole path works.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
mkdir -p outputs
"${SDVGEN_VENV:-.venv}/bin/python" - <<'PY'
from PIL import Image, ImageDraw
image = Image.new("RGBA", (512, 384), (0, 0, 0, 0))
draw = ImageDraw.Draw(image)
draw.ellipse((136, 72, 376, 312), fill=(230, 120, 30, 255))
draw.ellipse((200, 140, 240, 180), fill=(20, 20, 20, 255))
image.save("outputs/demo_subject.png")
PY
"${SDVGEN_VENV:-.venv}/bin/sdvgen" generate --preset tiny --ref outputs/demo_subject.png \
  --prompt "a toy ball rolls across a wooden table" --subject ball --out outputs/demo.mp4 "$@"
