"""End-to-end transfers between processes over the host (TCP) transport, byte-exact (runs in CI)."""

import time

import pytest

import kvlink
from peer_process import PrefillProcess, build_cache
from transfer_cases import *  # noqa: F401,F403  (the shared test cases)
from transfer_cases import DST_PRESET

SEED = 1234
SRC_SHAPE = dict(num_layers=4, num_blocks=256, block_size=16, num_heads=4, head_dim=32)
DST_SHAPE = dict(num_layers=4, num_blocks=700, block_size=8, num_heads=4, head_dim=32)


@pytest.fixture(scope="module")
def prefill():
    process = PrefillProcess("vllm_flash_attn_nhd", SEED, SRC_SHAPE, chunk_bytes=96 * 1024, timeout=10)
    process.decode_device = "cpu"
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mirror():
    """The prefill cache's exact bytes, rebuilt here from the seed."""
    return build_cache("vllm_flash_attn_nhd", SEED, SRC_SHAPE)[1]


@pytest.fixture
def decode(prefill, generator):
    from engine_access import random_fill
    engine, layout = kvlink.presets.allocate(DST_PRESET, fill=random_fill(generator), **DST_SHAPE)
    with kvlink.Endpoint(layout, name="decode", listen=None, chunk_bytes=96 * 1024, timeout=10) as endpoint:
        peer = endpoint.connect(prefill.address)
        assert endpoint.links()[0]["transport"] == "host"
        yield endpoint, peer, engine, layout


def test_links_are_bounded(generator):
    """A listener refuses peers past max_links at the handshake, naming the bound; a freed slot is reusable."""
    _, src = kvlink.presets.allocate("vllm_flash_attn_nhd", **SRC_SHAPE)
    _, dst = kvlink.presets.allocate(DST_PRESET, **DST_SHAPE)
    with kvlink.Endpoint(src, name="bounded", max_links=1, timeout=5) as listener, \
            kvlink.Endpoint(dst, name="first", listen=None, timeout=5) as first, \
            kvlink.Endpoint(dst, name="second", listen=None, timeout=5) as second:
        assert first.connect(listener.address) == "bounded"
        with pytest.raises(ConnectionRefusedError, match=r"bounded already has 1 live links \(max_links=1\)"):
            second.connect(listener.address)
    with pytest.raises(ValueError, match="max_links must be >= 1"):
        kvlink.Endpoint(src, max_links=0)


def test_a_serve_that_breaks_fails_its_pull_and_the_link_goes_on(generator):
    _, src = kvlink.presets.allocate("vllm_flash_attn_nhd", **SRC_SHAPE)
    _, dst = kvlink.presets.allocate(DST_PRESET, **DST_SHAPE)
    with kvlink.Endpoint(src, name="flaky", timeout=5) as prefill_ep, \
            kvlink.Endpoint(dst, name="decode-f", listen=None, timeout=5) as decode_ep:
        peer = decode_ep.connect(prefill_ep.address)
        calls = []

        def breaks_once(request, chunk_index, payload):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("disk on fire")
            return payload

        prefill_ep.set_serve_hook(breaks_once)
        handle = decode_ep.pull(peer, "broken", [1, 2], [5, 6, 7], 20)
        with pytest.raises(kvlink.TransferError, match="request 'broken' from flaky: .*prefill side error: disk on fire"):
            handle.wait(5)
        decode_ep.pull(peer, "after", [1, 2], [5, 6, 7], 20).wait(5)  # the link still serves


def test_layers_of_a_request_nobody_pulls_are_forgotten_after_the_timeout():
    """layer_ready() for a request no decode side ever pulls must not grow the endpoint's state forever."""
    _, layout = kvlink.presets.allocate("vllm_flash_attn_nhd", num_layers=2, num_blocks=4, block_size=4, num_heads=1,
                                        head_dim=8)
    with kvlink.Endpoint(layout, name="lonely", timeout=0.3, heartbeat=0.05) as endpoint:
        endpoint.layer_ready("never-pulled", 0)
        endpoint.layer_ready("never-pulled", 1)
        deadline = time.time() + 0.2
        while "never-pulled" not in endpoint.layer_ready_requests() and time.time() < deadline:
            time.sleep(0.01)
        assert "never-pulled" in endpoint.layer_ready_requests(), "layer_ready() was not recorded"
        deadline = time.time() + 3
        while "never-pulled" in endpoint.layer_ready_requests() and time.time() < deadline:
            time.sleep(0.05)
        assert "never-pulled" not in endpoint.layer_ready_requests()


def test_connect_async_returns_at_once_and_resolves_to_the_peer_or_its_error():
    """An engine's step cannot wait for a handshake: connect_async() hands back a Future."""
    import socket
    _, src = kvlink.presets.allocate("vllm_flash_attn_nhd", **SRC_SHAPE)
    _, dst = kvlink.presets.allocate(DST_PRESET, **DST_SHAPE)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: no kvlink there
    with kvlink.Endpoint(src, name="async-prefill", timeout=5) as prefill_ep, \
            kvlink.Endpoint(dst, name="async-decode", listen=None, timeout=5) as decode_ep:
        doomed = decode_ep.connect_async(nobody, timeout=0.5)
        linked = decode_ep.connect_async(prefill_ep.address)
        assert linked.result(timeout=30) == "async-prefill"
        with pytest.raises((TimeoutError, ConnectionError)):
            doomed.result(timeout=30)
        decode_ep.pull("async-prefill", "after-async", [1, 2], [5, 6, 7], 20).wait(10)
    with pytest.raises(ValueError, match="address must be a ZeroMQ address"):
        decode_ep.connect_async("127.0.0.1:1")
