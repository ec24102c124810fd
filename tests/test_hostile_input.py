"""Hostile control-plane input: the decoder and a live endpoint under random, mutated, truncated,
oversized and out-of-order messages (CPU, runs in CI)."""

import random
import time
import tracemalloc

import msgpack
import pytest
import torch
import zmq
from control_samples import VALID_MESSAGES, raw_dealer

import kvlink
from kvlink import control
from kvlink.control import ProtocolError

VALID = VALID_MESSAGES
ODD_VALUES = [None, True, -1, 2**63 - 1, -2**63, 1.5, "", "x" * 300, b"\x00" * 7, [], [1, "a", None], {},
              {"k": [1, 2]}, [[[[[]]]]]]


def mutations(rng: random.Random, count: int):
    """Random bytes, bit flips, truncations, splices, type confusion and lying length prefixes."""
    encoded = [control.encode(kind, **fields) for kind, fields in VALID.items()]
    for i in range(count):
        base = bytearray(rng.choice(encoded))
        choice = i % 8
        if choice == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        elif choice == 1:
            for _ in range(rng.randrange(1, 6)):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            yield bytes(base)
        elif choice == 2:
            yield bytes(base[: rng.randrange(len(base))])
        elif choice == 3:
            other = rng.choice(encoded)
            yield bytes(base[: rng.randrange(len(base))] + other[rng.randrange(len(other)):])
        elif choice == 4:  # a valid map with one field of the wrong type, or missing, or extra
            kind = rng.choice(list(VALID))
            fields = dict(VALID[kind])
            if fields and rng.random() < 0.5:
                fields[rng.choice(list(fields))] = rng.choice(ODD_VALUES)
            elif fields:
                del fields[rng.choice(list(fields))]
            fields[rng.choice(["extra", "type", "v"])] = rng.choice(ODD_VALUES)
            yield msgpack.packb({"type": kind, "v": 1, **fields} if "type" not in fields else fields, use_bin_type=True)
        elif choice == 5:  # containers that claim far more elements than the message holds
            header = rng.choice([b"\xdd\x7f\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\x7f\xff\xff\xff",
                                 b"\xc6\x7f\xff\xff\xff"])
            yield header + bytes(rng.randrange(0, 64))
        elif choice == 6:  # deep nesting
            depth = rng.randrange(100, 5000)
            yield b"\x91" * depth + b"\xc0"
        else:  # a valid message of another protocol version, or not a map at all
            yield rng.choice([msgpack.packb({"type": "PULL", "v": 99}), msgpack.packb([1, 2, 3]),
                              msgpack.packb("PULL"), b"\xc1", bytes(control.MAX_CONTROL_BYTES + 1)])


def test_decoder_survives_ten_thousand_hostile_messages():
    rng = random.Random(20261128)
    tracemalloc.start()
    accepted = refused = 0
    try:
        for data in mutations(rng, 10_000):
            try:
                message = control.decode(data)
            except ProtocolError:
                refused += 1
                continue
            # whatever gets through has a known type and every required field with its declared type
            assert message["type"] in control.SCHEMAS
            for field, types in control.SCHEMAS[message["type"]].items():
                assert isinstance(message[field], types)
            accepted += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused > 5_000 and accepted > 0, (accepted, refused)
    assert peak < 16 << 20, f"decoding hostile messages peaked at {peak} bytes"


def test_oversized_messages_are_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        control.decode(b"\x80" * (control.MAX_CONTROL_BYTES + 1))


def test_a_live_endpoint_keeps_serving_through_hostile_peers(generator, caplog):
    """Garbage, truncated frames, messages out of order and unknown types from raw sockets: the
    endpoint logs them, stays up, and a real peer's pull afterwards is byte-exact."""
    from engine_access import random_fill
    shape = dict(num_layers=2, num_blocks=16, block_size=4, num_heads=2, head_dim=8)
    _, src = kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), **shape)
    _, dst = kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), **shape)
    rng = random.Random(7)
    with kvlink.Endpoint(src, name="target", timeout=5) as prefill:
        context = zmq.Context()
        attackers = []
        for _ in range(4):
            sock = raw_dealer(context, prefill.address)
            attackers.append(sock)
        out_of_order = [control.encode(kind, **VALID[kind]) for kind in ("PULL", "DATA", "NOTIFY", "SENT", "WELCOME")]
        for i, data in enumerate(mutations(rng, 2000)):
            sock = attackers[i % len(attackers)]
            frames = [data] if i % 5 else [data, b"extra", b""]  # multi-frame junk too
            sock.send_multipart(frames)
            if i % 100 == 0:
                sock.send(out_of_order[(i // 100) % len(out_of_order)])
        # a peer that completes the handshake, then sends pulls whose fields lie
        linked = raw_dealer(context, prefill.address)
        linked.send(control.encode("HELLO", endpoint="liar", fingerprint=dst.fingerprint, layout=dst.to_dict(),
                                   transports=["host"], host="h", pid=1, device="", chunk_bytes=1 << 20, ipc=None,
                                   auth=None))
        assert linked.poll(5000) and control.decode(linked.recv_multipart()[0])["type"] == "WELCOME"
        lies = [dict(src_blocks=[-1]), dict(src_blocks=[99]), dict(src_blocks=[0] * 5000), dict(num_tokens=-4),
                dict(num_tokens=2**40), dict(layers=[1, 0]), dict(layers=[0, 99]), dict(heads=[0, 3]),
                dict(heads=["a", 1]), dict(chunks=[[0, 2, 0, 10**12]]), dict(chunks=[[0, 2]]), dict(chunks=[["x"] * 4]),
                dict(chunks=[[1, 0, 0, 4]]), dict(src_blocks=[1.5]), dict(request="")]
        for i, lie in enumerate(lies * 20):
            fields = dict(VALID["PULL"], xfer=1000 + i, num_tokens=8, src_blocks=[1, 2], layers=[0, 2],
                          heads=[0, 2], chunks=[[0, 2, 0, 8]])
            fields.update(lie)
            linked.send(control.encode("PULL", **fields))
        refusals = 0
        deadline = time.time() + 10
        while refusals < len(lies) * 20 and time.time() < deadline:
            if linked.poll(100):
                refusals += control.decode(linked.recv_multipart()[0])["type"] == "FAILED"
        assert refusals == len(lies) * 20, f"only {refusals} of {len(lies) * 20} lying pulls were refused"
        linked.close()
        # a frame far over the control-message bound: the peer is dropped, nothing is buffered
        huge = raw_dealer(context, prefill.address)
        huge.send(bytes(64 << 20))
        huge.close()
        time.sleep(0.5)
        assert prefill.alive
        with kvlink.Endpoint(dst, name="honest", listen=None, timeout=5) as decode:
            peer = decode.connect(prefill.address)
            decode.pull(peer, "after-the-storm", [3, 1, 4], [0, 9, 2], 10).wait(5)
        got = torch.empty(kvlink.packed_nbytes(dst, 10), dtype=torch.uint8)
        want = torch.empty_like(got)
        kvlink.pack(dst, [0, 9, 2], 10, got)
        kvlink.pack(src, [3, 1, 4], 10, want)
        assert torch.equal(got[64:], want[64:])
        for sock in attackers:
            sock.close()
        context.term()
