"""Pack/unpack bandwidth on the W1 shape (docs/design.md), against a device-to-device copy and torch index_select.

W1: Llama-3-8B-shaped cache, 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks, vLLM
FlashAttention layout ``[2, 2048, 16, 8, 128]`` per layer; 256 random blocks (4096 tokens,
512 MiB). Bandwidth counts bytes read plus bytes written. GPU time from CUDA events, median of
``KVLINK_BENCH_ITERS`` (default 50) runs after warm-up. Every byte moved is verified after timing.

    pytest benchmarks/ -s            # prints the summary table; KVLINK_BENCH_JSON=path writes JSON
"""

import os

import pytest
import torch

import kvlink
from kvlink import kernels, presets
from kvlink.timing import time_gpu

pytestmark = pytest.mark.skipif(not kernels.cuda_available(), reason="needs a CUDA GPU and CuPy")

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS, REQUEST_BLOCKS = 32, 8, 128, 16, 2048, 256
NUM_TOKENS = REQUEST_BLOCKS * BLOCK_SIZE
ITERS = int(os.environ.get("KVLINK_BENCH_ITERS", "50"))
BASELINES: dict[str, float] = {}


class W1:
    def __init__(self):
        gen = torch.Generator(device="cuda").manual_seed(1234)

        def fill(t):
            t.view(torch.uint8).random_(0, 256, generator=gen)

        self.src_engine, self.src = presets.allocate(
            "vllm_flash_attn_nhd", num_layers=LAYERS, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
            num_heads=HEADS, head_dim=HEAD_DIM, device="cuda", fill=fill)
        self.dst_engine, self.dst = presets.allocate(
            "vllm_flash_attn_nhd", num_layers=LAYERS, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
            num_heads=HEADS, head_dim=HEAD_DIM, device="cuda", fill=fill)
        cpu_gen = torch.Generator().manual_seed(99)
        self.src_ids = torch.randperm(NUM_BLOCKS, generator=cpu_gen)[:REQUEST_BLOCKS]
        self.dst_ids = torch.randperm(NUM_BLOCKS, generator=cpu_gen)[:REQUEST_BLOCKS]
        self.chunk = torch.empty(kvlink.packed_nbytes(self.src, NUM_TOKENS), dtype=torch.uint8, device="cuda")
        self.payload_bytes = self.chunk.numel() - kvlink.HEADER_BYTES


@pytest.fixture(scope="module")
def w1():
    return W1()


def report(benchmark, record, case, nbytes, timing, verified, target=None):
    gbps = nbytes / (timing.median_us * 1e-6) / 1e9
    vs_copy = gbps / BASELINES["copy"] if "copy" in BASELINES else float("nan")
    benchmark.extra_info.update(case=case, bytes=nbytes, time_us=timing.median_us, GBps=gbps,
                                host_us=timing.host_median_us, vs_copy=vs_copy, verified=verified,
                                device=torch.cuda.get_device_name())
    record(case=case, bytes=nbytes, time_us=timing.median_us, GBps=gbps, vs_copy=vs_copy,
           host_us=timing.host_median_us, verified=verified, target=target)
    return gbps


def run_timed(benchmark, fn, iters=ITERS):
    return benchmark.pedantic(lambda: time_gpu(fn, iters=iters, warmup=5), rounds=1, iterations=1)


def test_device_to_device_copy(benchmark, record, w1):
    """The ceiling: one contiguous copy of the request's bytes."""
    src = torch.empty(w1.payload_bytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    timing = run_timed(benchmark, lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    BASELINES["copy"] = report(benchmark, record, "d2d copy (contiguous)", 2 * w1.payload_bytes, timing, True)


def test_torch_index_select_per_layer(benchmark, record, w1):
    """The baseline: one index_select launch per layer gathering the request's blocks."""
    idx = w1.src_ids.cuda()
    # the payload order for whole blocks is exactly index_select's output order: [layer][kv][block][token][head][dim]
    out = w1.chunk[kvlink.HEADER_BYTES:].view(torch.bfloat16).view(LAYERS, 2, REQUEST_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)

    def gather():
        for layer in range(LAYERS):
            torch.index_select(w1.src_engine[layer], 1, idx, out=out[layer])

    timing = run_timed(benchmark, gather)
    expected = torch.empty_like(w1.chunk)
    kvlink.pack(w1.src, w1.src_ids, NUM_TOKENS, expected, backend="torch")
    verified = torch.equal(w1.chunk[kvlink.HEADER_BYTES:], expected[kvlink.HEADER_BYTES:])
    BASELINES["index_select"] = report(benchmark, record, "torch index_select per layer", 2 * w1.payload_bytes,
                                       timing, verified)
    assert verified, "index_select baseline gathered wrong bytes"


def test_kvlink_pack(benchmark, record, w1):
    w1.chunk.fill_(0xA5)
    timing = run_timed(benchmark, lambda: kvlink.pack(w1.src, w1.src_ids, NUM_TOKENS, w1.chunk, backend="cuda"))
    expected = torch.empty_like(w1.chunk)
    kvlink.pack(w1.src, w1.src_ids, NUM_TOKENS, expected, backend="torch")
    verified = torch.equal(w1.chunk, expected)
    gbps = report(benchmark, record, "kvlink pack", 2 * w1.payload_bytes, timing, verified,
                  target="0.90 x copy, 2.5 x index_select")
    BASELINES["pack"] = gbps
    assert verified, "kvlink pack wrote wrong bytes"


def test_kvlink_unpack(benchmark, record, w1):
    kvlink.pack(w1.src, w1.src_ids, NUM_TOKENS, w1.chunk, backend="cuda")
    timing = run_timed(benchmark, lambda: kvlink.unpack(w1.dst, w1.dst_ids, NUM_TOKENS, w1.chunk, backend="cuda"))
    status = kvlink.unpack(w1.dst, w1.dst_ids, NUM_TOKENS, w1.chunk, backend="cuda")
    kvlink.check_status(status)
    # every written byte: packing the destination's blocks back must give the same chunk
    repacked = torch.empty_like(w1.chunk)
    kvlink.pack(w1.dst, w1.dst_ids, NUM_TOKENS, repacked, backend="torch")
    verified = torch.equal(repacked[kvlink.HEADER_BYTES:], w1.chunk[kvlink.HEADER_BYTES:])
    report(benchmark, record, "kvlink unpack", 2 * w1.payload_bytes, timing, verified,
           target="0.90 x copy, 2.5 x index_select")
    assert verified, "kvlink unpack wrote wrong bytes"


@pytest.mark.parametrize("kind", ["pack", "unpack"])
def test_one_block_all_layers(benchmark, record, w1, kind):
    """Latency floor: one 16-token block of all 32 layers (2 MiB), target <= 10 us of GPU time."""
    ids = w1.src_ids[:1]
    chunk = torch.empty(kvlink.packed_nbytes(w1.src, BLOCK_SIZE), dtype=torch.uint8, device="cuda")
    kvlink.pack(w1.src, ids, BLOCK_SIZE, chunk, backend="cuda")
    if kind == "pack":
        fn = lambda: kvlink.pack(w1.src, ids, BLOCK_SIZE, chunk, backend="cuda")  # noqa: E731
    else:
        fn = lambda: kvlink.unpack(w1.dst, w1.dst_ids[:1], BLOCK_SIZE, chunk, backend="cuda")  # noqa: E731
    timing = run_timed(benchmark, fn, iters=max(ITERS, 200))
    expected = torch.empty_like(chunk)
    if kind == "pack":
        kvlink.pack(w1.src, ids, BLOCK_SIZE, expected, backend="torch")
        verified = torch.equal(chunk, expected)
    else:
        kvlink.check_status(kvlink.unpack(w1.dst, w1.dst_ids[:1], BLOCK_SIZE, chunk, backend="cuda"))
        kvlink.pack(w1.dst, w1.dst_ids[:1], BLOCK_SIZE, expected, backend="torch")
        verified = torch.equal(chunk[64:], expected[64:])
    report(benchmark, record, f"kvlink {kind}, 1 block x 32 layers", 2 * (chunk.numel() - 64), timing, verified,
           target="<= 10 us")
    assert verified
