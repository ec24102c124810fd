"""The object an engine holds: registers its cache, links to peers, moves requests' KV blocks.

One :class:`Endpoint` per GPU (or per CPU cache). The decode side *pulls*: it names the
request, the prefill side's source blocks and its own destination blocks; the prefill side
serves pulls on each link in the order they arrive, so NCCL's send/recv order matches on both
sides without further coordination.

Pipeline on the NCCL transport (per chunk of the request's plan, kvlink.plan)::

    prefill: pack stream:  wait(slot free) -> pack(chunk i) -> record(packed)
             link stream:  wait(packed) -> ncclSend(slot) -> record(slot free)
    decode:  link stream:  wait(slot free) -> ncclRecv(slot) -> record(received)
             unpack stream: wait(received) -> unpack(chunk i) -> record(slot free)

Every ordering is a CUDA event between streams; the host never waits for the GPU. Slots come
from a preallocated staging pool, so chunk i+1 packs while chunk i is on the wire and chunk i-1
unpacks. On the host (TCP) transport the same chunks travel as ZeroMQ messages.

On the ipc transport (two processes on one host, kvlink.ipc) there is no pipeline: the decode
side maps the prefill's cache at the handshake, and ``pull()`` itself queues one copy kernel
that reads the source blocks across NVLink and writes the destination blocks, with no message
to the prefill side until the NOTIFY. In layer-wise mode each layer's copy first waits, on the
GPU, for a counter that the prefill's stream advances after that layer's forward pass.

A background progress thread owns the ZeroMQ sockets and issues every NCCL call; the engine's
threads talk to it through a command queue.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import socket as pysocket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from kvlink import auth, control, cuda_driver, ipc, nccl
from kvlink.control import ProtocolError
from kvlink.kernels import _on_device, launch_copy
from kvlink.layout import CacheLayout, PeerLayout, check_compatible
from kvlink.pack import _resolve_backend, pack_selection, prepare, unpack_selection
from kvlink.plan import Box, box_payload_bytes, plan_chunks
from kvlink.selection import HEADER_BYTES, WIRE_DTYPES, block_ids_to_numpy, select, wire_row_bytes, with_wire
from kvlink.wire import CHECKSUM_OFFSET, STATUS_OK, payload_checksum_numpy, payload_checksum_torch

log = logging.getLogger("kvlink")

TRANSPORTS = ("auto", "ipc", "nccl", "host")
# ipc layer-wise pulls: int32 layer counters on the decode GPU that the prefill's stream advances
COUNTER_SLOTS = 1024
# host transport: chunks one serve hands to ZeroMQ per progress turn, so a long pull neither
# queues its whole payload in memory at once nor keeps cancels and other links waiting
HOST_CHUNKS_PER_TURN = 8
DEFAULT_TIMEOUT = float(os.environ.get("KVLINK_TIMEOUT", "30"))
# progress loop: most commands, and most messages per socket, one turn handles before it checks
# liveness and moves every link on (a burst on one link must not starve the others)
TURN_BUDGET = 256
# messages a link may queue behind a peer that does not read; past it the link fails
OUTBOX_LIMIT = 1024
REFUSED_FLAG = 0x8000  # header flag of a chunk sent in place of data the prefill side refused
_DEFAULT = object()  # pull(wire_dtype=...) not given: the endpoint's default


def _as_int32(value: torch.Tensor) -> torch.Tensor:
    """A value in [0, 2**32) as the int32 with the same bits."""
    return (value - (value >= 2**31).to(value.dtype) * 2**32).to(torch.int32)


class TransferError(RuntimeError):
    """A transfer failed; the message names the request and the peer."""


@dataclass
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


class _FutureReply:
    """The (done, box) reply of a progress-thread command nobody waits for: resolves a Future."""

    def __init__(self):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.box: dict = {}

    def set(self) -> None:
        if "error" in self.box:
            self.future.set_exception(self.box["error"])
        else:
            self.future.set_result(self.box.get("result"))


class TransferHandle:
    """One pull, as the decode side sees it.

    ``done()`` and ``wait(timeout)`` report completion (every byte in the destination blocks);
    on a GPU cache ``event`` is a CUDA event the engine's stream can wait on instead, and
    ``layer_event(l)`` the event of layer ``l`` in layer-wise mode. ``error`` holds the
    :class:`TransferError` of a failed transfer; ``stats`` its bytes, time and GB/s.
    """

    def __init__(self, xfer: int, request: str, peer: str, layerwise: bool):
        self.xfer, self.request, self.peer = xfer, request, peer
        self.layerwise = layerwise
        self.stats = TransferStats()
        self.error: TransferError | None = None
        self._event: torch.cuda.Event | None = None
        self._layer_events: dict[int, torch.cuda.Event] = {}
        self._started = time.perf_counter()
        self._enqueued = threading.Event()  # the GPU work (or the host wait) is in place
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._status_host: torch.Tensor | None = None  # pinned copy of the unpack status word
        self._refused_at: float | None = None  # when the GPU reported a refused chunk (waiting for the reason)
        self._spin = False  # poll completion tightly (nothing left for the progress thread to do)
        self.dst_state = "pending"  # then "complete", or for a failed pull "untouched" / "invalid"
        self.cancelled = False
        self._chunks_done = 0  # host transport: chunks unpacked so far
        self._refused_whole = False  # the prefill side refused the whole pull (every chunk arrives empty)
        self._canceller = None  # set by the endpoint
        self._counter: tuple[int, int, int] | None = None  # ipc layer-wise: (slot, base, layers)

    @property
    def event(self) -> torch.cuda.Event | None:
        """CUDA event recorded after the last unpack (GPU caches; None on the host path).

        ``torch.cuda.current_stream().wait_event(handle.event)`` orders the engine's work after
        the transfer without blocking the host.
        """
        if not self._enqueued.wait(DEFAULT_TIMEOUT):
            raise TimeoutError(f"request {self.request!r} from {self.peer}: transfer was never started")
        return self._event

    def layer_event(self, layer: int) -> torch.cuda.Event:
        """CUDA event recorded once ``layer`` is in the destination blocks (layer-wise pulls on GPU)."""
        if not self._enqueued.wait(DEFAULT_TIMEOUT):
            raise TimeoutError(f"request {self.request!r} from {self.peer}: transfer was never started")
        if layer not in self._layer_events:
            raise KeyError(f"request {self.request!r}: no event for layer {layer} (layerwise={self.layerwise})")
        return self._layer_events[layer]

    def done(self) -> bool:
        if self._finished.is_set():
            return True
        event = self._event
        if event is not None and self._enqueued.is_set() and event.query():
            if self._status_host is not None and int(self._status_host[0]) != STATUS_OK:
                # the sender refused the pull: its FAILED message names the reason; give it a moment
                now = time.perf_counter()
                self._refused_at = self._refused_at or now
                if now - self._refused_at < 1.0:
                    return False
            self._finish()
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> "TransferHandle":
        """Block until done; raise the transfer's error, or TimeoutError naming request and peer."""
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        start = time.perf_counter()
        while not self.done():
            waited = time.perf_counter() - start
            if waited > timeout:
                raise TimeoutError(f"request {self.request!r} from {self.peer}: not done after {timeout:.1f} s")
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
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request!r} from {self.peer}: cancel not taken within {timeout:.1f} s")
        return self.cancelled

    # -- called by the endpoint ------------------------------------------------------------
    def _finish(self, error: str | None = None, *, untouched: bool | None = None, cancelled: bool = False) -> bool:
        """Complete the handle once. ``untouched``: for an error, whether the destination blocks are
        known to be unwritten (default: nothing was queued on the GPU and no chunk unpacked)."""
        with self._lock:
            if self._finished.is_set():
                return False
            if error is None and self._status_host is not None and int(self._status_host[0]) != STATUS_OK:
                if self._status_host.numel() > 1 and int(self._status_host[1]):
                    error = "a received chunk failed its checksum (corrupted on the way) and was not unpacked"
                else:
                    error = "a received chunk was refused (header mismatch or refused by the sender)"
                untouched = self._refused_whole
            if error is not None:
                if untouched is None:
                    untouched = self._event is None and self._chunks_done == 0
                self.dst_state = "untouched" if untouched else "invalid"
                self.cancelled = cancelled
                where = ("the destination blocks are untouched" if untouched else
                         "the destination blocks may hold part of the data: treat them as invalid")
                self.error = TransferError(f"request {self.request!r} from {self.peer}: {error}; {where}")
            else:
                self.dst_state = "complete"
            now = time.perf_counter()
            self.stats.seconds = now - self._started
            if self.stats.host_stamps:
                self.stats.host_stamps["finished"] = now
            self._finished.set()
        return True


@dataclass
class _Slot:
    """A staging buffer and its two events, reused for every chunk (re-recording is safe: a stream
    waits on the record that was current when the wait was queued)."""
    buffer: torch.Tensor
    free: torch.cuda.Event = field(default_factory=torch.cuda.Event)   # after the last read of the buffer
    ready: torch.cuda.Event = field(default_factory=torch.cuda.Event)  # after the chunk was written into it
    used: bool = False


@dataclass
class _Link:
    name: str                     # the peer's endpoint name
    role: str                     # "decode" (we pull through it) or "prefill" (we serve it)
    transport: str
    remote_layout: dict
    chunk_bytes: int
    identity: bytes = b""         # ROUTER identity of the peer (prefill side)
    socket: zmq.Socket | None = None  # DEALER (decode side)
    comm: nccl.Communicator | None = None
    stream: torch.cuda.Stream | None = None
    last_seen: float = field(default_factory=time.monotonic)
    serves: list = field(default_factory=list)      # prefill: pulls in arrival order
    pending: dict = field(default_factory=dict)     # decode: xfer -> handle
    failed: str | None = None
    peer_layout: PeerLayout | None = None           # ipc, decode side: the prefill's cache, mapped here
    peer_memory: ipc.PeerMemory | None = None       # ipc: what we mapped of the peer (cache or counters)
    layer_stream: torch.cuda.Stream | None = None   # ipc, decode side: layer-wise copies (may wait on the GPU)
    # messages ZeroMQ would not take without blocking (the peer is slow or gone), sent in order
    outbox: collections.deque = field(default_factory=collections.deque)


@dataclass
class _Connecting:
    """A handshake in progress (decode side): the HELLO is out, the WELCOME not in yet."""
    address: str
    dealer: zmq.Socket
    timeout: float
    deadline: float
    reply: tuple
    with_ipc: bool
    nonce: bytes | None = None  # of our HELLO's credentials (shared secret)


@dataclass
class _Serve:
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
    counter: tuple[int, int] = (0, 0)  # ipc layer-wise: the decode side's counter slot and base value
    checksum: bool = False  # put a payload checksum in each chunk's header
    wire: str = ""  # "fp8": e4m3 rows and scales on the wire


class Endpoint:
    """kvlink's per-GPU object: cache registration, links, pulls, notifications.

    Args:
        layout: this side's cache (kvlink.presets).
        name: how peers and logs call this endpoint (default: host:pid:device).
        listen: ZeroMQ address to serve pulls on (``tcp://127.0.0.1:0`` picks a port; ``None``
            for a pull-only endpoint). Loopback unless told otherwise.
        transport: ``"auto"`` (NCCL between two GPUs, else host TCP), ``"nccl"`` or ``"host"``.
        chunk_bytes: staging slot payload size (default: ``KVLINK_CHUNK_MB`` or 64 MiB).
        num_slots: staging slots (GPU); 3 lets pack, wire and unpack overlap.
        timeout: seconds any wait may take before it fails with an error naming the peer.
        max_ctas: thread blocks pack/unpack may use while NCCL runs (default ``KVLINK_MAX_CTAS`` or 64).
        ipc_max_ctas: thread blocks of an ipc pull's copy kernel (default ``KVLINK_IPC_MAX_CTAS`` or
            264; 0 = one per tile): remote reads are latency-bound, so the copy needs more blocks
            in flight than pack/unpack to fill NVLink.
        max_links: most live links (each NCCL link holds a communicator, ~100-250 MiB of GPU
            memory); a peer past the bound is refused at the handshake, naming the bound.
        secret: shared secret (str or bytes; default ``KVLINK_SECRET``): when set, the handshake
            is authenticated both ways (kvlink.auth) and peers without it are refused.
        checksum: ask senders for a checksum of every chunk's payload and verify it before
            unpacking (default ``KVLINK_CHECKSUM=1``); a chunk that fails is not unpacked. NCCL
            and host transports; the ipc transport moves no chunk.
        wire_dtype: default for this endpoint's pulls: None (the cache's own bytes) or ``"fp8"``
            (e4m3 with a scale per token and head: lossy, about half the bytes; NCCL and host
            transports, so a decode endpoint with ``"fp8"`` does not offer CUDA IPC). Pulls into
            an e4m3 cache from a bf16/fp16/fp32 one always use fp8.
        cache_scale: an e4m3 destination cache's per-tensor scale (stored = value / scale).
    """

    def __init__(self, layout: CacheLayout, *, name: str | None = None, listen: str | None = "tcp://127.0.0.1:0",
                 transport: str = "auto", chunk_bytes: int | None = None, num_slots: int = 3,
                 timeout: float = DEFAULT_TIMEOUT, heartbeat: float = 1.0, max_ctas: int | None = None,
                 max_links: int = 8, ipc_max_ctas: int | None = None, secret: str | bytes | None = None,
                 checksum: bool | None = None, wire_dtype: str | None = None, cache_scale: float = 1.0,
                 outbox_limit: int = OUTBOX_LIMIT):
        if not isinstance(layout, CacheLayout):
            raise TypeError(f"layout must be a kvlink CacheLayout, got {type(layout).__name__}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport == "nccl" and (layout.device.type != "cuda" or not nccl.available()):
            raise ValueError(f"transport='nccl' needs a GPU cache and CuPy's NCCL; {layout.name} is on {layout.device}")
        if transport == "ipc" and layout.device.type != "cuda":
            raise ValueError(f"transport='ipc' needs a GPU cache; {layout.name} is on {layout.device}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_links < 1:
            raise ValueError(f"max_links must be >= 1, got {max_links}")
        if outbox_limit < 1:
            raise ValueError(f"outbox_limit must be >= 1, got {outbox_limit}")
        self.outbox_limit = outbox_limit
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        if not isinstance(cache_scale, (int, float)) or not 0 < cache_scale < float("inf"):
            raise ValueError(f"cache_scale must be a positive finite number, got {cache_scale!r}")
        self.wire_dtype = wire_dtype
        self.cache_scale = float(cache_scale)
        self.max_links = max_links
        self.checksum = bool(checksum) if checksum is not None else os.environ.get("KVLINK_CHECKSUM") == "1"
        self._secret = auth.normalize_secret(secret if secret is not None else os.environ.get("KVLINK_SECRET"))
        self._hello_verifier = auth.HelloVerifier(self._secret) if self._secret else None
        self.layout = layout
        self.on_gpu = layout.device.type == "cuda"
        self.device_index = layout.device.index if self.on_gpu else None
        self.name = name or f"{pysocket.gethostname()}:{os.getpid()}:{layout.device}"
        self.transport = transport
        self.chunk_bytes = int(chunk_bytes or int(os.environ.get("KVLINK_CHUNK_MB", "64")) << 20)
        if self.chunk_bytes < layout.num_kv * layout.num_heads * layout.row_bytes:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} cannot hold one token of one layer")
        self.num_slots = num_slots
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat)
        self.max_ctas = max_ctas if max_ctas is not None else int(os.environ.get("KVLINK_MAX_CTAS", "64"))
        ipc_max_ctas = ipc_max_ctas if ipc_max_ctas is not None else int(os.environ.get("KVLINK_IPC_MAX_CTAS", "264"))
        self.ipc_max_ctas = ipc_max_ctas or None
        self._backend = _resolve_backend(layout, "auto")  # CUDA kernels for a GPU cache when CuPy is here
        self._links: dict[str, _Link] = {}
        self._xfer_ids = itertools.count(1)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._notifications: list[tuple[str, bool]] = []
        self._ready_layers: dict[str, dict[int, torch.cuda.Event | None]] = {}
        self._notify_lock = threading.Lock()
        self._closed = False
        self._connecting: dict[zmq.Socket, _Connecting] = {}  # handshakes under way (decode side)
        self._late_messages = 0  # messages for transfers already ended (cancelled, failed): dropped
        self._serve_hook = None  # set_serve_hook()
        self._slots: list[_Slot] = []
        self._slot_cursor = 0
        self._pack_stream = self._unpack_stream = None
        self._launch_lock = threading.Lock()  # ipc pulls launch on the caller's thread
        self._tracked: collections.deque = collections.deque()  # ipc pulls launched, not yet watched
        # (peer, request id) -> the latest pull of it: an id still in flight on a link is refused
        self._pulls_by_request: dict[tuple[str, str], TransferHandle] = {}
        self._prune_pulls_at = 1024
        self._progress_busy = False  # the progress loop turns every millisecond (no wake-up needed)
        self._more_to_send = False  # host transport: a serve stopped at its per-turn chunk budget
        self._serve_lock = threading.RLock()  # link.serves: the progress thread and layer_ready() (ipc)
        self._ready_since: dict[str, float] = {}  # when layer_ready() first named a request (stale ones are dropped)
        self._ready_pulls_left: dict[str, int] = {}  # layer-wise pulls still to serve from a request's ready layers
        self._counters = None
        self._counter_values = [0] * COUNTER_SLOTS
        self._counters_busy: set[int] = set()
        self._counter_cursor = 0
        self._ipc_cache = self._ipc_counters = None
        self.ipc_unavailable: str | None = "not a GPU cache" if not self.on_gpu else None
        if self.on_gpu:
            self._pack_stream = torch.cuda.Stream(layout.device)
            self._unpack_stream = torch.cuda.Stream(layout.device)
            self._release_stream = torch.cuda.Stream(layout.device)
            prepare(layout, self._pack_stream)
            prepare(layout, self._unpack_stream)
            self._offer_ipc()

        self._context = zmq.Context()
        self._wake_send = self._context.socket(zmq.PAIR)
        self._wake_recv = self._context.socket(zmq.PAIR)
        wake_address = f"inproc://kvlink-wake-{uuid.uuid4().hex}"
        self._wake_recv.bind(wake_address)
        self._wake_send.connect(wake_address)
        self._wake_lock = threading.Lock()
        self._router = None
        self._poller = zmq.Poller()  # the progress thread's
        self.address = None
        if listen is not None:
            self._router = self._context.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # NOTE: only control messages come in here; ZeroMQ drops a peer that sends a bigger
            # frame before buffering it, so no peer can make this process allocate without bound
            self._router.setsockopt(zmq.MAXMSGSIZE, control.MAX_CONTROL_BYTES)
            if listen.endswith(":0"):
                port = self._router.bind_to_random_port(listen[: listen.rfind(":")])
                self.address = f"{listen[: listen.rfind(':')]}:{port}"
            else:
                self._router.bind(listen)
                self.address = listen
        self._thread = threading.Thread(target=self._run, name=f"kvlink-progress-{self.name}", daemon=True)
        self._thread.start()
        log.info("kvlink endpoint %s: %s, listening on %s", self.name, layout.describe(), self.address)

    def _offer_ipc(self) -> None:
        """Export our cache and layer counters for the ipc transport, or record why we cannot."""
        if self.transport in ("nccl", "host"):
            self.ipc_unavailable = f"transport={self.transport!r}"
            return
        reason = ipc.disabled_reason()
        if reason is None:
            try:
                side = torch.cuda.Stream(self.layout.device)
                with torch.cuda.stream(side):
                    self._counters = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=self.layout.device)
                side.synchronize()  # zeroed before any peer stream reads it
                self._ipc_counters = ipc.export_memory([self._counters.data_ptr()], self.device_index)
                layout = self.layout
                self._ipc_cache = {**ipc.export_memory(layout.plane_ptrs(), self.device_index),
                                   "strides": [layout.block_stride, layout.token_stride, layout.head_stride]}
            except ipc.IPCError as exc:
                reason = str(exc)
        if reason is not None:
            self._ipc_cache = self._ipc_counters = None
            self.ipc_unavailable = reason
            if self.transport == "ipc":
                raise ValueError(f"transport='ipc' is unavailable: {reason}")
            log.info("kvlink %s: CUDA IPC not offered: %s", self.name, reason)

    # ================================================================== public API
    def connect(self, address: str, timeout: float | None = None) -> str:
        """Link to the endpoint listening at ``address`` (handshake, NCCL setup); return its name."""
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address must be a ZeroMQ address like tcp://127.0.0.1:5555, got {address!r}")
        timeout = self.timeout if timeout is None else float(timeout)
        return self._call("connect", address, timeout, timeout=2 * timeout + 5)

    def connect_async(self, address: str, timeout: float | None = None) -> concurrent.futures.Future:
        """Start linking to ``address`` and return at once: a Future of the peer's name, or of the
        error ``connect()`` would raise. For callers that must not block (an engine's step)."""
        if not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address must be a ZeroMQ address like tcp://127.0.0.1:5555, got {address!r}")
        reply = _FutureReply()
        self._post("connect", address, self.timeout if timeout is None else float(timeout), (reply, reply.box))
        return reply.future

    def pull(self, peer: str, request: str, src_blocks, dst_blocks, num_tokens: int, *,
             layers: tuple[int, int] | None = None, src_heads: tuple[int, int] | None = None,
             dst_heads: tuple[int, int] | None = None, layerwise: bool = False,
             wire_dtype: str | None | object = _DEFAULT) -> TransferHandle:
        """Start moving ``request``'s KV from ``peer``'s ``src_blocks`` into our ``dst_blocks``.

        Validated here, before anything is sent: our destination blocks against our cache, the
        source blocks against the peer's cache geometry from the handshake. ``wire_dtype``
        (default: the endpoint's) picks fp8 on the wire for this pull.
        """
        called, called_cpu = time.perf_counter(), time.thread_time()
        if self._closed:
            raise RuntimeError(f"endpoint {self.name} is closed")
        link = self._links.get(peer)
        if link is None or link.role != "decode":
            raise ValueError(f"no link to peer {peer!r}; connect() to it first (links: {sorted(self._links)})")
        if link.failed:
            raise TransferError(f"request {request!r} from {peer}: link is down ({link.failed})")
        if not isinstance(request, str) or not request:
            raise TypeError(f"request must be a non-empty str id, got {request!r}")
        self._check_request_free(peer, request)
        dst_sel = select(self.layout, dst_blocks, num_tokens, layers=layers, heads=dst_heads, destination=True)
        remote = link.remote_layout
        wire = self.wire_dtype if wire_dtype is _DEFAULT else wire_dtype
        if wire is None and remote["dtype"] != dst_sel.layout.dtype_name:
            if self.layout.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{peer}'s cache is {remote['dtype']} and ours {self.layout.dtype_name}: pull with "
                                 "wire_dtype='fp8' to convert (lossy), or register caches of one dtype")
            wire = "fp8"  # a bf16/fp16/fp32 source into an e4m3 cache: quantized on the way, always
        if wire is not None:
            if link.transport == "ipc":
                raise ValueError(f"wire_dtype={wire!r} needs a wire, but the link to {peer} is ipc (a direct copy): "
                                 "create the decode endpoint with wire_dtype='fp8' or transport='nccl'")
            dst_sel = with_wire(dst_sel, wire, role="destination")
        src_heads = src_heads or (0, remote["num_heads"])
        if not (0 <= src_heads[0] < src_heads[1] <= remote["num_heads"]) or \
                src_heads[1] - src_heads[0] != dst_sel.num_selected_heads:
            raise ValueError(f"src_heads={src_heads} must lie in [0, {remote['num_heads']}) and match "
                             f"{dst_sel.num_selected_heads} destination heads")
        if link.transport == "ipc":
            # NOTE: validated against the peer cache as mapped (fixed since the handshake), not the
            # link's description: a block id past the mapping is an illegal address on the GPU,
            # which would poison this process's CUDA context.
            src_sel = select(link.peer_layout, src_blocks, num_tokens, layers=(dst_sel.layer_start, dst_sel.layer_stop),
                             heads=src_heads, ids_name="src_blocks", owner=f"{peer}'s cache")
            return self._pull_ipc(link, request, dst_sel, src_sel, layerwise, called, called_cpu)
        src_ids = block_ids_to_numpy(src_blocks, "src_blocks")
        bad = (src_ids < 0) | (src_ids >= remote["num_blocks"])
        if bad.any():
            raise ValueError(f"src_blocks[{int(np.argmax(bad))}]={int(src_ids[bad][0])} is out of range "
                             f"[0, {remote['num_blocks']}) of {peer}'s cache")
        if -(-num_tokens // remote["block_size"]) != src_ids.size:
            raise ValueError(f"num_tokens={num_tokens} fills {-(-num_tokens // remote['block_size'])} of {peer}'s "
                             f"{remote['block_size']}-token blocks but {src_ids.size} src_blocks were given")
        boxes = plan_chunks((dst_sel.layer_start, dst_sel.layer_stop), num_tokens, dst_sel.token_layer_bytes,
                            link.chunk_bytes, layerwise=layerwise)
        handle = TransferHandle(next(self._xfer_ids), request, peer, layerwise)
        handle._canceller = self._request_cancel
        self._pulls_by_request[(peer, request)] = handle
        handle.stats.payload_bytes = dst_sel.cache_bytes
        handle.stats.wire_bytes = dst_sel.payload_bytes
        handle.stats.chunks = len(boxes)
        self._post("pull", link, handle, dst_sel, src_ids, src_heads, boxes)
        return handle

    def _pull_ipc(self, link: _Link, request: str, dst_sel, src_sel, layerwise: bool,
                  called: float, called_cpu: float) -> TransferHandle:
        """Queue the copy kernel(s) of an ipc pull right here, on the caller's thread."""
        started = time.perf_counter()
        layers = (dst_sel.layer_start, dst_sel.layer_stop)
        handle = TransferHandle(next(self._xfer_ids), request, link.name, layerwise)
        handle._canceller = self._request_cancel
        self._pulls_by_request[(link.name, request)] = handle
        stamps = handle.stats.host_stamps
        stamps["called"], stamps["validated"] = called, started
        handle.stats.payload_bytes = handle.stats.wire_bytes = dst_sel.payload_bytes
        handle._spin = True
        tokens = (0, dst_sel.num_tokens)
        with self._launch_lock, _on_device(self.device_index):
            stamps["locked"] = time.perf_counter()
            if not layerwise:
                stream = link.stream
                launch_copy(src_sel, dst_sel, stream, max_ctas=self.ipc_max_ctas, stamps=stamps)
                handle.stats.chunks = 1
            else:
                slot = self._take_counter(request, link.name)
                base = self._counter_values[slot]
                self._counter_values[slot] = (base + dst_sel.num_layers) & 0xFFFFFFFF
                handle._counter = (slot, base, dst_sel.num_layers)
                stream = link.layer_stream
                address = self._counters.data_ptr() + 4 * slot
                for i, layer in enumerate(range(*layers)):
                    cuda_driver.stream_wait_value(stream.cuda_stream, address, base + i + 1)  # the prefill finished this layer
                    launch_copy(src_sel.box((layer, layer + 1), tokens), dst_sel.box((layer, layer + 1), tokens),
                                stream, max_ctas=self.ipc_max_ctas)
                    handle._layer_events[layer] = event = torch.cuda.Event()
                    event.record(stream)
                handle.stats.chunks = dst_sel.num_layers
            done = torch.cuda.Event()
            done.record(stream)
        handle._event = done
        stamps["recorded"] = time.perf_counter()
        handle.stats.enqueue_seconds = stamps["recorded"] - started
        # this thread's CPU time over the whole pull() so far: far below the wall time means it waited
        # (for the GIL, or the OS), not that the steps are slow
        handle.stats.pull_cpu_seconds = time.thread_time() - called_cpu
        handle._enqueued.set()
        if layerwise:
            self._post("track", link, handle, dst_sel)  # its PULL must reach the prefill side now
        else:
            # NOTE: no wake-up per pull: the progress thread only has to notice completion (for the
            # NOTIFY), and waking it for each of many pulls makes it compete with this thread for
            # the GIL. A busy loop turns every millisecond anyway; an idle one is woken.
            self._tracked.append((link, handle, dst_sel))
            if not self._progress_busy:
                self._post("wake")
        return handle

    def _check_request_free(self, peer: str, request: str) -> None:
        """Refuse a request id that is still being pulled from ``peer``: the prefill side knows a
        pull by its id (notifications, layer_ready, cancels), so two at once would mix them up."""
        earlier = self._pulls_by_request.get((peer, request))
        if earlier is not None and not earlier.done():
            raise ValueError(f"request {request!r} is already being pulled from {peer}: wait for that pull or "
                             "cancel it before pulling the same id again")
        if len(self._pulls_by_request) >= self._prune_pulls_at:  # amortized: a pass per doubling
            self._pulls_by_request = {key: h for key, h in self._pulls_by_request.items() if not h.done()}
            self._prune_pulls_at = max(1024, 2 * len(self._pulls_by_request))

    def _take_counter(self, request: str, peer: str) -> int:
        """A layer-counter slot no pending pull uses (caller holds the launch lock)."""
        for _ in range(COUNTER_SLOTS):
            slot = self._counter_cursor
            self._counter_cursor = (slot + 1) % COUNTER_SLOTS
            if slot not in self._counters_busy:
                self._counters_busy.add(slot)
                return slot
        raise TransferError(f"request {request!r} from {peer}: {COUNTER_SLOTS} layer-wise pulls already in flight")

    def _release_counter(self, handle: TransferHandle, failed: bool) -> None:
        """Free a layer-wise ipc pull's counter; for a failed pull first let its waiting copies run,
        so the stream is not blocked forever (its destination blocks are then reported invalid)."""
        counter = handle._counter
        if counter is None:
            return
        handle._counter = None
        slot, base, num_layers = counter
        if failed:
            cuda_driver.stream_write_value(self._release_stream.cuda_stream, self._counters.data_ptr() + 4 * slot,
                                           base + num_layers)
        with self._launch_lock:
            self._counters_busy.discard(slot)

    def layer_ready(self, request: str, layer: int, stream: torch.cuda.Stream | None = None, *,
                    pulls: int = 1) -> None:
        """Prefill side, layer-wise mode: ``layer`` of ``request`` is written (by work queued on ``stream``).

        ``pulls``: how many layer-wise pulls will read this request from this cache (several
        decode ranks under tensor-parallel resharding: ``ReshardPlan.pulls_from``); the
        request's ready layers are kept until that many have been served (or the timeout).
        """
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer={layer} outside [0, {self.layout.num_layers})")
        if isinstance(pulls, bool) or not isinstance(pulls, int) or pulls < 1:
            raise ValueError(f"pulls must be a positive int, got {pulls!r}")
        event = None
        if self.on_gpu:
            stream = stream or torch.cuda.current_stream(self.device_index)
            event = torch.cuda.Event()
            event.record(stream)
            self._signal_layer_now(request, layer, stream)
        self._post("layer_ready", request, layer, event, pulls)

    def _signal_layer_now(self, request: str, layer: int, stream: torch.cuda.Stream) -> None:
        """ipc links: advance the decode side's layer counter on the caller's stream, right behind the
        layer's own work, when this request's pull is at the head of the link and this is its next
        layer; anything else is left to the progress thread (which skips layers signalled here)."""
        with self._serve_lock:
            for link in list(self._links.values()):
                if link.transport != "ipc" or link.role != "prefill" or link.failed or not link.serves:
                    continue
                serve = link.serves[0]
                if serve.request != request or serve.next_chunk >= len(serve.boxes) or \
                        serve.boxes[serve.next_chunk][0] != layer:
                    continue
                slot, base = serve.counter
                cuda_driver.stream_write_value(stream.cuda_stream, link.peer_memory.addresses[0] + 4 * slot,
                                               base + serve.next_chunk + 1)
                serve.next_chunk += 1

    def _request_cancel(self, handle: TransferHandle) -> None:
        self._post("cancel", handle)

    def cancel(self, request: str, timeout: float | None = None) -> int:
        """Prefill side: stop serving every pull of ``request``; the number stopped.

        Each decode side gets a FAILED naming the cancel (its handle then reports whether its
        destination blocks are untouched or invalid); the blocks here can be freed.
        """
        return self._call("cancel_request", request, timeout=timeout)

    def release(self, peer: str, request: str) -> None:
        """Decode side: tell ``peer`` we are done with ``request`` without pulling from it.

        Under tensor-parallel resharding a prefill rank whose heads another rank sent (a GQA
        replica, MLA's latent) still holds the request's blocks: its ``finished_sends()`` then
        reports ``(request, True)``, as after a pull. Does not wait.
        """
        link = self._links.get(peer)
        if link is None or link.role != "decode":
            raise ValueError(f"no link to peer {peer!r}; connect() to it first (links: {sorted(self._links)})")
        if not isinstance(request, str) or not request or len(request) > 1024:
            raise TypeError(f"request must be a str id of 1 to 1024 characters, got {request!r:.80}")
        self._post("release", link, request)

    def remote_layout(self, peer: str) -> dict:
        """The linked peer's cache description from the handshake (``CacheLayout.to_dict``)."""
        link = self._links.get(peer)
        if link is None:
            raise ValueError(f"no link to peer {peer!r} (links: {sorted(self._links)})")
        return dict(link.remote_layout)

    def finished_sends(self) -> list[tuple[str, bool]]:
        """Prefill side: (request, ok) for each pull the decode side confirmed since the last call."""
        with self._notify_lock:
            done, self._notifications = self._notifications, []
        return done

    def links(self) -> list[dict]:
        """One dict per link: peer, role, transport, communicator and staging bytes."""
        return [{"peer": link.name, "role": link.role, "transport": link.transport, "failed": link.failed,
                 "nccl_bytes": link.comm.init_bytes if link.comm else 0,
                 "staging_bytes": sum(s.buffer.numel() for s in self._slots) if link.transport == "nccl" else 0}
                for link in self._links.values()]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the progress thread (pending pulls fail with "endpoint closed") and close the sockets.

        Returns within ``timeout``: every turn of the progress loop is bounded and no socket call
        blocks, so the thread sees the stop at once; should it still be busy (a GPU wait), it
        closes its sockets itself when it gets there.
        """
        if self._closed:
            return
        self._closed = True
        self._post("close")
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("kvlink %s: progress thread did not stop within %.1f s; it closes the sockets when it does",
                      self.name, timeout)

    def set_serve_hook(self, hook) -> None:
        """Test seam (fault injection), prefill side, host transport: ``hook(request, chunk_index,
        payload)`` sees each packed chunk (a uint8 numpy array, header included) before it is sent
        and returns the bytes to send (the same, a corrupted copy...); an exception it raises
        fails the serve as a real error would. ``None`` removes it."""
        self._serve_hook = hook

    def stats(self) -> dict:
        """Counters of the endpoint's life: late messages dropped, links that failed, messages queued
        for slow peers."""
        links = list(self._links.values())
        return {"late_messages": self._late_messages, "links_failed": sum(bool(l.failed) for l in links),
                "queued_messages": sum(len(l.outbox) for l in links)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ================================================================== command plumbing
    def _post(self, *command) -> None:
        if self._closed and command[0] != "close":
            raise RuntimeError(f"endpoint {self.name} is closed")
        self._commands.put(command)
        with self._wake_lock:
            try:
                self._wake_send.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # wake-ups already queued (the thread will find this command too), or the thread is gone

    def _call(self, *command, timeout: float | None = None):
        """Run a command on the progress thread and wait for its result."""
        done, box = threading.Event(), {}
        self._post(*command, (done, box))
        timeout = self.timeout if timeout is None else timeout
        if not done.wait(timeout):
            raise TimeoutError(f"endpoint {self.name}: {command[0]} {command[1:]} not done within {timeout:.1f} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ================================================================== progress thread
    def _run(self) -> None:
        # KVLINK_PROFILE_PROGRESS=DIR: cProfile this endpoint's progress thread, written to DIR at close
        profile_dir = os.environ.get("KVLINK_PROFILE_PROGRESS")
        try:
            if not profile_dir:
                return self._run_loop()
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            try:
                self._run_loop()
            finally:
                profiler.disable()
                os.makedirs(profile_dir, exist_ok=True)
                profiler.dump_stats(os.path.join(profile_dir,
                                                 f"progress-{self.name.replace(':', '_').replace('/', '_')}.prof"))
        finally:
            with self._wake_lock:  # no _post() is between its check and its send while the context goes
                self._context.destroy(linger=0)

    def _run_loop(self) -> None:
        if self.on_gpu:
            torch.cuda.set_device(self.device_index)  # the current device is per thread
        poller = self._poller
        poller.register(self._wake_recv, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        next_heartbeat = time.monotonic() + self.heartbeat
        more = False
        while True:
            try:
                more = self._progress(poller, next_heartbeat, more)
                if more is None:
                    return
            except Exception:  # keep serving other requests; the failed one times out with its name
                log.exception("kvlink %s: progress thread error", self.name)
                more = False
            # NOTE: liveness every turn, whatever the load: every turn is bounded (TURN_BUDGET), so a
            # burst of commands or messages delays it by one turn at most
            now = time.monotonic()
            try:
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat
                    self._heartbeat(now)
                self._check_liveness(now)
            except Exception:
                log.exception("kvlink %s: liveness check error", self.name)

    def _progress(self, poller, next_heartbeat: float, more: bool):
        """One bounded turn of the progress loop: True when work was left for the next turn, None
        once the endpoint is closed."""
        # NOTE: the flag drops before the queue is drained: a pull queued after the drain sees it down
        # and wakes us; one that saw it up was queued before the drain.
        self._progress_busy = False
        while self._tracked:
            self._track_ipc_pull(*self._tracked.popleft())
        busy = any(link.pending or link.serves or link.outbox for link in self._links.values()) or \
            bool(self._connecting)
        self._progress_busy = busy
        if more or self._more_to_send or not self._commands.empty():
            wait_ms = 0
        else:
            wait_ms = 1 if busy else max(1, int((next_heartbeat - time.monotonic()) * 1000))
        events = dict(poller.poll(wait_ms))
        more = False
        if self._wake_recv in events:
            for _ in range(TURN_BUDGET):  # wake-ups only say "look at the queue"; at most one each
                try:
                    self._wake_recv.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        for _ in range(TURN_BUDGET):
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "close":
                self._shutdown()
                return None
            self._run_command(command, poller)
        else:
            more = True
        if self._router is not None and self._router in events:
            more |= self._drain(self._router, self._on_router_message)
        for link in list(self._links.values()):
            if link.socket is not None and link.socket in events and not link.failed:
                more |= self._drain(link.socket, lambda frames, link=link: self._on_dealer_message(link, frames))
        for dealer in [d for d in self._connecting if d in events]:
            self._on_connect_reply(poller, self._connecting.pop(dealer))
        for link in list(self._links.values()):
            if link.outbox and not link.failed:
                self._flush(link)
        self._advance_serves()
        self._complete_pulls()
        self._expire_connects(poller)
        return more

    @staticmethod
    def _drain(sock: zmq.Socket, handle) -> bool:
        """Hand at most TURN_BUDGET waiting messages of ``sock`` to ``handle``; True if more wait."""
        for _ in range(TURN_BUDGET):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            handle(frames)
        return True

    # ------------------------------------------------------------------ sending without blocking
    def _send(self, link: _Link, *frames, copy: bool = True) -> bool:
        """Hand a message for ``link``'s peer to ZeroMQ without blocking; False if the link is down.

        A peer that does not read (stopped, gone, or slower than we send) makes ZeroMQ refuse
        the message once its queue is full: it then waits in the link's outbox, behind which later
        messages queue in order, and the outbox is flushed each turn. A full outbox fails the link.
        """
        if link.failed:
            return False
        if link.outbox:
            if len(link.outbox) >= self.outbox_limit:
                self._fail_link(link, f"control queue full: peer not reading ({len(link.outbox)} messages queued)")
                return False
            link.outbox.append((frames, copy))
            return True
        try:
            self._send_now(link, frames, copy)
        except zmq.Again:
            link.outbox.append((frames, copy))
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: EHOSTUNREACH, the peer disconnected
            self._fail_link(link, f"cannot reach peer: {exc}")
            return False
        return True

    def _send_now(self, link: _Link, frames, copy: bool) -> None:
        if link.socket is not None:
            link.socket.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        else:
            self._router.send_multipart([link.identity, *frames], zmq.NOBLOCK, copy=copy)

    def _flush(self, link: _Link) -> None:
        while link.outbox:
            frames, copy = link.outbox[0]
            try:
                self._send_now(link, frames, copy)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._fail_link(link, f"cannot reach peer: {exc}")
                return
            link.outbox.popleft()

    def _reply_to(self, identity: bytes, data: bytes) -> None:
        """A handshake answer to a peer that has no link (yet): dropped if it cannot be sent at once."""
        try:
            self._router.send_multipart([identity, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("kvlink %s: could not answer peer %r: %s", self.name, identity, exc)

    def _drop_late(self, what: str, peer: str) -> None:
        """A message for a transfer that already ended (cancelled, failed, timed out): expected after
        faults, so counted (``stats()``) and logged at debug level only."""
        self._late_messages += 1
        log.debug("kvlink %s: dropped late %s from %s", self.name, what, peer)

    def _run_command(self, command, poller) -> None:
        kind, *args = command
        reply = args[-1] if kind in ("connect", "cancel_request") else None
        try:
            if kind == "connect":
                self._start_connect(args[0], args[1], reply, poller)
                reply = None  # answered when the WELCOME arrives or the handshake times out
            elif kind == "pull":
                self._start_pull(*args)
            elif kind == "track":
                self._track_ipc_pull(*args)
            elif kind == "wake":
                pass  # _progress() picks up self._tracked
            elif kind == "release":
                link, request = args
                self._send(link, control.encode("RELEASE", request=request))
            elif kind == "cancel":
                self._cancel_pull(args[0])
            elif kind == "cancel_request":
                reply = args[-1]
                reply[1]["result"] = sum(self._drop_serves(link, lambda serve: serve.request == args[0],
                                                           "cancelled by the prefill side", tell_decode=True)
                                         for link in list(self._links.values()) if link.role == "prefill")
            elif kind == "layer_ready":
                request, layer, event, pulls = args
                self._ready_layers.setdefault(request, {})[layer] = event
                self._ready_since.setdefault(request, time.monotonic())
                self._ready_pulls_left.setdefault(request, pulls)
        except Exception as exc:
            if reply is not None:
                reply[1]["error"] = exc
            elif kind == "connect":
                args[-1][1]["error"] = exc
                args[-1][0].set()
            elif kind in ("pull", "track"):
                args[1]._finish(f"could not start: {exc}")
                self._release_counter(args[1], failed=True)
            else:
                log.exception("kvlink %s: command %s failed", self.name, kind)
        finally:
            if reply is not None:
                reply[0].set()
    # ------------------------------------------------------------------ handshake
    def _transports(self, with_ipc: bool = True) -> list[str]:
        """What this endpoint can link with, best first."""
        if self.transport != "auto":
            return [self.transport]
        # fp8 on the wire needs a wire: an ipc pull is a direct copy of the cache's own bytes
        offered = ["ipc"] if with_ipc and self._ipc_cache is not None and self.wire_dtype is None else []
        offered += ["nccl"] if self.on_gpu and nccl.available() else []
        return offered + ["host"]

    def _hello(self, with_ipc: bool = True) -> tuple[bytes, bytes | None]:
        """Our HELLO, and the nonce its credentials carry (with a shared secret)."""
        device = ""
        if self.on_gpu:
            device = str(torch.cuda.get_device_properties(self.device_index).uuid)
        transports = self._transports(with_ipc)
        credentials = nonce = None
        if self._secret:
            credentials, nonce = auth.hello_auth(self._secret, self.name, self.layout.fingerprint)
        return control.encode("HELLO", endpoint=self.name, fingerprint=self.layout.fingerprint,
                              layout=self.layout.to_dict(), transports=transports, host=pysocket.gethostname(),
                              pid=os.getpid(), device=device, chunk_bytes=self.chunk_bytes,
                              ipc=self._ipc_counters if "ipc" in transports else None, auth=credentials), nonce

    def _start_connect(self, address: str, timeout: float, reply, poller, with_ipc: bool = True) -> None:
        """Send our HELLO to ``address``; the WELCOME is handled by a later turn (_on_connect_reply),
        so a peer slow to answer, or not there at all, never holds up the other links."""
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # control messages and host-transport chunks (at most our chunk size) come in here
        dealer.setsockopt(zmq.MAXMSGSIZE, max(control.MAX_CONTROL_BYTES, self.chunk_bytes + HEADER_BYTES))
        try:
            dealer.connect(address)
            hello, nonce = self._hello(with_ipc)
            dealer.send(hello, zmq.NOBLOCK)  # a fresh socket's queue is empty: this never waits
        except Exception:
            dealer.close()
            raise
        pending = _Connecting(address, dealer, timeout, time.monotonic() + timeout, reply, with_ipc, nonce)
        self._connecting[dealer] = pending
        poller.register(dealer, zmq.POLLIN)

    def _expire_connects(self, poller) -> None:
        now = time.monotonic()
        for dealer, pending in list(self._connecting.items()):
            if now > pending.deadline:
                del self._connecting[dealer]
                self._end_connect(poller, pending, TimeoutError(
                    f"endpoint {self.name}: no answer to HELLO from {pending.address} within {pending.timeout:.1f} s"))

    def _end_connect(self, poller, pending: _Connecting, error: Exception | None = None, result=None,
                     keep_dealer: bool = False) -> None:
        if not keep_dealer:
            poller.unregister(pending.dealer)
            pending.dealer.close(linger=0)
        done, box = pending.reply
        if error is not None:
            box["error"] = error
        else:
            box["result"] = result
        done.set()

    def _on_connect_reply(self, poller, pending: _Connecting) -> None:
        try:
            name = self._finish_connect(poller, pending)
        except Exception as exc:
            self._end_connect(poller, pending, exc)
            return
        if name is not None:
            self._end_connect(poller, pending, result=name, keep_dealer=True)

    def _finish_connect(self, poller, pending: _Connecting) -> str | None:
        """The WELCOME is in: set the link up; its name, or None when we link again without ipc."""
        address, dealer = pending.address, pending.dealer
        try:
            reply = control.decode(dealer.recv(zmq.NOBLOCK))
        except zmq.Again:  # woken without a message: wait on
            self._connecting[dealer] = pending
            return None
        if reply["type"] == "REJECT":
            raise ConnectionRefusedError(f"{address} refused the link: {reply['reason']}")
        if reply["type"] != "WELCOME":
            raise ProtocolError(f"expected WELCOME from {address}, got {reply['type']}")
        if self._secret:
            try:
                auth.check_welcome(self._secret, pending.nonce, reply["endpoint"], reply["auth"])
            except auth.AuthError as exc:
                try:
                    dealer.send(control.encode("BYE", reason="authentication failed"), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the peer learns it from the closed connection all the same
                raise ConnectionRefusedError(f"{address}: {exc}") from None
        link = _Link(name=reply["endpoint"], role="decode", transport=reply["transport"],
                     remote_layout=reply["layout"], chunk_bytes=reply["chunk_bytes"], socket=dealer)
        live = [l for l in self._links.values() if not l.failed and l.name != link.name]
        if len(live) >= self.max_links:
            raise ConnectionRefusedError(f"{self.name} already has {len(live)} live links (max_links={self.max_links})")
        if link.transport == "ipc":
            link.stream = torch.cuda.Stream(self.layout.device)
            link.layer_stream = torch.cuda.Stream(self.layout.device)
            try:
                export = reply["ipc"]
                link.peer_memory = ipc.import_memory(export, self.device_index)
                link.peer_layout = PeerLayout.from_description(reply["layout"], export["strides"],
                                                               link.peer_memory.addresses, self.layout.device)
                for stream in (link.stream, link.layer_stream):  # plane table and metadata rings now,
                    prepare(link.peer_layout, stream)               # not on the first pull
            except (ipc.IPCError, KeyError, TypeError, ValueError) as exc:
                if link.peer_memory is not None:
                    link.peer_memory.close()
                if self.transport == "ipc":
                    raise ConnectionError(f"CUDA IPC with {link.name} at {address} failed: {exc}") from exc
                log.warning("kvlink %s: CUDA IPC with %s failed (%s); linking again without it", self.name,
                            link.name, exc)
                poller.unregister(dealer)
                dealer.close(linger=0)
                self._start_connect(address, pending.timeout, pending.reply, poller, with_ipc=False)
                return None
        if link.transport == "nccl":
            link.comm = nccl.Communicator(reply["nccl_id"], 1, self.device_index, timeout=pending.timeout,
                                          peer=link.name)
            link.stream = torch.cuda.Stream(self.layout.device)
            self._ensure_slots(link.chunk_bytes)
        old = self._links.get(link.name)
        if old is not None:
            self._fail_link(old, "replaced by a new link")
        self._links[link.name] = link
        self._log_link(link, address)
        return link.name

    def _on_hello(self, identity: bytes, message: dict) -> None:
        peer = message["endpoint"]
        hello_nonce = None
        try:
            if self._hello_verifier is not None:
                hello_nonce = self._hello_verifier.check(message["auth"], peer, message["fingerprint"])
            # A link is made before any pull names its wire dtype: accept dtypes fp8 can convert
            # between; pull() refuses such a pair without wire_dtype="fp8" before any byte moves.
            check_compatible(self.layout.to_dict(), message["layout"], wire_dtype="fp8")
            same_dtype = message["layout"].get("dtype") == self.layout.dtype_name  # else fp8 converts (checked above)
            if same_dtype and message["fingerprint"] != self.layout.fingerprint:
                raise ValueError(f"layout fingerprints differ: ours {self.layout.fingerprint}, theirs {message['fingerprint']}")
            live = [l for l in self._links.values() if not l.failed and l.name != peer]
            if len(live) >= self.max_links:
                raise ValueError(f"{self.name} already has {len(live)} live links (max_links={self.max_links})")
        except ValueError as exc:
            log.error("kvlink %s: refusing %s: %s", self.name, peer, exc)
            self._reply_to(identity, control.encode("REJECT", reason=str(exc)))
            return
        ours = set(self._transports())
        same_gpu = self.on_gpu and message["device"] == str(torch.cuda.get_device_properties(self.device_index).uuid)
        common = ours & set(message["transports"])
        if same_gpu:
            common.discard("nccl")  # NCCL refuses two ranks on one GPU
        if message["layout"].get("dtype") != self.layout.dtype_name:
            common.discard("ipc")  # the copy kernel moves bytes; a dtype change needs fp8 on the wire
        peer_counters = None
        if "ipc" in common:
            try:
                if not isinstance(message["ipc"], dict):
                    raise ipc.IPCError("the peer sent no IPC export")
                peer_counters = ipc.import_memory(message["ipc"], self.device_index)
            except (ipc.IPCError, KeyError, TypeError, ValueError) as exc:
                common.discard("ipc")
                log.warning("kvlink %s: CUDA IPC with %s unavailable (%s); using %s", self.name, peer,
                            exc, "nccl" if "nccl" in common else "host")
        transport = next((t for t in ("ipc", "nccl", "host") if t in common), None)
        if transport is None:
            reason = f"no common transport: ours {sorted(ours)}, theirs {message['transports']}" + \
                (" (same GPU: NCCL cannot link a GPU to itself)" if same_gpu else "")
            self._reply_to(identity, control.encode("REJECT", reason=reason))
            return
        chunk_bytes = min(self.chunk_bytes, message["chunk_bytes"])
        nccl_id = nccl.unique_id() if transport == "nccl" else None
        self._reply_to(identity, control.encode(
            "WELCOME", endpoint=self.name, transport=transport, nccl_id=nccl_id, chunk_bytes=chunk_bytes,
            layout=self.layout.to_dict(), ipc=self._ipc_cache if transport == "ipc" else None,
            auth=auth.welcome_auth(self._secret, hello_nonce, self.name) if hello_nonce else None))
        link = _Link(name=peer, role="prefill", transport=transport, remote_layout=message["layout"],
                     chunk_bytes=chunk_bytes, identity=identity, peer_memory=peer_counters)
        if transport == "ipc":
            link.stream = torch.cuda.Stream(self.layout.device)  # advances the decode side's layer counters
        if transport == "nccl":
            try:
                link.comm = nccl.Communicator(nccl_id, 0, self.device_index, timeout=self.timeout, peer=peer)
            except (TimeoutError, RuntimeError) as exc:
                log.error("kvlink %s: NCCL setup with %s failed: %s", self.name, peer, exc)
                return
            link.stream = torch.cuda.Stream(self.layout.device)
            self._ensure_slots(chunk_bytes)
        old = self._links.get(peer)
        if old is not None:
            self._fail_link(old, "replaced by a new link", level=logging.INFO)
        self._links[peer] = link
        self._log_link(link, f"{message['host']} pid {message['pid']}")

    def _log_link(self, link: _Link, where: str) -> None:
        if link.transport == "ipc":
            log.info("kvlink %s <-> %s (%s): transport ipc (CUDA IPC on one host: the decode GPU reads the prefill "
                     "GPU's blocks directly over NVLink or PCIe; no staging, no communicator) on GPU %d", self.name,
                     link.name, where, self.device_index)
        elif link.transport == "nccl":
            log.info("kvlink %s <-> %s (%s): transport nccl on GPU %d, communicator %.0f MiB, staging %d x %.0f MiB, "
                     "NCCL env %s", self.name, link.name, where, self.device_index, link.comm.init_bytes / 2**20,
                     len(self._slots), self.chunk_bytes / 2**20,
                     {k: v for k, v in os.environ.items() if k.startswith("NCCL_")})
        else:
            log.info("kvlink %s <-> %s (%s): transport host (TCP through ZeroMQ, %s cache)%s", self.name, link.name,
                     where, self.layout.device, " -- slow path for a GPU cache" if self.on_gpu else "")

    def _ensure_slots(self, chunk_bytes: int) -> None:
        if self._slots:
            return
        self._slots = [_Slot(torch.empty(chunk_bytes + HEADER_BYTES, dtype=torch.uint8, device=self.layout.device))
                       for _ in range(self.num_slots)]

    def _next_slot(self) -> _Slot:
        slot = self._slots[self._slot_cursor % len(self._slots)]
        self._slot_cursor += 1
        return slot

    # ------------------------------------------------------------------ decode side
    def _start_pull(self, link: _Link, handle: TransferHandle, dst_sel, src_ids, src_heads, boxes) -> None:
        handle._dst = (dst_sel, boxes)
        handle._chunks_done = 0
        if link.failed:  # it went down after pull() looked
            handle._finish(f"link failed: {link.failed}")
            return
        link.pending[handle.xfer] = handle
        self._send(link, control.encode(
            "PULL", xfer=handle.xfer, request=handle.request, src_blocks=src_ids.tolist(),
            num_tokens=dst_sel.num_tokens, layers=[dst_sel.layer_start, dst_sel.layer_stop],
            heads=list(src_heads), chunks=[list(b) for b in boxes], layerwise=handle.layerwise, counter=[0, 0],
            checksum=self.checksum, wire="fp8" if dst_sel.wire_fp8 else ""))
        if link.transport == "nccl":
            started = time.perf_counter()
            self._post_receives(link, handle, dst_sel, boxes)
            handle.stats.enqueue_seconds = time.perf_counter() - started
        handle._enqueued.set()

    def _cancel_pull(self, handle: TransferHandle) -> None:
        """Decode side: end ``handle`` as cancelled and tell the prefill side to stop serving it."""
        while self._tracked:  # an ipc pull cancelled before this thread saw it
            self._track_ipc_pull(*self._tracked.popleft())
        if handle._finished.is_set():
            return
        link = self._links.get(handle.peer)
        if link is not None and link.transport == "ipc" and handle._counter is None and handle._event.query():
            handle._finish()  # the copy had finished: nothing left to cancel
            return
        handle._finish("cancelled by the decode side", cancelled=True)
        if link is None or link.failed:
            self._release_counter(handle, failed=True)
            return
        if link.transport == "host":
            link.pending.pop(handle.xfer, None)
        # NOTE: a GPU pull stays pending until its queued work is done (_complete_pulls then sends
        # NOTIFY ok=False and frees an ipc layer counter, letting its waiting copies run).
        self._send(link, control.encode("CANCEL", xfer=handle.xfer, request=handle.request))

    def _track_ipc_pull(self, link: _Link, handle: TransferHandle, dst_sel) -> None:
        """Watch an ipc pull queued by pull(); a layer-wise one tells the prefill side its counter."""
        if link.failed:
            handle._finish(f"link failed: {link.failed}")
            self._release_counter(handle, failed=True)
            return
        link.pending[handle.xfer] = handle
        if handle._counter is not None:
            slot, base, _ = handle._counter
            self._send(link, control.encode(
                "PULL", xfer=handle.xfer, request=handle.request, src_blocks=[], num_tokens=dst_sel.num_tokens,
                layers=[dst_sel.layer_start, dst_sel.layer_stop], heads=[0, 0], chunks=[], layerwise=True,
                counter=[slot, base], checksum=False, wire=""))

    def _post_receives(self, link: _Link, handle: TransferHandle, dst_sel, boxes) -> None:
        layout, stream, unpack_stream = self.layout, link.stream, self._unpack_stream
        with torch.cuda.stream(unpack_stream):  # zeroed on the stream that later reads it
            status = torch.zeros(1, dtype=torch.int32, device=layout.device)
        checksum_bad = None
        for box in boxes:
            nbytes = HEADER_BYTES + box_payload_bytes(box, dst_sel.token_layer_bytes)
            slot = self._next_slot()
            if slot.used:
                stream.wait_event(slot.free)
            link.comm.recv(slot.buffer.data_ptr(), nbytes, stream)
            slot.ready.record(stream)
            unpack_stream.wait_event(slot.ready)
            if self.checksum:
                with torch.cuda.stream(unpack_stream):
                    # a chunk that fails its checksum loses its magic word, so the unpack refuses it whole
                    bad = _as_int32(payload_checksum_torch(slot.buffer[HEADER_BYTES:nbytes])) != \
                        slot.buffer[CHECKSUM_OFFSET:HEADER_BYTES].view(torch.int32)
                    slot.buffer[:4].view(torch.int32).bitwise_xor_(bad.to(torch.int32) * 0x55555555)
                    checksum_bad = bad if checksum_bad is None else checksum_bad | bad
            unpack_selection(dst_sel.box(box[:2], box[2:]), slot.buffer[:nbytes], unpack_stream, self._backend,
                             self.max_ctas, status, cache_scale=self.cache_scale)
            slot.free.record(unpack_stream)
            slot.used = True
            if handle.layerwise and box[3] == dst_sel.num_tokens:
                for layer in range(box[0], box[1]):
                    handle._layer_events[layer] = event = torch.cuda.Event()
                    event.record(unpack_stream)
        with torch.cuda.stream(unpack_stream):
            handle._status_host = torch.empty(2 if checksum_bad is not None else 1, dtype=torch.int32, pin_memory=True)
            handle._status_host[:1].copy_(status, non_blocking=True)
            if checksum_bad is not None:
                handle._status_host[1:].copy_(checksum_bad.to(torch.int32).reshape(1), non_blocking=True)
        done = torch.cuda.Event()
        done.record(unpack_stream)
        handle._event = done

    def _on_dealer_message(self, link: _Link, frames) -> None:
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
            self._fail_link(link, f"peer closed: {message['reason']}", level=logging.INFO)
            return
        handle = link.pending.get(message.get("xfer"))
        if handle is None:
            # a transfer that ended here already (cancelled, refused, failed): its chunks and
            # reports still in flight arrive late, thousands of them after a stalled peer resumes
            self._drop_late(f"{kind} of transfer {message.get('xfer')}", link.name)
            return
        if kind == "FAILED":
            # NOTE: a layer-wise ipc pull's copies are queued already and run once its counter is
            # released, so only the other transports can promise untouched blocks
            whole = message["whole"] and handle._counter is None
            handle._refused_whole = whole
            handle._finish(f"refused by {link.name}: {message['reason']}", untouched=True if whole else None)
            if link.transport == "host":
                link.pending.pop(handle.xfer, None)
        elif kind == "DATA" and link.transport == "host":
            if len(frames) != 2:
                log.error("kvlink %s: DATA from %s in %d frames (expected 2), ignored", self.name, link.name, len(frames))
                return
            self._unpack_host_chunk(link, handle, message["chunk"], frames[1])
        elif kind == "SENT":  # informational; completion is when our unpack is done
            handle.stats.sender_enqueue_seconds = float(message.get("enqueue_seconds", 0.0))

    def _unpack_host_chunk(self, link: _Link, handle: TransferHandle, chunk_idx: int, frame) -> None:
        dst_sel, boxes = handle._dst
        if chunk_idx != handle._chunks_done or chunk_idx >= len(boxes):
            handle._finish(f"chunk {chunk_idx} arrived out of order (expected {handle._chunks_done})")
            return
        box = boxes[chunk_idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only ZeroMQ buffer: unpack only reads it
            chunk = torch.from_numpy(np.frombuffer(frame.buffer, dtype=np.uint8))
        try:
            if self.on_gpu:
                chunk = chunk.to(self.layout.device)
            needed = HEADER_BYTES + box_payload_bytes(box, dst_sel.token_layer_bytes)
            if chunk.numel() < needed:
                raise ValueError(f"chunk {chunk_idx} holds {chunk.numel()} bytes, fewer than its box needs")
            if self.checksum:
                data = np.frombuffer(frame.buffer, dtype=np.uint8)
                sent = int(data[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0])
                if payload_checksum_numpy(data[HEADER_BYTES:needed]) != sent:
                    raise ValueError("checksum mismatch: the chunk was corrupted on the way")
            stream = torch.cuda.current_stream(self.device_index) if self.on_gpu else None
            status = unpack_selection(dst_sel.box(box[:2], box[2:]), chunk, stream, self._backend, self.max_ctas,
                                      cache_scale=self.cache_scale)
            if self.on_gpu:
                stream.synchronize()
                if int(status.item()) != STATUS_OK:
                    raise ValueError("header mismatch")
        except ValueError as exc:
            handle._finish(f"chunk {chunk_idx} refused: {exc}")
            link.pending.pop(handle.xfer, None)
            return
        handle._chunks_done += 1
        if handle._chunks_done == len(boxes):
            handle._finish()

    def _complete_pulls(self) -> None:
        """Notify prefill of finished pulls (so it frees its blocks) and forget them."""
        for link in self._links.values():
            if not link.pending:
                continue
            for xfer, handle in list(link.pending.items()):
                if handle._counter is not None and not handle._finished.is_set() and \
                        time.perf_counter() - handle._started > self.timeout:
                    handle._finish(f"layers not all ready within {self.timeout:.1f} s")
                if handle.done():
                    del link.pending[xfer]
                    self._release_counter(handle, failed=handle.error is not None)
                    self._send(link, control.encode("NOTIFY", xfer=xfer, request=handle.request,
                                                    ok=handle.error is None))

    # ------------------------------------------------------------------ prefill side
    def _on_router_message(self, frames) -> None:
        identity = frames[0].bytes
        try:
            message = control.decode(frames[1].bytes)
        except (ProtocolError, IndexError) as exc:
            log.error("kvlink %s: bad message from peer %r: %s", self.name, identity, exc)
            return
        kind = message["type"]
        if kind == "HELLO":
            self._on_hello(identity, message)
            return
        link = next((l for l in self._links.values() if l.identity == identity), None)
        if link is None:
            log.warning("kvlink %s: %s from an unknown peer, ignored", self.name, kind)
            return
        if link.failed:  # the link's transfers ended with it; what the peer still sends is late
            self._drop_late(kind, link.name)
            return
        link.last_seen = time.monotonic()
        if kind == "PULL":
            self._on_pull(link, message)
        elif kind == "CANCEL":
            self._drop_serves(link, lambda serve: serve.xfer == message["xfer"], "cancelled by the decode side",
                              tell_decode=False)
        elif kind == "NOTIFY":
            with self._notify_lock:
                self._notifications.append((message["request"], message["ok"]))
            if link.transport == "ipc" and not message["ok"]:
                # the decode side gave up on a layer-wise pull (timeout, cancel): stop serving it, so
                # the pulls queued behind it on this link move on
                with self._serve_lock:
                    link.serves = [serve for serve in link.serves if serve.xfer != message["xfer"]]
        elif kind == "RELEASE":
            if not message["request"] or len(message["request"]) > 1024:
                log.error("kvlink %s: RELEASE from %s with a bad request id, ignored", self.name, link.name)
                return
            with self._notify_lock:
                self._notifications.append((message["request"], True))
        elif kind == "BYE":
            self._fail_link(link, f"peer closed: {message['reason']}", level=logging.INFO)

    def _on_pull(self, link: _Link, message: dict) -> None:
        if link.transport == "ipc":
            return self._on_ipc_pull(link, message)
        serve = _Serve(xfer=message["xfer"], request=message["request"], num_tokens=message["num_tokens"],
                       heads=(0, 0), boxes=[], layerwise=message["layerwise"], checksum=message["checksum"],
                       wire=message["wire"])
        try:
            if not serve.request or len(serve.request) > 1024:
                raise ValueError(f"request id must hold 1 to 1024 characters, got {len(serve.request)}")
            src = control.int_list(message, "src_blocks")
            heads = tuple(control.int_list(message, "heads", length=2))
            layers = tuple(control.int_list(message, "layers", length=2))
            boxes = [tuple(control.int_list({"type": "PULL", "b": b}, "b", length=4)) for b in message["chunks"]]
            wire = message["wire"]
            if wire not in ("", "fp8"):
                raise ValueError(f"unknown wire dtype {wire!r:.40}")
            sel = with_wire(select(self.layout, src, serve.num_tokens, layers=layers, heads=heads), wire or None,
                            role="source")
            for box in boxes:
                if not (layers[0] <= box[0] < box[1] <= layers[1] and 0 <= box[2] < box[3] <= serve.num_tokens):
                    raise ValueError(f"chunk {box} lies outside layers {layers} x tokens [0, {serve.num_tokens})")
                if box_payload_bytes(box, sel.token_layer_bytes) > link.chunk_bytes:
                    raise ValueError(f"chunk {box} exceeds the link's {link.chunk_bytes}-byte chunks")
            serve.sel, serve.heads, serve.boxes = sel, heads, boxes
        except (ValueError, TypeError, ProtocolError) as exc:
            serve.refused = str(exc)
            heads = message.get("heads")
            if isinstance(heads, list) and len(heads) == 2 and all(isinstance(h, int) for h in heads):
                serve.heads = tuple(heads)
            # keep NCCL in step: the decode side posted one receive per chunk, so send refused chunks
            serve.boxes = [tuple(b) for b in message["chunks"] if isinstance(b, list) and len(b) == 4
                           and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in b)]
            log.error("kvlink %s: refusing pull %d (request %r) from %s: %s", self.name, serve.xfer, serve.request,
                      link.name, exc)
            self._send(link, control.encode("FAILED", xfer=serve.xfer, reason=serve.refused, whole=True))
            if link.transport != "nccl":
                return
        link.serves.append(serve)

    def _drop_serves(self, link: _Link, which, reason: str, tell_decode: bool) -> int:
        """Stop serving the pulls ``which`` selects on ``link``; the number stopped.

        On NCCL the receiver has posted one receive per chunk, so a stopped pull keeps going with
        empty (refused) chunks, which its unpack writes nothing of; elsewhere it just ends.
        """
        stopped = 0
        with self._serve_lock:
            for serve in list(link.serves):
                if not which(serve) or serve.refused is not None:
                    continue
                stopped += 1
                if link.transport == "nccl":
                    serve.refused = reason
                else:
                    link.serves.remove(serve)
                log.info("kvlink %s: pull %d (request %r) to %s stopped: %s", self.name, serve.xfer, serve.request,
                         link.name, reason)
                if tell_decode:
                    self._send(link, control.encode(
                        "FAILED", xfer=serve.xfer, reason=reason, whole=serve.next_chunk == 0))
        return stopped

    def _on_ipc_pull(self, link: _Link, message: dict) -> None:
        """A layer-wise pull on the ipc link: the decode side's copies wait for our layer counter."""
        serve = _Serve(xfer=message["xfer"], request=message["request"], num_tokens=message["num_tokens"],
                       heads=(0, 0), boxes=[], layerwise=True)
        try:
            layers = tuple(control.int_list(message, "layers", length=2))
            counter = tuple(control.int_list(message, "counter", length=2))
            if not message["layerwise"]:
                raise ValueError("only layer-wise pulls travel to the prefill side on the ipc transport")
            if not 0 <= layers[0] < layers[1] <= self.layout.num_layers:
                raise ValueError(f"layers {list(layers)} outside [0, {self.layout.num_layers})")
            if not (0 <= counter[0] < COUNTER_SLOTS and 0 <= counter[1] < 2**32):
                raise ValueError(f"counter {list(counter)} outside [0, {COUNTER_SLOTS}) x [0, 2**32)")
        except (ValueError, ProtocolError) as exc:
            log.error("kvlink %s: refusing pull %d (request %r) from %s: %s", self.name, serve.xfer, serve.request,
                      link.name, exc)
            self._send(link, control.encode("FAILED", xfer=serve.xfer, reason=str(exc), whole=True))
            return
        serve.boxes = [(layer, layer + 1, 0, serve.num_tokens) for layer in range(*layers)]
        serve.counter = counter
        with self._serve_lock:
            link.serves.append(serve)

    def _forget_ready_layers(self, request: str) -> None:
        self._ready_layers.pop(request, None)
        self._ready_since.pop(request, None)
        self._ready_pulls_left.pop(request, None)

    def _advance_serves(self) -> None:
        self._more_to_send = False
        for link in self._links.values():
            with self._serve_lock:
                self._advance_link_serves(link)

    def _advance_link_serves(self, link: _Link) -> None:
        while link.serves:
            serve = link.serves[0]
            try:
                if not self._serve_chunks(link, serve):
                    break  # waiting for layers (layer-wise); later pulls on this link wait behind it
            except Exception as exc:  # never retry a serve that broke half-way
                log.exception("kvlink %s: serving pull %d (request %r) to %s failed", self.name, serve.xfer,
                              serve.request, link.name)
                link.serves.pop(0)
                self._send(link, control.encode(
                    "FAILED", xfer=serve.xfer, reason=f"prefill side error: {exc}", whole=False))
                if link.transport == "nccl":  # the chunk stream is out of step with the receiver's
                    self._fail_link(link, f"serving request {serve.request!r} failed: {exc}")
                break
            link.serves.pop(0)
            left = self._ready_pulls_left.get(serve.request, 1) - 1
            if left > 0:
                self._ready_pulls_left[serve.request] = left  # other decode ranks still read these layers
            else:
                self._forget_ready_layers(serve.request)
            self._send(link, control.encode(
                "SENT", xfer=serve.xfer, enqueue_seconds=serve.enqueue_seconds))

    def _serve_chunks(self, link: _Link, serve: _Serve) -> bool:
        """Issue the chunks whose layers are ready; True when every chunk is issued."""
        ready = self._ready_layers.get(serve.request, {})
        sent = 0
        while serve.next_chunk < len(serve.boxes):
            box = serve.boxes[serve.next_chunk]
            if serve.layerwise and serve.refused is None and any(layer not in ready for layer in range(box[0], box[1])):
                return False
            if link.transport == "ipc":
                # the layer's writes (ordered by its event), then the decode side's counter
                event = ready.get(box[0])
                if event is not None:
                    link.stream.wait_event(event)
                slot, base = serve.counter
                cuda_driver.stream_write_value(link.stream.cuda_stream, link.peer_memory.addresses[0] + 4 * slot,
                                               base + serve.next_chunk + 1)
                serve.next_chunk += 1
                continue
            nbytes = None if serve.refused else HEADER_BYTES + box_payload_bytes(box, serve.sel.token_layer_bytes)
            if link.transport == "nccl":
                started = time.perf_counter()
                self._send_nccl_chunk(link, serve, box, ready, nbytes)
                serve.enqueue_seconds += time.perf_counter() - started
            else:
                if link.outbox:  # the peer reads slower than we pack: wait for it, holding no more chunks
                    return False
                if sent == HOST_CHUNKS_PER_TURN:
                    self._more_to_send = True
                    return False
                self._send_host_chunk(link, serve, box, nbytes)
                sent += 1
            serve.next_chunk += 1
        return True

    def _send_nccl_chunk(self, link: _Link, serve: _Serve, box: Box, ready: dict, nbytes: int | None) -> None:
        """Pack ``box`` into the next slot and send it (``nbytes`` None: a refused pull's empty chunk)."""
        slot = self._next_slot()
        stream = self._pack_stream
        if slot.used:
            stream.wait_event(slot.free)
        if serve.refused is None:
            for layer in range(box[0], box[1]):
                if ready.get(layer) is not None:
                    stream.wait_event(ready[layer])
            pack_selection(serve.sel.box(box[:2], box[2:]), slot.buffer, stream, self._backend, self.max_ctas)
            if serve.checksum:
                with torch.cuda.stream(stream):
                    sent = payload_checksum_torch(slot.buffer[HEADER_BYTES:nbytes])
                    slot.buffer[CHECKSUM_OFFSET:HEADER_BYTES].view(torch.int32).copy_(_as_int32(sent))
        else:
            nbytes = self._refused_chunk_bytes(link, serve, box)
            with torch.cuda.stream(stream):
                slot.buffer[:HEADER_BYTES].fill_(0)  # no magic: the receiver refuses it and writes nothing
        slot.ready.record(stream)
        link.stream.wait_event(slot.ready)
        link.comm.send(slot.buffer.data_ptr(), nbytes, link.stream)
        slot.free.record(link.stream)
        slot.used = True

    def _refused_chunk_bytes(self, link: _Link, serve: _Serve, box) -> int:
        """Size the decode side expects for a chunk of a pull we refused (it planned with its own layout)."""
        remote = link.remote_layout
        element_bytes = torch.empty(0, dtype=getattr(torch, remote["dtype"])).element_size()
        row_bytes = wire_row_bytes(remote["head_dim"], element_bytes, serve.wire == "fp8")
        heads = serve.heads[1] - serve.heads[0] if serve.heads[1] > serve.heads[0] else remote["num_heads"]
        token_layer_bytes = remote["num_kv"] * heads * row_bytes
        return HEADER_BYTES + min(link.chunk_bytes, box_payload_bytes(tuple(box), token_layer_bytes))

    def _send_host_chunk(self, link: _Link, serve: _Serve, box: Box, nbytes: int | None) -> None:
        if serve.refused is not None:
            return
        payload = self._host_chunk(serve, box, nbytes)
        if self._serve_hook is not None:
            payload = self._serve_hook(serve.request, serve.next_chunk, payload)
        self._send(link, control.encode("DATA", xfer=serve.xfer, chunk=serve.next_chunk), payload, copy=False)

    def _host_chunk(self, serve: _Serve, box: Box, nbytes: int) -> np.ndarray:
        """The packed chunk of ``box`` as host bytes, with its payload checksum if asked for."""
        chunk = torch.empty(nbytes, dtype=torch.uint8, device=self.layout.device)
        stream = torch.cuda.current_stream(self.device_index) if self.on_gpu else None
        pack_selection(serve.sel.box(box[:2], box[2:]), chunk, stream, self._backend, self.max_ctas)
        payload = chunk.cpu().numpy()  # synchronizes a GPU cache: the host transport is the slow path
        if serve.checksum:
            payload[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0] = payload_checksum_numpy(payload[HEADER_BYTES:])
        return payload

    # ------------------------------------------------------------------ liveness and shutdown
    def _heartbeat(self, now: float) -> None:
        # layers of requests no pull served within the timeout (never pulled, or finished before
        # their last layer_ready() reached this thread): forget them
        served = {serve.request for link in self._links.values() for serve in link.serves}
        for request, since in list(self._ready_since.items()):
            if now - since > self.timeout and request not in served:
                self._forget_ready_layers(request)
        beat = control.encode("HEARTBEAT")
        for link in list(self._links.values()):
            if not link.failed and not link.outbox:  # a queue already ahead tells the peer we live
                self._send(link, beat)

    def _check_liveness(self, now: float) -> None:
        for link in list(self._links.values()):
            if not link.failed and now - link.last_seen > self.timeout:
                self._fail_link(link, f"no message for {now - link.last_seen:.1f} s (timeout {self.timeout:.1f} s)")

    def _fail_link(self, link: _Link, reason: str, level: int = logging.ERROR) -> None:
        if link.failed:
            return
        link.failed = reason
        log.log(level, "kvlink %s: link to %s down: %s", self.name, link.name, reason)
        for handle in link.pending.values():
            handle._finish(f"link failed: {reason}")
            self._release_counter(handle, failed=True)
        link.pending.clear()
        link.serves.clear()
        link.outbox.clear()
        if link.comm is not None:
            link.comm.abort()
        if link.socket is not None:
            # nothing more is read from or sent to this peer; closing tells it so at once (a peer
            # resumed after a stop finds the connection gone and its transfers to us failed)
            self._poller.unregister(link.socket)
            link.socket.close(linger=0)
            link.socket = None

    def _shutdown(self) -> None:
        while self._tracked:  # ipc pulls launched but not yet watched: finished below like the others
            link, handle, _ = self._tracked.popleft()
            link.pending[handle.xfer] = handle
        while True:  # commands that came too late: their callers learn it now, not at their timeout
            try:
                kind, *args = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind in ("connect", "cancel_request"):
                args[-1][1]["error"] = RuntimeError(f"endpoint {self.name} is closed")
                args[-1][0].set()
            elif kind in ("pull", "track", "cancel"):
                args[1 if kind != "cancel" else 0]._finish("endpoint closed")
        for pending in self._connecting.values():
            self._end_connect(self._poller, pending, RuntimeError(f"endpoint {self.name} is closed"))
        self._connecting.clear()
        bye = control.encode("BYE", reason=f"{self.name} closed")
        for link in self._links.values():
            if not link.failed:
                try:
                    self._send_now(link, [bye], True)
                except zmq.ZMQError:
                    pass  # best effort: the peer's liveness check tells it all the same
            for handle in link.pending.values():
                handle._finish("endpoint closed")
                self._release_counter(handle, failed=True)
            if link.comm is not None:
                link.comm.abort()  # frees NCCL's memory without waiting on a peer that may be gone
        for link in self._links.values():
            if link.peer_memory is not None:
                try:
                    for stream in (link.stream, link.layer_stream):
                        if stream is not None:
                            stream.synchronize()  # no copy still reads the mapping (waiting copies were released)
                    link.peer_memory.close()
                except Exception as exc:  # a CUDA error already poisoned the context: nothing left to unmap
                    log.error("kvlink %s: unmapping %s's memory failed: %s", self.name, link.name, exc)
        self._links.clear()
