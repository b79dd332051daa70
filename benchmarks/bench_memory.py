"""Memory: activation checkpointing on and off, and a whole large-image stylisation.

Part 1 (``--sizes``): for each size and checkpoint mode a fresh subprocess builds nstlab's ``Objective``
(VGG-19 unless ``--extractor``; random weights), resets the kernel's peak-RSS counter, runs one evaluation
(forward + backward, exactly the engine's closure body) and reports the growth of the peak RSS over the
RSS before it, and the seconds it took. Modes alternate per size; the table gives on/off ratios.

Part 2 (``--full SIZE``): one complete ``nstlab.stylize`` run at that size in a subprocess -- image loading,
targets, ``--full-iterations`` L-BFGS evaluations with ``--lbfgs-history`` -- reporting the process's peak
RSS (VmHWM, everything included), seconds per evaluation and the run record. L-BFGS's state grows by two
image-sized vectors per evaluation until the history is full; the table adds what the remaining pairs of a
longer run would take (``nstlab.memory.lbfgs_state_bytes``, exact: they are plain fp32 tensors).

    .venv/bin/python benchmarks/bench_memory.py --sizes 512,1024,2048
    .venv/bin/python benchmarks/bench_memory.py --sizes 0 --full 4096 --full-iterations 4 --lbfgs-history 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

_PROBE = r"""
import json, sys, time, torch
from nstlab.api import get_extractor
from nstlab.config import StylizeConfig
from nstlab.engine import Objective
from nstlab.memory import current_bytes, peak_bytes, reset_peak
sys.path.insert(0, {bench!r})
import _common as C
extractor, size, mode, pair, data = {extractor!r}, {size}, {mode!r}, {pair!r}, {data!r}
cfg = StylizeConfig(extractor=extractor, weights="random", size=size, device="cpu", checkpoint=mode)
cpu = torch.device("cpu")
content, style = C.load_pair(C.data_dir(data), pair, size)
objective = Objective(get_extractor(cfg, cpu), content, style, cfg)
param = content.clone().requires_grad_(True)
before = current_bytes(cpu)
reset_peak(cpu)
t = time.perf_counter()
terms = objective.terms(param)
torch.stack(list(terms.values())).sum().backward()
seconds = time.perf_counter() - t
peak, _ = peak_bytes(cpu)
print(json.dumps({{"hw": list(content.shape[-2:]), "before": before, "peak": peak, "seconds": seconds}}))
"""

_FULL = r"""
import json, sys, time, resource
import nstlab
from nstlab.engine import Progress
sys.path.insert(0, {bench!r})
import _common as C
content, style = C.pair_paths(C.data_dir({data!r}), {pair!r})
marks = []
def on_step(p: Progress) -> None:
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS")))
    b = {{k: int(v.split()[0]) * 1024 for k, v in status.items()}}
    marks.append({{"evaluation": p.evaluation, "elapsed": p.elapsed, "hwm": b["VmHWM"], "rss": b["VmRSS"]}})
    print(json.dumps({{"progress": marks[-1]}}), flush=True)
t = time.perf_counter()
res = nstlab.stylize(content, style, extractor={extractor!r}, weights="random", size={size},
                     iterations={iterations}, lbfgs_history={history}, device="cpu", on_step=on_step)
wall = time.perf_counter() - t
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({{"result": {{"wall_s": wall, "vmhwm": hwm, "run": res.record["run"],
      "hw": list(res.image.shape[-2:]), "marks": marks}}}}))
"""


def _run(code: str, threads: int) -> list[dict[str, Any]]:
    env_prefix = [] if not threads else ["env", f"OMP_NUM_THREADS={threads}"]
    proc = subprocess.run(
        [*env_prefix, sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"probe failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="vgg19")
    p.add_argument("--sizes", default="512,1024,2048", help="long sides for part 1 (0: skip)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--full", type=int, default=0, help="long side of a complete run (part 2; 0: skip)")
    p.add_argument("--full-iterations", type=int, default=4)
    p.add_argument("--lbfgs-history", type=int, default=10)
    C.add_common_args(p)
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    bench = str(Path(__file__).resolve().parent)
    info = C.start("bench_memory", 0)  # --threads goes to the subprocesses, which do the work
    out: dict[str, Any] = {"machine": info, "args": vars(args), "evaluation": [], "full": None}
    sizes = [int(s) for s in args.sizes.split(",") if int(s) > 0]
    if sizes:
        print(f"\nOne evaluation of {args.extractor} ({args.pair}), peak RSS growth over the RSS before it\n")
        print("| image H×W | off: growth GiB | on: growth GiB | on/off memory | off s | on s | on/off time |")
        print("|---|---|---|---|---|---|---|")
    for size in sizes:
        res: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for r in range(args.repeats):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                code = _PROBE.format(
                    bench=bench,
                    extractor=args.extractor,
                    size=size,
                    mode=mode,
                    pair=args.pair,
                    data=str(data),
                )
                res[mode] += _run(code, args.threads)
        g = {m: C.median([(x["peak"] - x["before"]) / 2**30 for x in v]) for m, v in res.items()}
        t = {m: C.median([x["seconds"] for x in v]) for m, v in res.items()}
        hw = "×".join(map(str, res["off"][0]["hw"]))
        print(
            f"| {hw} | {g['off']:.2f} | {g['on']:.2f} | {g['on'] / g['off']:.2f} "
            f"| {t['off']:.1f} | {t['on']:.1f} | {t['on'] / t['off']:.2f} |",
            flush=True,
        )
        out["evaluation"].append(
            {"size": size, "hw": res["off"][0]["hw"], "off": res["off"], "on": res["on"]}
        )
    if args.full:
        from nstlab.memory import lbfgs_state_bytes

        code = _FULL.format(
            bench=bench,
            data=str(data),
            pair=args.pair,
            extractor=args.extractor,
            size=args.full,
            iterations=args.full_iterations,
            history=args.lbfgs_history,
        )
        t0 = time.perf_counter()
        lines = _run(code, args.threads)
        full = next(x["result"] for x in lines if "result" in x)
        h, w = full["hw"]
        # Curvature pairs already held during the last evaluation: evaluation k (k >= 2) runs with k - 2.
        held = max(0, min(args.full_iterations - 2, args.lbfgs_history))
        extra = lbfgs_state_bytes(h * w, args.lbfgs_history, 10**9) - lbfgs_state_bytes(h * w, held, 10**9)
        run = full["run"]
        print(f"\nComplete stylisation at {h}×{w} ({args.extractor}, L-BFGS history {args.lbfgs_history})\n")
        print(f"- wall time {full['wall_s']:.0f} s ({time.perf_counter() - t0:.0f} s with start-up)")
        print(f"- {run['evaluations']} evaluations, {run['seconds_per_evaluation']:.1f} s each")
        print(f"- activation checkpointing: {run['checkpoint']}")
        print(f"- peak RSS of the whole process (VmHWM): {full['vmhwm'] / 2**30:.2f} GiB")
        print(
            f"- peak during the run (record, {run['peak_memory_kind']}): "
            f"{run['peak_memory_bytes'] / 2**30:.2f} GiB"
        )
        print(
            f"- the {args.lbfgs_history - held} further curvature pairs of a longer run add "
            f"{extra / 2**30:.2f} GiB: projected peak {(full['vmhwm'] + extra) / 2**30:.2f} GiB"
        )
        for m in full["marks"]:
            print(
                f"  after evaluation {m['evaluation']}: {m['elapsed']:.0f} s, "
                f"VmHWM {m['hwm'] / 2**30:.2f} GiB"
            )
        out["full"] = full | {"further_lbfgs_bytes": extra}
    C.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
