"""Where the host time of one pack/unpack call goes (cProfile), for the latency budget.

    python benchmarks/profile_host.py        # needs a GPU and CuPy
"""

import cProfile
import pstats
import time

import torch

import kvlink
from kvlink import presets


def main(calls: int = 500) -> None:
    _, src = presets.allocate("vllm_flash_attn_nhd", num_layers=32, num_blocks=2048, block_size=16, num_heads=8,
                              head_dim=128, device="cuda")
    _, dst = presets.allocate("vllm_flash_attn_nhd", num_layers=32, num_blocks=2048, block_size=16, num_heads=8,
                              head_dim=128, device="cuda")
    chunk = torch.empty(kvlink.packed_nbytes(src, 16), dtype=torch.uint8, device="cuda")
    ops = {
        "pack": lambda: kvlink.pack(src, [7], 16, chunk),
        "unpack": lambda: kvlink.unpack(dst, [9], 16, chunk),
    }
    for name, op in ops.items():
        for _ in range(20):
            op()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            op()
        host_us = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        print(f"host time per {name} call (1 block x 32 layers): {host_us:.1f} us")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            op()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
