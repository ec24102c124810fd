"""Faults on GPU transports (CUDA IPC on one or two GPUs, NCCL on two): a prefill killed with
SIGKILL or stopped mid-transfer, cancels from either side, a restarted prefill. Skipped without
GPUs. Transfers are held open with layer-wise pulls (the prefill side announces only some layers),
so the fault always lands mid-transfer; afterwards this process's GPU must still work and later
pulls must succeed."""

import os
import signal
import time

import pytest
import torch

import kvlink
from kvlink import ipc, nccl
from peer_process import PrefillProcess, build_cache

PRESET = "vllm_flash_attn_nhd"
SEED = 99
SHAPE = dict(num_layers=4, num_blocks=256, block_size=16, num_heads=4, head_dim=128)
LINK = dict(chunk_bytes=1 << 20, timeout=2.0, heartbeat=0.2)
BOUND = 5.0


def transports():
    out = []
    if torch.cuda.is_available() and ipc.disabled_reason() is None:
        out.append("ipc")
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2 and nccl.available():
        out.append("nccl")
    return out or ["none"]


def decode_device():
    return "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"


@pytest.fixture(params=transports())
def transport(request):
    if request.param == "none":
        pytest.skip("needs a GPU with CUDA IPC, or two GPUs with NCCL")
    torch.cuda.set_device(decode_device())
    return request.param


@pytest.fixture
def decode(transport, generator):
    from engine_access import random_fill
    engine, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), device=decode_device(), **SHAPE)
    before = [t.clone() for t in engine]
    endpoint = kvlink.Endpoint(layout, name="decode", listen=None, transport=transport, **LINK)
    yield endpoint, engine, before
    endpoint.close()


def start_prefill(transport):
    return PrefillProcess(PRESET, SEED, SHAPE, device="cuda:0", transport=transport, **LINK)


def assert_untouched_outside(engine, before, dst_blocks):
    keep = torch.ones(SHAPE["num_blocks"], dtype=torch.bool, device=engine[0].device)
    keep[torch.as_tensor(dst_blocks, device=engine[0].device)] = False
    for layer, (now, then) in enumerate(zip(engine, before)):
        assert torch.equal(now[:, keep].view(torch.int16), then[:, keep].view(torch.int16)), \
            f"layer {layer}: a write landed outside the request's blocks"


def small_pull_works(endpoint, peer):
    mirror = build_cache(PRESET, SEED, SHAPE, decode_device())[1]
    endpoint.pull(peer, f"after-{time.monotonic()}", [5, 6, 7], [250, 251, 252], 40).wait(10)
    got, want = (torch.empty(kvlink.packed_nbytes(mirror, 40), dtype=torch.uint8, device=decode_device())
                 for _ in range(2))
    kvlink.pack(endpoint.layout, [250, 251, 252], 40, got)
    kvlink.pack(mirror, [5, 6, 7], 40, want)
    assert torch.equal(got[64:], want[64:])
    torch.cuda.synchronize()  # this process's GPU context is healthy


def held_open_pull(endpoint, peer, prefill, request):
    """A layer-wise pull of 100 blocks whose first two layers have landed; the rest never will."""
    src, dst = list(range(100)), list(range(100, 200))
    handle = endpoint.pull(peer, request, src, dst, 1600, layerwise=True)
    prefill.call("layer_ready", request, [0, 1])
    handle.layer_event(1).synchronize()
    assert not handle.done()
    return handle, dst


def test_prefill_killed_mid_transfer_then_restarted(transport, decode):
    endpoint, engine, before = decode
    prefill = start_prefill(transport)
    try:
        peer = endpoint.connect(prefill.address)
        assert endpoint.links()[0]["transport"] == transport
        handle, dst = held_open_pull(endpoint, peer, prefill, "killed")
        os.kill(prefill.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        # whichever bound trips first: the link's heartbeat timeout or the layer-wise pull's own
        with pytest.raises(kvlink.TransferError,
                           match=r"request 'killed' from prefill: (link failed|layers not all ready within)"):
            handle.wait(10)
        assert time.monotonic() - killed <= BOUND and handle.dst_state == "invalid"
        torch.cuda.synchronize()
        assert_untouched_outside(engine, before, dst)
        restarted = start_prefill(transport)
        try:
            small_pull_works(endpoint, endpoint.connect(restarted.address))
        finally:
            restarted.stop()
    finally:
        prefill.stop()


def test_prefill_that_stops_answering(transport, decode):
    endpoint, engine, before = decode
    prefill = start_prefill(transport)
    try:
        peer = endpoint.connect(prefill.address)
        handle, dst = held_open_pull(endpoint, peer, prefill, "frozen")
        os.kill(prefill.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            with pytest.raises(kvlink.TransferError,
                               match=r"request 'frozen' from prefill: (link failed: no message|layers not all ready)"):
                handle.wait(10)
            assert time.monotonic() - stopped <= BOUND
        finally:
            os.kill(prefill.process.pid, signal.SIGCONT)
        torch.cuda.synchronize()
        assert_untouched_outside(engine, before, dst)
        time.sleep(0.5)
        small_pull_works(endpoint, endpoint.connect(prefill.address))
    finally:
        prefill.stop()


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_cancel_mid_transfer(transport, decode, side):
    endpoint, engine, before = decode
    prefill = start_prefill(transport)
    try:
        peer = endpoint.connect(prefill.address)
        handle, dst = held_open_pull(endpoint, peer, prefill, f"cancel-{side}")
        if side == "decode":
            assert handle.cancel(timeout=BOUND) is True
            match = "cancelled by the decode side"
        else:
            assert prefill.call("cancel", f"cancel-{side}") == 1
            match = "cancelled by the prefill side"
        with pytest.raises(kvlink.TransferError, match=match):
            handle.wait(BOUND)
        assert handle.dst_state == "invalid"
        torch.cuda.synchronize()
        assert_untouched_outside(engine, before, dst)
        small_pull_works(endpoint, peer)  # the same link moves on
    finally:
        prefill.stop()


def test_nccl_checksums_pass_clean_chunks(transport, generator):
    if transport != "nccl":
        pytest.skip("checksums travel on the NCCL and host transports")
    from engine_access import random_fill
    _, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), device=decode_device(), **SHAPE)
    prefill = start_prefill(transport)
    try:
        with kvlink.Endpoint(layout, name="decode", listen=None, transport=transport, checksum=True, **LINK) as endpoint:
            peer = endpoint.connect(prefill.address)
            mirror = build_cache(PRESET, SEED, SHAPE, decode_device())[1]
            handle = endpoint.pull(peer, "checked", list(range(200)), list(range(50, 250)), 3190)
            handle.wait(10)
            assert handle.stats.chunks > 3
            got, want = (torch.empty(kvlink.packed_nbytes(mirror, 3190), dtype=torch.uint8, device=decode_device())
                         for _ in range(2))
            kvlink.pack(layout, list(range(50, 250)), 3190, got)
            kvlink.pack(mirror, list(range(200)), 3190, want)
            assert torch.equal(got[64:], want[64:])
    finally:
        prefill.stop()


def test_decode_killed_mid_transfer(transport, generator):
    """The prefill side (this process) notices within the timeout, aborts what it served the dead
    peer (NCCL: its communicator), and a new decode process's pull succeeds."""
    from peer_process import DecodeProcess
    torch.cuda.set_device("cuda:0")
    _, layout = build_cache(PRESET, SEED, SHAPE, "cuda:0")
    with kvlink.Endpoint(layout, name="prefill", transport=transport, **LINK) as prefill:
        src, dst = list(range(100)), list(range(100, 200))
        doomed = DecodeProcess(PRESET, SEED + 1, SHAPE, prefill.address, (src, dst, 1600, True), device=decode_device(),
                               on_pulled=lambda: [prefill.layer_ready("doomed", layer) for layer in (0, 1)],
                               transport=transport, **LINK)
        assert doomed.started[0] == "started" and not doomed.started[2]
        os.kill(doomed.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not any(link["failed"] for link in prefill.links()):
            assert time.monotonic() - killed <= BOUND, f"the prefill side still serves a dead peer: {prefill.links()}"
            time.sleep(0.05)
        torch.cuda.synchronize()  # nothing of the dead link's is left hanging on this GPU
        survivor = DecodeProcess(PRESET, SEED + 2, SHAPE, prefill.address, ([1, 2], [3, 4], 20, False),
                                 device=decode_device(), transport=transport, **LINK)
        assert survivor.started[2] and survivor.started[3] is None, f"the later pull failed: {survivor.started}"
        survivor.process.kill()


def test_dropped_control_connection(transport, decode):
    from test_faults import Proxy
    endpoint, engine, before = decode
    prefill = start_prefill(transport)
    try:
        proxy = Proxy(prefill.address)
        peer = endpoint.connect(proxy.address)
        handle, dst = held_open_pull(endpoint, peer, prefill, "cut")
        proxy.cut()
        cut = time.monotonic()
        with pytest.raises(kvlink.TransferError, match=r"request 'cut' from prefill: (link failed|layers not all ready)"):
            handle.wait(10)
        assert time.monotonic() - cut <= BOUND
        torch.cuda.synchronize()
        assert_untouched_outside(engine, before, dst)
        small_pull_works(endpoint, endpoint.connect(prefill.address))
    finally:
        prefill.stop()
