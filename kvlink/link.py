"""A link to one peer: the fields every transport shares, and the channel its messages go out on.

What only one transport needs lives in ``Link.state``, an object of that transport's own
(kvlink.transports): the link itself is not the union of every transport's fields.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from dataclasses import dataclass, field

import zmq


class Channel:
    """How the progress thread sends to one peer, never blocking: ``socket`` is our DEALER for the
    peer (decode side) or the listening ROUTER with the peer's ``identity`` (prefill side).

    ZeroMQ refuses a message (EAGAIN) once its queue for the peer is full: the peer is slow,
    stopped or gone. The message then waits in the outbox, later ones queue behind it in order,
    and :meth:`flush` retries each turn. The outbox is bounded: past ``limit`` the link must fail.
    """

    def __init__(self, socket: zmq.Socket, identity: bytes | None = None, limit: int = 1024):
        self.socket, self.identity, self.limit = socket, identity, limit
        self.outbox: collections.deque = collections.deque()

    def send(self, frames, copy: bool = True) -> str | None:
        """Queue one message (a list of frames); the reason the link must fail, or None."""
        if self.outbox:
            if len(self.outbox) >= self.limit:
                return f"control queue full: peer not reading ({len(self.outbox)} messages queued)"
            self.outbox.append((frames, copy))
            return None
        try:
            self._send_now(frames, copy)
        except zmq.Again:
            self.outbox.append((frames, copy))
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: EHOSTUNREACH, the peer disconnected
            return f"cannot reach peer: {exc}"
        return None

    def flush(self) -> str | None:
        """Send what the outbox holds while ZeroMQ takes it; the reason the link must fail, or None."""
        while self.outbox:
            frames, copy = self.outbox[0]
            try:
                self._send_now(frames, copy)
            except zmq.Again:
                return None
            except zmq.ZMQError as exc:
                return f"cannot reach peer: {exc}"
            self.outbox.popleft()
        return None

    def send_last(self, data: bytes) -> None:
        """A parting message (BYE), best effort: nothing waits for a peer that cannot take it."""
        try:
            self._send_now([data], True)
        except zmq.ZMQError:
            pass  # the peer's liveness check tells it all the same

    def _send_now(self, frames, copy: bool) -> None:
        if self.identity is None:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        else:
            self.socket.send_multipart([self.identity, *frames], zmq.NOBLOCK, copy=copy)


@dataclass(eq=False)
class Link:
    name: str            # the peer's endpoint name
    role: str            # "decode" (we pull through it) or "prefill" (we serve it)
    transport: object    # the kvlink.transports.Transport moving its bytes
    remote_layout: dict  # the peer's cache description from the handshake (CacheLayout.to_dict)
    chunk_bytes: int
    channel: Channel
    state: object = None  # the transport's own per-link state
    ready: concurrent.futures.Future | None = None  # the transport's setup, while it runs (NCCL init)
    last_seen: float = field(default_factory=time.monotonic)
    failed: str | None = None
    pending: dict = field(default_factory=dict)  # decode: xfer -> TransferHandle, in issue order
    serves: list = field(default_factory=list)   # prefill: kvlink.serving.Serve, in arrival order

    @property
    def up(self) -> bool:
        """Set up and not failed: pulls may go through it."""
        return self.failed is None and (self.ready is None or self.ready.done())

    def info(self) -> dict:
        return {"peer": self.name, "role": self.role, "transport": self.transport.name, "failed": self.failed,
                "serving": len(self.serves), "in_flight": len(self.pending),
                "queued_messages": len(self.channel.outbox), **self.transport.link_info(self)}
