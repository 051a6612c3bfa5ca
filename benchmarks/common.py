"""Timing helpers the benchmark scripts share: interleaved repeats, medians, a device line."""
from __future__ import annotations

import argparse
import copy
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



def arguments(doc: str, sizes=(512, 1024, 2048, 4096), repeats: int = 10, **extra):
    """The options every layer benchmark takes, plus ``extra`` (name=default); returns (args, device)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(sizes))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args()
    return args, torch.device(args.device)


def train_and_merged(layers: dict, adapted, base, x, repeats: int, device) -> dict:
    """Median seconds of forward + backward of each of ``layers`` on x, then of the forward of
    ``adapted`` merged (keyed "merged") against its plain ``base`` (keyed "linear")."""
    times = compare({name: (lambda l=layer: l(x).sum().backward()) for name, layer in layers.items()},
                    repeats, device)
    merged = copy.deepcopy(adapted).merge()
    with torch.no_grad():
        times.update(compare({"merged": lambda: merged(x), "linear": lambda: base(x)}, repeats, device))
    return times
