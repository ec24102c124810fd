"""The packed chunk: what travels on the wire between prefill and decode.

A chunk is a 64-byte header followed by the payload::

    offset 0   header (64 bytes, little-endian, below)
    offset 64  payload: for each layer in [layer_start, layer_stop)
                          for each of K, V (MLA: the latent only)
                            for each token in [token_start, token_stop)
                              for each head in the chunk's head range
                                head_dim elements, in the cache dtype

With ``wire_dtype="fp8"`` (flag FLAG_FP8_SCALED, dtype e4m3, element bytes 1) the payload is
two regions: the rows above as e4m3 bytes (head_dim each), then one little-endian float32 scale
per row in the same (layer, K/V, token, head) order. A row is quantized as
``q = e4m3(clamp(x / s, -448, 448))`` with ``s = max|x| / 448`` (q = 0 where s = 0), and read
back as ``x' = q * s``; the fingerprint words are those of an e4m3 cache of the same shape.

The payload order is layer-major so one layer is one contiguous run (layer-wise transfers
send a layer as soon as it is written) and token-granular so the receiver can use any block
size: the sender's blocks are gone once packed.

Header (16 little-endian 32-bit words):

    word  field
    0     magic b"KVLK"
    1     version (u16) | header bytes (u16) << 16
    2     dtype code (u8) | num_kv (u8) << 8 | flags (u16) << 16
    3-4   layer_start, layer_stop
    5-6   token_start, token_stop
    7-8   head_start, head_stop (the sender's local head indices)
    9     head_dim
    10    element bytes
    11-12 payload bytes (u64)
    13-14 the first 8 bytes of the layout fingerprint (see CacheLayout.fingerprint)
    15    payload checksum (``payload_checksum``) when the receiver asked for one, else 0

A receiver checks every word except the sender's head indices (it knows how many heads come
from the payload size, and places them at its own head positions) and the checksum word, which
it verifies itself when it asked for checksums.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

import torch

from kvlink.errors import ChunkError  # noqa: F401  (kvlink.wire.ChunkError, as before)
from kvlink.layout import DTYPE_CODES, DTYPES_BY_CODE, layout_fingerprint
from kvlink.selection import HEADER_BYTES, Selection, wire_row_bytes

MAGIC = b"KVLK"
WIRE_VERSION = 1
_FORMAT = struct.Struct("<4sHHBBHIIIIIIIIQ8sI")
assert _FORMAT.size == HEADER_BYTES

# Words a receiver compares (bit i = word i): all but head_start, head_stop and reserved.
HEADER_CHECK_MASK = 0xFFFF & ~((1 << 7) | (1 << 8) | (1 << 15))

CHECKSUM_OFFSET = 60  # header word 15
# Header flags (word 2, high half).
FLAG_FP8_SCALED = 0x0001  # payload: e4m3 rows, then one float32 scale per row (see the module doc)

# Unpack status codes written by the CUDA kernel (and raised as errors by check_status).
STATUS_OK = 0
STATUS_HEADER_MISMATCH = 1


@dataclass(frozen=True)
class ChunkHeader:
    dtype_code: int
    num_kv: int
    layer_start: int
    layer_stop: int
    token_start: int
    token_stop: int
    head_start: int
    head_stop: int
    head_dim: int
    element_bytes: int
    payload_bytes: int
    fingerprint: bytes  # 8 bytes
    flags: int = 0
    version: int = WIRE_VERSION

    @classmethod
    def for_selection(cls, sel: Selection) -> "ChunkHeader":
        code, num_kv, flags, head_dim, element_bytes, fingerprint, row_bytes = _chunk_facts(sel.layout, sel.wire_fp8)
        # NOTE: fields set directly, not through the frozen dataclass's __init__ (every pack() returns one)
        header = object.__new__(cls)
        header.__dict__.update(
            dtype_code=code, num_kv=num_kv, layer_start=sel.layer_start, layer_stop=sel.layer_stop,
            token_start=sel.token_start, token_stop=sel.token_stop, head_start=sel.head_start,
            head_stop=sel.head_stop, head_dim=head_dim, element_bytes=element_bytes,
            payload_bytes=_payload_bytes(sel, num_kv, row_bytes), fingerprint=fingerprint, flags=flags,
            version=WIRE_VERSION)
        return header

    def to_bytes(self) -> bytes:
        return _FORMAT.pack(
            MAGIC, self.version, HEADER_BYTES, self.dtype_code, self.num_kv, self.flags,
            self.layer_start, self.layer_stop, self.token_start, self.token_stop,
            self.head_start, self.head_stop, self.head_dim, self.element_bytes,
            self.payload_bytes, self.fingerprint, 0,
        )

    def to_words(self) -> np.ndarray:
        return np.frombuffer(self.to_bytes(), dtype="<u4").copy()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkHeader":
        """Parse a header; ValueError on a short buffer, a bad magic or an unknown version."""
        data = bytes(data)
        if len(data) < HEADER_BYTES:
            raise ValueError(f"chunk header needs {HEADER_BYTES} bytes, got {len(data)}")
        (magic, version, header_bytes, dtype_code, num_kv, flags, layer_start, layer_stop,
         token_start, token_stop, head_start, head_stop, head_dim, element_bytes,
         payload_bytes, fingerprint, _reserved) = _FORMAT.unpack(data[:HEADER_BYTES])
        if magic != MAGIC:
            raise ValueError(f"not a kvlink chunk: magic {magic!r}, expected {MAGIC!r}")
        if version != WIRE_VERSION or header_bytes != HEADER_BYTES:
            raise ValueError(
                f"unsupported chunk version {version} (header {header_bytes} bytes); this kvlink speaks "
                f"version {WIRE_VERSION} with {HEADER_BYTES}-byte headers"
            )
        if dtype_code not in DTYPES_BY_CODE:
            raise ValueError(f"chunk header names unknown dtype code {dtype_code}")
        return cls(
            dtype_code=dtype_code, num_kv=num_kv, layer_start=layer_start, layer_stop=layer_stop,
            token_start=token_start, token_stop=token_stop, head_start=head_start, head_stop=head_stop,
            head_dim=head_dim, element_bytes=element_bytes, payload_bytes=payload_bytes,
            fingerprint=fingerprint, flags=flags, version=version,
        )

    def check_matches(self, expected: "ChunkHeader") -> None:
        """Raise ValueError naming the first field where this (received) header differs from ``expected``."""
        for name in ("version", "dtype_code", "num_kv", "flags", "layer_start", "layer_stop", "token_start",
                     "token_stop", "head_dim", "element_bytes", "payload_bytes", "fingerprint"):
            got, want = getattr(self, name), getattr(expected, name)
            if got != want:
                if name == "dtype_code":
                    got, want = DTYPES_BY_CODE.get(got, got), DTYPES_BY_CODE.get(want, want)
                    name = "dtype"
                raise ValueError(f"received chunk does not match the destination: {name} is {got}, expected {want}")


def _chunk_facts(layout, wire_fp8: bool) -> tuple:
    """What every chunk of ``layout`` (sent as fp8 or not) has in its header: (dtype code, num_kv,
    flags, head_dim, element bytes, the fingerprint's 8 bytes, payload bytes of one row); computed
    once per layout (stored out of band: the layout is a frozen dataclass)."""
    key = "_chunk_facts_fp8" if wire_fp8 else "_chunk_facts"
    facts = layout.__dict__.get(key)
    if facts is None:
        dtype, fingerprint, flags = layout.dtype, layout.fingerprint, 0
        if wire_fp8:  # the chunk's rows are e4m3 whatever the caches hold
            dtype, flags = torch.float8_e4m3fn, FLAG_FP8_SCALED
            fingerprint = layout_fingerprint(layout.num_layers, layout.num_kv, layout.head_dim, dtype)
        facts = (DTYPE_CODES[dtype], layout.num_kv, flags, layout.head_dim, 1 if wire_fp8 else layout.element_size,
                 bytes.fromhex(fingerprint)[:8], wire_row_bytes(layout.head_dim, layout.element_size, wire_fp8))
        object.__setattr__(layout, key, facts)
    return facts


def _payload_bytes(sel: Selection, num_kv: int, row_bytes: int) -> int:
    return ((sel.layer_stop - sel.layer_start) * num_kv * (sel.token_stop - sel.token_start)
            * (sel.head_stop - sel.head_start) * row_bytes)


def header_bytes(sel: Selection) -> bytes:
    """``ChunkHeader.for_selection(sel).to_bytes()``, without building the header object (the
    kernels' per-launch path)."""
    code, num_kv, flags, head_dim, element_bytes, fingerprint, row_bytes = _chunk_facts(sel.layout, sel.wire_fp8)
    return _FORMAT.pack(MAGIC, WIRE_VERSION, HEADER_BYTES, code, num_kv, flags, sel.layer_start, sel.layer_stop,
                        sel.token_start, sel.token_stop, sel.head_start, sel.head_stop, head_dim, element_bytes,
                        _payload_bytes(sel, num_kv, row_bytes), fingerprint, 0)


def check_status(status) -> None:
    """Wait for an unpack's status word and raise :class:`ChunkError` if it refused the chunk.

    This synchronizes with the stream the unpack ran on; call it where a sync is acceptable
    (tests, completion handling), not on the engine's critical path.
    """
    code = int(status.reshape(-1)[0].item())
    if code == STATUS_HEADER_MISMATCH:
        raise ChunkError("unpack refused a chunk whose header did not match the destination; nothing was written")
    if code != STATUS_OK:
        raise ChunkError(f"unpack reported unknown status {code}")


# ---------------------------------------------------------------------------------- checksums
# A position-weighted sum over the payload's little-endian 32-bit words (a trailing partial word
# zero-padded): s1 = sum(w), s2 = sum(w * (i + 1)), both mod 2**32, folded as s1 ^ rotl(s2, 16).
# It catches flipped, lost and reordered words on the wire, not an adversary; the numpy and the
# torch form give the same value, so a CPU sender and a GPU receiver agree.


def _fold(s1: int, s2: int) -> int:
    s1, s2 = s1 & 0xFFFFFFFF, s2 & 0xFFFFFFFF
    return s1 ^ (((s2 << 16) | (s2 >> 16)) & 0xFFFFFFFF)


def payload_checksum_numpy(payload: np.ndarray) -> int:
    data = np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1)
    pad = -data.size % 4
    if pad:
        data = np.concatenate([data, np.zeros(pad, dtype=np.uint8)])
    words = data.view("<u4").astype(np.uint64)
    weights = np.arange(1, words.size + 1, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    s1 = int(words.sum(dtype=np.uint64) & mask)
    s2 = int(((words * weights) & mask).sum(dtype=np.uint64) & mask)
    return _fold(s1, s2)


def payload_checksum_torch(payload):
    """The same checksum as an int64 tensor on the payload's device (no host sync)."""
    import torch

    data = payload.reshape(-1)
    if data.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=data.device)
    pad = -data.numel() % 4
    if pad:
        data = torch.cat([data, torch.zeros(pad, dtype=torch.uint8, device=data.device)])
    words = data.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=data.device)
    s1 = words.sum() & 0xFFFFFFFF
    s2 = ((words * weights) & 0xFFFFFFFF).sum() & 0xFFFFFFFF
    return s1 ^ (((s2 << 16) | (s2 >> 16)) & 0xFFFFFFFF)
