"""The progress engine: one thread per endpoint that owns every socket and never blocks on a peer.

The engine's callers (``pull()``, ``cancel()``, ``connect()``...) hand it work through a command
queue and a wake-up descriptor (Wakeup); the thread runs turns, each bounded:

    1. at most ``turn_budget`` commands;
    2. at most ``turn_budget`` messages from each socket with some waiting;
    3. the links' outboxes flushed as far as ZeroMQ takes them (kvlink.link.Channel);
    4. handshakes and transport setups moved on (kvlink.handshake), serves advanced
       (kvlink.serving), pulls' completions polled (each link's transport);
    5. liveness: heartbeats every ``heartbeat`` seconds, and every link's timeout checked.

No socket call blocks (NOBLOCK everywhere: a peer that does not read fills its link's bounded
outbox and that link fails, naming the peer and why), so a turn's length does not depend on any
peer, a failing link never delays another, liveness is checked every turn whatever the load, and
``stop()`` is seen within a turn.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time

import torch
import zmq

from kvlink import control
from kvlink.errors import EndpointClosed, KVLinkTimeout, LinkDown, ProtocolError
from kvlink.link import Link

log = logging.getLogger("kvlink")



class Wakeup:
    """A file descriptor a poll loop watches, which any thread makes readable: an eventfd (one
    system call, no ZeroMQ message, no allocation), or a pipe where there is no eventfd."""

    def __init__(self):
        if hasattr(os, "eventfd"):
            self.fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write_fd, False)
        self.closed = False

    def set(self) -> None:
        try:
            os.write(self._write_fd, b"\x01\0\0\0\0\0\0\0")  # an eventfd adds the 8-byte count
        except (BlockingIOError, OSError):
            pass  # full: a wake-up is pending already

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):  # an eventfd: one read resets its count
                if self.fd == self._write_fd:
                    break
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)
        if self._write_fd != self.fd:
            os.close(self._write_fd)


class ProgressEngine:
    """Sockets, links, commands and liveness of one endpoint (see the module docstring)."""

    def __init__(self, ctx, listen: str | None):
        self.ctx = ctx
        self.name, self.config = ctx.name, ctx.config
        self.links: dict[str, Link] = {}
        self.late_messages = 0  # messages for transfers or links already ended: dropped, counted
        self.handshake = self.serving = None  # set by the endpoint before start()
        self._by_identity: dict[bytes, Link] = {}  # prefill side: ROUTER identity -> link
        self._readers: dict[zmq.Socket, object] = {}  # socket -> what handles a message from it
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._quiet: collections.deque = collections.deque()  # post_quiet(): no wake-up needed
        self._busy = False  # the loop turns every millisecond anyway (post_quiet needs no wake-up)
        self._stopping = False
        self.context = zmq.Context()
        self._wakeup = Wakeup()
        self._wake_lock = threading.Lock()
        self._poller = zmq.Poller()
        self._poller.register(self._wakeup.fd, zmq.POLLIN)
        self.router = None
        self.address = None
        if listen is not None:
            self.router = self.context.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a peer that is gone fails, not vanishes
            # NOTE: only control messages come in here; ZeroMQ drops a peer that sends a bigger
            # frame before buffering it, so no peer can make this process allocate without bound
            self.router.setsockopt(zmq.MAXMSGSIZE, control.MAX_CONTROL_BYTES)
            if listen.endswith(":0"):
                port = self.router.bind_to_random_port(listen[: listen.rfind(":")])
                self.address = f"{listen[: listen.rfind(':')]}:{port}"
            else:
                self.router.bind(listen)
                self.address = listen
            self.add_reader(self.router, self._on_router_message)
        self._thread = threading.Thread(target=self._run, name=f"kvlink-progress-{self.name}", daemon=True)

    # ================================================================== any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def post(self, fn, *args, on_error=None) -> None:
        """Run ``fn(*args)`` on the progress thread. ``on_error(exc)`` is called there if it raises
        (or with EndpointClosed if the endpoint closes first); without one the error is logged."""
        if self._stopping:
            raise EndpointClosed(f"endpoint {self.name} is closed")
        self._commands.put((fn, args, on_error))
        self._wake()

    def post_quiet(self, fn, *args) -> None:
        """``post()`` for work that may wait for the loop's next turn: no wake-up when the loop turns
        every millisecond anyway (waking it for each of many calls makes it compete with their
        thread for the GIL). ``fn`` must not raise."""
        # NOTE: _busy drops before the queue is drained: work queued after the drain sees it down
        # and wakes the loop; work that saw it up was queued before the drain.
        self._quiet.append((fn, args))
        if not self._busy:
            self._wake()

    def call_async(self, fn, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the progress thread; a Future of its result. ``fn`` may instead
        return a Future of its own (an answer that comes in later turns): it is chained."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            result = fn(*args)
            if isinstance(result, concurrent.futures.Future):
                result.add_done_callback(lambda done: _copy_outcome(done, future))
            else:
                future.set_result(result)

        self.post(run, on_error=future.set_exception)
        return future

    def call(self, fn, *args, timeout: float, what: str):
        """``call_async`` and wait at most ``timeout`` seconds for the result (or its error)."""
        try:
            return self.call_async(fn, *args).result(timeout)
        except concurrent.futures.TimeoutError:
            raise KVLinkTimeout(f"endpoint {self.name}: {what} not done within {timeout:.1f} s") from None

    def stop(self, timeout: float) -> bool:
        """Stop the thread (it ends what is under way and closes the sockets); True if it stopped
        within ``timeout``."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with self._wake_lock:  # never a write to a descriptor closed (and its number reused) meanwhile
            if not self._wakeup.closed:
                self._wakeup.set()

    # ================================================================== progress thread: links and sockets
    def add_reader(self, sock: zmq.Socket, reader) -> None:
        """Poll ``sock``; each message's frames go to ``reader(frames)``."""
        if sock not in self._readers:
            self._poller.register(sock, zmq.POLLIN)
        self._readers[sock] = reader

    def close_socket(self, sock: zmq.Socket) -> None:
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)
        sock.close(linger=0)

    def add_link(self, link: Link) -> None:
        """Register ``link`` (replacing, and failing, an older link of the same peer)."""
        old = self.links.get(link.name)
        if old is not None:
            self.fail_link(old, "replaced by a new link", level=logging.INFO if link.role == "prefill" else logging.ERROR)
            try:
                old.transport.close_link(old)  # nothing will use it again: free its mappings, communicator
            except Exception as exc:
                log.error("kvlink %s: closing the replaced link to %s: %s", self.name, old.name, exc)
        self.links[link.name] = link
        if link.channel.identity is not None:
            self._by_identity[link.channel.identity] = link
        else:
            self.add_reader(link.channel.socket, lambda frames: self._on_link_message(link, frames))

    def live_links(self, besides: str) -> int:
        return sum(not link.failed and link.name != besides for link in self.links.values())

    def send(self, link: Link, *frames, copy: bool = True) -> bool:
        """Hand a message for ``link``'s peer to ZeroMQ, never blocking; False if the link is (now) down."""
        if link.failed:
            return False
        reason = link.channel.send(list(frames), copy)
        if reason is not None:
            self.fail_link(link, reason)
            return False
        return True

    def reply_to(self, identity: bytes, data: bytes) -> None:
        """A handshake answer to a peer that has no link (yet): dropped if it cannot go at once."""
        try:
            self.router.send_multipart([identity, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("kvlink %s: could not answer peer %r: %s", self.name, identity, exc)

    def drop_late(self, what: str, peer: str) -> None:
        """A message for a transfer or link that ended already (cancelled, refused, failed): expected
        after faults (thousands after a stalled peer resumes), so counted and logged at debug only."""
        self.late_messages += 1
        log.debug("kvlink %s: dropped late %s from %s", self.name, what, peer)

    def fail_link(self, link: Link, reason: str, level: int = logging.ERROR) -> None:
        """``link`` is down for good: its pulls fail (naming ``reason``), its serves stop, its
        transport lets go, and (decode side) its socket closes: a peer resumed after a stop finds
        the connection gone and its transfers to us failed."""
        if link.failed:
            return
        link.failed = reason
        log.log(level, "kvlink %s: link to %s down: %s", self.name, link.name, reason)
        link.transport.end_pulls(link, f"link failed: {reason}", LinkDown)
        link.transport.link_failed(link)
        link.pending.clear()
        with self.serving.lock:
            link.serves.clear()
        link.channel.outbox.clear()
        if link.channel.identity is None:
            self.close_socket(link.channel.socket)

    # ================================================================== progress thread: the loop
    def _run(self) -> None:
        try:
            profile_dir = self.config.profile_dir
            if not profile_dir:
                return self._loop()
            import cProfile

            profiler = cProfile.Profile()
            try:
                profiler.enable()
            except ValueError as exc:  # Python 3.12+: one profiler a process (another endpoint's here)
                log.warning("kvlink %s: progress thread not profiled: %s", self.name, exc)
                return self._loop()
            try:
                self._loop()
            finally:
                profiler.disable()
                os.makedirs(profile_dir, exist_ok=True)
                profiler.dump_stats(os.path.join(profile_dir,
                                                 f"progress-{self.name.replace(':', '_').replace('/', '_')}.prof"))
        finally:
            with self._wake_lock:  # no _wake() is between its check and its write while these go
                self.context.destroy(linger=0)
                self._wakeup.close()

    def _loop(self) -> None:
        if self.ctx.device_index is not None:
            torch.cuda.set_device(self.ctx.device_index)  # the current device is per thread
        next_heartbeat = time.monotonic() + self.config.heartbeat
        more = False
        while not self._stopping:
            try:
                more = self._turn(next_heartbeat, more)
            except Exception:  # keep serving other requests; the failed one times out with its name
                log.exception("kvlink %s: progress thread error", self.name)
                more = False
            # NOTE: liveness every turn, whatever the load: a turn is bounded, so a burst of commands
            # or messages delays it by one turn at most
            now = time.monotonic()
            try:
                if now >= next_heartbeat:
                    next_heartbeat = now + self.config.heartbeat
                    self._heartbeat(now)
                self._check_liveness(now)
            except Exception:
                log.exception("kvlink %s: liveness check error", self.name)
        self._shutdown()

    def _turn(self, next_heartbeat: float, more: bool) -> bool:
        """One bounded turn; True when work was left for the next one (it then polls without waiting)."""
        budget = self.config.turn_budget
        self._busy = False
        while self._quiet:
            fn, args = self._quiet.popleft()
            fn(*args)
        busy = bool(self.handshake.busy()) or any(link.pending or link.serves or link.channel.outbox
                                                  for link in self.links.values())
        self._busy = busy
        if more or not self._commands.empty():
            wait_ms = 0
        else:
            wait_ms = 1 if busy else max(1, int((next_heartbeat - time.monotonic()) * 1000))
        events = dict(self._poller.poll(wait_ms))
        more = False
        if events.pop(self._wakeup.fd, None):  # a wake-up only says "look at the queue"
            self._wakeup.clear()
        for _ in range(budget):
            try:
                fn, args, on_error = self._commands.get_nowait()
            except queue.Empty:
                break
            self._run_command(fn, args, on_error)
        else:
            more = True
        for sock in events:
            more |= self._drain(sock, budget)
        for link in list(self.links.values()):
            if link.channel.outbox and not link.failed:
                reason = link.channel.flush()
                if reason is not None:
                    self.fail_link(link, reason)
        self.handshake.turn()
        more |= self.serving.advance(self.links.values())
        for link in list(self.links.values()):
            if link.pending and link.up:
                link.transport.poll(link)
        return more

    def _run_command(self, fn, args, on_error) -> None:
        try:
            fn(*args)
        except Exception as exc:
            if on_error is None:
                log.exception("kvlink %s: command %s failed", self.name, getattr(fn, "__name__", fn))
            else:
                on_error(exc)

    def _drain(self, sock: zmq.Socket, budget: int) -> bool:
        """Hand at most ``budget`` waiting messages of ``sock`` to its reader; True if more wait."""
        for _ in range(budget):
            reader = self._readers.get(sock)  # looked up each time: a message may close or hand over the socket
            if reader is None:
                return False
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            reader(frames)
        return True

    def _on_link_message(self, link: Link, frames) -> None:
        """A message on our DEALER of a decode-side link."""
        if link.failed:
            self.drop_late("message", link.name)
            return
        link.last_seen = time.monotonic()
        try:
            message = control.decode(frames[0].bytes)
        except ProtocolError as exc:
            log.error("kvlink %s: bad message from %s: %s", self.name, link.name, exc)
            return
        kind = message["type"]
        if kind == "HEARTBEAT":
            return
        if kind == "BYE":
            self.fail_link(link, f"peer closed: {message['reason']}", level=logging.INFO)
            return
        handle = link.pending.get(message.get("xfer"))
        if handle is None:  # a transfer that ended here already: its chunks and reports arrive late
            self.drop_late(f"{kind} of transfer {message.get('xfer')}", link.name)
            return
        link.transport.on_message(link, handle, kind, message, frames)

    def _on_router_message(self, frames) -> None:
        """A message on the listening ROUTER: a HELLO, or a message of a prefill-side link."""
        identity = frames[0].bytes
        try:
            message = control.decode(frames[1].bytes)
        except (ProtocolError, IndexError) as exc:
            log.error("kvlink %s: bad message from peer %r: %s", self.name, identity, exc)
            return
        kind = message["type"]
        if kind == "HELLO":
            self.handshake.on_hello(identity, message)
            return
        link = self._by_identity.get(identity)
        if link is None:
            log.warning("kvlink %s: %s from an unknown peer, ignored", self.name, kind)
            return
        if link.failed:  # the link's transfers ended with it; what the peer still sends is late
            self.drop_late(kind, link.name)
            return
        link.last_seen = time.monotonic()
        if kind == "BYE":
            self.fail_link(link, f"peer closed: {message['reason']}", level=logging.INFO)
        elif kind != "HEARTBEAT":
            self.serving.on_message(link, kind, message)

    def _heartbeat(self, now: float) -> None:
        self.serving.expire(now)
        beat = control.encode("HEARTBEAT")
        for link in list(self.links.values()):
            if not link.failed and not link.channel.outbox:  # a queue ahead of it tells the peer we live
                self.send(link, beat)

    def _check_liveness(self, now: float) -> None:
        timeout = self.config.timeout
        for link in list(self.links.values()):
            if not link.failed and now - link.last_seen > timeout:
                self.fail_link(link, f"no message for {now - link.last_seen:.1f} s (timeout {timeout:.1f} s)")

    def _shutdown(self) -> None:
        closed = EndpointClosed(f"endpoint {self.name} is closed")
        while self._quiet:  # work queued without a wake-up: it runs, and ends below like the rest
            fn, args = self._quiet.popleft()
            fn(*args)
        while True:  # commands that came too late: their callers learn it now, not at their timeout
            try:
                _, _, on_error = self._commands.get_nowait()
            except queue.Empty:
                break
            if on_error is not None:
                on_error(closed)
        self.handshake.close(closed)
        bye = control.encode("BYE", reason=f"{self.name} closed")
        for link in self.links.values():
            if not link.failed:
                link.channel.send_last(bye)
            link.transport.end_pulls(link, "endpoint closed", LinkDown)
        for link in self.links.values():
            try:
                link.transport.close_link(link)
            except Exception as exc:  # a CUDA error already poisoned the context: nothing left to free
                log.error("kvlink %s: closing the link to %s: %s", self.name, link.name, exc)
        self.links.clear()


def _copy_outcome(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
