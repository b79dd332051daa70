"""Helpers shared by the benchmark scripts: test images, machine description, timing and memory probes.

Not part of the nstlab package; the scripts import it as a sibling module (``python benchmarks/x.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nstlab import images

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RANDOM_WEIGHTS_NOTE = (
    "weights: random (seed 0; no pretrained weights reachable here). Speed and memory do not depend on "
    "weight values; loss values and images do, so quality numbers only compare the two implementations."
)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# --- data ------------------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, pair: str = "pair-1") -> None:
    """The options every benchmark takes: --pair, --data, --threads, --json."""
    p.add_argument("--pair", default=pair)
    p.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write all numbers to this file")


def shared_data(given: str | None) -> Path:
    """The shared data folder (``--data``, $NSTLAB_DATA or ../shared/data); exits cleanly without it."""
    root = data_dir(given)
    require_data(root)
    return root


def data_dir(given: str | None) -> Path:
    return Path(given or os.environ.get("NSTLAB_DATA") or DEFAULT_DATA)


def require_data(root: Path) -> None:
    """Exit cleanly (status 0, with a message) when the shared test images are not there."""
    if not (root / "pairs.csv").is_file():
        print(f"SKIP: test images not found ({root / 'pairs.csv'} is missing); pass --data DIR.")
        sys.exit(0)


def pair_paths(root: Path, pair: str) -> tuple[Path, Path]:
    with open(root / "pairs.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["pair"] == pair:
                return root / row["content"], root / row["style"]
    raise SystemExit(f"pair {pair!r} not in {root / 'pairs.csv'}")


def pair_names(root: Path) -> list[str]:
    with open(root / "pairs.csv", newline="") as fh:
        return [row["pair"] for row in csv.DictReader(fh)]


def load_pair(root: Path, pair: str, size: int) -> tuple[Tensor, Tensor]:
    """(content, style) as (1, 3, H, W) float32 in [0, 1]: content at ``size`` px on its long side and the
    style scaled to the same long side -- exactly what ``nstlab.api.prepare_inputs`` does."""
    cpath, spath = pair_paths(root, pair)
    c = images.resize_long_side(images.load_image(cpath), size)
    s = images.resize_long_side(images.load_image(spath), max(c.size))
    return images.to_tensor(c), images.to_tensor(s)


# --- machine -----------------------------------------------------------------------------------------------

SPEED_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


def start(name: str, threads: int) -> dict[str, Any]:
    """Set torch's thread count (0: leave torch's choice) and print the run's header lines: the machine
    and the random-weights note. Returns the machine description for the JSON record."""
    if threads:
        torch.set_num_threads(threads)
    info = machine_info()
    print(f"# {name}: {describe_machine(info)}")
    print(f"# {RANDOM_WEIGHTS_NOTE}")
    return info


def write_json(path: str | None, record: Any) -> None:
    """Write ``record`` as indented JSON to ``path`` (creating its folder); nothing when path is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1) + "\n")


def machine_info() -> dict[str, Any]:
    model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "speed_flags_present": [f for f in SPEED_FLAGS if f in flags],
        "speed_flags_absent": [f for f in SPEED_FLAGS if f not in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads, {info['cpu_capability']}), "
        f"flags: {' '.join(info['speed_flags_present'])}; absent: {' '.join(info['speed_flags_absent'])}; "
        f"load average at start {' '.join(f'{x:.1f}' for x in info['loadavg_at_start'])}"
    )


# --- timing ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_gflops(n: int = 2048, repeats: int = 7) -> list[float]:
    """fp32 GFLOP/s of ``torch.mm`` on n x n matrices, one number per repeat (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    torch.mm(a, b)
    out = []
    for _ in range(repeats):
        dt = timed(lambda: torch.mm(a, b))
        out.append(2.0 * n**3 / dt / 1e9)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --- memory ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where that is impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the next peak starts from live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def mib(n: float) -> float:
    return n / 2**20
