#!/usr/bin/env bash
# GPU check for a lent device (under 5 minutes): install, then on CUDA at 512 px with random weights
#   1. fp32 / bf16 / fp16 for ResNet-18 and VGG-19 (200 evaluations each): ms per evaluation, peak memory;
#   2. --deterministic twice: must give identical pixels; and the cudnn.benchmark default once;
#   3. --checkpoint on for VGG-19 (memory saved, time cost) and --compile for ResNet-18;
#   4. a batch of 4 Adam runs, and one of 4 L-BFGS runs, against the same runs separately (bench_batch.py).
# Usage on the device machine:  bash benchmarks/gpu_check.sh   (results in $OUT or ./gpu_results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e . 2>&1 | grep -v "is ignored" || true
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
NST=".venv-gpu/bin/nstlab stylize src/nstlab/data/coffee.jpg src/nstlab/data/great_wave.jpg --weights random --size 512 --device cuda --quiet"
run() {  # name, extra options...
  local name=$1; shift
  timeout 120 $NST -o "$OUT_DIR/$name.png" "$@" || echo "FAILED $name"
}
for precision in fp32 bf16 fp16; do
  for extractor in resnet18 vgg19; do
    run "${extractor}_${precision}" --extractor "$extractor" --precision "$precision" --iterations 200
  done
done
run det_a --iterations 50 --deterministic
run det_b --iterations 50 --deterministic
run vgg19_checkpoint --extractor vgg19 --iterations 50 --checkpoint on
run vgg19_plain --extractor vgg19 --iterations 50 --checkpoint off
run resnet18_compile --iterations 200 --compile
.venv-gpu/bin/python - "$OUT_DIR" <<'PY'
import json, sys, pathlib
import numpy as np
from PIL import Image
out = pathlib.Path(sys.argv[1])
for rec in sorted(out.glob("*.json")):
    r = json.loads(rec.read_text())["run"]
    print(f"{rec.stem:20s} {r['seconds_per_evaluation']*1000:8.2f} ms/eval  peak {r['peak_memory_bytes']/2**20:8.1f} MiB"
          f"  {r['precision']}  checkpoint={r.get('checkpoint')}  cudnn_benchmark={r.get('cudnn_benchmark')}")
a, b = out / "det_a.png", out / "det_b.png"
if a.exists() and b.exists():
    same = np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    print(f"--deterministic twice: identical pixels: {same}")
PY
timeout 120 .venv-gpu/bin/python benchmarks/bench_batch.py --device cuda --size 512 --members 4 --iterations 50 \
  --repeats 2 --content src/nstlab/data/coffee.jpg --style src/nstlab/data/great_wave.jpg 2>&1 | tail -8 || echo "FAILED bench_batch"
timeout 90 .venv-gpu/bin/python benchmarks/bench_batch.py --device cuda --size 512 --members 4 --iterations 30 \
  --repeats 2 --optimizer lbfgs --content src/nstlab/data/coffee.jpg --style src/nstlab/data/great_wave.jpg 2>&1 \
  | tail -8 || echo "FAILED bench_batch lbfgs"
