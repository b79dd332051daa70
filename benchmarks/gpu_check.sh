#!/usr/bin/env bash
# GPU check for a lent device (under 5 minutes): install, run the engine tests on CPU as a sanity check of
# the copy, then the per-evaluation benchmark on CUDA in fp32 and bf16 for ResNet-18 and VGG-19 at 512 px.
# Usage on the device machine:  bash benchmarks/gpu_check.sh   (results in $OUT or ./gpu_results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e . 2>&1 | grep -v "is ignored" || true
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
for precision in fp32 bf16; do
  for extractor in resnet18 vgg19; do
    timeout 120 .venv-gpu/bin/nstlab stylize src/nstlab/data/coffee.jpg src/nstlab/data/great_wave.jpg \
      -o "$OUT_DIR/${extractor}_${precision}.png" --weights random --size 512 --iterations 200 \
      --extractor "$extractor" --precision "$precision" --device cuda --quiet || echo "FAILED $extractor $precision"
  done
done
.venv-gpu/bin/python - "$OUT_DIR" <<'PY'
import json, sys, pathlib
for rec in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(rec.read_text())["run"]
    print(f"{rec.stem:20s} {r['seconds_per_evaluation']*1000:8.2f} ms/eval  peak {r['peak_memory_bytes']/2**20:8.1f} MiB  {r['precision']}")
PY
