"""The ipc transport: the decode GPU copies the prefill's blocks itself, through CUDA IPC.

At the handshake each side maps what it needs of the other (kvlink.ipc): the decode side the
prefill's cache, the prefill side the decode side's layer counters. ``pull()`` then queues one
copy kernel, on the caller's thread, that reads the source blocks across NVLink (or PCIe) and
writes the destination blocks; no message goes to the prefill side until the NOTIFY.

Layer-wise pulls: each layer's copy first waits, on the GPU, for a counter in the decode GPU's
memory that the prefill's stream advances after that layer's forward pass (``layer_ready``),
so no host sits between the two. Those pulls do travel to the prefill side (a PULL naming the
counter), which serves them in order like any other.

Work waiting on the GPU fills the driver's launch queue, and a full queue makes the next launch
block the calling thread until the GPU moves on, which a slow or dead prefill may never let it
do. So a link keeps at most ``EndpointConfig.ipc_queued_layers`` layer copies queued (a pull
with more layers than that goes alone); a layer-wise pull beyond it is deferred: its PULL goes
out at once, and the progress thread queues its copies when earlier pulls have finished (its
``event``/``layer_event`` exist from then on). A deferred pull that times out or is cancelled
never queued anything: its blocks are untouched.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from kvlink import control, cuda_driver, ipc
from kvlink.config import IPC_CROSS_GPU_CTAS
from kvlink.errors import TransferError, TransferRefused
from kvlink.kernels import _on_device, completion_event, launch_copy
from kvlink.layout import PeerLayout
from kvlink.pack import prepare
from kvlink.serving import DONE, WAITING, Serve
from kvlink.selection import select
from kvlink.transports.base import Transport, TransportUnavailable

log = logging.getLogger("kvlink")

COUNTER_SLOTS = 1024  # int32 layer counters on the decode GPU that the prefill's stream advances


@dataclass
class DecodeLink:
    peer_layout: PeerLayout   # the prefill's cache, mapped here
    peer_memory: ipc.PeerMemory
    stream: torch.cuda.Stream        # plain pulls' copies
    layer_stream: torch.cuda.Stream  # layer-wise pulls' copies (they may wait on the GPU)
    owner: str | None = None  # how errors name the peer's cache (made at the first pull)
    max_ctas: int | None = None  # the copy kernel's grid bound (None: one block per tile)
    # pulls on each stream in the order queued: one completes only after those before it
    plain: collections.deque = field(default_factory=collections.deque)
    layered: collections.deque = field(default_factory=collections.deque)
    # layer-wise pulls whose copies wait on the host (the GPU queue is at its bound), in issue order
    deferred: collections.deque = field(default_factory=collections.deque)
    queued_layers: int = 0  # layer copies of ``layered`` queued on the GPU (the transport's _queue_lock)
    deferring: int = 0  # pulls deferred and not yet queued or ended (idem): later pulls defer too, in order

    def close(self) -> None:
        for stream in (self.stream, self.layer_stream):
            stream.synchronize()  # no copy still reads the mapping (waiting copies were released)
        self.peer_memory.close()


@dataclass
class PrefillLink:
    peer_counters: ipc.PeerMemory  # the decode side's layer counters, mapped here
    stream: torch.cuda.Stream      # advances them

    def close(self) -> None:
        self.stream.synchronize()
        self.peer_counters.close()


@dataclass
class IpcPull:
    req: object  # kvlink.transports.base.PullRequest
    src_sel: object
    counter: tuple[int, int, int] | None = None  # layer-wise: (slot, base, layers)
    deferred: bool = False  # layer-wise, its copies not queued by pull(): the progress thread queues them
    queued: int = 0  # layer copies it counts in its link's queued_layers


class IpcTransport(Transport):
    name = "ipc"
    has_wire = False  # a direct copy of the cache's own bytes: no fp8, no checksums
    converts_dtype = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self._cache_export = self._counters_export = None
        self._counters = None
        self._counter_values = [0] * COUNTER_SLOTS
        self._counters_busy: set[int] = set()
        self._counter_cursor = 0
        self._launch_lock = threading.Lock()  # pulls launch on their callers' threads
        # NOTE: the counter slots have a lock of their own. A caller's launch can block inside the
        # driver while its stream is full of copies waiting on counters (a prefill that died), and
        # only the progress thread's releases of timed-out counters drain it: a release that
        # needed the launch lock would wait for that caller for ever.
        self._counter_lock = threading.Lock()
        self._queue_lock = threading.Lock()  # the links' queued_layers and deferring counts
        self._deferred_total = 0  # layer-wise pulls deferred so far (Endpoint.stats())
        self._release_stream = None
        self.reason = self._offer()

    def _offer(self) -> str | None:
        """Export our cache and layer counters, or say why we cannot."""
        if not self.ctx.on_gpu:
            return "not a GPU cache"
        if self.config.transport.value not in ("auto", self.name):
            return f"transport={self.config.transport.value!r}"
        reason = "KVLINK_DISABLE_IPC=1" if self.config.disable_ipc else ipc.disabled_reason(check_env=False)
        if reason is None:
            try:
                device = self.layout.device
                side = torch.cuda.Stream(device)
                with torch.cuda.stream(side):
                    self._counters = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
                side.synchronize()  # zeroed before any peer stream reads it
                self._counters_export = ipc.export_memory([self._counters.data_ptr()], self.ctx.device_index)
                self._cache_export = {**ipc.export_memory(self.layout.plane_ptrs(), self.ctx.device_index),
                                      "strides": [self.layout.block_stride, self.layout.token_stride,
                                                  self.layout.head_stride]}
                self._release_stream = torch.cuda.Stream(device)
            except ipc.IPCError as exc:
                reason = str(exc)
        if reason is not None:
            self._cache_export = self._counters_export = None
            log.info("kvlink %s: CUDA IPC not offered: %s", self.ctx.name, reason)
        return reason

    def unavailable(self, auto: bool = False) -> str | None:
        return self.reason

    # ------------------------------------------------------------------ handshake
    def hello_fields(self) -> dict:
        return {"ipc": self._counters_export}

    def prefill_state(self, hello: dict):
        try:
            if not isinstance(hello["ipc"], dict):
                raise ipc.IPCError("the peer sent no IPC export")
            counters = ipc.import_memory(hello["ipc"], self.ctx.device_index)
        except (ipc.IPCError, KeyError, TypeError, ValueError) as exc:
            raise TransportUnavailable(str(exc)) from exc
        return PrefillLink(counters, torch.cuda.Stream(self.layout.device)), {"ipc": self._cache_export}

    def decode_state(self, welcome: dict):
        memory = None
        try:
            export = welcome["ipc"]
            memory = ipc.import_memory(export, self.ctx.device_index)
            peer_layout = PeerLayout.from_description(welcome["layout"], export["strides"], memory.addresses,
                                                      self.layout.device)
            state = DecodeLink(peer_layout, memory, torch.cuda.Stream(self.layout.device),
                               torch.cuda.Stream(self.layout.device), max_ctas=self._copy_ctas(export))
            for stream in (state.stream, state.layer_stream):  # plane table and metadata rings now,
                prepare(peer_layout, stream)                    # not on the first pull
        except (ipc.IPCError, KeyError, TypeError, ValueError) as exc:
            if memory is not None:
                memory.close()
            raise TransportUnavailable(f"CUDA IPC failed: {exc}") from exc
        return state

    def link_info(self, link) -> dict:
        info = super().link_info(link)
        if link.role == "decode" and link.state is not None:
            info["copy_ctas"] = link.state.max_ctas or 0  # 0: one thread block per tile
        return info

    def _copy_ctas(self, export: dict) -> int | None:
        """The copy kernel's grid bound for a link whose source cache ``export`` describes."""
        configured = self.config.ipc_max_ctas
        if configured is not None:
            return configured or None
        same_gpu = export.get("device_uuid") == str(torch.cuda.get_device_properties(self.ctx.device_index).uuid)
        return None if same_gpu else IPC_CROSS_GPU_CTAS

    def counters(self) -> dict:
        """Layer-wise pulls deferred so far: their copies waited on the host for the GPU queue."""
        return {"layerwise_deferred": self._deferred_total} if self._counters is not None else {}

    def describe(self, link) -> str:
        text = (f"transport ipc (CUDA IPC on one host: the decode GPU reads the prefill GPU's blocks directly over "
                f"NVLink or PCIe; no staging, no communicator) on GPU {self.ctx.device_index}")
        if link.role == "decode" and link.state is not None:
            ctas = link.state.max_ctas
            text += f", copy grid {'one block per tile' if ctas is None else f'{ctas} blocks'}"
        return text

    # ------------------------------------------------------------------ decode side
    def prepare_pull(self, link, req):
        # NOTE: validated against the peer cache as mapped (fixed since the handshake), not the
        # link's description: a block id past the mapping is an illegal address on the GPU,
        # which would poison this process's CUDA context.
        dst, state = req.dst_sel, link.state
        if state.owner is None:
            state.owner = f"{link.name}'s cache"
        src_sel = select(state.peer_layout, req.src_blocks, dst.num_tokens, layers=(dst.layer_start, dst.layer_stop),
                         heads=req.src_heads, ids_name="src_blocks", owner=state.owner)
        return IpcPull(req, src_sel)

    def start_pull(self, link, handle, op) -> None:
        """Queue the copy kernel(s) right here, on the caller's thread (a layer-wise pull past the
        link's bound on queued layer copies: on the progress thread, later)."""
        pull = op
        req = pull.req
        state, dst_sel = link.state, req.dst_sel
        started = time.perf_counter()
        stamps = handle.stats.host_stamps
        stamps["called"], stamps["validated"] = req.called, started
        stats = handle.stats
        stats.payload_bytes = stats.wire_bytes = dst_sel.payload_bytes
        stats.chunks = dst_sel.num_layers if req.layerwise else 1
        with self._launch_lock, _on_device(self.ctx.device_index):
            stamps["locked"] = time.perf_counter()
            if not req.layerwise:
                stream = state.stream
                if req.after is not None:
                    stream.wait_event(req.after)  # pull(stream=): not before the caller's work
                launch_copy(pull.src_sel, dst_sel, stream, max_ctas=state.max_ctas, stamps=stamps)
                done = completion_event(self.ctx.device_index, stream)
                layer_events = {}
            else:
                slot = self._take_counter(handle)
                base = self._counter_values[slot]
                self._counter_values[slot] = (base + dst_sel.num_layers) & 0xFFFFFFFF
                pull.counter = (slot, base, dst_sel.num_layers)
                with self._queue_lock:
                    pull.deferred = state.deferring > 0 or not self._fits(state, dst_sel.num_layers)
                    if pull.deferred:
                        state.deferring += 1
                        self._deferred_total += 1
                    else:
                        state.queued_layers += dst_sel.num_layers
                        pull.queued = dst_sel.num_layers
                if not pull.deferred:
                    done, layer_events = self._queue_layer_copies(state, pull)
        stamps["recorded"] = time.perf_counter()
        handle.stats.enqueue_seconds = stamps["recorded"] - started
        # this thread's CPU time over the whole pull() so far: far below the wall time means it waited
        # (for the GIL, or the OS), not that the steps are slow
        handle.stats.pull_cpu_seconds = time.thread_time() - req.called_cpu
        if not pull.deferred:
            handle._gpu_work(done, layer_events, spin=True)  # all of it is on the GPU now
        if req.layerwise:  # its PULL must reach the prefill side now
            self.ctx.engine.post(self.track, link, handle, on_error=lambda exc: self._not_tracked(link, handle, exc))
        else:
            self.ctx.engine.post_quiet(self.track, link, handle)  # only its completion is watched

    def _fits(self, state: DecodeLink, num_layers: int) -> bool:
        """Whether ``num_layers`` more layer copies may queue on the link's stream (under _queue_lock)."""
        return state.queued_layers == 0 or state.queued_layers + num_layers <= self.config.ipc_queued_layers

    def _queue_layer_copies(self, state: DecodeLink, pull: IpcPull):
        """Queue a layer-wise pull's copies, each behind a GPU wait on its layer counter (under the
        launch lock); its completion event and per-layer events."""
        req, dst_sel = pull.req, pull.req.dst_sel
        stream = state.layer_stream
        if req.after is not None:
            stream.wait_event(req.after)  # pull(stream=): not before the caller's work
        slot, base, _ = pull.counter
        address = self._counters.data_ptr() + 4 * slot
        tokens = (0, dst_sel.num_tokens)
        layer_events = {}
        for i, layer in enumerate(range(dst_sel.layer_start, dst_sel.layer_stop)):
            cuda_driver.stream_wait_value(stream.cuda_stream, address, base + i + 1)  # the prefill finished it
            launch_copy(pull.src_sel.box((layer, layer + 1), tokens), dst_sel.box((layer, layer + 1), tokens),
                        stream, max_ctas=state.max_ctas)
            layer_events[layer] = event = torch.cuda.Event()
            event.record(stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done, layer_events

    def _not_tracked(self, link, handle, exc) -> None:
        handle._finish(f"could not start: {exc}")
        self.release(link, handle, failed=True)

    def track(self, link, handle) -> None:
        """Progress thread: watch a pull queued by start_pull(); a layer-wise one tells the prefill
        side its counter."""
        if link.failed:
            handle._finish(f"link failed: {link.failed}")
            self.release(link, handle, failed=True)
            return
        link.pending[handle.xfer] = handle
        pull = handle._op
        state = link.state
        (state.deferred if pull.deferred else state.layered if pull.counter is not None else state.plain).append(handle)
        if pull.counter is not None:  # the prefill side needs only the layers and the counter
            dst_sel = pull.req.dst_sel
            self.ctx.engine.send(link, control.encode(
                "PULL", xfer=handle.xfer, request=handle.request, src_blocks=[], num_tokens=dst_sel.num_tokens,
                layers=[dst_sel.layer_start, dst_sel.layer_stop], heads=[0, 0], chunks=[], layerwise=True,
                counter=list(pull.counter[:2]), checksum=False, wire=""))

    def poll(self, link) -> None:
        state = link.state
        for queue in (state.plain, state.layered):
            while queue:
                handle = queue[0]
                if handle._op.counter is not None and not handle._ended() and handle._elapsed() > self.config.timeout:
                    # the oldest layer-wise pull is the first that can run out of time
                    handle._finish(f"layers not all ready within {self.config.timeout:.1f} s")
                if not handle.done():
                    break
                queue.popleft()
                if handle._op.queued:
                    with self._queue_lock:
                        state.queued_layers -= handle._op.queued
                    handle._op.queued = 0
                if handle.xfer in link.pending:
                    self.notify(link, handle)
        if state.deferred:
            self._queue_deferred(link)

    def _queue_deferred(self, link) -> None:
        """Progress thread: end the deferred pulls that timed out or were cancelled, and queue the
        copies of those the link's bound now admits, oldest first."""
        state = link.state
        while state.deferred:
            handle = state.deferred[0]
            pull = handle._op
            if not handle._ended() and handle._elapsed() > self.config.timeout:
                handle._finish(f"layers not all ready within {self.config.timeout:.1f} s (its copies were never "
                               "queued: earlier layer-wise pulls on this link held the GPU queue)")
            if not handle._ended():
                with self._launch_lock, _on_device(self.ctx.device_index):
                    with self._queue_lock:
                        if not self._fits(state, pull.req.dst_sel.num_layers):
                            return
                        state.queued_layers += pull.req.dst_sel.num_layers
                        pull.queued = pull.req.dst_sel.num_layers
                    done, layer_events = self._queue_layer_copies(state, pull)
                handle._gpu_work(done, layer_events, spin=True)
                state.layered.append(handle)
            elif handle.xfer in link.pending:
                self.notify(link, handle)  # nothing of it was queued: its counter is simply freed
            state.deferred.popleft()
            with self._queue_lock:
                state.deferring -= 1

    def on_message(self, link, handle, kind, message, frames) -> None:
        if kind == "FAILED":
            # NOTE: a layer-wise pull's copies are queued already and run once its counter is
            # released, so its blocks cannot be promised untouched
            handle._finish(f"refused by {link.name}: {message['reason']}", kind=TransferRefused)
        else:
            super().on_message(link, handle, kind, message, frames)

    def cancel(self, link, handle) -> None:
        if not handle._ended() and handle._op.counter is None and handle._event is not None and \
                handle.gpu_idle():
            handle._finish()  # the copy had finished: nothing left to cancel
            return
        super().cancel(link, handle)

    def _take_counter(self, handle) -> int:
        """A layer-counter slot no pending pull uses."""
        with self._counter_lock:
            for _ in range(COUNTER_SLOTS):
                slot = self._counter_cursor
                self._counter_cursor = (slot + 1) % COUNTER_SLOTS
                if slot not in self._counters_busy:
                    self._counters_busy.add(slot)
                    return slot
        raise TransferError(f"request {handle.request!r} from {handle.peer}: {COUNTER_SLOTS} layer-wise pulls "
                            "already in flight")

    def release(self, link, handle, failed: bool) -> None:
        """Free a layer-wise pull's counter; for a failed pull first let its waiting copies run,
        so the stream is not blocked forever (its destination blocks are then reported invalid)."""
        pull = handle._op
        if pull is None or pull.counter is None:
            return
        slot, base, num_layers = pull.counter
        pull.counter = None
        if failed:
            cuda_driver.stream_write_value(self._release_stream.cuda_stream, self._counters.data_ptr() + 4 * slot,
                                           base + num_layers)
        with self._counter_lock:
            self._counters_busy.discard(slot)

    # ------------------------------------------------------------------ prefill side
    def accept_pull(self, link, message: dict) -> Serve | None:
        """A layer-wise pull: the decode side's copies wait for our layer counter."""
        serve = Serve(xfer=message["xfer"], request=message["request"], num_tokens=message["num_tokens"],
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
        except (ValueError, control.ProtocolError) as exc:
            self.ctx.serving.refuse(link, serve, str(exc))
            return None
        serve.boxes = [(layer, layer + 1, 0, serve.num_tokens) for layer in range(*layers)]
        serve.state = counter
        return serve

    def serve(self, link, serve: Serve, ready: dict) -> str:
        while serve.next_chunk < len(serve.boxes):
            layer = serve.boxes[serve.next_chunk][0]
            if layer not in ready:
                return WAITING
            event = ready[layer]
            if event is not None:
                link.state.stream.wait_event(event)  # the layer's writes first, then the counter
            self._signal(link, serve, link.state.stream)
        return DONE

    def _signal(self, link, serve: Serve, stream) -> None:
        """Advance the decode side's counter past ``serve``'s next layer, behind ``stream``'s work."""
        slot, base = serve.state
        cuda_driver.stream_write_value(stream.cuda_stream, link.state.peer_counters.addresses[0] + 4 * slot,
                                       base + serve.next_chunk + 1)
        serve.next_chunk += 1

    def layer_ready_now(self, request: str, layer: int, stream) -> None:
        """Advance the decode side's layer counter on the caller's stream, right behind the layer's own
        work, when this request's pull is at the head of its link and this is its next layer;
        anything else is left to the progress thread (which skips layers signalled here)."""
        with self.ctx.serving.lock:
            for link in list(self.ctx.engine.links.values()):
                if link.transport is not self or link.role != "prefill" or link.failed or not link.serves:
                    continue
                serve = link.serves[0]
                if serve.request == request and serve.next_chunk < len(serve.boxes) and \
                        serve.boxes[serve.next_chunk][0] == layer:
                    self._signal(link, serve, stream)

    def on_notify(self, link, message: dict) -> None:
        if not message["ok"]:
            # the decode side gave up on a layer-wise pull (timeout, cancel): stop serving it, so
            # the pulls queued behind it on this link move on
            self.ctx.serving.remove(link, message["xfer"])

    # ------------------------------------------------------------------ teardown
    def close_link(self, link) -> None:
        link.state.close()
