"""One pull as the decode side sees it: :class:`TransferHandle`, its stats and its states.

The engine's side of a handle is a small completion API, the methods starting with ``_`` that
the transports call (no one writes a handle's fields from outside):

    _gpu_work(done, layer_events, verdict)  the pull's GPU work is queued: ``done`` is recorded
                                            after its last write; ``verdict()`` judges it once
                                            ``done`` has fired (None: fine; WAIT; or
                                            (error, untouched, TransferError subclass))
    _started_on_host()                      the pull is under way with no GPU event (host transport)
    _landed()                               one more chunk is in the destination blocks
    _finish(error, ...)                     complete it, once; later calls are no-ops
    _ended(), _elapsed()                    whether it is complete, its age

``_op`` is the transport's own record of the pull (given at construction, opaque here).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import torch

from kvlink.cuda_driver import CompletionEvent
from kvlink.errors import KVLinkTimeout, TransferError

WAIT = object()  # a verdict: not yet (a refused chunk's reason is still on its way)

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}  # per GPU: where a driver event's torch twin is recorded


def _torch_twin(event: CompletionEvent, device: int) -> torch.cuda.Event:
    """A torch event that fires when the driver ``event`` does: recorded on a side stream made to
    wait for it (the public ``event`` of a pull whose completion is a driver event)."""
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    event.wait(side.cuda_stream)
    twin = torch.cuda.Event()
    twin.record(side)
    return twin


class _Flag:
    """threading.Event's set / is_set / wait, on one lock held until set: a tenth of an Event's cost
    to make and to set (a handle makes two per pull)."""

    __slots__ = ("_lock", "_set")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()  # every waiter gets it in turn (each hands it back)
            except RuntimeError:  # a concurrent set() released it first
                pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            try:
                self._lock.release()
            except RuntimeError:  # a racing second set() released it while we held it
                pass
            return True
        return self._set


class DstState(str, enum.Enum):
    """What a pull left in its destination blocks. ``str``-valued: ``DstState.COMPLETE == "complete"``."""

    PENDING = "pending"      # not finished yet
    COMPLETE = "complete"    # every byte is in place
    UNTOUCHED = "untouched"  # failed, and nothing was written: the blocks hold what they held
    INVALID = "invalid"      # failed after some bytes may have landed: treat the blocks as garbage

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class TransferStats:
    payload_bytes: int = 0  # bytes of the destination cache filled
    wire_bytes: int = 0     # bytes that crossed (fewer with fp8 on the wire)
    chunks: int = 0
    seconds: float = 0.0
    enqueue_seconds: float = 0.0         # host time our side spent queueing the GPU work
    host_stamps: dict = field(default_factory=dict)  # ipc pulls: host time (perf_counter) after each step
    pull_cpu_seconds: float = 0.0  # ipc pulls: CPU time of the calling thread inside pull()
    sender_enqueue_seconds: float = 0.0  # the same on the prefill side (from its SENT message)

    @property
    def GBps(self) -> float:
        return self.payload_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class TransferHandle:
    """One pull, as the decode side sees it.

    ``done()`` and ``wait(timeout)`` report completion (every byte in the destination blocks).
    On a GPU cache, ``current_stream_wait()`` orders the engine's stream after the transfer
    without blocking the host (DeepEP's pattern); ``event`` is the CUDA event behind it and
    ``layer_event(l)`` the event of layer ``l`` in layer-wise mode. ``error`` holds the
    :class:`~kvlink.TransferError` of a failed transfer, ``dst_state`` what it left in the
    destination blocks (:class:`DstState`), ``stats`` its bytes, time and GB/s.
    """

    def __init__(self, xfer: int, request: str, peer: str, layerwise: bool, *, timeout: float,
                 canceller=None, device: int | None = None, op=None):
        self.xfer, self.request, self.peer = xfer, request, peer
        self.layerwise = layerwise
        self.stats = TransferStats()
        self.error: TransferError | None = None
        self.dst_state = DstState.PENDING
        self.cancelled = False
        self._timeout = timeout  # the endpoint's: the default of every wait here
        self._canceller = canceller
        self._device = device  # the GPU of the destination cache; None for a CPU cache
        self._event: torch.cuda.Event | CompletionEvent | None = None
        self._event_twin: torch.cuda.Event | None = None  # the torch view of a driver completion event
        self._layer_events: dict[int, torch.cuda.Event] = {}
        self._verdict = None
        self._started = time.perf_counter()
        self._enqueued = _Flag()  # the GPU work (or the host-side transfer) is under way
        self._finished = _Flag()
        self._lock = threading.Lock()
        self._touched = False  # something may have been written into the destination blocks
        self._chunks_landed = 0
        self._refused_at: float | None = None  # when the verdict first said WAIT
        self._spin = False  # poll completion tightly (nothing left for the progress thread to do)
        self._op = op  # the transport's own record of this pull (opaque here)

    # ------------------------------------------------------------------ public
    @property
    def device(self) -> int | None:
        """The GPU (index) of the destination cache; None for a CPU cache."""
        return self._device

    @property
    def chunks_landed(self) -> int:
        """Chunks unpacked into the destination blocks so far (host transport; GPU transports
        report their chunks at completion)."""
        return self._chunks_landed

    @property
    def event(self) -> torch.cuda.Event | None:
        """CUDA event recorded after the last write of the pull (GPU caches; None on the host
        transport). Prefer :meth:`current_stream_wait`. On ipc it exists when ``pull()``
        returns (a layer-wise pull deferred past its link's bound on queued layer copies: once the
        progress thread queued it); on nccl once the progress thread queued the receives (this
        waits for that, at most the endpoint's timeout: normally one turn of the progress loop)."""
        self._wait_enqueued()
        event = self._event
        if isinstance(event, CompletionEvent):
            if self._event_twin is None:
                self._event_twin = _torch_twin(event, self._device)
            return self._event_twin
        return event

    def layer_event(self, layer: int) -> torch.cuda.Event:
        """CUDA event recorded once ``layer`` is in the destination blocks (layer-wise pulls on GPU)."""
        self._wait_enqueued()
        if layer not in self._layer_events:
            raise KeyError(f"request {self.request!r}: no event for layer {layer} (layerwise={self.layerwise})")
        return self._layer_events[layer]

    def current_stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait on the GPU until the pull's bytes
        are in place, without blocking the host.

        A GPU pull's completion is a CUDA event (ipc: queued by ``pull()`` itself; nccl: by the
        progress thread right after, which this may wait for, one turn). Where there is no GPU
        event (the host transport, a CPU cache), the bytes are written by the host: this waits
        on the host until the pull ends (at most the endpoint's timeout). Never raises the
        transfer's error: read ``error``, or ``wait()``, for that.
        """
        if self._device is not None:
            self._wait_enqueued()
            event = self._event
            if isinstance(event, CompletionEvent):
                event.wait((stream or torch.cuda.current_stream(self._device)).cuda_stream)
                return
            if event is not None:
                (stream or torch.cuda.current_stream(self._device)).wait_event(event)
                return
        if not self._finished.wait(self._timeout) and not self.done():
            raise KVLinkTimeout(f"request {self.request!r} from {self.peer}: not done after {self._timeout:.1f} s")

    def done(self) -> bool:
        if self._finished.is_set():
            return True
        event = self._event
        if event is not None and self._enqueued.is_set() and event.query():
            verdict = self._verdict() if self._verdict is not None else None
            if verdict is WAIT:
                now = time.perf_counter()
                self._refused_at = self._refused_at or now
                if now - self._refused_at < 1.0:  # the sender's FAILED names the reason: give it a moment
                    return False
                verdict = self._verdict(final=True)
            if verdict is None:
                self._finish()
            else:
                error, untouched, kind = verdict
                self._finish(error, untouched, kind=kind)
        return self._finished.is_set()

    def gpu_idle(self) -> bool:
        """True when no GPU work of this pull can still write the destination blocks. A cancelled
        or failed pull is done at once, but copies it had queued may still run: reuse its blocks
        once this holds (always true on the host transport)."""
        event = self._event
        return event is None or bool(event.query())

    def wait(self, timeout: float | None = None) -> TransferHandle:
        """Block until done; raise the transfer's error, or KVLinkTimeout (a TimeoutError) naming
        request and peer."""
        timeout = self._timeout if timeout is None else timeout
        start = time.perf_counter()
        while not self.done():
            waited = time.perf_counter() - start
            if waited > timeout:
                raise KVLinkTimeout(f"request {self.request!r} from {self.peer}: not done after {timeout:.1f} s")
            # NOTE: completion is a CUDA event, which cannot be waited on with a timeout: poll it.
            # Real sleeps, not sleep(0), where the progress thread still has work for this pull: a
            # thread spinning on the GIL starves it (CPython hands the GIL over only every 5 ms to
            # a thread that keeps re-taking it). An ipc pull is all queued on the GPU already, so
            # its first milliseconds are polled tightly (a sleep costs ~55 us of timer slack).
            if self._spin and waited < 2e-3:
                time.sleep(0)
            else:
                self._finished.wait(2e-5 if waited < (0.1 if self._spin else 2e-3) else 1e-3)
        if self.error is not None:
            raise self.error
        return self

    def cancel(self, timeout: float | None = None) -> bool:
        """Cancel the pull; True if it was cancelled, False if it had finished already.

        After a cancel, ``error`` says so and ``dst_state`` whether the destination blocks are
        untouched or must be treated as invalid (data already in flight on the GPU cannot be
        called back). Waits at most ``timeout`` seconds for the endpoint to take the cancel.
        """
        if self._finished.is_set() or self._canceller is None:
            return False
        self._canceller(self)
        timeout = self._timeout if timeout is None else timeout
        if not self._finished.wait(timeout):
            raise KVLinkTimeout(f"request {self.request!r} from {self.peer}: cancel not taken within {timeout:.1f} s")
        return self.cancelled

    def __repr__(self) -> str:
        return f"<TransferHandle request={self.request!r} peer={self.peer!r} {self.dst_state}>"

    # ------------------------------------------------------------------ completion API (transports)
    def _wait_enqueued(self) -> None:
        if not self._enqueued.wait(self._timeout):
            raise KVLinkTimeout(f"request {self.request!r} from {self.peer}: transfer was never started")

    def __del__(self):
        event = self._event
        if isinstance(event, CompletionEvent):
            self._event = None
            event.give_back()  # nobody can query or wait on it any more (its twin has waited already)

    def _gpu_work(self, done: torch.cuda.Event | CompletionEvent, layer_events: dict | None = None, verdict=None, *,
                  spin: bool = False) -> None:
        """The pull's GPU work is queued; ``done`` (a torch event, or a driver event of the pool,
        which the handle then owns and gives back when it goes) fires after its last write. ``verdict(final=False)``
        is asked once it fired: None (complete), WAIT (not yet: asked again with final=True after a
        second), or (error, untouched, kind) to fail the pull. ``spin``: nothing is left for the
        progress thread to do, so wait() may poll tightly at first."""
        self._spin = spin
        self._event = done
        self._layer_events = layer_events or {}
        self._verdict = verdict
        self._touched = True
        self._enqueued.set()

    def _ended(self) -> bool:
        return self._finished.is_set()

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _started_on_host(self) -> None:
        self._enqueued.set()

    def _landed(self) -> None:
        self._touched = True
        self._chunks_landed += 1

    def _finish(self, error: str | None = None, untouched: bool | None = None, *, cancelled: bool = False,
                kind: type[TransferError] = TransferError) -> bool:
        """Complete the handle once; False if it was complete already. ``untouched``: for an error,
        whether the destination blocks are known to be unwritten (default: no GPU work was queued
        and no chunk landed). ``kind``: the TransferError subclass to raise."""
        with self._lock:
            if self._finished.is_set():
                return False
            if error is not None:
                if untouched is None:
                    untouched = not self._touched
                self.dst_state = DstState.UNTOUCHED if untouched else DstState.INVALID
                self.cancelled = cancelled
                where = ("the destination blocks are untouched" if untouched else
                         "the destination blocks may hold part of the data: treat them as invalid")
                self.error = kind(f"request {self.request!r} from {self.peer}: {error}; {where}")
            else:
                self.dst_state = DstState.COMPLETE
            now = time.perf_counter()
            self.stats.seconds = now - self._started
            if self.stats.host_stamps:
                self.stats.host_stamps["finished"] = now
            self._finished.set()
        return True
