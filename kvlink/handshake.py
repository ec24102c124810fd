"""Linking two endpoints: HELLO -> WELCOME (or REJECT), the transport they agree on, and its setup.

Decode side (``connect()``): a DEALER sends our HELLO; the WELCOME is handled in a later turn of
the progress loop, so a peer slow to answer, or not there at all, holds up no other link. The
link is registered as soon as the WELCOME is in (heartbeats flow while its transport sets up)
and ``connect()`` returns once the transport is up: NCCL's communicator forms on a helper
thread while the loop goes on.

Prefill side: a HELLO is checked (credentials, cache compatibility, the link bound), the best
transport both sides offer that can link them is picked (kvlink.transports.TRANSPORTS, best
first: a transport may decline, and the next is tried), and the WELCOME goes out before its
setup starts, so both ranks of a communicator form together.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket as pysocket
import time
from dataclasses import dataclass

import torch
import zmq

from kvlink import auth, control
from kvlink.config import Transport
from kvlink.errors import AuthError, InvalidArgument, KVLinkTimeout, LinkError, LinkRefused, ProtocolError
from kvlink.layout import check_compatible
from kvlink.link import Channel, Link
from kvlink.selection import HEADER_BYTES
from kvlink.transports.base import TransportUnavailable

log = logging.getLogger("kvlink")


@dataclass(eq=False)
class _Connecting:
    """A connect() under way: the HELLO is out, the WELCOME (then the transport's setup) not done."""

    address: str
    dealer: zmq.Socket
    timeout: float
    deadline: float
    future: concurrent.futures.Future
    excluded: tuple  # transports not to offer again (one whose setup failed)
    nonce: bytes | None = None  # of our HELLO's credentials (shared secret)


class Handshake:
    def __init__(self, ctx, transports: dict):
        self.ctx, self.engine, self.config = ctx, ctx.engine, ctx.config
        self.transports = transports  # name -> Transport, best first
        self._verifier = auth.HelloVerifier(self.config.secret) if self.config.secret else None
        self._connecting: dict[zmq.Socket, _Connecting] = {}
        # links whose transport sets up: (link, its connect() if ours, where from, deadline)
        self._setups: list[tuple[Link, _Connecting | None, str, float]] = []
        self._device_uuid = str(torch.cuda.get_device_properties(ctx.device_index).uuid) if ctx.on_gpu else ""

    def busy(self) -> bool:
        return bool(self._connecting or self._setups)

    def offered(self, excluded=()) -> list[str]:
        """What this endpoint can link with, best first."""
        if self.config.transport != Transport.AUTO:
            return [self.config.transport.value]
        return [name for name, transport in self.transports.items()
                if name not in excluded and transport.unavailable(auto=True) is None
                and (transport.has_wire or self.config.wire_dtype is None)]  # fp8 on the wire needs a wire

    # ================================================================== decode side
    def connect(self, address: str, timeout: float, future=None, excluded=()) -> concurrent.futures.Future:
        """Progress thread: send our HELLO to ``address``; a Future of the peer's name."""
        future = future or concurrent.futures.Future()
        dealer = self.engine.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # control messages and host-transport chunks (at most our chunk size) come in here
        dealer.setsockopt(zmq.MAXMSGSIZE, max(control.MAX_CONTROL_BYTES, self.config.chunk_bytes + HEADER_BYTES))
        try:
            dealer.connect(address)
            offered = self.offered(excluded)
            fields = {"ipc": None}
            for name in offered:
                fields.update(self.transports[name].hello_fields())
            credentials = nonce = None
            if self.config.secret:
                credentials, nonce = auth.hello_auth(self.config.secret, self.ctx.name, self.ctx.layout.fingerprint)
            dealer.send(control.encode(
                "HELLO", endpoint=self.ctx.name, fingerprint=self.ctx.layout.fingerprint,
                layout=self.ctx.layout.to_dict(), transports=offered, host=pysocket.gethostname(), pid=os.getpid(),
                device=self._device_uuid, chunk_bytes=self.config.chunk_bytes, auth=credentials, **fields),
                zmq.NOBLOCK)  # a fresh socket's queue is empty: this never waits
        except Exception:
            dealer.close(linger=0)
            raise
        pending = _Connecting(address, dealer, timeout, time.monotonic() + timeout, future, tuple(excluded), nonce)
        self._connecting[dealer] = pending
        self.engine.add_reader(dealer, lambda frames: self._on_reply(pending, frames))
        return future

    def _end(self, pending: _Connecting, error: Exception | None = None, name: str | None = None) -> None:
        self._connecting.pop(pending.dealer, None)
        if error is None:
            pending.future.set_result(name)
            return
        if not pending.dealer.closed:  # (a link that failed in its setup closed it already)
            self.engine.close_socket(pending.dealer)
        pending.future.set_exception(error)

    def _on_reply(self, pending: _Connecting, frames) -> None:
        try:
            self._welcome(pending, control.decode(frames[0].bytes))
        except Exception as exc:
            self._end(pending, exc)

    def _welcome(self, pending: _Connecting, reply: dict) -> None:
        address, dealer = pending.address, pending.dealer
        if reply["type"] == "REJECT":
            raise LinkRefused(f"{address} refused the link: {reply['reason']}")
        if reply["type"] != "WELCOME":
            raise ProtocolError(f"expected WELCOME from {address}, got {reply['type']}")
        if self.config.secret:
            try:
                auth.check_welcome(self.config.secret, pending.nonce, reply["endpoint"], reply["auth"])
            except AuthError as exc:
                Channel(dealer).send_last(control.encode("BYE", reason="authentication failed"))
                raise LinkRefused(f"{address}: {exc}") from None
        transport = self.transports.get(reply["transport"])
        if transport is None or reply["transport"] not in self.offered(pending.excluded):
            raise ProtocolError(f"{address} picked transport {reply['transport']!r:.40}, which we did not offer")
        name = reply["endpoint"]
        live = self.engine.live_links(besides=name)
        if live >= self.config.max_links:
            raise LinkRefused(f"{self.ctx.name} already has {live} live links (max_links={self.config.max_links})")
        try:
            state = transport.decode_state(reply)
        except TransportUnavailable as exc:
            if self.config.transport != Transport.AUTO:
                raise LinkError(f"transport {transport.name} with {name} at {address} failed: {exc}") from exc
            log.warning("kvlink %s: transport %s with %s failed (%s); linking again without it", self.ctx.name,
                        transport.name, name, exc)
            self._connecting.pop(dealer, None)
            self.engine.close_socket(dealer)
            self.connect(address, pending.timeout, pending.future, pending.excluded + (transport.name,))
            return
        link = Link(name=name, role="decode", transport=transport, remote_layout=reply["layout"],
                    chunk_bytes=reply["chunk_bytes"], state=state,
                    channel=Channel(dealer, limit=self.config.outbox_limit))
        self._connecting.pop(dealer, None)
        self.engine.add_link(link)  # from now on the dealer's messages are the link's
        self._set_up(link, pending, address)

    def _set_up(self, link: Link, pending: _Connecting | None, where: str) -> None:
        timeout = pending.timeout if pending else self.config.timeout
        try:
            link.ready = link.transport.start(link, timeout)
        except Exception as exc:
            self._failed_setup(link, pending, exc)
            return
        # a setup may take two bounded steps (NCCL: form the communicator, then connect it)
        self._setups.append((link, pending, where, time.monotonic() + 2 * timeout + 1))
        self._check_setups()

    def _check_setups(self) -> None:
        now = time.monotonic()
        for entry in list(self._setups):
            link, pending, where, deadline = entry
            if link.failed:  # gone while it set up (its peer closed, timed out)
                self._setups.remove(entry)
                if pending is not None:
                    self._end(pending, LinkError(f"link to {link.name} at {where} failed during setup: {link.failed}"))
                continue
            if link.ready is not None and not link.ready.done():
                if now > deadline:  # a setup that hangs (it should not) must not hold the link for good
                    self._setups.remove(entry)
                    self._failed_setup(link, pending, KVLinkTimeout(
                        f"{link.transport.name} setup with {link.name} not done by its deadline"))
                continue
            self._setups.remove(entry)
            try:
                if link.ready is not None:
                    link.transport.started(link, link.ready.result())
                link.ready = None
            except Exception as exc:
                self._failed_setup(link, pending, exc)
                continue
            log.info("kvlink %s <-> %s (%s): %s", self.ctx.name, link.name, where, link.transport.describe(link))
            if pending is not None:
                self._end(pending, name=link.name)

    def _failed_setup(self, link: Link, pending, exc: Exception) -> None:
        reason = f"{link.transport.name} setup with {link.name} failed: {exc}"
        self.engine.fail_link(link, reason)
        if pending is not None:
            error = exc if isinstance(exc, (TimeoutError, LinkError)) else LinkError(reason)
            self._end(pending, error)

    def turn(self) -> None:
        """Each progress turn: handshakes past their deadline fail, finished setups complete."""
        now = time.monotonic()
        for pending in [p for p in self._connecting.values() if now > p.deadline]:
            self._end(pending, KVLinkTimeout(f"endpoint {self.ctx.name}: no answer to HELLO from {pending.address} "
                                             f"within {pending.timeout:.1f} s"))
        if self._setups:
            self._check_setups()

    def close(self, error: Exception) -> None:
        for pending in list(self._connecting.values()):
            self._end(pending, error)
        for _, pending, _, _ in self._setups:
            if pending is not None:
                pending.future.set_exception(error)
        self._setups.clear()

    # ================================================================== prefill side
    def on_hello(self, identity: bytes, message: dict) -> None:
        peer, layout = message["endpoint"], self.ctx.layout
        hello_nonce = None
        try:
            if self._verifier is not None:
                hello_nonce = self._verifier.check(message["auth"], peer, message["fingerprint"])
            # A link is made before any pull names its wire dtype: accept dtypes fp8 can convert
            # between; pull() refuses such a pair without wire_dtype="fp8" before any byte moves.
            check_compatible(layout.to_dict(), message["layout"], wire_dtype="fp8")
            same_dtype = message["layout"].get("dtype") == layout.dtype_name  # else fp8 converts (checked above)
            if same_dtype and message["fingerprint"] != layout.fingerprint:
                raise InvalidArgument(f"layout fingerprints differ: ours {layout.fingerprint}, "
                                      f"theirs {message['fingerprint']}")
            live = self.engine.live_links(besides=peer)
            if live >= self.config.max_links:
                raise InvalidArgument(f"{self.ctx.name} already has {live} live links "
                                      f"(max_links={self.config.max_links})")
        except ValueError as exc:
            log.error("kvlink %s: refusing %s: %s", self.ctx.name, peer, exc)
            self.engine.reply_to(identity, control.encode("REJECT", reason=str(exc)))
            return
        ours = self.offered()
        same_gpu = bool(self._device_uuid) and message["device"] == self._device_uuid
        same_process = message["host"] == pysocket.gethostname() and message["pid"] == os.getpid()
        chosen = state = None
        welcome_fields: dict = {}
        for name in ours:
            transport = self.transports[name]
            if name not in message["transports"] or not transport.can_link(message, same_gpu, same_process) or \
                    (not same_dtype and not transport.converts_dtype):
                continue
            try:
                state, welcome_fields = transport.prefill_state(message)
            except TransportUnavailable as exc:
                log.warning("kvlink %s: transport %s with %s unavailable (%s); trying the next", self.ctx.name, name,
                            peer, exc)
                continue
            chosen = transport
            break
        if chosen is None:
            reason = f"no common transport: ours {sorted(ours)}, theirs {message['transports']}" + \
                (" (same GPU: NCCL cannot link a GPU to itself)" if same_gpu else "")
            self.engine.reply_to(identity, control.encode("REJECT", reason=reason))
            return
        chunk_bytes = min(self.config.chunk_bytes, message["chunk_bytes"])
        self.engine.reply_to(identity, control.encode(
            "WELCOME", endpoint=self.ctx.name, transport=chosen.name, chunk_bytes=chunk_bytes, layout=layout.to_dict(),
            auth=auth.welcome_auth(self.config.secret, hello_nonce, self.ctx.name) if hello_nonce else None,
            **{"nccl_id": None, "ipc": None, **welcome_fields}))
        link = Link(name=peer, role="prefill", transport=chosen, remote_layout=message["layout"],
                    chunk_bytes=chunk_bytes, state=state,
                    channel=Channel(self.engine.router, identity, limit=self.config.outbox_limit))
        self.engine.add_link(link)
        self._set_up(link, None, f"{message['host']} pid {message['pid']}")
