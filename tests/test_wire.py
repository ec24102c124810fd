"""The chunk header: a stable, versioned, self-checking wire format."""

import struct

import pytest
import torch

import kvlink
from kvlink import wire
from kvlink.kernels import fast_divisor
from roundtrip import make_cache


def test_header_roundtrips_and_sits_at_the_front_of_the_chunk(generator):
    src = make_cache("vllm_flashinfer_nhd", generator)
    chunk = torch.empty(kvlink.packed_nbytes(src.layout, 20, heads=(1, 3)), dtype=torch.uint8)
    header = kvlink.pack(src.layout, [4, 9], 20, chunk, heads=(1, 3))
    parsed = kvlink.ChunkHeader.from_bytes(chunk[:64].numpy().tobytes())
    assert parsed == header
    assert chunk[:4].numpy().tobytes() == b"KVLK"
    assert (parsed.head_start, parsed.head_stop, parsed.token_stop) == (1, 3, 20)
    assert parsed.payload_bytes == chunk.numel() - 64 == 3 * 2 * 20 * 2 * 64 * 2


def test_header_layout_is_stable():
    """Field offsets are part of the wire format (the CUDA kernel checks words by index)."""
    header = wire.ChunkHeader(dtype_code=2, num_kv=2, layer_start=3, layer_stop=4, token_start=5, token_stop=6,
                              head_start=7, head_stop=8, head_dim=128, element_bytes=2, payload_bytes=2**40 + 1,
                              fingerprint=b"abcdefgh")
    words = header.to_words()
    assert words.size == 16
    assert words[0].tobytes() == b"KVLK" and words[1] == 1 | (64 << 16) and words[2] == 2 | (2 << 8)
    assert list(words[3:11]) == [3, 4, 5, 6, 7, 8, 128, 2]
    assert int(words[11]) | (int(words[12]) << 32) == 2**40 + 1
    assert words[13:15].tobytes() == b"abcdefgh"
    assert wire.HEADER_CHECK_MASK == 0b0111111001111111


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"NOPE" + b[4:], "not a kvlink chunk"),
    (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "unsupported chunk version 2"),
    (lambda b: b[:8] + bytes([99]) + b[9:], "unknown dtype code 99"),
    (lambda b: b[:40], "needs 64 bytes, got 40"),
])
def test_bad_headers_are_refused(mutate, match):
    good = wire.ChunkHeader(2, 2, 0, 1, 0, 1, 0, 1, 8, 2, 32, b"12345678").to_bytes()
    with pytest.raises(ValueError, match=match):
        wire.ChunkHeader.from_bytes(mutate(good))


def test_check_status_raises_on_refused_chunk():
    kvlink.check_status(torch.zeros(1, dtype=torch.int32))
    with pytest.raises(kvlink.ChunkError, match="header did not match"):
        kvlink.check_status(torch.ones(1, dtype=torch.int32))


def test_fast_divisor_matches_integer_division(generator):
    """The kernels divide with (umulhi(n, mul) + n) >> shift; check it against // for many d and n."""
    divisors = [1, 2, 3, 5, 7, 16, 17, 100, 576, 656, 1000003, 2**30 + 1, 2**31 - 1]
    divisors += torch.randint(1, 2**31 - 1, (200,), generator=generator).tolist()
    numerators = [0, 1, 2**31 - 1, 2**31 - 2] + torch.randint(0, 2**31, (300,), generator=generator).tolist()
    for d in divisors:
        mul, shift = fast_divisor(d)
        for n in numerators + [d - 1, d, d + 1, 2 * d - 1]:
            if 0 <= n < 2**31:
                assert ((n * mul >> 32) + n) >> shift == n // d, (n, d)
