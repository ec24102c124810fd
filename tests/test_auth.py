"""Shared-secret authentication of the handshake, both directions (CPU, runs in CI)."""

import pytest
import torch
import zmq
from control_samples import raw_dealer

import kvlink
from kvlink import auth, control

SHAPE = dict(num_layers=2, num_blocks=8, block_size=4, num_heads=1, head_dim=8)


@pytest.fixture
def layouts(generator):
    from engine_access import random_fill
    return (kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), **SHAPE)[1],
            kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), **SHAPE)[1])


def test_same_secret_links_and_moves_bytes(layouts):
    src, dst = layouts
    with kvlink.Endpoint(src, name="p", secret="s3cret", timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, secret=b"s3cret", timeout=5) as decode:
        peer = decode.connect(prefill.address)
        decode.pull(peer, "r", [1, 2], [5, 6], 7).wait(5)
        got, want = torch.empty(kvlink.packed_nbytes(dst, 7), dtype=torch.uint8), torch.empty(
            kvlink.packed_nbytes(src, 7), dtype=torch.uint8)
        kvlink.pack(dst, [5, 6], 7, got)
        kvlink.pack(src, [1, 2], 7, want)
        assert torch.equal(got[64:], want[64:])


@pytest.mark.parametrize("decode_secret", [None, "wrong"])
def test_a_peer_without_the_secret_is_refused(layouts, decode_secret, caplog):
    src, dst = layouts
    with kvlink.Endpoint(src, name="p", secret="s3cret", timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, secret=decode_secret, timeout=5) as decode:
        expected = "authentication required" if decode_secret is None else "authentication failed: wrong secret"
        with pytest.raises(ConnectionRefusedError, match=expected):
            decode.connect(prefill.address)
        assert prefill.links() == []


def test_the_decode_side_refuses_a_prefill_without_the_secret(layouts):
    src, dst = layouts
    with kvlink.Endpoint(src, name="impostor", timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, secret="s3cret", timeout=5) as decode:
        with pytest.raises(ConnectionRefusedError, match="impostor did not prove it holds the shared secret"):
            decode.connect(prefill.address)
        assert decode.links() == []


def test_a_replayed_hello_is_refused(layouts):
    src, dst = layouts
    secret = b"s3cret"
    credentials, _ = auth.hello_auth(secret, "d", dst.fingerprint)
    hello = control.encode("HELLO", endpoint="d", fingerprint=dst.fingerprint, layout=dst.to_dict(),
                           transports=["host"], host="h", pid=1, device="", chunk_bytes=1 << 20, ipc=None,
                           auth=credentials)
    with kvlink.Endpoint(src, name="p", secret=secret, timeout=5) as prefill:
        context = zmq.Context()
        replies = []
        for _ in range(2):
            sock = raw_dealer(context, prefill.address)
            sock.send(hello)
            assert sock.poll(5000)
            replies.append(control.decode(sock.recv()))
            sock.close()
        context.term()
    assert replies[0]["type"] == "WELCOME"
    assert replies[1]["type"] == "REJECT" and "replayed HELLO" in replies[1]["reason"]


def test_stale_or_malformed_credentials_are_refused():
    verifier = auth.HelloVerifier(b"k")
    credentials, _ = auth.hello_auth(b"k", "d", "fp")
    with pytest.raises(auth.AuthError, match="wrong secret"):
        verifier.check(credentials, "someone-else", "fp")
    stamp, nonce, _ = credentials
    old = stamp - 3600
    import hashlib
    import hmac
    import struct
    mac = hmac.new(b"k", b"|".join([b"kvlink-hello", struct.pack("<d", old), nonce, b"d", b"fp"]), hashlib.sha256).digest()
    with pytest.raises(auth.AuthError, match="off this host's clock"):
        verifier.check([old, nonce, mac], "d", "fp")
    for bad in (None, [], [1, b"x", b"y"], [1.0, b"short", b"m"], "text"):
        with pytest.raises(auth.AuthError, match="authentication required"):
            verifier.check(bad, "d", "fp")
    with pytest.raises(TypeError, match="secret must be str or bytes"):
        kvlink.Endpoint(kvlink.presets.allocate("vllm_flash_attn_nhd", **SHAPE)[1], listen=None, secret=123)


def test_endpoints_listen_on_loopback_unless_told_otherwise(layouts):
    src, _ = layouts
    with kvlink.Endpoint(src, name="p") as endpoint:
        assert endpoint.address.startswith("tcp://127.0.0.1:")
