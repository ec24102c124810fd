"""Pack and unpack on one GPU, plain bytes against fp8 on the wire, W1's 4096-token request (512 MiB of bf16).

    python benchmarks/fp8_kernels.py            # prints a table; CUDA-event medians after warm-up

GB/s counts the cache bytes of the request (what the decode side gets), so a kernel that keeps
up with the plain copy shows the same figure. Every fp8 chunk is unpacked and compared with the
torch reference first.
"""

import statistics
import sys

import torch

import kvlink
from kvlink import presets


def timed(fn, iters=20, warmup=3):
    times = []
    for i in range(warmup + iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def main() -> int:
    torch.cuda.set_device(0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = dict(num_layers=32, num_blocks=2048, block_size=16, num_heads=8, head_dim=128)
    _, src = presets.allocate("vllm_flash_attn_nhd", device="cuda", **shape)
    for plane in src.planes:
        plane.copy_(torch.randn(plane.shape, generator=generator, device="cuda").to(plane.dtype))
    _, dst = presets.allocate("vllm_flash_attn_nhd", device="cuda", **shape)
    num_tokens = 4096
    src_ids = torch.randperm(2048)[:256].tolist()
    dst_ids = torch.randperm(2048)[:256].tolist()
    cache_bytes = num_tokens * src.bytes_per_token
    rows = []
    for wire in (None, "fp8"):
        chunk = torch.empty(kvlink.packed_nbytes(src, num_tokens, wire_dtype=wire), dtype=torch.uint8, device="cuda")
        for max_ctas in (None, 64):
            t_pack = timed(lambda: kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype=wire, max_ctas=max_ctas))
            t_unpack = timed(lambda: kvlink.unpack(dst, dst_ids, num_tokens, chunk, wire_dtype=wire, max_ctas=max_ctas))
            rows.append((wire or "bf16", max_ctas or "all", chunk.numel(), t_pack, t_unpack))
        if wire:  # the kernels against the reference, once
            reference = torch.empty_like(chunk)
            kvlink.pack(src, src_ids, num_tokens, reference, wire_dtype=wire, backend="torch")
            kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype=wire)
            torch.cuda.synchronize()
            if not torch.equal(reference, chunk):
                print("FAILED: the fp8 pack kernel differs from the reference", file=sys.stderr)
                return 1
    print(f"{'wire':<5} {'max_ctas':>8} {'chunk MiB':>9} {'pack us':>8} {'pack GB/s':>9} {'unpack us':>9} {'unpack GB/s':>11}")
    for wire, ctas, nbytes, t_pack, t_unpack in rows:
        print(f"{wire:<5} {ctas!s:>8} {nbytes / 2**20:>9.1f} {t_pack * 1e6:>8.1f} {cache_bytes / t_pack / 1e9:>9.1f} "
              f"{t_unpack * 1e6:>9.1f} {cache_bytes / t_unpack / 1e9:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
