"""Control-plane messages: msgpack maps over ZeroMQ, never pickle.

Every message is one msgpack map with a ``type`` and a protocol ``v``; data messages of the
host transport carry the chunk bytes as a second ZeroMQ frame. Decoding checks the type, the
required fields and their Python types, and refuses oversized messages, so a malformed peer
produces a :class:`ProtocolError`, never a crash.

Flow on one link (decode pulls from prefill):

    decode                               prefill
    HELLO {fingerprint, layout, caps, ipc} ->
                                      <- WELCOME {transport, nccl_id, chunk_bytes, ipc}   (or REJECT)
    PULL {xfer, request, src, dst n, tokens, plan}  ->       (ipc transport: layer-wise pulls only)
                                      <- DATA {xfer, chunk} + bytes                   (host transport)
                                      <- SENT {xfer}            (all chunks handed to the wire)
                                      <- FAILED {xfer, reason, whole}  (nothing more of this pull will arrive)
    CANCEL {xfer, request}           ->                         (the decode side gave up on it)
    NOTIFY {xfer, request, ok}       ->                         (decode has the blocks: free them)
    RELEASE {request}                ->                         (resharding: another rank sent them; free them)
    HEARTBEAT                       <->
    BYE                             <->
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvlink.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # a pull for 100k blocks is ~0.6 MB; anything larger is refused

# type -> {field: python type(s)}; every listed field is required.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "HELLO": {"endpoint": (str,), "fingerprint": (str,), "layout": (dict,), "transports": (list,),
              "host": (str,), "pid": (int,), "device": (str,), "chunk_bytes": (int,),
              "ipc": (dict, type(None)),  # kvlink.ipc: the layer counters' export (ipc transport offered)
              "auth": (list, type(None))},  # kvlink.auth: [time, nonce, mac] with a shared secret
    "WELCOME": {"endpoint": (str,), "transport": (str,), "nccl_id": (bytes, type(None)), "chunk_bytes": (int,),
                "layout": (dict,), "ipc": (dict, type(None)),  # ipc: the cache's export and byte strides
                "auth": (bytes, type(None))},  # kvlink.auth: mac over the HELLO's nonce
    "REJECT": {"reason": (str,)},
    "PULL": {"xfer": (int,), "request": (str,), "src_blocks": (list,), "num_tokens": (int,),
             "layers": (list,), "heads": (list,), "chunks": (list,), "layerwise": (bool,),
             "counter": (list,),  # ipc layer-wise: [slot, base] of the decode side's layer counter
             "checksum": (bool,),  # the sender puts a payload checksum in each chunk's header
             "wire": (str,)},  # "" (the cache's bytes) or "fp8" (e4m3 rows with scales, kvlink.wire)
    "DATA": {"xfer": (int,), "chunk": (int,)},
    "SENT": {"xfer": (int,)},
    "FAILED": {"xfer": (int,), "reason": (str,), "whole": (bool,)},  # whole: refused before any data moved
    "CANCEL": {"xfer": (int,), "request": (str,)},  # decode -> prefill: stop serving this pull
    "NOTIFY": {"xfer": (int,), "request": (str,), "ok": (bool,)},
    "RELEASE": {"request": (str,)},  # decode -> prefill: done with this request, nothing pulled from you
    "HEARTBEAT": {},
    "BYE": {"reason": (str,)},
}


def encode(kind: str, **fields: Any) -> bytes:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown control message type {kind!r}")
    return msgpack.packb({"type": kind, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


def decode(data: bytes) -> dict:
    """Parse and validate one control message; ProtocolError on anything unexpected."""
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise ProtocolError(f"undecodable control message: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"control message is a {type(message).__name__}, expected a map")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown control message type {kind!r:.80}")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{kind}: protocol version {message.get('v')!r}, this kvlink speaks {PROTOCOL_VERSION}")
    for field, types in SCHEMAS[kind].items():
        if field not in message:
            raise ProtocolError(f"{kind}: missing field {field!r}")
        value = message[field]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{kind}: field {field!r} has type {type(value).__name__}")
    return message


def int_list(message: dict, field: str, *, length: int | None = None) -> list[int]:
    """A list field that must hold only ints (optionally of a given length)."""
    values = message[field]
    if length is not None and len(values) != length:
        raise ProtocolError(f"{message['type']}: {field} has {len(values)} items, expected {length}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"{message['type']}: {field} must hold ints")
    return values
