"""Faults on the host transport (CPU, runs in CI): a side killed with SIGKILL mid-transfer, a peer
that stops answering, a dropped control connection, cancels from either side, a restarted peer.

Every case must end in an error naming the request and the peer within the endpoint's timeout
(2 s here; the acceptance bound is 5 s), leave every block outside the request's destination
blocks untouched, and let later transfers succeed.
"""

import contextlib
import os
import signal
import socket
import threading
import time

import pytest
import torch

import kvlink
from peer_process import DecodeProcess, PrefillProcess, build_cache

PRESET = "vllm_flash_attn_nhd"
SEED = 777
SHAPE = dict(num_layers=4, num_blocks=600, block_size=16, num_heads=4, head_dim=64)
TIMEOUT = 2.0
LINK = dict(chunk_bytes=64 * 1024, timeout=TIMEOUT, heartbeat=0.2)
BIG = 8192  # tokens: 512 blocks, 32 MiB, 512 chunks of 64 KiB
BOUND = 5.0  # seconds a failure may take to surface


def packed(layout, ids, num_tokens):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[kvlink.HEADER_BYTES:]


def big_request(generator):
    src = torch.randperm(SHAPE["num_blocks"], generator=generator)[: BIG // 16]
    dst = torch.randperm(SHAPE["num_blocks"], generator=generator)[: BIG // 16]
    return src, dst


def assert_untouched_outside(engine, before, dst_blocks):
    """Guard check: every block of every layer outside ``dst_blocks`` kept its bytes."""
    keep = torch.ones(SHAPE["num_blocks"], dtype=torch.bool)
    keep[torch.as_tensor(dst_blocks)] = False
    for layer, (now, then) in enumerate(zip(engine, before)):
        # compared as raw bits: random bf16 bytes hold NaNs, which never compare equal
        assert torch.equal(now[:, keep].view(torch.int16), then[:, keep].view(torch.int16)), \
            f"layer {layer}: a write landed outside the request's blocks"


def wait_started(handle, timeout=10.0):
    deadline = time.time() + timeout
    while handle.chunks_landed == 0 and not handle.done():
        assert time.time() < deadline, "the transfer never started"
        time.sleep(0.0005)
    assert not handle.done(), "the transfer finished before the fault could be injected; make it bigger"


@pytest.fixture
def decode_cache(generator):
    from engine_access import random_fill
    engine, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **SHAPE)
    return engine, layout, [t.clone() for t in engine]


@pytest.fixture(scope="module")
def mirror():
    return build_cache(PRESET, SEED, SHAPE)[1]


@contextlib.contextmanager
def big_pull_under_way(layout, generator, request, *, proxy=False):
    """A prefill process, a decode endpoint linked to it (through a cuttable proxy if asked) and a
    32 MiB pull whose first chunk has landed: (prefill, decode, peer, handle, dst blocks, proxy).

    The pull is layer-wise and only its first layer is announced, so it stays under way (a quarter
    of it landed, the rest waiting on the prefill side) for as long as the test needs, however fast
    the machine moves the rest."""
    prefill = PrefillProcess(PRESET, SEED, SHAPE, **LINK)
    try:
        relay = Proxy(prefill.address) if proxy else None
        with kvlink.Endpoint(layout, name="decode", listen=None, **LINK) as decode:
            peer = decode.connect(relay.address if relay else prefill.address)
            src, dst = big_request(generator)
            handle = decode.pull(peer, request, src, dst, BIG, layerwise=True)
            prefill.call("layer_ready", request, [0])
            wait_started(handle)
            yield prefill, decode, peer, handle, dst, relay
    finally:
        prefill.stop()


def small_pull_works(endpoint, peer, mirror, request="after"):
    endpoint.pull(peer, request, [5, 6, 7], [590, 591, 592], 40).wait(10)
    assert torch.equal(packed(endpoint.layout, [590, 591, 592], 40), packed(mirror, [5, 6, 7], 40))


def test_prefill_killed_mid_transfer_then_restarted(decode_cache, mirror, generator):
    engine, layout, before = decode_cache
    with big_pull_under_way(layout, generator, "big") as (prefill, decode, _, handle, dst, _):
        os.kill(prefill.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(kvlink.TransferError, match=r"request 'big' from prefill: link failed"):
            handle.wait(10)
        assert time.monotonic() - killed <= BOUND
        assert handle.dst_state == "invalid" and "treat them as invalid" in str(handle.error)
        assert_untouched_outside(engine, before, dst)
        # a restarted prefill (new process, same name): the decode side links again and moves on
        restarted = PrefillProcess(PRESET, SEED, SHAPE, **LINK)
        try:
            small_pull_works(decode, decode.connect(restarted.address), mirror)
        finally:
            restarted.stop()


def test_decode_killed_mid_transfer(mirror, generator):
    """The prefill side notices within the timeout, drops what it was serving, and serves others."""
    from engine_access import random_fill
    _, src_layout = build_cache(PRESET, SEED, SHAPE)
    with kvlink.Endpoint(src_layout, name="prefill", **LINK) as prefill:
        src, dst = big_request(generator)
        doomed = DecodeProcess(PRESET, SEED + 1, SHAPE, prefill.address, (src.tolist(), dst.tolist(), BIG, False),
                               **LINK)
        assert doomed.started[1] > 0 and not doomed.started[2], doomed.started
        os.kill(doomed.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not any(link["failed"] for link in prefill.links()):
            assert time.monotonic() - killed <= BOUND, f"prefill still thinks the dead peer is alive: {prefill.links()}"
            time.sleep(0.05)
        assert all(link["serving"] == 0 for link in prefill.links())
        _, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **SHAPE)
        with kvlink.Endpoint(layout, name="decode-2", listen=None, **LINK) as decode:
            small_pull_works(decode, decode.connect(prefill.address), mirror)


def test_prefill_that_stops_answering(decode_cache, mirror, generator):
    engine, layout, before = decode_cache
    with big_pull_under_way(layout, generator, "frozen") as (prefill, decode, peer, handle, dst, _):
        os.kill(prefill.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            with pytest.raises(kvlink.TransferError, match=r"request 'frozen' from prefill: link failed: no message"):
                handle.wait(10)
            assert time.monotonic() - stopped <= BOUND
        finally:
            os.kill(prefill.process.pid, signal.SIGCONT)
        assert_untouched_outside(engine, before, dst)
        with pytest.raises(kvlink.TransferError, match="link is down"):
            decode.pull(peer, "too-soon", [1], [1], 16)
        small_pull_works(decode, decode.connect(prefill.address), mirror)  # alive again: link anew


class Proxy:
    """A TCP forwarder between the decode side and the prefill's control port; cut() drops it."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass

    def cut(self):
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_dropped_control_connection(decode_cache, mirror, generator):
    engine, layout, before = decode_cache
    with big_pull_under_way(layout, generator, "cut", proxy=True) as (prefill, decode, _, handle, dst, proxy):
        proxy.cut()
        cut = time.monotonic()
        with pytest.raises(kvlink.TransferError, match=r"request 'cut' from prefill: link failed"):
            handle.wait(10)
        assert time.monotonic() - cut <= BOUND
        deadline = time.monotonic() + BOUND
        while not any(link["failed"] for link in prefill.call("links")):
            assert time.monotonic() < deadline, "the prefill side never noticed the cut"
            time.sleep(0.05)
        assert_untouched_outside(engine, before, dst)
        small_pull_works(decode, decode.connect(prefill.address), mirror)


def test_cancel_from_the_decode_side(decode_cache, mirror, generator):
    engine, layout, before = decode_cache
    with big_pull_under_way(layout, generator, "changed-my-mind") as (_, decode, peer, handle, dst, _):
        assert handle.cancel(timeout=BOUND) is True
        assert handle.cancelled and handle.dst_state == "invalid"
        with pytest.raises(kvlink.TransferError, match=r"request 'changed-my-mind' from prefill: cancelled by the "
                                                       r"decode side; the destination blocks may hold part"):
            handle.wait(1)
        assert handle.cancel() is False  # once
        assert_untouched_outside(engine, before, dst)
        # the link moves on at once: the prefill side stopped serving the cancelled pull
        started = time.monotonic()
        small_pull_works(decode, peer, mirror)
        assert time.monotonic() - started < 1.0


def test_cancel_from_the_prefill_side(decode_cache, mirror, generator):
    engine, layout, before = decode_cache
    with big_pull_under_way(layout, generator, "withdrawn") as (prefill, decode, peer, handle, dst, _):
        assert prefill.call("cancel", "withdrawn") == 1
        with pytest.raises(kvlink.TransferError, match=r"request 'withdrawn' from prefill: refused by prefill: "
                                                       r"cancelled by the prefill side"):
            handle.wait(BOUND)
        assert handle.dst_state == "invalid"
        assert_untouched_outside(engine, before, dst)
        assert prefill.call("cancel", "withdrawn") == 0
        small_pull_works(decode, peer, mirror)




def test_other_links_keep_working_while_one_peer_dies(decode_cache, mirror, generator):
    """A decode endpoint linked to two prefills: one is killed mid-transfer, the other keeps serving."""
    _, layout, _ = decode_cache
    healthy = PrefillProcess(PRESET, SEED, SHAPE, name="healthy", **LINK)
    try:
        with big_pull_under_way(layout, generator, "doomed") as (doomed, decode, _, handle, _, _):
            other = decode.connect(healthy.address)
            os.kill(doomed.process.pid, signal.SIGKILL)
            pulls = [decode.pull(other, f"meanwhile-{i}", [i, i + 1], [560 + 2 * i, 561 + 2 * i], 20) for i in range(8)]
            for i, pull in enumerate(pulls):
                pull.wait(BOUND)
                assert torch.equal(packed(layout, [560 + 2 * i, 561 + 2 * i], 20), packed(mirror, [i, i + 1], 20))
            with pytest.raises(kvlink.TransferError, match="request 'doomed' from prefill: link failed"):
                handle.wait(10)
            small_pull_works(decode, other, mirror)
            assert {link["peer"]: bool(link["failed"]) for link in decode.links()} == {"prefill": True, "healthy": False}
    finally:
        healthy.stop()
