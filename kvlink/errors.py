"""kvlink's exceptions: one base, :class:`KVLinkError`, and a subclass per kind of failure.

Each subclass also derives from the built-in exception code written before it existed catches
(``ValueError`` for a bad argument, ``TimeoutError`` for a wait that ran out, ``ConnectionError``
for a link that could not be made, ``RuntimeError`` for a failed transfer), so
``except KVLinkError`` catches everything kvlink raises on purpose and older ``except`` clauses
keep working. Messages name the request and the peer wherever there is one.

    KVLinkError
    ├── InvalidArgument (ValueError)      a bad argument or setting, refused before anything moves
    │   ├── ProtocolError                 a malformed or unexpected control message (kvlink.control)
    │   └── AuthError                     a handshake's credentials do not check out (kvlink.auth)
    ├── ArgumentTypeError (TypeError)     an argument of the wrong type
    ├── KVLinkTimeout (TimeoutError)      a wait, connect or cancel not done in time
    ├── LinkError (ConnectionError)       connect() failed
    │   └── LinkRefused (ConnectionRefusedError)  the peer (or our own bound) refused the link
    ├── EndpointClosed (RuntimeError)     the endpoint was closed
    ├── TransferError (RuntimeError)      a transfer failed (handle.error, handle.wait())
    │   ├── LinkDown                      ... because its link went down (or was down already)
    │   ├── TransferCancelled             ... because it was cancelled (by either side)
    │   └── TransferRefused               ... because the sender refused it or a chunk failed its checks
    ├── ChunkError (RuntimeError)         an unpack refused a chunk (kvlink.wire.check_status)
    └── IPCError (RuntimeError)           CUDA IPC cannot link two processes (kvlink.ipc)
"""

from __future__ import annotations


class KVLinkError(Exception):
    """Base of every exception kvlink raises on purpose."""


class InvalidArgument(KVLinkError, ValueError):
    """A bad argument or setting; nothing was sent or written."""


class ArgumentTypeError(KVLinkError, TypeError):
    """An argument of the wrong type; nothing was sent or written."""


class ProtocolError(InvalidArgument):
    """A control message that is malformed, unknown, oversized or of another protocol version."""


class AuthError(InvalidArgument):
    """A handshake's credentials are missing, stale, replayed or wrong."""


class KVLinkTimeout(KVLinkError, TimeoutError):
    """A wait (``wait()``, ``connect()``, ``cancel()``) that did not end in time; names what and whom."""


class LinkError(KVLinkError, ConnectionError):
    """``connect()`` could not make the link."""


class LinkRefused(LinkError, ConnectionRefusedError):
    """The peer refused the link (incompatible caches, authentication, its link bound), or ours did."""


class EndpointClosed(KVLinkError, RuntimeError):
    """The endpoint is closed."""


class TransferError(KVLinkError, RuntimeError):
    """A transfer failed; the message names the request and the peer, and whether the destination
    blocks are untouched or must be treated as invalid (``handle.dst_state``)."""


class LinkDown(TransferError):
    """The transfer failed because its link went down (peer dead, stopped, gone, not reading)."""


class TransferCancelled(TransferError):
    """The transfer was cancelled, by the decode side (``handle.cancel()``) or the prefill side
    (``Endpoint.cancel_serving()``)."""


class TransferRefused(TransferError):
    """The sender refused the transfer, or a chunk failed its checks (header, checksum)."""


class ChunkError(KVLinkError, RuntimeError):
    """An unpack refused a chunk: header mismatch or corruption (kvlink.wire.check_status)."""


class IPCError(KVLinkError, RuntimeError):
    """CUDA IPC cannot link these two processes (the endpoint then uses another transport)."""
