"""Sweep the copy kernel's grid across NVLink: GPU 1 reads W1 blocks from GPU 0 (peer access, one process).

    python benchmarks/ipc_copy_sweep.py [--ctas 64 132 264 0] [--tokens 16 4096]

Prints GPU time (CUDA events, median after warm-up) and GB/s per grid size, and the host time of
one launch_copy() call. Run under KVLINK_NVRTC_OPTIONS="-DKVLINK_UNROLL=8" to try other unrolls.
With one GPU, both caches lie on it: the copy reads local memory, and a device copy of the same
bytes (torch ``copy_``) is timed beside it. Every copy is verified against the source.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctas", type=int, nargs="+", default=[64, 132, 264, 528, 0], help="0: one block per tile")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 4096])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    import cupy
    from kvlink import presets
    from kvlink.kernels import launch_copy, prepare
    from kvlink.selection import select

    shape = dict(num_layers=32, num_blocks=2048, block_size=16, num_heads=8, head_dim=128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    one_gpu = torch.cuda.device_count() < 2
    reader = "cuda:0" if one_gpu else "cuda:1"
    _, src = presets.allocate("vllm_flash_attn_nhd", device="cuda:0", fill=lambda t: t.copy_(
        torch.randint(-2**15, 2**15, t.shape, dtype=torch.int16, generator=gen).view(t.dtype)), **shape)
    _, dst = presets.allocate("vllm_flash_attn_nhd", device=reader, **shape)
    if not one_gpu:
        with cupy.cuda.Device(1):
            cupy.cuda.runtime.deviceEnablePeerAccess(0)
    torch.cuda.set_device(reader)
    stream = torch.cuda.Stream(reader)
    prepare(dst, stream)
    unroll = os.environ.get("KVLINK_NVRTC_OPTIONS", "") or "default"
    wrong = 0
    if one_gpu:
        local = src
        cases = [("local", src, ctas) for ctas in args.ctas]
    else:
        _, local = presets.allocate("vllm_flash_attn_nhd", device=reader, **shape)
        local.plane(0, 0).view(torch.int16).random_()
        cases = [("peer", src, ctas) for ctas in args.ctas] + [("peer-same-blocks", src, 264), ("local", local, 264)]
    for num_tokens in args.tokens:
        if one_gpu:  # the baseline: a device copy of the same bytes
            nbytes = num_tokens * src.bytes_per_token
            a, b = torch.empty(nbytes, dtype=torch.uint8, device=reader), torch.empty(nbytes, dtype=torch.uint8,
                                                                                     device=reader)
            times = []
            for i in range(args.iters + 3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    b.copy_(a)
                    end.record(stream)
                end.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) * 1e-3)
            t = statistics.median(times)
            print(f"{'device copy':>20} {'copy_':>16} tokens {num_tokens:>5}            : {t * 1e6:8.1f} us "
                  f"{nbytes / t / 1e9:7.1f} GB/s", flush=True)
            del a, b
        n = -(-num_tokens // 16)
        for name, source, ctas in cases:
            times, host = [], []
            for i in range(args.iters + 3):
                if i == 0 or name != "peer-same-blocks":  # fresh random blocks: cold translations each time
                    src_ids = torch.randperm(2048, generator=gen)[:n]
                    dst_ids = torch.randperm(2048, generator=gen)[:n]
                s = select(source, src_ids, num_tokens)
                d = select(dst, dst_ids, num_tokens, destination=True)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                t0 = time.perf_counter()
                launch_copy(s, d, stream, max_ctas=ctas or None)
                host.append(time.perf_counter() - t0)
                end.record(stream)
                end.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end) * 1e-3)
            t = statistics.median(times)
            for layer in (0, 31):  # compared as raw bits: random bf16 bits hold NaNs
                got = dst.plane(layer, 1)[dst_ids.to(reader)].view(torch.int16).flatten()[: num_tokens * 8 * 128]
                want = source.plane(layer, 1)[src_ids.to(source.device)].view(torch.int16).flatten()[
                    : num_tokens * 8 * 128].to(reader)
                wrong += int((got != want).sum())
            print(f"{unroll:>20} {name:>16} tokens {num_tokens:>5} ctas {ctas or 'all':>5}: {t * 1e6:8.1f} us "
                  f"{d.payload_bytes / t / 1e9:7.1f} GB/s  host {statistics.median(host) * 1e6:6.1f} us", flush=True)
    print(f"wrong elements: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
