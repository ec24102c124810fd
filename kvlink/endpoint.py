"""The object an engine holds: registers its cache, links to peers, moves requests' KV blocks.

One :class:`Endpoint` per GPU (or per CPU cache). The decode side *pulls*: it names the
request, the prefill side's source blocks and its own destination blocks; the prefill side
serves the pulls of each link in the order they arrive.

The endpoint is a facade: it validates what it is asked, keeps the links and the pulls'
handles, and hands the rest on. Where the rest lives:

    kvlink/progress.py    the progress thread: sockets, commands, outboxes, liveness (never blocks)
    kvlink/handshake.py   HELLO/WELCOME, the transport both sides agree on, its setup
    kvlink/serving.py     the prefill side: serve queues, layer readiness, finished_sends()
    kvlink/transports/    one module per transport (ipc, nccl, host) behind one interface
    kvlink/handle.py      TransferHandle, the decode side's view of one pull
    kvlink/config.py      EndpointConfig, every setting (and the KVLINK_* variables)
"""

from __future__ import annotations

import itertools
import logging
import os
import socket as pysocket
import time
import warnings
import weakref

import torch

from kvlink.config import EndpointConfig, Transport, default_timeout
from kvlink import control
from kvlink.errors import ArgumentTypeError, EndpointClosed, InvalidArgument, LinkDown, TransferError  # noqa: F401
from kvlink.handle import DstState, TransferHandle, TransferStats  # noqa: F401  (kvlink.endpoint's names, as before)
from kvlink.handshake import Handshake
from kvlink.layout import CacheLayout
from kvlink.pack import _resolve_backend
from kvlink.progress import ProgressEngine
from kvlink.selection import WIRE_DTYPES, select, with_wire
from kvlink.serving import Serving
from kvlink.transports import TRANSPORTS
from kvlink.transports.base import EndpointContext, PullRequest

log = logging.getLogger("kvlink")

TRANSPORT_NAMES = tuple(t.value for t in Transport)
_DEFAULT = object()  # pull(wire_dtype=...) not given: the endpoint's default


class Endpoint:
    """kvlink's per-GPU object: cache registration, links, pulls, notifications.

    Args:
        layout: this side's cache (kvlink.presets).
        config: every setting at once (:class:`~kvlink.EndpointConfig`); default: the defaults
            with the ``KVLINK_*`` environment variables applied, read now. The keyword
            arguments below override single settings of either (None: keep it).
        name: how peers and logs call this endpoint (default: host:pid:device).
        listen: ZeroMQ address to serve pulls on (``tcp://127.0.0.1:0`` picks a port; ``None``
            for a pull-only endpoint). Loopback unless told otherwise.
        transport: ``"auto"`` (ipc on one host, else NCCL between two GPUs, else host TCP),
            ``"ipc"``, ``"nccl"`` or ``"host"`` (:class:`~kvlink.Transport`).
        chunk_bytes: staging slot payload size (default ``KVLINK_CHUNK_MB`` or 64 MiB).
        num_slots: staging slots (GPU); 3 lets pack, wire and unpack overlap.
        timeout: seconds any wait may take before it fails with an error naming the peer.
        heartbeat: seconds between heartbeats on every link.
        max_ctas: thread blocks pack/unpack may use while NCCL runs (default ``KVLINK_MAX_CTAS`` or 64).
        ipc_max_ctas: thread blocks of an ipc pull's copy kernel (default ``KVLINK_IPC_MAX_CTAS``,
            else by where the source lies: 264 looping over the tiles when it is another GPU's
            memory, whose reads are latency-bound; one per tile on our own GPU; 0 = one per tile).
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
        outbox_limit: messages a link may queue behind a peer that does not read them; past it
            the link fails ("control queue full: peer not reading").
    """

    def __init__(self, layout: CacheLayout, *, config: EndpointConfig | None = None, name: str | None = None,
                 listen: str | None = "tcp://127.0.0.1:0", transport: str | None = None,
                 chunk_bytes: int | None = None, num_slots: int | None = None, timeout: float | None = None,
                 heartbeat: float | None = None, max_ctas: int | None = None, max_links: int | None = None,
                 ipc_max_ctas: int | None = None, secret: str | bytes | None = None, checksum: bool | None = None,
                 wire_dtype: str | None = None, cache_scale: float | None = None, outbox_limit: int | None = None):
        if not isinstance(layout, CacheLayout):
            raise ArgumentTypeError(f"layout must be a kvlink CacheLayout, got {type(layout).__name__}")
        if wire_dtype not in WIRE_DTYPES:
            raise InvalidArgument(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        settings = dict(transport=transport, chunk_bytes=chunk_bytes, num_slots=num_slots, timeout=timeout,
                        heartbeat=heartbeat, max_ctas=max_ctas, max_links=max_links, ipc_max_ctas=ipc_max_ctas,
                        secret=secret, checksum=checksum, wire_dtype=wire_dtype, cache_scale=cache_scale,
                        outbox_limit=outbox_limit)
        self.config = (config or EndpointConfig.from_env()).replace(**settings)
        if self.config.chunk_bytes < layout.num_kv * layout.num_heads * layout.row_bytes:
            raise InvalidArgument(f"chunk_bytes={self.config.chunk_bytes} cannot hold one token of one layer")
        self.layout = layout
        self.on_gpu = layout.device.type == "cuda"
        self.device_index = layout.device.index if self.on_gpu else None
        self.name = name or f"{pysocket.gethostname()}:{os.getpid()}:{layout.device}"
        ctx = EndpointContext(self.name, layout, self.config, _resolve_backend(layout, "auto"), self.device_index)
        self._transports = {kind: cls(ctx) for kind, cls in TRANSPORTS.items()}
        if self.config.transport != Transport.AUTO:
            reason = self._transports[self.config.transport.value].unavailable()
            if reason is not None:
                raise InvalidArgument(f"transport={self.config.transport.value!r} is unavailable: {reason}")
        self._engine = ctx.engine = ProgressEngine(ctx, listen)
        self._serving = ctx.serving = self._engine.serving = Serving(self._engine)
        self._handshake = self._engine.handshake = Handshake(ctx, self._transports)
        self._links = self._engine.links  # read here, changed only by the progress thread
        self._xfer_ids = itertools.count(1)
        # (peer, request id) -> the latest pull of it: an id still in flight on a link is refused
        # weak: a handle nobody holds (neither the caller nor its transport, which holds it while in
        # flight) frees its id, and its pooled completion event goes back at once
        self._pulls_by_request: weakref.WeakValueDictionary[tuple[str, str], TransferHandle] = \
            weakref.WeakValueDictionary()
        self._prune_pulls_at = 1024
        self._closed = False
        self._engine.start()
        log.info("kvlink endpoint %s: %s, listening on %s", self.name, layout.describe(), self.address)

    # ================================================================== settings and state
    address = property(lambda self: self._engine.address, doc="The ZeroMQ address peers connect() to (or None).")
    transport = property(lambda self: self.config.transport, doc="The configured Transport (AUTO: negotiated per link).")
    chunk_bytes = property(lambda self: self.config.chunk_bytes)
    checksum = property(lambda self: self.config.checksum)
    wire_dtype = property(lambda self: self.config.wire_dtype)
    cache_scale = property(lambda self: self.config.cache_scale)
    max_links = property(lambda self: self.config.max_links)
    alive = property(lambda self: self._engine.alive, doc="The progress thread runs (until close()).")

    @property
    def timeout(self) -> float:
        return self.config.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        """Changes the timeout of later waits (a link's liveness, a layer-wise pull's layers)."""
        self.config.timeout = float(seconds)

    @property
    def ipc_unavailable(self) -> str | None:
        """Why this endpoint does not offer CUDA IPC, or None when it does."""
        return self._transports["ipc"].unavailable()

    def offered_transports(self) -> list[str]:
        """The transports this endpoint offers a peer at the handshake, best first."""
        return self._handshake.offered()

    # ================================================================== links
    def connect(self, address: str, timeout: float | None = None) -> str:
        """Link to the endpoint listening at ``address`` (handshake, transport setup); its name."""
        timeout = self._connect_timeout(address, timeout)
        return self._engine.call(self._handshake.connect, address, timeout, timeout=2 * timeout + 5,
                                 what=f"connect to {address}")

    def connect_async(self, address: str, timeout: float | None = None):
        """Start linking to ``address`` and return at once: a Future of the peer's name, or of the
        error ``connect()`` would raise. For callers that must not block (an engine's step)."""
        return self._engine.call_async(self._handshake.connect, address, self._connect_timeout(address, timeout))

    def _connect_timeout(self, address, timeout) -> float:
        if not isinstance(address, str) or "://" not in address:
            raise InvalidArgument(f"address must be a ZeroMQ address like tcp://127.0.0.1:5555, got {address!r}")
        self._check_open()
        return self.config.timeout if timeout is None else float(timeout)

    def _link(self, peer: str, role: str | None = "decode"):
        link = self._links.get(peer)
        if link is None or (role is not None and link.role != role):
            raise InvalidArgument(f"no link to peer {peer!r}; connect() to it first (links: {sorted(self._links)})")
        return link

    def remote_layout(self, peer: str) -> dict:
        """The linked peer's cache description from the handshake (``CacheLayout.to_dict``)."""
        return dict(self._link(peer, role=None).remote_layout)

    def links(self) -> list[dict]:
        """One dict per link: peer, role, transport, failed (the reason) and what is under way on it
        (serving, in_flight, queued_messages), communicator and staging bytes."""
        return [link.info() for link in list(self._links.values())]

    def stats(self) -> dict:
        """The endpoint's counters: late messages dropped (of transfers that had ended), failed
        links, messages queued behind slow peers; and under ``transports`` those a transport
        keeps (nccl: chunks queued and the host seconds spent on them, per side; ipc: layer-wise
        pulls deferred past the GPU queue's bound)."""
        links = list(self._links.values())
        return {"late_messages": self._engine.late_messages, "links_failed": sum(bool(l.failed) for l in links),
                "queued_messages": sum(len(l.channel.outbox) for l in links),
                "transports": {name: c for name, t in self._transports.items() if (c := t.counters())}}

    # ================================================================== decode side
    def pull(self, peer: str, request: str, src_blocks, dst_blocks, num_tokens: int, *,
             layers: tuple[int, int] | None = None, src_heads: tuple[int, int] | None = None,
             dst_heads: tuple[int, int] | None = None, layerwise: bool = False,
             wire_dtype: str | None | object = _DEFAULT, stream: torch.cuda.Stream | None = None) -> TransferHandle:
        """Start moving ``request``'s KV from ``peer``'s ``src_blocks`` into our ``dst_blocks``.

        Validated here, before anything is sent: our destination blocks against our cache, the
        source blocks against the peer's cache geometry from the handshake. ``wire_dtype``
        (default: the endpoint's) picks fp8 on the wire for this pull. ``stream`` (GPU caches):
        the pull writes nothing before the work queued on it so far (the engine's last reads of
        the destination blocks); ``handle.current_stream_wait()`` orders the other way.
        """
        called, called_cpu = time.perf_counter(), time.thread_time()
        self._check_open()
        link = self._link(peer)
        if not link.up:
            raise LinkDown(f"request {request!r} from {peer}: link is " +
                           (f"down ({link.failed})" if link.failed else "still being set up: wait for connect()"))
        if not isinstance(request, str) or not request:
            raise ArgumentTypeError(f"request must be a non-empty str id, got {request!r}")
        self._check_request_free(peer, request)
        dst_sel = select(self.layout, dst_blocks, num_tokens, layers=layers, heads=dst_heads, destination=True)
        remote = link.remote_layout
        wire = self.config.wire_dtype if wire_dtype is _DEFAULT else wire_dtype
        if wire is None and remote["dtype"] != dst_sel.layout.dtype_name:
            if self.layout.dtype != torch.float8_e4m3fn:
                raise InvalidArgument(f"{peer}'s cache is {remote['dtype']} and ours {self.layout.dtype_name}: pull "
                                      "with wire_dtype='fp8' to convert (lossy), or register caches of one dtype")
            wire = "fp8"  # a bf16/fp16/fp32 source into an e4m3 cache: quantized on the way, always
        if wire is not None:
            if not link.transport.has_wire:
                raise InvalidArgument(f"wire_dtype={wire!r} needs a wire, but the link to {peer} is "
                                      f"{link.transport.name} (a direct copy): create the decode endpoint with "
                                      "wire_dtype='fp8' or transport='nccl'")
            dst_sel = with_wire(dst_sel, wire, role="destination")
        src_heads = src_heads or (0, remote["num_heads"])
        if not (0 <= src_heads[0] < src_heads[1] <= remote["num_heads"]) or \
                src_heads[1] - src_heads[0] != dst_sel.num_selected_heads:
            raise InvalidArgument(f"src_heads={src_heads} must lie in [0, {remote['num_heads']}) and match "
                                  f"{dst_sel.num_selected_heads} destination heads")
        after = None
        if stream is not None:
            if not self.on_gpu:
                raise InvalidArgument(f"stream given, but {self.layout.name} is on {self.layout.device}")
            after = torch.cuda.Event()
            after.record(stream)
        req = PullRequest(request, src_blocks, dst_sel, tuple(src_heads), layerwise, after, called, called_cpu)
        op = link.transport.prepare_pull(link, req)
        handle = TransferHandle(next(self._xfer_ids), request, peer, layerwise, timeout=self.config.timeout,
                                canceller=lambda h: self._engine.post(link.transport.cancel, link, h),
                                device=self.device_index, op=op)
        self._pulls_by_request[(peer, request)] = handle
        link.transport.start_pull(link, handle, op)
        return handle

    def _check_request_free(self, peer: str, request: str) -> None:
        """Refuse a request id that is still being pulled from ``peer``: the prefill side knows a
        pull by its id (notifications, layer_ready, cancels), so two at once would mix them up."""
        earlier = self._pulls_by_request.get((peer, request))
        if earlier is not None and not earlier.done():
            raise InvalidArgument(f"request {request!r} is already being pulled from {peer}: wait for that pull or "
                                  "cancel it before pulling the same id again")
        if len(self._pulls_by_request) >= self._prune_pulls_at:  # amortized: a pass per doubling
            for key in [key for key, h in list(self._pulls_by_request.items()) if h.done()]:
                self._pulls_by_request.pop(key, None)
            self._prune_pulls_at = max(1024, 2 * len(self._pulls_by_request))

    def release(self, peer: str, request: str) -> None:
        """Decode side: tell ``peer`` we are done with ``request`` without pulling from it.

        Under tensor-parallel resharding a prefill rank whose heads another rank sent (a GQA
        replica, MLA's latent) still holds the request's blocks: its ``finished_sends()`` then
        reports ``(request, True)``, as after a pull. Does not wait.
        """
        link = self._link(peer)
        if not isinstance(request, str) or not request or len(request) > 1024:
            raise ArgumentTypeError(f"request must be a str id of 1 to 1024 characters, got {request!r:.80}")
        self._check_open()
        self._engine.post(self._engine.send, link, control.encode("RELEASE", request=request))  # a no-op once down

    # ================================================================== prefill side
    def layer_ready(self, request: str, layer: int, stream: torch.cuda.Stream | None = None, *,
                    pulls: int = 1) -> None:
        """Prefill side, layer-wise mode: ``layer`` of ``request`` is written (by work queued on ``stream``).

        ``pulls``: how many layer-wise pulls will read this request from this cache (several
        decode ranks under tensor-parallel resharding: ``ReshardPlan.pulls_from``); the
        request's ready layers are kept until that many have been served (or the timeout).
        """
        if not 0 <= layer < self.layout.num_layers:
            raise InvalidArgument(f"layer={layer} outside [0, {self.layout.num_layers})")
        if isinstance(pulls, bool) or not isinstance(pulls, int) or pulls < 1:
            raise InvalidArgument(f"pulls must be a positive int, got {pulls!r}")
        self._check_open()
        event = None
        if self.on_gpu:
            stream = stream or torch.cuda.current_stream(self.device_index)
            event = torch.cuda.Event()
            event.record(stream)
            for transport in self._transports.values():  # what can be signalled at once, is (ipc)
                transport.layer_ready_now(request, layer, stream)
        self._engine.post(self._serving.ready.record, request, layer, event, pulls)

    def cancel_serving(self, request: str, timeout: float | None = None) -> int:
        """Prefill side: stop serving every pull of ``request``; the number stopped.

        Each decode side gets a FAILED naming the cancel (its handle then reports whether its
        destination blocks are untouched or invalid); the blocks here can be freed.
        """
        self._check_open()
        return self._engine.call(self._serving.cancel_request, request,
                                 timeout=self.config.timeout if timeout is None else timeout,
                                 what=f"cancel_serving({request!r})")

    def cancel(self, request: str, timeout: float | None = None) -> int:
        """Deprecated name of :meth:`cancel_serving` (a handle's own ``cancel()`` is the decode side's)."""
        warnings.warn("Endpoint.cancel() is now Endpoint.cancel_serving()", DeprecationWarning, stacklevel=2)
        return self.cancel_serving(request, timeout)

    def finished_sends(self) -> list[tuple[str, bool]]:
        """Prefill side: (request, ok) for each pull the decode side confirmed since the last call."""
        return self._serving.finished_sends()

    def layer_ready_requests(self) -> list[str]:
        """Prefill side: requests whose ready layers (layer_ready()) are kept, waiting to be served."""
        return self._engine.call(self._serving.ready.requests, timeout=self.config.timeout, what="layer_ready_requests")

    # ================================================================== test seams
    def set_serve_hook(self, hook) -> None:
        """Test seam (fault injection), prefill side, host transport: ``hook(request, chunk_index,
        payload)`` sees each packed chunk (a uint8 numpy array, header included) before it is sent
        and returns the bytes to send (the same, a corrupted copy...); an exception it raises
        fails the serve as a real error would. ``None`` removes it."""
        self._serving.hook = hook

    def set_remote_view(self, peer: str, **fields) -> None:
        """Test seam: change our record of ``peer``'s cache description (what ``pull()`` checks the
        source side against on the chunked transports), as a stale record would be; the peer's
        own checks must still refuse what does not fit its cache."""
        link = self._link(peer, role=None)
        link.remote_layout = {**link.remote_layout, **fields}

    # ================================================================== lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed(f"endpoint {self.name} is closed")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the progress thread (pending pulls fail with "endpoint closed") and close the sockets.

        Returns within ``timeout``: every turn of the progress loop is bounded and no socket call
        blocks, so the thread sees the stop at once; should it still be busy (a GPU wait), it
        closes its sockets itself when it gets there.
        """
        if self._closed:
            return
        self._closed = True
        if not self._engine.stop(timeout):
            log.error("kvlink %s: progress thread did not stop within %.1f s; it closes the sockets when it does",
                      self.name, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def __getattr__(name: str):
    if name == "DEFAULT_TIMEOUT":  # read when asked for, not at import (kvlink.config.default_timeout)
        return default_timeout()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
