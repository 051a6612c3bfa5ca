"""Timing helpers the benchmark scripts share: interleaved repeats, medians, a device line."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(fns: dict, repeats: int, device) -> dict:
    """Median seconds of each function, run in interleaved rounds after two warm-up calls."""
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def device_line(device) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    return f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"

