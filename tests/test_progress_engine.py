"""The progress engine never blocks on a peer (CPU, host transport, runs in CI).

The issue's cases: thousands of pulls or cancels to a killed or stopped peer, a silent link
during a burst of calls, a peer that never answers the handshake, a peer that stops reading,
close() with all of it under way. Each must end in a bounded error naming the peer and leave
the endpoint serving its other links. Bounds are generous (several times the link timeout) and
no assertion times the machine: where order matters, the test checks order, not speed.
"""

import logging
import os
import signal
import socket
import threading
import time

import pytest
import torch
import zmq

import kvlink
from kvlink import control
from peer_process import PrefillProcess, build_cache

PRESET = "vllm_flash_attn_nhd"
SEED = 31
SHAPE = dict(num_layers=2, num_blocks=64, block_size=4, num_heads=1, head_dim=8)
TIMEOUT = 2.0
LINK = dict(timeout=TIMEOUT, heartbeat=0.1)
BOUND = 4 * TIMEOUT  # seconds any failure may take to surface


def packed(layout, ids, num_tokens):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[kvlink.HEADER_BYTES:]


@pytest.fixture
def decode_layout():
    return kvlink.presets.allocate(PRESET, **SHAPE)[1]


@pytest.fixture(scope="module")
def mirror():
    return build_cache(PRESET, SEED, SHAPE)[1]


def pull_works(endpoint, peer, mirror, request):
    endpoint.pull(peer, request, [5, 6], [60, 61], 8).wait(BOUND)
    assert torch.equal(packed(endpoint.layout, [60, 61], 8), packed(mirror, [5, 6], 8))


def pull_many(endpoint, peer, count, prefix, layerwise=False):
    """``count`` pulls (or as many as the endpoint takes before it says the link is down)."""
    handles = []
    for i in range(count):
        try:
            handles.append(endpoint.pull(peer, f"{prefix}-{i}", [i % 64], [i % 64], 4, layerwise=layerwise))
        except kvlink.TransferError as exc:
            assert f"from {peer}: link is down" in str(exc)
            break
    return handles


def assert_all_fail_naming(handles, peer, deadline):
    for handle in handles:
        with pytest.raises(kvlink.TransferError, match=f"request '{handle.request}' from {peer}: "):
            handle.wait(max(0.0, deadline - time.monotonic()))


@pytest.mark.parametrize("count", [500, 5000])
def test_pulls_to_a_killed_prefill_fail_and_the_endpoint_goes_on(decode_layout, mirror, count):
    """The issue: 2,000 or 5,000 pulls after a SIGKILL hung the progress thread for good."""
    doomed = PrefillProcess(PRESET, SEED, SHAPE, name="doomed", **LINK)
    healthy = PrefillProcess(PRESET, SEED, SHAPE, name="healthy", **LINK)
    try:
        endpoint = kvlink.Endpoint(decode_layout, name="decode", listen=None, **LINK)
        dead_peer = endpoint.connect(doomed.address)
        live_peer = endpoint.connect(healthy.address)
        os.kill(doomed.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        handles = pull_many(endpoint, dead_peer, count, "dead")
        pull_works(endpoint, live_peer, mirror, "meanwhile")  # the healthy link is not held up
        assert_all_fail_naming(handles, dead_peer, killed + BOUND + count * 1e-3)
        assert {l["peer"]: bool(l["failed"]) for l in endpoint.links()} == {dead_peer: True, live_peer: False}
        pull_works(endpoint, live_peer, mirror, "after")
        restarted = PrefillProcess(PRESET, SEED, SHAPE, name="restarted", **LINK)
        try:
            pull_works(endpoint, endpoint.connect(restarted.address), mirror, "restarted")
        finally:
            restarted.stop()
        started = time.monotonic()
        endpoint.close(timeout=BOUND)
        assert time.monotonic() - started < BOUND and not endpoint.alive
    finally:
        doomed.stop()
        healthy.stop()


def test_cancels_to_a_killed_prefill_never_hang(decode_layout):
    """The issue: after 600 pulls to a killed peer, the 397th cancel hung."""
    doomed = PrefillProcess(PRESET, SEED, SHAPE, name="doomed", **LINK)
    try:
        with kvlink.Endpoint(decode_layout, name="decode", listen=None, **LINK) as endpoint:
            peer = endpoint.connect(doomed.address)
            handles = pull_many(endpoint, peer, 600, "held", layerwise=True)  # held open: no layer is ever ready
            os.kill(doomed.process.pid, signal.SIGKILL)
            for handle in handles:
                handle.cancel(timeout=BOUND)  # True, or False if the link failed first: never a hang
                assert handle.done() and handle.dst_state in ("untouched", "invalid")
    finally:
        doomed.stop()


def test_a_stopped_prefill_fails_its_link_and_finds_its_transfers_failed_when_it_resumes(
        decode_layout, mirror, caplog):
    """SIGSTOP: pulls pile up and the link fails by its timeout (or its full queue), naming the
    peer; after SIGCONT the decode side drops whatever arrives late, quietly, and links anew."""
    prefill = PrefillProcess(PRESET, SEED, SHAPE, **LINK)
    try:
        with kvlink.Endpoint(decode_layout, name="decode", listen=None, **LINK) as endpoint:
            peer = endpoint.connect(prefill.address)
            os.kill(prefill.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                with caplog.at_level(logging.WARNING, logger="kvlink"):
                    handles = pull_many(endpoint, peer, 5000, "stalled")
                    assert_all_fail_naming(handles, peer, stopped + BOUND + 5)
            finally:
                os.kill(prefill.process.pid, signal.SIGCONT)
            reason = endpoint.links()[0]["failed"]
            assert reason.startswith(("no message for", "control queue full: peer not reading")), reason
            deadline = time.monotonic() + BOUND
            while not any(link["failed"] for link in prefill.call("links")):  # it finds the link gone
                assert time.monotonic() < deadline, "the resumed prefill still serves the failed link"
                time.sleep(0.05)
            pull_works(endpoint, endpoint.connect(prefill.address), mirror, "resumed")
            assert not [r for r in caplog.records if "unknown transfer" in r.getMessage()]
    finally:
        prefill.stop()


class SilentPrefill:
    """A raw ROUTER that completes the handshake (host transport) and then never says a word, nor
    reads one: the peer that is alive to TCP and dead to kvlink."""

    def __init__(self, layout, name="silent"):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 1)  # stop taking messages in as soon as it stops reading
        self.router.setsockopt(zmq.RCVBUF, 4096)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.layout, self.name = layout, name
        self.linked = threading.Event()
        self.beating = threading.Event()  # heartbeats keep the link alive while it does not read
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        identity = None
        while not self.stop.is_set() and identity is None:
            if self.router.poll(50):
                identity, data = self.router.recv_multipart()
                assert control.decode(data)["type"] == "HELLO"
                self.router.send_multipart([identity, control.encode(
                    "WELCOME", endpoint=self.name, transport="host", nccl_id=None, chunk_bytes=1 << 20,
                    layout=self.layout.to_dict(), ipc=None, auth=None)])
                self.linked.set()
        while not self.stop.wait(0.05):
            if self.beating.is_set():
                try:
                    self.router.send_multipart([identity, control.encode("HEARTBEAT")], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.context.destroy(linger=0)


def test_a_silent_link_fails_on_time_during_a_burst_of_calls(decode_layout, mirror):
    """The issue: while callers kept the command queue busy, the loop draining wake-ups starved the
    heartbeat check, and a silent link went unnoticed past its timeout."""
    healthy = PrefillProcess(PRESET, SEED, SHAPE, name="healthy", **LINK)
    silent = SilentPrefill(decode_layout)
    stop = threading.Event()
    try:
        with kvlink.Endpoint(decode_layout, name="decode", listen=None, **LINK) as endpoint:
            live_peer = endpoint.connect(healthy.address)
            quiet_peer = endpoint.connect(silent.address)
            linked = time.monotonic()

            def burst():  # every call posts a command and wakes the thread (and sends nothing)
                while not stop.is_set():
                    endpoint.layer_ready("burst", 0)

            threads = [threading.Thread(target=burst, daemon=True) for _ in range(2)]
            for thread in threads:
                thread.start()
            while not endpoint.links()[1]["failed"]:
                assert time.monotonic() - linked < BOUND, "the silent link was not noticed during the burst"
                time.sleep(0.01)
            assert endpoint.links()[1]["failed"].startswith("no message for")
            assert not endpoint.links()[0]["failed"]
            pull_works(endpoint, live_peer, mirror, "during-burst")
            stop.set()
            for thread in threads:
                thread.join(BOUND)
            assert quiet_peer == "silent"
    finally:
        stop.set()
        silent.close()
        healthy.stop()


def test_a_peer_that_does_not_read_fails_its_link_with_a_full_queue(decode_layout):
    """Its heartbeats say it lives, but it reads nothing: once ZeroMQ's queue and the link's own are
    full, the link fails naming the peer and the reason; nothing ever blocks."""
    silent = SilentPrefill(decode_layout, name="deaf")
    silent.beating.set()
    try:
        with kvlink.Endpoint(decode_layout, name="decode", listen=None, timeout=60, heartbeat=0.1,
                             outbox_limit=64) as endpoint:
            peer = endpoint.connect(silent.address)
            pending = endpoint.pull(peer, "waiting", [1], [1], 4)
            request = "r" * 1000  # big messages fill the socket buffers sooner
            deadline = time.monotonic() + 60
            while not endpoint.links()[0]["failed"]:
                assert time.monotonic() < deadline, f"the link never filled: {endpoint.stats()}"
                try:
                    for _ in range(200):
                        endpoint.release(peer, request)
                except kvlink.TransferError:
                    break
                time.sleep(0.001)
            with pytest.raises(kvlink.TransferError, match=r"request 'waiting' from deaf: link failed: control "
                                                           r"queue full: peer not reading"):
                pending.wait(BOUND)
            assert endpoint.stats()["links_failed"] == 1
    finally:
        silent.close()


def test_a_handshake_nobody_answers_does_not_hold_up_other_links(decode_layout, mirror):
    healthy = PrefillProcess(PRESET, SEED, SHAPE, name="healthy", **LINK)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{unused.getsockname()[1]}"
    try:
        with kvlink.Endpoint(decode_layout, name="decode", listen=None, **LINK) as endpoint:
            peer = endpoint.connect(healthy.address)
            doomed = endpoint.connect_async(nobody, timeout=BOUND)
            pull_works(endpoint, peer, mirror, "while-connecting")
            assert not doomed.done(), "the handshake should still be waiting: the pull did not wait behind it"
            with pytest.raises(TimeoutError, match=f"no answer to HELLO from {nobody}"):
                doomed.result(timeout=2 * BOUND)
    finally:
        healthy.stop()


def test_close_returns_within_its_timeout_with_everything_under_way(decode_layout):
    """A stopped peer, pulls and a handshake in flight: close() stops the thread and closes the
    sockets within its timeout; every pull ends with "endpoint closed"."""
    prefill = PrefillProcess(PRESET, SEED, SHAPE, **LINK)
    silent = SilentPrefill(decode_layout)
    try:
        endpoint = kvlink.Endpoint(decode_layout, name="decode", listen=None, timeout=60, heartbeat=0.1)
        peer = endpoint.connect(prefill.address)
        os.kill(prefill.process.pid, signal.SIGSTOP)
        handles = pull_many(endpoint, peer, 3000, "closing")
        connecting = endpoint.connect_async(silent.address.replace(silent.address.rsplit(":", 1)[1], "1"), timeout=60)
        started = time.monotonic()
        endpoint.close(timeout=BOUND)
        assert time.monotonic() - started < BOUND and not endpoint.alive
        for handle in handles:
            with pytest.raises(kvlink.TransferError, match="endpoint closed"):
                handle.wait(0)
        with pytest.raises(RuntimeError, match="is closed"):
            connecting.result(timeout=BOUND)
    finally:
        os.kill(prefill.process.pid, signal.SIGCONT)
        silent.close()
        prefill.stop()


def test_late_chunks_of_a_refused_pull_are_dropped_quietly(generator, caplog):
    """A pull whose first chunk fails its checksum ends at once; its later chunks still arrive and
    are dropped without a warning each (counted in stats())."""
    from engine_access import random_fill
    _, src = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **SHAPE)
    _, dst = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **SHAPE)
    with kvlink.Endpoint(src, name="p", chunk_bytes=256, timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, chunk_bytes=256, timeout=5, checksum=True) as decode:
        def flip_first(request, chunk_index, payload):
            if chunk_index == 0:
                payload = payload.copy()
                payload[kvlink.HEADER_BYTES] ^= 1
            return payload
        prefill.set_serve_hook(flip_first)
        peer = decode.connect(prefill.address)
        with caplog.at_level(logging.DEBUG, logger="kvlink"):
            handle = decode.pull(peer, "corrupted", list(range(16)), list(range(16)), 64)
            with pytest.raises(kvlink.TransferError, match="chunk 0 refused: checksum mismatch"):
                handle.wait(5)
            assert handle.stats.chunks > 2
            deadline = time.monotonic() + 5
            while decode.stats()["late_messages"] < handle.stats.chunks - 1:
                assert time.monotonic() < deadline, decode.stats()
                time.sleep(0.01)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "transfer" in r.getMessage()]


def test_a_stopped_decode_holds_up_no_other_decode_and_its_link_fails(generator):
    """Prefill side: a decode process is SIGSTOPped while a 32 MiB pull is being served to it; a
    second decode's pulls are served meanwhile, and the stopped one's link fails within bounds."""
    from engine_access import random_fill
    from peer_process import DecodeProcess
    shape = dict(num_layers=4, num_blocks=600, block_size=16, num_heads=4, head_dim=64)
    link = dict(chunk_bytes=64 * 1024, timeout=TIMEOUT, heartbeat=0.1)
    _, src = build_cache(PRESET, SEED, shape)
    with kvlink.Endpoint(src, name="prefill", **link) as prefill:
        doomed = DecodeProcess(PRESET, SEED + 1, shape, prefill.address,
                               (list(range(512)), list(range(512)), 8192, False), **link)
        assert doomed.started[1] > 0 and not doomed.started[2], doomed.started
        os.kill(doomed.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            _, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **shape)
            with kvlink.Endpoint(layout, name="other", listen=None, **link) as other:
                peer = other.connect(prefill.address)
                for i in range(4):
                    other.pull(peer, f"meanwhile-{i}", [i], [590 + i], 16).wait(BOUND)
                    assert torch.equal(packed(layout, [590 + i], 16), packed(src, [i], 16))
                while not any(l["failed"] for l in prefill.links() if l["peer"] == "doomed-decode"):
                    assert time.monotonic() - stopped < BOUND, prefill.links()
                    time.sleep(0.02)
                assert [l["failed"] is None for l in prefill.links() if l["peer"] == "other"] == [True]
        finally:
            os.kill(doomed.process.pid, signal.SIGCONT)
            doomed.process.kill()


def test_a_decode_gone_in_the_middle_of_a_serve_ends_it_cleanly(generator, caplog):
    """The decode process dies while its pull is being served (killed from the serve hook, before
    its last chunk): the prefill's next send finds the peer gone, the link fails naming why, no error
    escapes the progress loop, and another decode is served at once."""
    from engine_access import random_fill
    from peer_process import DecodeProcess
    shape = dict(num_layers=4, num_blocks=600, block_size=16, num_heads=4, head_dim=64)
    link = dict(chunk_bytes=64 * 1024, timeout=TIMEOUT, heartbeat=0.1)
    _, src = build_cache(PRESET, SEED, shape)
    with kvlink.Endpoint(src, name="prefill", **link) as prefill:
        doomed = []

        def kill_near_the_end(request, chunk_index, payload):
            if request == "doomed" and chunk_index == 511 and doomed:  # the last of 512: the serve ends
                os.kill(doomed[0].process.pid, signal.SIGKILL)
                time.sleep(0.3)  # (test only: holds this thread) let ZeroMQ see the connection close
            return payload
        prefill.set_serve_hook(kill_near_the_end)
        with caplog.at_level(logging.ERROR, logger="kvlink"):
            doomed.append(DecodeProcess(PRESET, SEED + 1, shape, prefill.address,
                                        (list(range(512)), list(range(512)), 8192, False), **link))
            deadline = time.monotonic() + BOUND
            while not any(l["failed"] for l in prefill.links()):
                assert time.monotonic() < deadline, prefill.links()
                time.sleep(0.02)
            assert prefill.links()[0]["failed"].startswith(("cannot reach peer", "no message for")), prefill.links()
            assert prefill.links()[0]["serving"] == 0
            _, layout = kvlink.presets.allocate(PRESET, fill=random_fill(generator), **shape)
            with kvlink.Endpoint(layout, name="next", listen=None, **link) as other:
                other.pull(other.connect(prefill.address), "next", [3, 4], [5, 6], 32).wait(BOUND)
                assert torch.equal(packed(layout, [5, 6], 32), packed(src, [3, 4], 32))
        assert not [r for r in caplog.records if "progress thread error" in r.getMessage()]
