"""Soak: many random transfers (sizes, layouts, block sizes, boxes, concurrency), every byte verified.

On the CPU (CI) over the host transport; with GPUs over CUDA IPC and NCCL. KVLINK_SOAK_TRANSFERS
sets the count. The default, 10,000, takes 15-35 s on a 2-core CI machine, far inside the test
timeout; the test counts what it did and prints it, so a slower machine runs longer, never less.
"""

import os
import random
import time

import pytest
import torch

import kvlink
from kvlink import ipc, nccl, presets
from peer_process import PrefillProcess, build_cache

SEED = 4242
SRC_PRESET = "vllm_flash_attn_nhd"
SRC_SHAPE = dict(num_layers=3, num_blocks=400, block_size=16, num_heads=4, head_dim=32)
DST_PRESETS = [p for p in presets.PRESETS if p not in presets.MLA_PRESETS]
TRANSFERS = int(os.environ.get("KVLINK_SOAK_TRANSFERS", "10000"))


def packed(layout, ids, num_tokens, layers, heads):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens, layers=layers, heads=heads), dtype=torch.uint8,
                        device=layout.device)
    kvlink.pack(layout, ids, num_tokens, chunk, layers=layers, heads=heads)
    return chunk[kvlink.HEADER_BYTES:].cpu()


def soak(prefill_address, mirror, device: str, transport: str, rng: random.Random, transfers: int) -> dict:
    """Run ``transfers`` pulls from random decode caches; return counts by kind."""
    from engine_access import random_fill
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    decoders = []
    for preset in rng.sample(DST_PRESETS, 4):
        block_size = rng.choice([8, 16, 32])
        shape = dict(SRC_SHAPE, block_size=block_size, num_blocks=SRC_SHAPE["num_blocks"] * 16 // block_size)
        _, layout = presets.allocate(preset, fill=random_fill(generator), device=device, **shape)
        endpoint = kvlink.Endpoint(layout, name=f"soak-{preset}", listen=None, chunk_bytes=rng.choice([32, 256]) * 1024,
                                   timeout=20, transport=transport)
        decoders.append((endpoint, endpoint.connect(prefill_address)))
    counts = {"transfers": 0, "bytes": 0, "partial_boxes": 0, "max_in_flight": 0}
    try:
        while counts["transfers"] < transfers:
            endpoint, peer = rng.choice(decoders)
            layout = endpoint.layout
            in_flight = min(rng.choice([1, 1, 2, 4, 8, 16]), transfers - counts["transfers"])
            dst_free = torch.randperm(layout.num_blocks, generator=generator).tolist()
            requests = []
            for i in range(in_flight):
                num_tokens = rng.choice([1, 15, 16, 17, rng.randrange(1, 700)])
                src = torch.randperm(SRC_SHAPE["num_blocks"], generator=generator)[: -(-num_tokens // 16)]
                dst = [dst_free.pop() for _ in range(-(-num_tokens // layout.block_size))]
                layers, heads = None, None
                if rng.random() < 0.3:
                    start = rng.randrange(SRC_SHAPE["num_layers"])
                    layers = (start, rng.randrange(start + 1, SRC_SHAPE["num_layers"] + 1))
                    start = rng.randrange(SRC_SHAPE["num_heads"])
                    heads = (start, rng.randrange(start + 1, SRC_SHAPE["num_heads"] + 1))
                    counts["partial_boxes"] += 1
                handle = endpoint.pull(peer, f"soak-{counts['transfers'] + i}", src, dst, num_tokens, layers=layers,
                                       src_heads=heads, dst_heads=heads)
                requests.append((handle, src, dst, num_tokens, layers, heads))
            counts["max_in_flight"] = max(counts["max_in_flight"], in_flight)
            for handle, src, dst, num_tokens, layers, heads in requests:
                handle.wait(30)
                got = packed(layout, dst, num_tokens, layers, heads)
                want = packed(mirror, src, num_tokens, layers, heads)
                assert torch.equal(got, want), f"{handle.request} into {layout.name}: {(got != want).sum()} wrong bytes"
                counts["transfers"] += 1
                counts["bytes"] += handle.stats.payload_bytes
    finally:
        for endpoint, _ in decoders:
            endpoint.close()
    return counts


def test_soak_over_the_host_transport():
    prefill = PrefillProcess(SRC_PRESET, SEED, SRC_SHAPE, chunk_bytes=256 * 1024, timeout=20)
    try:
        mirror = build_cache(SRC_PRESET, SEED, SRC_SHAPE)[1]
        started = time.monotonic()
        counts = soak(prefill.address, mirror, "cpu", "host", random.Random(SEED), TRANSFERS)
        print(f"soak (host): {counts} in {time.monotonic() - started:.1f} s")
        assert counts["transfers"] == TRANSFERS and counts["partial_boxes"] > 0 and counts["max_in_flight"] == 16
    finally:
        prefill.stop()


@pytest.mark.parametrize("transport", ["auto", "nccl"])
def test_soak_on_gpus(transport):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if transport == "nccl" and not (torch.cuda.device_count() >= 2 and nccl.available()):
        pytest.skip("NCCL needs two GPUs and CuPy's NCCL")
    if transport == "auto" and ipc.disabled_reason() is not None:
        pytest.skip(f"CUDA IPC unavailable: {ipc.disabled_reason()}")
    device = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    torch.cuda.set_device(device)
    prefill = PrefillProcess(SRC_PRESET, SEED, SRC_SHAPE, device="cuda:0", chunk_bytes=256 * 1024, timeout=20,
                             transport=transport)
    try:
        mirror = build_cache(SRC_PRESET, SEED, SRC_SHAPE, device)[1]
        started = time.monotonic()
        counts = soak(prefill.address, mirror, device, transport, random.Random(SEED + 1), TRANSFERS)
        print(f"soak ({transport}): {counts} in {time.monotonic() - started:.1f} s")
        assert counts["transfers"] == TRANSFERS
    finally:
        prefill.stop()
