"""Host (CPU) cost of the Python steps of one ipc pull, single-threaded, no GPU: calibrates a machine.

    python benchmarks/host_overhead.py

Compare its figures between machines before reading host-side stamps of the transfer benchmark
(``host_*_us`` in its JSON): the same steps inside a pull that take much longer than here point
to contention (another thread holding the GIL, a busy CPU), not to the steps themselves.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from kvlink import kernels, presets
from kvlink.selection import select


def median_us(fn, repeat: int = 2000) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    shape = dict(num_layers=32, num_blocks=2048, block_size=16, num_heads=8, head_dim=128)
    _, src = presets.allocate("vllm_flash_attn_nhd", **shape)
    _, dst = presets.allocate("vllm_flash_attn_nhd", **shape)
    print(f"python loop sum(range(1000)): {median_us(lambda: sum(range(1000))):.1f} us")
    for num_tokens in (16, 4096):
        n = num_tokens // 16
        src_ids, dst_ids = torch.randperm(2048)[:n], torch.randperm(2048)[:n]
        sel = lambda: (select(dst, dst_ids, num_tokens, destination=True), select(src, src_ids, num_tokens))  # noqa: E731
        s, d = sel()

        def records():
            sg, dg, _, _ = kernels._copy_geometry(s, d)
            kernels._inline_copy_params(kernels._metadata(sg, b"", s.block_ids), kernels._metadata(dg, b"", d.block_ids),
                                        1, 2)
        print(f"{num_tokens:>5} tokens: two selects {median_us(sel):.1f} us, geometry + launch parameters "
              f"{median_us(records):.1f} us, numpy int32 copy {median_us(lambda: np.asarray(src_ids).astype(np.int32)):.1f} us")


if __name__ == "__main__":
    main()
