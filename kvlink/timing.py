"""GPU timing with CUDA events: medians of warmed-up runs, GPU time only; and the spread of timed runs.

Before each timed run a short spin kernel is queued, so the host has already enqueued the whole
region by the time the GPU reaches the start event: the events measure GPU time, not Python's
launch overhead. Host overhead is measured separately (wall clock around the enqueue).

:func:`spread` summarizes any list of per-iteration times (median, min, p10, p90, max): the
transfer benchmark reports every case with it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    gpu_us: list[float]   # per-iteration GPU time
    host_us: list[float]  # per-iteration time the host spent enqueuing

    @property
    def median_us(self) -> float:
        return statistics.median(self.gpu_us)

    @property
    def host_median_us(self) -> float:
        return statistics.median(self.host_us)


def time_gpu(fn: Callable[[], object], *, iters: int = 50, warmup: int = 5, spin_cycles: int = 2_000_000,
             stream: torch.cuda.Stream | None = None) -> Timing:
    """Run ``fn`` (which enqueues work on ``stream``) ``warmup + iters`` times; return per-run timings."""
    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    with torch.cuda.stream(stream):
        for _ in range(iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(spin_cycles)  # keeps the GPU busy while the host enqueues the region
            start.record(stream)
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            stop.record(stream)
            stop.synchronize()
            gpu.append(start.elapsed_time(stop) * 1e3)
    return Timing(gpu, host)


# ------------------------------------------------------------------------------------- spread
@dataclass
class Spread:
    """What a list of timed iterations says: its median and how far the iterations strayed."""
    n: int
    median_us: float
    min_us: float
    p10_us: float
    p90_us: float
    max_us: float
    samples_us: list[float]


def spread(seconds: list[float]) -> Spread:
    """Summarize per-iteration times (in seconds): median, min, p10, p90, max, all in microseconds.

    p10/p90 interpolate between the sorted samples (``statistics.quantiles``, inclusive method),
    so with fewer than ten samples they lie between the extremes and the median.
    """
    if not seconds:
        raise ValueError("no timed iterations to summarize")
    us = [s * 1e6 for s in seconds]
    if len(us) >= 2:
        deciles = statistics.quantiles(us, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = us[0]
    return Spread(n=len(us), median_us=statistics.median(us), min_us=min(us), p10_us=p10, p90_us=p90,
                  max_us=max(us), samples_us=us)
