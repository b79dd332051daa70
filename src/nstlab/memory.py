"""Peak memory of a run: CUDA's allocator statistics, or the process's resident-set high-water mark."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Start a new peak measurement (best effort: the CPU reset needs Linux's clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Writing 5 resets the kernel's peak-RSS counter (VmHWM) for this process (Linux >= 4.0).
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process_peak_rss"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "process_peak_rss_since_start"


def total_bytes(device: torch.device) -> int | None:
    """Physical memory of the device (the GPU's, or the machine's RAM); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def lbfgs_state_bytes(pixels: int, history: int, iterations: int) -> int:
    """L-BFGS's own memory for an RGB image (nstlab.lbfgs.CompactLBFGS): ``min(history, iterations)``
    curvature pairs (s, y), two image-sized fp32 vectors each, plus 5 more (direction, previous gradient,
    gradient, candidate pair). Pairs are allocated in blocks of up to 16 slots; slots not yet written are
    not resident on the CPU, but a CUDA allocator reserves them (at most 15 pairs more while the history
    fills; none once it is full)."""
    vector = 3 * pixels * 4
    return (2 * min(history, iterations) + 5) * vector


def current_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA's allocated bytes, or this process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
