"""The prefill side of every link: the queue of pulls to serve, layer readiness, notifications.

Pulls are served per link in the order they arrive (NCCL's send order must match the order the
decode side posted its receives), each by its link's transport, as far as the layers it needs
are ready (layer-wise mode) and the transport can take them. What the transports share lives
here: the serve record, the queue, the SENT/FAILED reports, the cancels, ``finished_sends()``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kvlink import control
from kvlink.plan import Box

log = logging.getLogger("kvlink")

# what a transport's serve() reports
DONE = "done"        # every chunk is issued: the serve leaves the queue
WAITING = "waiting"  # for layers or for a slow reader: the pulls behind it wait too
MORE = "more"        # stopped at its per-turn budget: the loop turns again at once


@dataclass
class Serve:
    xfer: int
    request: str
    num_tokens: int
    heads: tuple[int, int]
    boxes: list[Box]
    layerwise: bool
    sel: object = None            # the validated Selection of the whole pull
    enqueue_seconds: float = 0.0
    refused: str | None = None
    next_chunk: int = 0
    checksum: bool = False  # put a payload checksum in each chunk's header
    wire: str = ""  # "fp8": e4m3 rows and scales on the wire
    state: object = None  # the transport's own (ipc: the decode side's layer counter)


class ReadyLayers:
    """``layer_ready()``'s record: per request, the layers ready (with the CUDA event after each
    one's writes), how many pulls will still read them, and since when (stale ones are dropped)."""

    def __init__(self):
        self._layers: dict[str, dict[int, object]] = {}
        self._since: dict[str, float] = {}
        self._pulls_left: dict[str, int] = {}

    def record(self, request: str, layer: int, event, pulls: int) -> None:
        self._layers.setdefault(request, {})[layer] = event
        self._since.setdefault(request, time.monotonic())
        self._pulls_left.setdefault(request, pulls)

    def of(self, request: str) -> dict:
        return self._layers.get(request, {})

    def requests(self) -> list[str]:
        return list(self._layers)

    def served(self, request: str) -> None:
        """One pull of ``request`` is served: forget its layers once every expected pull was."""
        left = self._pulls_left.get(request, 1) - 1
        if left > 0:
            self._pulls_left[request] = left  # other decode ranks still read these layers
        else:
            self.forget(request)

    def forget(self, request: str) -> None:
        self._layers.pop(request, None)
        self._since.pop(request, None)
        self._pulls_left.pop(request, None)

    def expire(self, now: float, timeout: float, in_use: set[str]) -> None:
        """Forget requests no pull served within ``timeout`` (never pulled, or finished before
        their last layer_ready() reached the progress thread)."""
        for request, since in list(self._since.items()):
            if now - since > timeout and request not in in_use:
                self.forget(request)


class Serving:
    """Serve queues of the prefill-side links (the progress thread's; ``lock`` for callers that
    look at them from their own thread: ipc's layer_ready())."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name
        self.lock = threading.RLock()
        self.ready = ReadyLayers()
        self._notifications: list[tuple[str, bool]] = []
        self._notify_lock = threading.Lock()
        self.hook = None  # Endpoint.set_serve_hook(): fault injection for tests

    # ------------------------------------------------------------------ any thread
    def finished_sends(self) -> list[tuple[str, bool]]:
        with self._notify_lock:
            done, self._notifications = self._notifications, []
        return done

    # ------------------------------------------------------------------ progress thread
    def on_message(self, link, kind: str, message: dict) -> None:
        if kind == "PULL":
            serve = link.transport.accept_pull(link, message)
            if serve is not None:
                with self.lock:
                    link.serves.append(serve)
        elif kind == "CANCEL":
            self.drop(link, lambda serve: serve.xfer == message["xfer"], "cancelled by the decode side",
                      tell_decode=False)
        elif kind == "NOTIFY":
            self._notify(message["request"], message["ok"])
            link.transport.on_notify(link, message)
        elif kind == "RELEASE":
            if not message["request"] or len(message["request"]) > 1024:
                log.error("kvlink %s: RELEASE from %s with a bad request id, ignored", self.name, link.name)
                return
            self._notify(message["request"], True)

    def _notify(self, request: str, ok: bool) -> None:
        with self._notify_lock:
            self._notifications.append((request, ok))

    def refuse(self, link, serve: Serve, reason: str) -> None:
        """Tell the decode side a pull is refused before any of it was served."""
        log.error("kvlink %s: refusing pull %d (request %r) from %s: %s", self.name, serve.xfer, serve.request,
                  link.name, reason)
        serve.refused = reason
        self.engine.send(link, control.encode("FAILED", xfer=serve.xfer, reason=reason, whole=True))

    def remove(self, link, xfer: int) -> None:
        with self.lock:
            link.serves = [serve for serve in link.serves if serve.xfer != xfer]

    def drop(self, link, which, reason: str, tell_decode: bool) -> int:
        """Stop serving the pulls ``which`` selects on ``link``; the number stopped.

        A transport whose receiver posted one receive per chunk (NCCL) keeps serving a stopped
        pull with empty (refused) chunks, which its unpack writes nothing of; elsewhere it ends.
        """
        stopped = 0
        with self.lock:
            for serve in list(link.serves):
                if not which(serve) or serve.refused is not None:
                    continue
                stopped += 1
                if link.transport.serves_refused_chunks:
                    serve.refused = reason
                else:
                    link.serves.remove(serve)
                log.info("kvlink %s: pull %d (request %r) to %s stopped: %s", self.name, serve.xfer, serve.request,
                         link.name, reason)
                if tell_decode:
                    self.engine.send(link, control.encode("FAILED", xfer=serve.xfer, reason=reason,
                                                          whole=serve.next_chunk == 0))
        return stopped

    def cancel_request(self, request: str) -> int:
        return sum(self.drop(link, lambda serve: serve.request == request, "cancelled by the prefill side",
                             tell_decode=True)
                   for link in list(self.engine.links.values()) if link.role == "prefill")

    def advance(self, links) -> bool:
        """Serve what can be served on every link; True when a serve stopped at its turn's budget."""
        more = False
        for link in list(links):
            if link.serves and link.up:
                with self.lock:
                    more |= self._advance(link)
        return more

    def _advance(self, link) -> bool:
        while link.serves:
            serve = link.serves[0]
            try:
                outcome = link.transport.serve(link, serve, self.ready.of(serve.request))
            except Exception as exc:  # never retry a serve that broke half-way
                log.exception("kvlink %s: serving pull %d (request %r) to %s failed", self.name, serve.xfer,
                              serve.request, link.name)
                if link.failed:
                    return False
                link.serves.pop(0)
                self.engine.send(link, control.encode("FAILED", xfer=serve.xfer, reason=f"prefill side error: {exc}",
                                                      whole=False))
                link.transport.serve_failed(link, serve, exc)
                return False
            if link.failed:  # a send of the serve's found the peer gone: the link's serves ended with it
                return False
            if outcome != DONE:
                return outcome == MORE  # the pulls behind it on this link wait behind it
            link.serves.pop(0)
            self.ready.served(serve.request)
            self.engine.send(link, control.encode("SENT", xfer=serve.xfer, enqueue_seconds=serve.enqueue_seconds))
        return False

    def expire(self, now: float) -> None:
        in_use = {serve.request for link in self.engine.links.values() for serve in link.serves}
        self.ready.expire(now, self.engine.config.timeout, in_use)
