"""The public API's shape (CPU, runs in CI): the configuration object and when the environment is
read, the exception hierarchy, the enums, the prefill side's cancel, pull(stream=) and
current_stream_wait(), and a resharded pull with the interface of one handle."""

import os
import subprocess
import sys
import time

import pytest
import torch

import kvlink
from kvlink import DstState, EndpointConfig, Transport
from kvlink.resharding import plan_resharding, pull_resharded

SHAPE = dict(num_layers=2, num_blocks=32, block_size=4, num_heads=2, head_dim=8)


def layout(preset="vllm_flash_attn_nhd", **shape):
    from engine_access import random_fill
    return kvlink.presets.allocate(preset, fill=random_fill(torch.Generator().manual_seed(5)), **{**SHAPE, **shape})[1]


def packed(layout, ids, num_tokens, heads=None):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens, heads=heads), dtype=torch.uint8)
    kvlink.pack(layout, ids, num_tokens, chunk, heads=heads)
    return chunk[kvlink.HEADER_BYTES:]


# ------------------------------------------------------------------------------ configuration
def test_the_environment_is_read_when_an_endpoint_is_built_not_at_import(monkeypatch):
    monkeypatch.setenv("KVLINK_TIMEOUT", "7.5")
    monkeypatch.setenv("KVLINK_CHECKSUM", "1")
    with kvlink.Endpoint(layout(), listen=None) as endpoint:
        assert endpoint.timeout == 7.5 and endpoint.checksum is True
        assert endpoint.config == EndpointConfig.from_env()
    assert kvlink.endpoint.DEFAULT_TIMEOUT == 7.5  # the old name, read when asked for
    monkeypatch.setenv("KVLINK_TIMEOUT", "3")
    with kvlink.Endpoint(layout(), listen=None) as endpoint:
        assert endpoint.timeout == 3.0


def test_importing_kvlink_reads_no_setting():
    """A bad KVLINK_TIMEOUT breaks building an endpoint (naming the variable), never the import."""
    code = ("import kvlink\n"
            "try:\n"
            "    kvlink.EndpointConfig.from_env()\n"
            "except kvlink.InvalidArgument as exc:\n"
            "    print('refused:', exc)\n")
    env = dict(os.environ, KVLINK_TIMEOUT="soon")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: KVLINK_TIMEOUT='soon' is not a number" in out.stdout


def test_an_explicit_config_is_taken_as_given_and_keywords_override_it(monkeypatch):
    monkeypatch.setenv("KVLINK_TIMEOUT", "99")
    config = EndpointConfig(timeout=4.0, max_links=3, transport="host")
    with kvlink.Endpoint(layout(), listen=None, config=config, max_links=5) as endpoint:
        assert endpoint.timeout == 4.0 and endpoint.max_links == 5 and endpoint.transport == Transport.HOST
        endpoint.timeout = 2.0  # the endpoint's own copy changes, not the caller's object
    assert config.timeout == 4.0 and config.max_links == 3


@pytest.mark.parametrize("settings,match", [
    (dict(max_links=0), "max_links must be >= 1, got 0"),
    (dict(num_slots=0), "num_slots must be >= 1"),
    (dict(outbox_limit=0), "outbox_limit must be >= 1"),
    (dict(timeout=-1.0), "timeout must be a positive finite number"),
    (dict(transport="carrier-pigeon"), "transport must be one of"),
    (dict(wire_dtype="int4"), "wire_dtype must be one of"),
    (dict(nccl_wire="smoke-signals"), "nccl_wire must be one of"),
    (dict(ipc_max_ctas=-1), "ipc_max_ctas must be None"),
])
def test_bad_settings_are_refused_naming_the_setting(settings, match):
    with pytest.raises(kvlink.InvalidArgument, match=match) as info:
        kvlink.Endpoint(layout(), listen=None, **({"config": EndpointConfig(**settings)}
                                                  if "nccl_wire" in settings else settings))
    assert isinstance(info.value, ValueError) and isinstance(info.value, kvlink.KVLinkError)


def test_gpu_transports_on_a_cpu_cache_are_refused_naming_why():
    for transport in ("ipc", "nccl"):
        with pytest.raises(kvlink.InvalidArgument, match=f"transport='{transport}' is unavailable: .*"):
            kvlink.Endpoint(layout(), listen=None, transport=transport)


# ------------------------------------------------------------------------------ enums and errors
def test_enums_are_their_strings():
    assert Transport("host") is Transport.HOST and Transport.HOST == "host" and str(Transport.NCCL) == "nccl"
    assert DstState.UNTOUCHED == "untouched" and f"{DstState.INVALID}" == "invalid"


def test_every_error_is_a_kvlink_error_and_the_builtin_it_replaces():
    pairs = [(kvlink.InvalidArgument, ValueError), (kvlink.ArgumentTypeError, TypeError),
             (kvlink.ProtocolError, ValueError), (kvlink.KVLinkTimeout, TimeoutError),
             (kvlink.LinkError, ConnectionError), (kvlink.LinkRefused, ConnectionRefusedError),
             (kvlink.EndpointClosed, RuntimeError), (kvlink.TransferError, RuntimeError),
             (kvlink.LinkDown, kvlink.TransferError), (kvlink.TransferCancelled, kvlink.TransferError),
             (kvlink.TransferRefused, kvlink.TransferError), (kvlink.ChunkError, RuntimeError),
             (kvlink.IPCError, RuntimeError), (kvlink.auth.AuthError, ValueError)]
    for error, builtin in pairs:
        assert issubclass(error, kvlink.KVLinkError) and issubclass(error, builtin), error
    assert kvlink.control.ProtocolError is kvlink.ProtocolError and kvlink.wire.ChunkError is kvlink.ChunkError
    assert kvlink.ipc.IPCError is kvlink.IPCError


def serving(prefill, count=1):
    """Wait until the prefill side has ``count`` pulls queued (what was sent to it arrived)."""
    deadline = time.monotonic() + 5
    while sum(link["serving"] for link in prefill.links()) != count:
        assert time.monotonic() < deadline, prefill.links()
        time.sleep(0.005)


@pytest.fixture
def linked():
    src, dst = layout(), layout("flashinfer_hnd")
    with kvlink.Endpoint(src, name="p", timeout=5, chunk_bytes=512) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, timeout=5, chunk_bytes=512) as decode:
        yield prefill, decode, decode.connect(prefill.address), src, dst


def test_each_failure_raises_its_own_kind(linked):
    prefill, decode, peer, _, _ = linked
    with pytest.raises(kvlink.InvalidArgument, match="no link to peer 'nobody'"):
        decode.pull("nobody", "r", [0], [0], 1)
    with pytest.raises(kvlink.ArgumentTypeError, match="request must be a non-empty str"):
        decode.pull(peer, 17, [0], [0], 1)
    held = decode.pull(peer, "held", [1], [1], 4, layerwise=True)
    with pytest.raises(kvlink.KVLinkTimeout, match=r"request 'held' from p: not done after 0.1 s"):
        held.wait(0.1)
    assert held.cancel(timeout=5) is True
    with pytest.raises(kvlink.TransferCancelled, match="request 'held' from p: cancelled by the decode side"):
        held.wait(1)
    assert held.dst_state is DstState.UNTOUCHED
    serving(prefill, 0)  # its CANCEL arrived
    withdrawn = decode.pull(peer, "withdrawn", [2], [2], 4, layerwise=True)
    serving(prefill)
    assert prefill.cancel_serving("withdrawn") == 1
    with pytest.raises(kvlink.TransferRefused, match="refused by p: cancelled by the prefill side"):
        withdrawn.wait(5)
    with pytest.raises(kvlink.LinkRefused, match="refused the link"):
        with kvlink.Endpoint(layout(head_dim=16), listen=None, timeout=5) as other:
            other.connect(prefill.address)


def test_cancel_is_the_deprecated_name_of_cancel_serving(linked):
    prefill, decode, peer, _, _ = linked
    handle = decode.pull(peer, "old-name", [3], [3], 4, layerwise=True)
    serving(prefill)
    with pytest.warns(DeprecationWarning, match="cancel_serving"):
        assert prefill.cancel("old-name") == 1
    with pytest.raises(kvlink.TransferRefused):
        handle.wait(5)


def test_a_closed_endpoint_says_so(linked):
    prefill, decode, peer, _, _ = linked
    decode.close()
    with pytest.raises(kvlink.EndpointClosed, match="endpoint d is closed"):
        decode.pull(peer, "late", [1], [1], 4)
    assert not decode.alive


# ------------------------------------------------------------------------------ streams
def test_stream_ordering_on_a_cpu_cache(linked):
    """No stream on a CPU cache: pull(stream=) is refused, current_stream_wait() waits on the host
    (without raising the transfer's error: that is wait()'s and error's)."""
    prefill, decode, peer, src, dst = linked
    if torch.cuda.is_available():
        with pytest.raises(kvlink.InvalidArgument, match="stream given, but"):
            decode.pull(peer, "s", [1], [1], 4, stream=torch.cuda.current_stream())
    handle = decode.pull(peer, "waited", [4, 5], [6, 7], 8)
    handle.current_stream_wait()
    assert handle.done() and handle.dst_state == "complete" and handle.gpu_idle()  # no GPU work at all
    assert torch.equal(packed(dst, [6, 7], 8), packed(src, [4, 5], 8))
    decode.set_remote_view(peer, num_blocks=1000)
    refused = decode.pull(peer, "refused", [999], [8], 4)
    refused.current_stream_wait()  # does not raise
    assert isinstance(refused.error, kvlink.TransferRefused) and refused.dst_state == "untouched"


# ------------------------------------------------------------------------------ resharding
def test_a_resharded_pull_has_the_interface_of_one_handle():
    from sharded_caches import make_truth, rank_cache
    truth = make_truth(11, num_layers=2, num_kv=2, num_blocks=8, block_size=4, num_heads=4, head_dim=8)
    plan = plan_resharding(4, 2, 1)
    caches = [rank_cache("vllm_flash_attn_nhd", truth, (2 * r, 2 * r + 2))[1] for r in range(2)]
    dst = layout("flashinfer_hnd", num_heads=4, num_blocks=8)
    with kvlink.Endpoint(caches[0], name="p0", timeout=5) as p0, kvlink.Endpoint(caches[1], name="p1", timeout=5) as p1, \
            kvlink.Endpoint(dst, name="d", listen=None, timeout=5) as decode:
        peers = [decode.connect(p0.address), decode.connect(p1.address)]
        pull = pull_resharded(decode, plan, 0, peers, "whole", [1, 2], [3, 4], 8)
        pull.current_stream_wait()
        pull.wait(5)
        assert pull.done() and pull.dst_state is DstState.COMPLETE and pull.error is None
        assert pull.event is None and pull.gpu_idle()  # the host transport has no CUDA event
        assert pull.stats.payload_bytes == pull.payload_bytes == 8 * dst.bytes_per_token
        assert pull.stats.chunks == sum(h.stats.chunks for h in pull.handles) and pull.stats.GBps > 0
        for rank, cache in enumerate(caches):
            assert torch.equal(packed(dst, [3, 4], 8, heads=(2 * rank, 2 * rank + 2)), packed(cache, [1, 2], 8))
        held = pull_resharded(decode, plan, 0, peers, "held", [5], [6], 4, layerwise=True)
        assert not held.done() and held.dst_state is DstState.PENDING and held.layerwise
        assert held.cancel(timeout=5) is True
        assert held.cancelled and held.dst_state is DstState.UNTOUCHED
        with pytest.raises(kvlink.TransferCancelled, match="request 'held' from p0: cancelled by the decode side"):
            held.wait(5)
