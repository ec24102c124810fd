"""End-to-end transfers between two GPUs over NCCL, byte-exact (skipped without two GPUs).

Run a second time with ``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1`` to exercise NCCL's network
(socket) transport, the cross-host path, on one host.
"""

import pytest
import torch

import kvlink
from kvlink import nccl
from peer_process import PrefillProcess, build_cache
from transfer_cases import *  # noqa: F401,F403  (the shared test cases)
from transfer_cases import DST_PRESET, packed

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and nccl.available()),
                                reason="needs two CUDA GPUs and CuPy's NCCL")

SEED = 4321
SRC_SHAPE = dict(num_layers=4, num_blocks=256, block_size=16, num_heads=4, head_dim=128)
DST_SHAPE = dict(num_layers=4, num_blocks=700, block_size=8, num_heads=4, head_dim=128)


@pytest.fixture(scope="module")
def prefill():
    process = PrefillProcess("vllm_flash_attn_nhd", SEED, SRC_SHAPE, device="cuda:0", chunk_bytes=1 << 20, timeout=20,
                             transport="nccl")
    process.decode_device = "cuda:1"
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mirror():
    return build_cache("vllm_flash_attn_nhd", SEED, SRC_SHAPE, "cuda:1")[1]


@pytest.fixture
def decode(prefill, generator):
    from engine_access import random_fill
    torch.cuda.set_device(1)
    engine, layout = kvlink.presets.allocate(DST_PRESET, fill=random_fill(generator), device="cuda:1", **DST_SHAPE)
    with kvlink.Endpoint(layout, name="decode", listen=None, chunk_bytes=1 << 20, timeout=20,
                         transport="nccl") as endpoint:
        peer = endpoint.connect(prefill.address)
        assert endpoint.links()[0]["transport"] == "nccl"
        yield endpoint, peer, engine, layout


def test_large_request_through_the_pipeline(prefill, mirror, decode, generator):
    """Many chunks (1 MiB slots, 3 of them): pack, wire and unpack overlap; every byte lands."""
    endpoint, peer, _, layout = decode
    num_tokens = 16 * 200 + 5
    src = torch.randperm(mirror.num_blocks, generator=generator)[:201]
    dst = torch.randperm(layout.num_blocks, generator=generator)[:-(-num_tokens // 8)]
    handle = endpoint.pull(peer, "big", src, dst, num_tokens)
    assert handle.stats.chunks > 3
    # the engine's way: make its stream wait on the handle's event, no host wait
    torch.cuda.current_stream().wait_event(handle.event)
    assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))
    handle.wait(30)


def test_layer_events_order_the_engine_stream(prefill, mirror, decode, generator):
    endpoint, peer, _, layout = decode
    src, dst, num_tokens = [7, 8, 9], list(range(300, 305)), 40
    handle = endpoint.pull(peer, "lw-events", src, dst, num_tokens, layerwise=True)
    prefill.call("layer_ready", "lw-events", [0, 1, 2, 3])
    for layer in range(layout.num_layers):
        torch.cuda.current_stream().wait_event(handle.layer_event(layer))
    handle.wait(30)
    assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))
