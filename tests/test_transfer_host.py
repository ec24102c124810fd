"""End-to-end transfers between processes over the host (TCP) transport, byte-exact (runs in CI)."""

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
