"""End-to-end transfers over CUDA IPC between two processes, byte-exact (skipped without a GPU).

With two GPUs the prefill process holds GPU 0 and the decode side GPU 1, so the copy kernel
reads across NVLink; with one GPU both processes share it (CUDA IPC still maps the memory from
the other process). The shared cases (transfer_cases.py) run here too.
"""

import time

import pytest
import torch

import kvlink
from kvlink import ipc
from peer_process import PrefillProcess, build_cache
from transfer_cases import *  # noqa: F401,F403  (the shared test cases)
from transfer_cases import DST_PRESET, packed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or ipc.disabled_reason() is not None,
                                reason=f"needs a GPU and CUDA IPC ({ipc.disabled_reason()})")

SEED = 9876
SRC_SHAPE = dict(num_layers=4, num_blocks=256, block_size=16, num_heads=4, head_dim=128)
DST_SHAPE = dict(num_layers=4, num_blocks=700, block_size=8, num_heads=4, head_dim=128)


def decode_device() -> str:
    return "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"


@pytest.fixture(scope="module")
def prefill():
    process = PrefillProcess("vllm_flash_attn_nhd", SEED, SRC_SHAPE, device="cuda:0", timeout=20)
    process.decode_device = decode_device()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mirror():
    return build_cache("vllm_flash_attn_nhd", SEED, SRC_SHAPE, decode_device())[1]


@pytest.fixture
def decode(prefill, generator):
    from engine_access import random_fill
    device = decode_device()
    torch.cuda.set_device(device)
    engine, layout = kvlink.presets.allocate(DST_PRESET, fill=random_fill(generator), device=device, **DST_SHAPE)
    with kvlink.Endpoint(layout, name="decode", listen=None, timeout=20) as endpoint:
        peer = endpoint.connect(prefill.address)
        assert endpoint.links()[0]["transport"] == "ipc"
        assert endpoint.links()[0]["nccl_bytes"] == endpoint.links()[0]["staging_bytes"] == 0
        yield endpoint, peer, engine, layout


def test_the_copy_grid_follows_where_the_source_lies(prefill, decode, generator):
    """Reads of another GPU's memory take a grid of IPC_CROSS_GPU_CTAS blocks; on one GPU one
    block per tile (0); a configured bound wins either way."""
    from kvlink.config import IPC_CROSS_GPU_CTAS
    endpoint, *_ = decode
    expected = IPC_CROSS_GPU_CTAS if decode_device() != "cuda:0" else 0
    assert endpoint.links()[0]["copy_ctas"] == expected
    _, layout = kvlink.presets.allocate(DST_PRESET, device=decode_device(), **DST_SHAPE)
    with kvlink.Endpoint(layout, name="decode-132", listen=None, timeout=20, ipc_max_ctas=132) as bounded:
        bounded.connect(prefill.address)
        assert bounded.links()[0]["copy_ctas"] == 132


def test_pooled_completion_events_are_reused_and_each_orders_its_own_pull(prefill, mirror, decode, generator):
    """A plain pull completes on a pooled driver event: handed back when its handle goes, taken by
    the next pull; its torch twin (``event``) and current_stream_wait() order the engine's stream
    after that pull's copy, each time, with fresh random blocks."""
    from kvlink.cuda_driver import CompletionEvent
    endpoint, peer, _, layout = decode
    taken = set()
    for i in range(12):
        num_tokens = int(torch.randint(1, 600, (1,), generator=generator))
        src = torch.randperm(mirror.num_blocks, generator=generator)[:-(-num_tokens // 16)]
        dst = torch.randperm(layout.num_blocks, generator=generator)[:-(-num_tokens // 8)]
        handle = endpoint.pull(peer, f"pooled-{i}", src, dst, num_tokens)
        assert isinstance(handle._event, CompletionEvent)
        taken.add(handle._event.handle)
        if i % 2:
            torch.cuda.current_stream().wait_event(handle.event)
            assert isinstance(handle.event, torch.cuda.Event)
        else:
            handle.current_stream_wait()
        assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens)), i
        assert handle.wait(30).gpu_idle()
        del handle  # its event goes back to the pool
    assert len(taken) < 12, "no event was reused"


def test_large_request_is_one_copy_kernel(prefill, mirror, decode, generator):
    """Block size 16 -> 8 and NHD -> HND in the same kernel; the engine orders on the event."""
    endpoint, peer, _, layout = decode
    num_tokens = 16 * 200 + 5
    src = torch.randperm(mirror.num_blocks, generator=generator)[:201]
    dst = torch.randperm(layout.num_blocks, generator=generator)[:-(-num_tokens // 8)]
    handle = endpoint.pull(peer, "big", src, dst, num_tokens)
    assert handle.stats.chunks == 1
    torch.cuda.current_stream().wait_event(handle.event)
    assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))
    handle.wait(30)


def test_head_ranges_and_layer_ranges(prefill, decode, generator):
    """Source heads 2..4 into destination heads 0..2 of layers 1..3; nothing else is written."""
    from engine_access import snapshot
    from roundtrip import Cache, capture_rows, verify_unpacked
    endpoint, peer, engine, layout = decode
    src_cache = Cache("vllm_flash_attn_nhd", *build_cache("vllm_flash_attn_nhd", SEED, SRC_SHAPE, decode_device()))
    dst_cache = Cache(DST_PRESET, engine, layout)
    num_tokens, layers, tokens = 45, (1, 3), (0, 45)
    src = torch.randperm(SRC_SHAPE["num_blocks"], generator=generator)[:3]
    dst = torch.randperm(layout.num_blocks, generator=generator)[:6]
    before = snapshot(DST_PRESET, engine)
    saved = capture_rows(dst_cache, dst, layers=layers, tokens=tokens, dst_heads=slice(0, 2))
    endpoint.pull(peer, "heads", src, dst, num_tokens, layers=layers, src_heads=(2, 4), dst_heads=(0, 2)).wait(20)
    verify_unpacked(src_cache, src, dst_cache, dst, before, saved, layers=layers, tokens=tokens,
                    src_heads=slice(2, 4), dst_heads=slice(0, 2))


def test_layer_counters_gate_each_layer_on_the_gpu(prefill, mirror, decode, generator):
    """A layer-wise pull copies layer l only after the prefill's stream advanced the counter past l."""
    endpoint, peer, _, layout = decode
    src, dst, num_tokens = [11, 12, 13], list(range(400, 406)), 44
    handle = endpoint.pull(peer, "gated", src, dst, num_tokens, layerwise=True)
    time.sleep(0.2)
    assert not handle.layer_event(0).query(), "layer 0 copied before the prefill said it was ready"
    prefill.call("layer_ready", "gated", [0, 1])
    handle.layer_event(1).synchronize()
    assert not handle.layer_event(2).query()
    prefill.call("layer_ready", "gated", [2, 3])
    handle.wait(10)
    assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))


def test_plain_pulls_do_not_wait_behind_a_layerwise_one(prefill, mirror, decode, generator):
    endpoint, peer, _, layout = decode
    waiting = endpoint.pull(peer, "slow-layers", [20], [500, 501], 16, layerwise=True)
    quick = endpoint.pull(peer, "quick", [21, 22], [510, 511, 512, 513], 32)
    quick.wait(10)
    assert not waiting.done()
    prefill.call("layer_ready", "slow-layers", [0, 1, 2, 3])
    waiting.wait(10)
    assert torch.equal(packed(layout, [510, 511, 512, 513], 32), packed(mirror, [21, 22], 32))
    assert torch.equal(packed(layout, [500, 501], 16), packed(mirror, [20], 16))


def test_layerwise_pull_that_never_gets_its_layers_fails_and_frees_the_stream(prefill, decode):
    endpoint, peer, _, layout = decode
    endpoint.timeout = 1.0
    handle = endpoint.pull(peer, "abandoned", [30], [600, 601], 16, layerwise=True)
    with pytest.raises(kvlink.TransferError, match=r"request 'abandoned' from prefill: layers not all ready"):
        handle.wait(10)
    endpoint.timeout = 20
    # the layer stream moves again: a later layer-wise pull completes
    later = endpoint.pull(peer, "after-abandoned", [31], [602, 603], 16, layerwise=True)
    prefill.call("layer_ready", "after-abandoned", [0, 1, 2, 3])
    later.wait(10)


def test_two_endpoints_in_one_process_share_addresses(generator):
    """In one process there is nothing to map: the link uses the prefill's addresses directly."""
    from engine_access import random_fill
    _, src_layout = kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), device="cuda:0",
                                            **SRC_SHAPE)
    device = decode_device()
    _, dst_layout = kvlink.presets.allocate("vllm_2026_lhnbc", fill=random_fill(generator), device=device,
                                            **dict(SRC_SHAPE, num_blocks=300))
    with kvlink.Endpoint(src_layout, name="p") as prefill_side, \
            kvlink.Endpoint(dst_layout, name="d", listen=None) as decode_side:
        peer = decode_side.connect(prefill_side.address)
        assert decode_side.links()[0]["transport"] == "ipc"
        src, dst = [3, 1, 4, 15, 9], [299, 0, 27, 18, 28]
        decode_side.pull(peer, "local", src, dst, 70).wait(10)
        assert torch.equal(packed(dst_layout, dst, 70), packed(src_layout, src, 70).to(device).cpu())
        deadline = time.time() + 5
        while not (sends := prefill_side.finished_sends()) and time.time() < deadline:
            time.sleep(0.01)
        assert sends == [("local", True)]


def test_ipc_can_be_turned_off(prefill, generator, monkeypatch):
    monkeypatch.setenv("KVLINK_DISABLE_IPC", "1")
    _, layout = kvlink.presets.allocate(DST_PRESET, device=decode_device(), **DST_SHAPE)
    with kvlink.Endpoint(layout, name="decode-no-ipc", listen=None, timeout=20) as endpoint:
        assert endpoint.ipc_unavailable == "KVLINK_DISABLE_IPC=1"
        endpoint.connect(prefill.address)
        assert endpoint.links()[0]["transport"] != "ipc"
    with pytest.raises(ValueError, match="transport='ipc' is unavailable: KVLINK_DISABLE_IPC=1"):
        kvlink.Endpoint(layout, listen=None, transport="ipc")


def test_layers_ready_out_of_order_are_signalled_in_order(prefill, mirror, decode, generator):
    """Layer 3 first: nothing may be copied until layers 0..2 are ready too (the counter only moves in order)."""
    endpoint, peer, _, layout = decode
    src, dst, num_tokens = [40, 41], list(range(640, 644)), 30
    handle = endpoint.pull(peer, "reversed", src, dst, num_tokens, layerwise=True)
    time.sleep(0.1)  # the PULL is at the prefill side: its layer_ready() may signal directly
    prefill.call("layer_ready", "reversed", [3, 2])
    time.sleep(0.2)
    assert not handle.layer_event(0).query() and not handle.layer_event(3).query()
    prefill.call("layer_ready", "reversed", [1, 0])
    handle.wait(10)
    assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))


def test_layerwise_pulls_past_the_gpu_queue_bound_wait_on_the_host(prefill, mirror, generator):
    """A link queues at most ipc_queued_layers layer copies on the GPU (work waiting there fills the
    driver's launch queue, and a full one blocks the caller's next launch): later layer-wise pulls
    are deferred, a cancelled deferred one leaves its blocks untouched, and the rest land in order
    once their layers are ready."""
    from engine_access import random_fill
    device = decode_device()
    torch.cuda.set_device(device)
    engine, layout = kvlink.presets.allocate(DST_PRESET, fill=random_fill(generator), device=device, **DST_SHAPE)
    config = kvlink.EndpointConfig(timeout=20, ipc_queued_layers=8)  # two 4-layer pulls on the GPU
    with kvlink.Endpoint(layout, name="decode-bounded", listen=None, config=config) as endpoint:
        peer = endpoint.connect(prefill.address)
        pulls = []
        src_choice = torch.randperm(SRC_SHAPE["num_blocks"], generator=generator)[:30].tolist()
        dst_free = torch.randperm(layout.num_blocks, generator=generator).tolist()
        for i, src in enumerate(src_choice):
            dst = [dst_free.pop(), dst_free.pop()]
            pulls.append((endpoint.pull(peer, f"bounded-{i}", [src], dst, 16, layerwise=True), [src], dst))
        deferred = endpoint.stats()["transports"]["ipc"]["layerwise_deferred"]
        assert deferred == len(pulls) - 2, f"{deferred} of {len(pulls)} deferred"
        cancelled, cancelled_src, cancelled_dst = pulls.pop(20)
        before = packed(layout, cancelled_dst, 16)
        assert cancelled.cancel(timeout=10) is True
        assert cancelled.dst_state == "untouched"
        for handle, _, _ in pulls:
            prefill.call("layer_ready", handle.request, [0, 1, 2, 3])
        for handle, src, dst in pulls:
            handle.wait(20)
            assert torch.equal(packed(layout, dst, 16), packed(mirror, src, 16)), handle.request
            torch.cuda.current_stream().wait_event(handle.layer_event(3))  # events exist once queued
        torch.cuda.synchronize()
        assert torch.equal(packed(layout, cancelled_dst, 16), before), "a cancelled deferred pull wrote its blocks"
