"""The NCCL transport: a pipelined pack -> send -> unpack between two GPUs, the whole of it here.

Per chunk of the request's plan (kvlink.plan)::

    prefill: pack stream:   wait(slot free) -> pack(chunk i) [-> checksum] -> record(slot ready)
             link stream:   wait(slot ready) -> wire.send(slot) -> record(slot free)
    decode:  link stream:   wait(slot free) -> wire.recv(slot) -> record(slot ready)
             unpack stream: wait(slot ready) [-> checksum check] -> unpack(chunk i) -> record(slot free)

Every ordering is a CUDA event between streams (the slots' events are driver events: one call a
record or a wait); the host never waits for the GPU. Slots come from a staging pool allocated
once per endpoint (``num_slots`` of ``chunk_bytes``), so chunk i+1 packs while chunk i is on the
wire and chunk i-1 unpacks. Each side enqueues a pull in one pass: what its chunks share (the
request's block ids, in a kernels.BoxLauncher, and the status word) is made once, and a chunk
adds its events, its wire call and one launch of the pack or unpack kernel with the box's plan. The decode side posts every
receive of a pull at once, in the order its PULL goes out; the prefill side serves the pulls of
a link in arrival order, so the sends match them. A pull the prefill side refuses or stops
keeps its chunk stream in step: it sends empty chunks (no magic word), which the unpack
kernel refuses without writing a byte.

The wire is an object with ``send(ptr, nbytes, stream)``, ``recv(ptr, nbytes, stream)``,
``abort()`` and ``init_bytes``: a 2-rank NCCL communicator (kvlink.nccl.Communicator), or, for
tests and benchmarks on one GPU, the stand-in of kvlink.transports.loopback_wire
(``EndpointConfig(nccl_wire="loopback")``), which runs this same pipeline with each send/recv
pair replaced by a device copy ordered exactly as NCCL orders them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch

from kvlink import cuda_driver, kernels, nccl
from kvlink.errors import TransferRefused
from kvlink.handle import WAIT
from kvlink.kernels import _on_device
from kvlink.pack import pack_selection, prepare, unpack_selection
from kvlink.plan import Box, box_payload_bytes
from kvlink.selection import HEADER_BYTES
from kvlink.serving import DONE, WAITING, Serve
from kvlink.transports import loopback_wire
from kvlink.transports.base import ChunkedTransport, TransportUnavailable
from kvlink.wire import CHECKSUM_OFFSET, STATUS_OK, payload_checksum_torch

log = logging.getLogger("kvlink")


def _as_int32(value: torch.Tensor) -> torch.Tensor:
    """A value in [0, 2**32) as the int32 with the same bits."""
    return (value - (value >= 2**31).to(value.dtype) * 2**32).to(torch.int32)


class _TorchSlotEvent:
    """A slot's event through torch: where the driver's own event calls are not to be had."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event()

    def record(self, stream: torch.cuda.Stream) -> None:
        self.event.record(stream)

    def wait(self, stream: torch.cuda.Stream) -> None:
        stream.wait_event(self.event)


class _DriverSlotEvent(cuda_driver.RawEvent):
    """A slot's event as a driver event: one driver call a record or a wait, no torch wrapper
    (four of them a chunk on each side)."""

    __slots__ = ()

    def record(self, stream: torch.cuda.Stream) -> None:
        result = self._record(self.handle, stream.cuda_stream)
        if result:
            cuda_driver.check(result, "cuEventRecord")

    def wait(self, stream: torch.cuda.Stream) -> None:
        result = self._wait(stream.cuda_stream, self.handle, 0)
        if result:
            cuda_driver.check(result, "cuStreamWaitEvent")


def _slot_events(device_index: int, count: int) -> list:
    """``count`` events for staging slots: driver events, or torch's where the driver refuses them."""
    try:
        with _on_device(device_index):
            cuda_driver.ensure_context(device_index)
            return [_DriverSlotEvent() for _ in range(count)]
    except cuda_driver.CudaDriverError as exc:
        log.warning("kvlink: staging slots use torch events (driver events unavailable: %s)", exc)
        return [_TorchSlotEvent() for _ in range(count)]


@dataclass
class _Slot:
    """A staging buffer and its two events, reused for every chunk (re-recording is safe: a stream
    waits on the record that was current when the wait was queued)."""
    buffer: torch.Tensor
    free: object   # after the last read of the buffer
    ready: object  # after the chunk was written into it
    scratch_address: int = 0  # three zero int32 words for the checksum kernel of the slot's chunk
    used: bool = False

    def __post_init__(self):
        self.address = self.buffer.data_ptr()


class _PullStatus:
    """One pull's status words on the GPU, [unpack status, checksum failures], and their pinned
    host copy."""

    __slots__ = ("device", "device_address", "host", "host_address")

    def __init__(self, device: torch.Tensor, host: torch.Tensor):
        self.device, self.device_address = device, device.data_ptr()
        self.host, self.host_address = host.numpy(), host.data_ptr()


class _PullStatusPool:
    """The decode side's per-pull status words, made a block at a time and reused (unlike
    kernels._StatusWords, the one-off words of standalone unpack() calls, these carry a pinned
    host copy and come back to the pool).

    NOTE: a pull's words were a device and a pinned allocation of its own; besides their host
    cost, an allocation on the progress thread may wait for the GPU, whose receives wait for
    sends still to be queued (on the stand-in wire, by a thread of this process). Every write of
    an entry (its zeroing, the unpacks' and checksums' verdicts, the copy to the host) is queued
    on the endpoint's one unpack stream, in pull order, so an entry can go back to the pool as
    soon as nobody will read it: once its pull's verdict was read, or once the pull ended
    without one (cancelled, link down); a later pull's writes of it come after.
    """

    BLOCK = 1024

    def __init__(self, device: torch.device):
        self.device = device
        self._free: collections.deque = collections.deque()
        self._blocks = []  # keeps each block's memory alive
        self._lock = threading.Lock()

    def take(self) -> _PullStatus:
        try:
            return self._free.popleft()
        except IndexError:  # more pulls in flight than ever before: one more block
            self.grow()
            return self._free.popleft()

    def grow(self) -> None:
        device_block = torch.empty((self.BLOCK, 2), dtype=torch.int32, device=self.device)
        host_block = torch.empty((self.BLOCK, 2), dtype=torch.int32, pin_memory=True)
        self._blocks.append((device_block, host_block))
        self._free.extend(_PullStatus(device_block[i], host_block[i]) for i in range(self.BLOCK))

    def read(self, op) -> tuple[int, int]:
        """The words of ``op``'s entry, once its GPU work ran, read once (any thread); the entry
        goes back to the pool."""
        with self._lock:
            if op.status_read is None:
                entry, op.status = op.status, None
                if entry is None:  # the pull ended meanwhile (settle): its outcome is set already
                    return STATUS_OK, 0
                op.status_read = (int(entry.host[0]), int(entry.host[1]))
                self._free.append(entry)
            return op.status_read

    def settle(self, op) -> None:
        """``op`` ended without its verdict read: its entry goes back to the pool."""
        with self._lock:
            entry, op.status = op.status, None
            if entry is not None:
                self._free.append(entry)


@dataclass
class NcclLink:
    wire_id: bytes
    stream: torch.cuda.Stream | None = None  # the link's sends or receives
    wire: object = None  # set once the communicator (or the stand-in) is up


@dataclass
class _ServePlan:
    """What a serve's chunks share, made once at its first chunk."""
    launcher: object  # kernels.BoxLauncher, or None (the torch backend)
    token_layer_bytes: int


class NcclTransport(ChunkedTransport):
    name = "nccl"
    serves_refused_chunks = True  # the receiver posted one receive per chunk: every chunk is sent

    def __init__(self, ctx):
        super().__init__(ctx)
        self._loopback = self.config.nccl_wire == "loopback"
        self._slots: list[_Slot] = []
        self._status_words = _PullStatusPool(self.layout.device) if ctx.on_gpu else None
        self._slot_cursor = 0
        self._slot_lock = threading.Lock()
        self._pack_stream = self._unpack_stream = None
        self._counters = {f"{side}_{what}": 0 if what == "chunks" else 0.0 for side in ("decode", "prefill")
                          for what in ("chunks", "seconds", "cpu_seconds", "wire_seconds")}
        if ctx.on_gpu:
            self._pack_stream = torch.cuda.Stream(self.layout.device)
            self._unpack_stream = torch.cuda.Stream(self.layout.device)
            prepare(self.layout, self._pack_stream)
            prepare(self.layout, self._unpack_stream)

    def unavailable(self, auto: bool = False) -> str | None:
        if not self.ctx.on_gpu:
            return f"needs a GPU cache; {self.layout.name} is on {self.layout.device}"
        if self._loopback:
            # a stand-in for tests: used when asked for by name, never picked by transport="auto"
            return "nccl_wire='loopback' is used only with transport='nccl'" if auto else loopback_wire.unavailable()
        return None if nccl.available() else "CuPy's NCCL is not available"

    # ------------------------------------------------------------------ handshake
    def can_link(self, hello: dict, same_gpu: bool, same_process: bool) -> bool:
        if self._loopback:
            return same_gpu and same_process  # the stand-in copies between two endpoints of one process
        return not same_gpu  # NCCL refuses two ranks on one GPU

    def prefill_state(self, hello: dict):
        wire_id = loopback_wire.new_pair(self.ctx.device_index) if self._loopback else nccl.unique_id()
        return NcclLink(wire_id), {"nccl_id": wire_id}

    def decode_state(self, welcome: dict):
        if not isinstance(welcome.get("nccl_id"), bytes):
            raise TransportUnavailable("the peer sent no NCCL id")
        return NcclLink(welcome["nccl_id"])

    def start(self, link, timeout: float):
        """Create the link's stream and staging, and start forming the wire; a Future of it. NCCL's
        communicator forms on a helper thread (both ranks must join): the progress loop goes on."""
        state = link.state
        state.stream = torch.cuda.Stream(self.layout.device)
        self._ensure_slots(link.chunk_bytes)
        rank = 0 if link.role == "prefill" else 1
        if self._loopback:
            future = concurrent.futures.Future()
            try:
                future.set_result(loopback_wire.end(state.wire_id, rank))
            except Exception as exc:  # no such pair: the peer is not a loopback endpoint of this process
                future.set_exception(exc)
            return future
        return _in_thread(f"kvlink-nccl-init-{link.name}", nccl.Communicator, state.wire_id, rank,
                          self.ctx.device_index, timeout=timeout, peer=link.name)

    def started(self, link, wire) -> None:
        link.state.wire = wire

    def describe(self, link) -> str:
        wire = link.state.wire
        return (f"transport nccl on GPU {self.ctx.device_index}, "
                + ("stand-in wire (loopback copies, tests only)" if self._loopback else
                   f"communicator {wire.init_bytes / 2**20:.0f} MiB")
                + f", staging {len(self._slots)} x {self.config.chunk_bytes / 2**20:.0f} MiB, NCCL env "
                + str({k: v for k, v in os.environ.items() if k.startswith("NCCL_")}))

    def link_info(self, link) -> dict:
        wire = link.state.wire if link.state is not None else None
        return {"nccl_bytes": wire.init_bytes if wire is not None else 0,
                "staging_bytes": sum(slot.buffer.numel() for slot in self._slots)}

    def _ensure_slots(self, chunk_bytes: int) -> None:
        with self._slot_lock:
            if not self._slots:
                count = self.config.num_slots
                events = _slot_events(self.ctx.device_index, 2 * count)
                # zeroed by a driver memset: no kernel to load while a peer's receives may be queued
                self._scratch = torch.empty(4 * count, dtype=torch.int32, device=self.layout.device)
                with _on_device(self.ctx.device_index):
                    cuda_driver.ensure_context(self.ctx.device_index)
                    cuda_driver.memset32_async(self._scratch.data_ptr(), 0, 4 * count, self._pack_stream.cuda_stream)
                self._pack_stream.synchronize()
                self._status_words.grow()  # the first block, before any pull
                self._slots = [_Slot(torch.empty(chunk_bytes + HEADER_BYTES, dtype=torch.uint8,
                                                 device=self.layout.device), events[2 * i], events[2 * i + 1],
                                     self._scratch.data_ptr() + 16 * i)
                               for i in range(count)]

    def counters(self) -> dict:
        """Host time of this endpoint's pipeline so far, per side: chunks queued, the seconds spent
        queueing them (wall time, the wire calls included), the CPU time of the thread meanwhile
        (the wall time less its waits for the GIL or the OS) and the seconds in the wire's
        send/recv (none on a CPU cache, which never runs the pipeline)."""
        return dict(self._counters) if self.ctx.on_gpu else {}

    def _count(self, side: str, chunks: int, seconds: float, cpu_seconds: float, wire_seconds: float) -> None:
        counters = self._counters
        counters[f"{side}_chunks"] += chunks
        counters[f"{side}_seconds"] += seconds
        counters[f"{side}_cpu_seconds"] += cpu_seconds
        counters[f"{side}_wire_seconds"] += wire_seconds

    def _next_slot(self) -> _Slot:
        slot = self._slots[self._slot_cursor % len(self._slots)]
        self._slot_cursor += 1
        return slot

    # ------------------------------------------------------------------ decode side
    def receive(self, link, handle, op) -> None:
        """Post every receive of the pull, with the unpack of each chunk behind it, in one pass.

        What the chunks share is made once: the status words (from a pool), the unpack launcher
        holding the request's block ids (kernels.BoxLauncher); a chunk adds its receive, two slot
        events, its launch (Geometry and header only), its checksum's check and the slot's
        release. Only driver calls and kvlink's own kernels: no allocation, no torch kernel.
        """
        started, started_cpu = time.perf_counter(), time.thread_time()
        dst_sel, boxes = op.req.dst_sel, op.boxes
        stream, unpack_stream, wire = link.state.stream, self._unpack_stream, link.state.wire
        unpack_handle = unpack_stream.cuda_stream
        cuda_backend = self.ctx.backend == "cuda"
        checksum = self.config.checksum
        layer_events = {}
        wire_seconds = 0.0
        with _on_device(self.ctx.device_index):
            if op.req.after is not None:
                unpack_stream.wait_event(op.req.after)  # pull(stream=): no write before the caller's work
            status = op.status = self._status_words.take()
            cuda_driver.memset32_async(status.device_address, 0, 2, unpack_handle)
            launcher = kernels.BoxLauncher("unpack", dst_sel, status_ptr=status.device_address,
                                           max_ctas=self.config.max_ctas) if cuda_backend else None
            token_layer_bytes, num_tokens = dst_sel.token_layer_bytes, dst_sel.num_tokens
            for box in boxes:
                nbytes = HEADER_BYTES + box_payload_bytes(box, token_layer_bytes)
                slot = self._next_slot()
                if slot.used:
                    slot.free.wait(stream)
                posted = time.perf_counter()
                wire.recv(slot.address, nbytes, stream)
                wire_seconds += time.perf_counter() - posted
                slot.ready.record(stream)
                slot.ready.wait(unpack_stream)
                if checksum:
                    self._check_checksum(slot, nbytes, unpack_stream, status, cuda_backend)
                if launcher is None or not launcher.launch(box, slot.address, unpack_handle):
                    unpack_selection(dst_sel.box(box[:2], box[2:]), slot.buffer[:nbytes], unpack_stream,
                                     self.ctx.backend, self.config.max_ctas, status.device[:1],
                                     cache_scale=self.config.cache_scale)
                slot.free.record(unpack_stream)
                slot.used = True
                if handle.layerwise and box[3] == num_tokens:
                    for layer in range(box[0], box[1]):
                        layer_events[layer] = event = torch.cuda.Event()
                        event.record(unpack_stream)
            cuda_driver.copy_to_host_async(status.host_address, status.device_address, 8, unpack_handle)
            done = kernels.completion_event(self.ctx.device_index, unpack_stream)
        enqueue = time.perf_counter() - started
        handle.stats.enqueue_seconds = enqueue
        self._count("decode", len(boxes), enqueue, time.thread_time() - started_cpu, wire_seconds)
        handle._gpu_work(done, layer_events, partial(_verdict, self._status_words, op))

    def _check_checksum(self, slot, nbytes: int, stream, status: _PullStatus, cuda_backend: bool) -> None:
        """Queue the check of a received chunk's payload checksum: a chunk that fails loses its
        magic word, so the unpack refuses it whole, and the pull's checksum word is set."""
        if cuda_backend:
            kernels.launch_checksum(self.ctx.device_index, slot.address, HEADER_BYTES, nbytes - HEADER_BYTES,
                                    CHECKSUM_OFFSET, slot.scratch_address, stream,
                                    verify_into=status.device_address + 4)
            return
        with torch.cuda.stream(stream):  # the reference backend: torch's ops, on the unpack stream
            bad = _as_int32(payload_checksum_torch(slot.buffer[HEADER_BYTES:nbytes])) != \
                slot.buffer[CHECKSUM_OFFSET:HEADER_BYTES].view(torch.int32)
            slot.buffer[:4].view(torch.int32).bitwise_xor_(bad.to(torch.int32) * 0x55555555)
            status.device[1:].bitwise_or_(bad.to(torch.int32).reshape(1))

    def release(self, link, handle, failed: bool) -> None:
        if handle._op.status is not None:  # ended before its verdict was read
            self._status_words.settle(handle._op)

    def poll(self, link) -> None:
        # NOTE: a link's pulls unpack in issue order on one stream: the first one not done holds
        # every one behind it, so a turn looks at the heads only
        for handle in list(link.pending.values()):
            if not handle.done():
                return
            self.notify(link, handle)

    # ------------------------------------------------------------------ prefill side
    def serve(self, link, serve: Serve, ready: dict) -> str:
        plan = serve.state
        if plan is None and serve.refused is None:
            # what the serve's chunks share: the pack launcher holding the request's block ids
            launcher = kernels.BoxLauncher("pack", serve.sel, max_ctas=self.config.max_ctas) \
                if self.ctx.backend == "cuda" else None
            plan = serve.state = _ServePlan(launcher, serve.sel.token_layer_bytes)
        chunks, host_seconds, wire_seconds = 0, 0.0, 0.0
        started_cpu = time.thread_time()
        try:
            with _on_device(self.ctx.device_index):
                while serve.next_chunk < len(serve.boxes):
                    box = serve.boxes[serve.next_chunk]
                    if self.waits_for_layers(serve, box, ready):
                        return WAITING
                    started = time.perf_counter()
                    wire_seconds += self._send_chunk(link, serve, box, ready, plan)
                    seconds = time.perf_counter() - started
                    serve.enqueue_seconds += seconds
                    host_seconds += seconds
                    chunks += 1
                    serve.next_chunk += 1
        finally:
            if chunks:
                self._count("prefill", chunks, host_seconds, time.thread_time() - started_cpu, wire_seconds)
        return DONE

    def _send_chunk(self, link, serve: Serve, box: Box, ready: dict, plan: _ServePlan | None) -> float:
        """Pack ``box`` into the next slot and send it (a refused pull's chunk: empty, no magic);
        the seconds spent in the wire's send."""
        slot = self._next_slot()
        stream, link_stream = self._pack_stream, link.state.stream
        if slot.used:
            slot.free.wait(stream)
        if serve.refused is None:
            nbytes = HEADER_BYTES + box_payload_bytes(box, plan.token_layer_bytes)
            if ready:
                for layer in range(box[0], box[1]):
                    if ready.get(layer) is not None:
                        stream.wait_event(ready[layer])
            if plan.launcher is None or not plan.launcher.launch(box, slot.address, stream.cuda_stream):
                pack_selection(serve.sel.box(box[:2], box[2:]), slot.buffer, stream, self.ctx.backend,
                               self.config.max_ctas)
            if serve.checksum and plan.launcher is not None:
                kernels.launch_checksum(self.ctx.device_index, slot.address, HEADER_BYTES, nbytes - HEADER_BYTES,
                                        CHECKSUM_OFFSET, slot.scratch_address, stream)
            elif serve.checksum:  # the reference backend
                with torch.cuda.stream(stream):
                    sent = payload_checksum_torch(slot.buffer[HEADER_BYTES:nbytes])
                    slot.buffer[CHECKSUM_OFFSET:HEADER_BYTES].view(torch.int32).copy_(_as_int32(sent))
        else:
            nbytes = self.refused_chunk_bytes(link, serve, box)
            # no magic: the receiver refuses it and writes nothing (a driver memset, no kernel)
            cuda_driver.memset32_async(slot.address, 0, HEADER_BYTES // 4, stream.cuda_stream)
        slot.ready.record(stream)
        slot.ready.wait(link_stream)
        posted = time.perf_counter()
        link.state.wire.send(slot.address, nbytes, link_stream)
        wire_seconds = time.perf_counter() - posted
        slot.free.record(link_stream)
        slot.used = True
        return wire_seconds

    def serve_failed(self, link, serve: Serve, exc: Exception) -> None:
        # the chunk stream is out of step with the receiver's: nothing later on this link can match
        self.ctx.engine.fail_link(link, f"serving request {serve.request!r} failed: {exc}")

    # ------------------------------------------------------------------ teardown
    def link_failed(self, link) -> None:
        wire = link.state.wire if link.state is not None else None
        if wire is not None:
            wire.abort()  # frees NCCL's memory without waiting on a peer that may be gone


def _verdict(status_words: _PullStatusPool, op, final: bool = False):
    """A pull's outcome once its last unpack ran: its status words (unpack status, checksum
    failures), read once, after which the entry goes back to the pool."""
    words = status_words.read(op)
    if words[0] == STATUS_OK:
        return None
    if not final:
        return WAIT  # the sender's FAILED, on its way, names the reason better
    if words[1]:
        return "a received chunk failed its checksum (corrupted on the way) and was not unpacked", None, TransferRefused
    return "a received chunk was refused (header mismatch or refused by the sender)", None, TransferRefused


def _in_thread(name: str, fn, *args, **kwargs) -> concurrent.futures.Future:
    """``fn(*args, **kwargs)`` on a daemon thread of its own; a Future of its result."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
