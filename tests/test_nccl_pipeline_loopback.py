"""The NCCL transport's pipeline over the stand-in wire, on one GPU (skipped without a GPU and CuPy).

Two endpoints of this process share one GPU and link with ``transport="nccl"`` and
``nccl_wire="loopback"``: everything of the NCCL transport runs (staging slots, the three
streams and their events, the receives posted at once, refused chunks, checksums, fp8) except
the crossing itself, which the stand-in does with one device copy per send/recv pair, ordered
as NCCL orders them (kvlink/transports/loopback_wire.py). Until a second GPU is lent these are
the pipeline's correctness tests: byte-exact, layer-wise, fp8, checksums and cancels.
"""

import time

import pytest
import torch

import kvlink
from kvlink import EndpointConfig, presets
from kvlink.transports import loopback_wire
from markers import requires_gpu

pytestmark = requires_gpu

SRC_PRESET, DST_PRESET = "vllm_flash_attn_nhd", "flashinfer_hnd"
SRC_SHAPE = dict(num_layers=4, num_blocks=256, block_size=16, num_heads=4, head_dim=128)
DST_SHAPE = dict(num_layers=4, num_blocks=700, block_size=8, num_heads=4, head_dim=128)
CHUNK = 256 * 1024  # small slots: a request is many chunks, and 3 slots are reused many times over
BOUND = 20.0


@pytest.fixture(autouse=True)
def torch_kernels_loaded():
    """Load the torch kernels these tests run on the GPU before any pull is queued.

    Under lazy module loading a kernel's first launch may synchronize the context to load it;
    with a stand-in receive waiting for a send that this process's progress thread has still to
    queue, and the launching thread holding the GIL that thread needs, it would never return
    (kvlink/transports/loopback_wire.py). kvlink's own kernels are loaded when an endpoint starts.
    """
    for dtype in (torch.uint8, torch.int16, torch.bfloat16, torch.float16):
        values = torch.zeros(16, 4, dtype=dtype, device="cuda:0")
        values.fill_(1)
        mask = torch.ones(16, dtype=torch.bool, device="cuda:0")
        mask[2:4] = False
        assert torch.equal(values.clone()[mask], values[mask])
    torch.cuda.synchronize()


def config(**settings) -> EndpointConfig:
    return EndpointConfig(transport="nccl", nccl_wire="loopback", chunk_bytes=CHUNK, timeout=BOUND, **settings)


def packed(layout, ids, num_tokens, **box):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens, **box), dtype=torch.uint8, device=layout.device)
    kvlink.pack(layout, ids, num_tokens, chunk, **box)
    return chunk[kvlink.HEADER_BYTES:]


@pytest.fixture
def pair(generator):
    """(prefill endpoint, decode endpoint, peer name, src layout, dst engine, dst layout) on cuda:0."""
    from engine_access import random_fill
    torch.cuda.set_device(0)
    _, src = presets.allocate(SRC_PRESET, fill=random_fill(generator), device="cuda:0", **SRC_SHAPE)
    engine, dst = presets.allocate(DST_PRESET, fill=random_fill(generator), device="cuda:0", **DST_SHAPE)
    before = loopback_wire.STATS["size_mismatches"]
    with kvlink.Endpoint(src, name="prefill", config=config()) as prefill, \
            kvlink.Endpoint(dst, name="decode", listen=None, config=config()) as decode:
        peer = decode.connect(prefill.address)
        link = decode.links()[0]
        assert (link["transport"], link["nccl_bytes"]) == ("nccl", 0) and link["staging_bytes"] > 0
        yield prefill, decode, peer, src, engine, dst
    assert loopback_wire.STATS["size_mismatches"] == before, "a send and its recv differed in size"


def test_auto_never_picks_the_stand_in_and_nccl_needs_it_named(generator):
    _, layout = presets.allocate(SRC_PRESET, device="cuda:0", **SRC_SHAPE)
    with kvlink.Endpoint(layout, listen=None, config=EndpointConfig(nccl_wire="loopback")) as endpoint:
        assert "nccl" not in endpoint.offered_transports()


def test_a_large_pull_through_the_pipeline_is_byte_exact(pair, generator):
    prefill, decode, peer, src, _, dst = pair
    copied = loopback_wire.STATS["copied_bytes"]
    num_tokens = 16 * 200 + 5
    src_ids = torch.randperm(src.num_blocks, generator=generator)[:201]
    dst_ids = torch.randperm(dst.num_blocks, generator=generator)[:-(-num_tokens // 8)]
    handle = decode.pull(peer, "big", src_ids, dst_ids, num_tokens)
    assert handle.stats.chunks > 3 * 3, "the slots must be reused several times"
    handle.current_stream_wait()  # the engine's way: its stream waits, the host does not
    assert torch.equal(packed(dst, dst_ids, num_tokens), packed(src, src_ids, num_tokens))
    handle.wait(BOUND)
    assert handle.dst_state == "complete"
    assert loopback_wire.STATS["copied_bytes"] - copied >= handle.stats.wire_bytes  # the stand-in carried them


def test_many_concurrent_pulls_of_random_sizes(pair, generator):
    prefill, decode, peer, src, _, dst = pair
    dst_free = torch.randperm(dst.num_blocks, generator=generator).tolist()
    pulls = []
    for i in range(32):
        num_tokens = int(torch.randint(1, 150, (1,), generator=generator))  # 32 x <= 19 blocks of 700
        src_ids = torch.randperm(src.num_blocks, generator=generator)[: -(-num_tokens // 16)].tolist()
        dst_ids = [dst_free.pop() for _ in range(-(-num_tokens // 8))]
        pulls.append((decode.pull(peer, f"r{i}", src_ids, dst_ids, num_tokens), src_ids, dst_ids, num_tokens))
    for handle, *_ in pulls:  # every pull lands before this thread runs a kernel of its own
        handle.wait(BOUND)
    for handle, src_ids, dst_ids, num_tokens in pulls:
        assert torch.equal(packed(dst, dst_ids, num_tokens), packed(src, src_ids, num_tokens)), handle.request
    deadline = time.monotonic() + BOUND
    confirmed = []
    while len(confirmed) < len(pulls) and time.monotonic() < deadline:
        confirmed += prefill.finished_sends()
        time.sleep(0.01)
    assert sorted(confirmed) == sorted((f"r{i}", True) for i in range(32))


def test_layerwise_pulls_wait_for_each_layer_and_their_events_order_the_stream(pair):
    prefill, decode, peer, src, _, dst = pair
    src_ids, dst_ids, num_tokens = [7, 8, 9, 10], list(range(300, 308)), 61
    handle = decode.pull(peer, "layered", src_ids, dst_ids, num_tokens, layerwise=True)
    time.sleep(0.2)
    assert not handle.done(), "finished before the prefill side said any layer was ready"
    for layer in (0, 1):
        prefill.layer_ready("layered", layer)
    handle.layer_event(1).synchronize()
    assert not handle.done()
    for layer in (2, 3):
        prefill.layer_ready("layered", layer)
    for layer in range(dst.num_layers):
        torch.cuda.current_stream().wait_event(handle.layer_event(layer))
    handle.wait(BOUND)
    assert torch.equal(packed(dst, dst_ids, num_tokens), packed(src, src_ids, num_tokens))


def test_head_and_layer_ranges(pair, generator):
    prefill, decode, peer, src, _, dst = pair
    src_ids, dst_ids, num_tokens = [40, 41, 42], list(range(500, 506)), 45
    decode.pull(peer, "box", src_ids, dst_ids, num_tokens, layers=(1, 3), src_heads=(2, 4), dst_heads=(0, 2)).wait(BOUND)
    assert torch.equal(packed(dst, dst_ids, num_tokens, layers=(1, 3), heads=(0, 2)),
                       packed(src, src_ids, num_tokens, layers=(1, 3), heads=(2, 4)))


@pytest.mark.parametrize("checksum", [False, True])
def test_fp8_on_the_wire_lands_what_pack_and_unpack_produce(generator, checksum):
    from test_fp8_wire import finite_fill
    torch.cuda.set_device(0)
    _, src = presets.allocate(SRC_PRESET, fill=finite_fill(generator), device="cuda:0", **SRC_SHAPE)
    _, dst = presets.allocate(DST_PRESET, device="cuda:0", **DST_SHAPE)
    _, expected = presets.allocate(DST_PRESET, device="cuda:0", **DST_SHAPE)
    with kvlink.Endpoint(src, name="prefill", config=config()) as prefill, \
            kvlink.Endpoint(dst, name="decode", listen=None, config=config(wire_dtype="fp8", checksum=checksum)) as decode:
        peer = decode.connect(prefill.address)
        src_ids, dst_ids, num_tokens = list(range(20, 120)), list(range(0, 199)), 1590  # 100 x 16, 199 x 8 tokens
        handle = decode.pull(peer, "fp8", src_ids, dst_ids, num_tokens)
        handle.wait(BOUND)
        assert handle.stats.wire_bytes < handle.stats.payload_bytes and handle.stats.chunks > 3
    chunk = torch.empty(kvlink.packed_nbytes(src, num_tokens, wire_dtype="fp8"), dtype=torch.uint8, device="cuda:0")
    kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype="fp8")
    kvlink.unpack(expected, dst_ids, num_tokens, chunk, wire_dtype="fp8")
    assert torch.equal(packed(dst, dst_ids, num_tokens), packed(expected, dst_ids, num_tokens))


def test_checksummed_pulls_are_byte_exact(generator):
    from engine_access import random_fill
    torch.cuda.set_device(0)
    _, src = presets.allocate(SRC_PRESET, fill=random_fill(generator), device="cuda:0", **SRC_SHAPE)
    _, dst = presets.allocate(DST_PRESET, fill=random_fill(generator), device="cuda:0", **DST_SHAPE)
    with kvlink.Endpoint(src, name="prefill", config=config()) as prefill, \
            kvlink.Endpoint(dst, name="decode", listen=None, config=config(checksum=True)) as decode:
        peer = decode.connect(prefill.address)
        src_ids, dst_ids, num_tokens = list(range(200)), list(range(50, 449)), 3190  # 200 x 16, 399 x 8 tokens
        handle = decode.pull(peer, "checked", src_ids, dst_ids, num_tokens)
        handle.wait(BOUND)
        assert handle.stats.chunks > 3
        assert torch.equal(packed(dst, dst_ids, num_tokens), packed(src, src_ids, num_tokens))


def held_open(prefill, decode, peer, request):
    """A layer-wise pull of 100 blocks whose first two layers landed; the rest wait."""
    handle = decode.pull(peer, request, list(range(100)), list(range(100, 300)), 1600, layerwise=True)
    for layer in (0, 1):
        prefill.layer_ready(request, layer)
    handle.layer_event(1).synchronize()
    assert not handle.done()
    return handle


def small_pull_works(decode, peer, src, dst, request):
    decode.pull(peer, request, [5, 6, 7], [600, 601, 602, 603, 604], 40).wait(BOUND)
    assert torch.equal(packed(dst, [600, 601, 602, 603, 604], 40), packed(src, [5, 6, 7], 40))


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_a_cancel_mid_pull_keeps_the_chunk_stream_in_step(pair, side):
    """The prefill side sends the cancelled pull's remaining chunks empty (its receives are posted
    already); nothing of them lands, and the next pull on the link is byte-exact."""
    prefill, decode, peer, src, engine, dst = pair
    before = [t.clone() for t in engine]
    handle = held_open(prefill, decode, peer, f"cancel-{side}")
    if side == "decode":
        assert handle.cancel(timeout=BOUND) is True
        error = kvlink.TransferCancelled
    else:
        assert prefill.cancel_serving(f"cancel-{side}") == 1
        error = kvlink.TransferRefused
    with pytest.raises(error, match=f"request 'cancel-{side}' from prefill: .*cancelled by the {side} side"):
        handle.wait(BOUND)
    assert handle.dst_state == "invalid"
    for layer in (2, 3):  # the layers come after all: the serve goes on, with empty chunks
        prefill.layer_ready(f"cancel-{side}", layer)
    torch.cuda.synchronize()
    untouched = torch.ones(dst.num_blocks, dtype=torch.bool, device="cuda:0")
    untouched[100:300] = False
    for now, then in zip(engine, before):
        assert torch.equal(now[untouched].view(torch.int16), then[untouched].view(torch.int16))
    small_pull_works(decode, peer, src, dst, f"after-cancel-{side}")


def test_a_refused_pull_sends_empty_chunks_and_the_link_goes_on(pair):
    """The decode side's view of the prefill cache is stale: the prefill side refuses the pull, sends
    its chunks empty, and nothing lands."""
    prefill, decode, peer, src, engine, dst = pair
    before = [t.clone() for t in engine]
    decode.set_remote_view(peer, num_blocks=10_000)
    handle = decode.pull(peer, "stale", [0, 9000] + list(range(1, 60)), list(range(0, 122)), 16 * 61)
    with pytest.raises(kvlink.TransferRefused, match=r"request 'stale' from prefill: .*9000 is out of range"):
        handle.wait(BOUND)
    assert handle.dst_state == "untouched"
    torch.cuda.synchronize()
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(engine, before))
    small_pull_works(decode, peer, src, dst, "after-refusal")


def test_a_closed_prefill_fails_the_pull_and_leaves_no_stream_waiting(generator):
    """The prefill endpoint closes with a pull held open: the decode side's pull fails naming it,
    the stand-in wire releases every stream waiting on it (as NCCL's abort does), and the GPU
    is free: a synchronize returns."""
    from engine_access import random_fill
    torch.cuda.set_device(0)
    _, src = presets.allocate(SRC_PRESET, fill=random_fill(generator), device="cuda:0", **SRC_SHAPE)
    _, dst = presets.allocate(DST_PRESET, fill=random_fill(generator), device="cuda:0", **DST_SHAPE)
    with kvlink.Endpoint(dst, name="decode", listen=None, config=config(heartbeat=0.1)) as decode:
        prefill = kvlink.Endpoint(src, name="prefill", config=config())
        peer = decode.connect(prefill.address)
        handle = held_open(prefill, decode, peer, "orphaned")
        prefill.close()
        with pytest.raises(kvlink.LinkDown, match="request 'orphaned' from prefill: link failed: peer closed"):
            handle.wait(BOUND)
        torch.cuda.synchronize()
        assert handle.dst_state == "invalid"


def test_pull_after_the_engines_stream_and_current_stream_wait(pair):
    """pull(stream=s): nothing is written before s's work so far (here: a slow fill of the
    destination blocks); current_stream_wait() orders the engine's stream after the pull."""
    prefill, decode, peer, src, engine, dst = pair
    dst_ids, src_ids, num_tokens = list(range(640, 650)), [50, 51, 52, 53, 54], 80
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # ~0.1 s of GPU time before the fill
        for tensor in engine:
            tensor.view(torch.uint8).fill_(0x11)
    handle = decode.pull(peer, "after-fill", src_ids, dst_ids, num_tokens, stream=stream)
    handle.current_stream_wait()
    got = packed(dst, dst_ids, num_tokens)  # on the current stream: after the pull
    assert torch.equal(got, packed(src, src_ids, num_tokens)), "the pull's writes went before the fill's"
    handle.wait(BOUND)
