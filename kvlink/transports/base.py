"""The transport interface, and what the chunked transports (host, nccl) share.

A transport moves a pull's bytes over one link, on both sides of it:

    handshake  can_link / prefill_state / decode_state (per-link state, from HELLO and WELCOME),
               start (a setup that takes time, as a Future), describe, link_info
    decode     prepare_pull (validate, on the caller's thread), start_pull (queue the pull: the
               copy itself, or a command for the progress thread), on_message (DATA, FAILED,
               SENT of a pending pull), poll (completions, each turn), cancel, end_pulls
    prefill    accept_pull (a PULL message -> a Serve), serve (issue what is ready), serve_failed,
               on_notify, layer_ready_now
    teardown   link_failed, close_link

Everything runs on the progress thread except prepare_pull, start_pull and layer_ready_now,
which run on the caller's. A new transport (RDMA, say) is one more module implementing this
class, listed in kvlink.transports.TRANSPORTS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvlink import control
from kvlink.errors import (EndpointClosed, InvalidArgument, LinkDown, ProtocolError, TransferCancelled, TransferError,
                           TransferRefused)
from kvlink.plan import box_payload_bytes, plan_chunks
from kvlink.selection import HEADER_BYTES, block_ids_to_numpy, select, with_wire, wire_row_bytes
from kvlink.serving import Serve


class TransportUnavailable(Exception):
    """This transport cannot serve this link (the handshake tries the next one)."""


@dataclass
class EndpointContext:
    """What a transport may use of its endpoint."""

    name: str
    layout: object  # CacheLayout
    config: object  # EndpointConfig
    backend: str  # "cuda" (kernels) or "torch" (reference)
    device_index: int | None  # the cache's GPU; None for a CPU cache
    engine: object = None  # kvlink.progress.ProgressEngine
    serving: object = None  # kvlink.serving.Serving

    @property
    def on_gpu(self) -> bool:
        return self.device_index is not None


@dataclass
class PullRequest:
    """A pull as the endpoint validated it: our side is checked, the peer's is the transport's job."""

    request: str
    src_blocks: object
    dst_sel: object  # Selection of our destination blocks (with the wire dtype)
    src_heads: tuple[int, int]
    layerwise: bool
    after: object = None  # CUDA event on the caller's stream: our writes wait for it (pull(stream=))
    called: float = 0.0  # perf_counter and thread_time when pull() was called
    called_cpu: float = 0.0


class Transport:
    name = ""
    has_wire = True  # bytes travel as chunks: fp8 on the wire and checksums are possible
    converts_dtype = True  # may link caches of different dtypes (through fp8 on the wire)
    serves_refused_chunks = False  # a stopped pull keeps sending empty chunks (the receiver expects them)

    def __init__(self, ctx: EndpointContext):
        self.ctx = ctx
        self.layout, self.config = ctx.layout, ctx.config

    # ------------------------------------------------------------------ handshake
    def unavailable(self, auto: bool = False) -> str | None:
        """Why this endpoint cannot offer the transport (``auto``: unasked, under transport="auto"),
        or None."""
        return None

    def hello_fields(self) -> dict:
        """Fields of our HELLO this transport fills (kvlink.control's schema)."""
        return {}

    def can_link(self, hello: dict, same_gpu: bool, same_process: bool) -> bool:
        """Prefill side: whether this transport can link us with the peer of ``hello``."""
        return True

    def prefill_state(self, hello: dict) -> tuple[object, dict]:
        """Prefill side: (the link's state, WELCOME fields); TransportUnavailable to try the next."""
        return None, {}

    def decode_state(self, welcome: dict) -> object:
        """Decode side: the link's state from the WELCOME; TransportUnavailable if it cannot be set up."""
        return None

    def start(self, link, timeout: float):
        """Start a setup that takes time (NCCL's communicator, at most ``timeout`` seconds); a Future
        of its result (handed to started()), or None when there is nothing to wait for."""
        return None

    def started(self, link, result) -> None:
        """Progress thread: the setup start() began is done; ``result`` is its Future's."""

    def describe(self, link) -> str:
        return f"transport {self.name}"

    def link_info(self, link) -> dict:
        return {"nccl_bytes": 0, "staging_bytes": 0}

    def counters(self) -> dict:
        """This transport's running totals for Endpoint.stats() (none by default)."""
        return {}

    # ------------------------------------------------------------------ decode side
    def prepare_pull(self, link, req: PullRequest):
        """Caller's thread: validate the source side; what start_pull needs (raise to refuse)."""
        raise NotImplementedError

    def start_pull(self, link, handle, op) -> None:
        """Caller's thread: queue the pull (stats filled in before it returns)."""
        raise NotImplementedError

    def on_message(self, link, handle, kind: str, message: dict, frames) -> None:
        if kind == "FAILED":
            whole = message["whole"]
            handle._finish(f"refused by {link.name}: {message['reason']}", True if whole else None,
                           kind=TransferRefused)
            self.forget(link, handle)
        elif kind == "SENT":  # informational; completion is when our side has the bytes
            handle.stats.sender_enqueue_seconds = float(message.get("enqueue_seconds", 0.0))

    def forget(self, link, handle) -> None:
        """A pull that ended early (refused, cancelled) leaves the link: by default it stays until
        its queued GPU work is done (poll), which then tells the prefill side."""

    def poll(self, link) -> None:
        """Finish the pulls whose bytes are in place; tell the prefill side (NOTIFY)."""

    def notify(self, link, handle) -> None:
        del link.pending[handle.xfer]
        self.release(link, handle, failed=handle.error is not None)
        self.ctx.engine.send(link, control.encode("NOTIFY", xfer=handle.xfer, request=handle.request,
                                                  ok=handle.error is None))

    def release(self, link, handle, failed: bool) -> None:
        """Free what the pull held (ipc: its layer counter)."""

    def cancel(self, link, handle) -> None:
        """Progress thread: end ``handle`` as cancelled and tell the prefill side to stop serving it."""
        if handle._ended():
            return
        handle._finish("cancelled by the decode side", cancelled=True, kind=TransferCancelled)
        if link.failed:
            self.release(link, handle, failed=True)
            return
        self.forget(link, handle)
        self.ctx.engine.send(link, control.encode("CANCEL", xfer=handle.xfer, request=handle.request))

    def end_pulls(self, link, reason: str, kind: type[TransferError]) -> None:
        for handle in link.pending.values():
            handle._finish(reason, kind=kind)
            self.release(link, handle, failed=True)

    # ------------------------------------------------------------------ prefill side
    def accept_pull(self, link, message: dict) -> Serve | None:
        raise NotImplementedError

    def serve(self, link, serve: Serve, ready: dict) -> str:
        """Issue the chunks whose layers are ready: kvlink.serving.DONE, WAITING or MORE."""
        raise NotImplementedError

    @staticmethod
    def waits_for_layers(serve: Serve, box, ready: dict) -> bool:
        """A layer-wise serve's next chunk needs a layer layer_ready() has not named yet."""
        return serve.layerwise and serve.refused is None and any(layer not in ready for layer in range(box[0], box[1]))

    def serve_failed(self, link, serve: Serve, exc: Exception) -> None:
        pass

    def on_notify(self, link, message: dict) -> None:
        pass

    def layer_ready_now(self, request: str, layer: int, stream) -> None:
        """Caller's thread, in layer_ready(): what can be signalled at once, behind ``stream``'s work."""

    # ------------------------------------------------------------------ teardown
    def link_failed(self, link) -> None:
        """The link is down (its pulls are ended already): let go of what waits on the peer."""

    def close_link(self, link) -> None:
        """The endpoint closes: free the link's resources."""
        self.link_failed(link)


class ChunkedTransport(Transport):
    """A transport that moves a pull as the chunks of kvlink.plan, packed by the prefill side and
    unpacked by ours (host, nccl): the pull's validation and plan, the PULL message, and the
    prefill side's validation of it are the same for both."""

    def prepare_pull(self, link, req: PullRequest):
        remote, peer = link.remote_layout, link.name
        src_ids = block_ids_to_numpy(req.src_blocks, "src_blocks")
        bad = (src_ids < 0) | (src_ids >= remote["num_blocks"])
        if bad.any():
            raise InvalidArgument(f"src_blocks[{int(np.argmax(bad))}]={int(src_ids[bad][0])} is out of range "
                                  f"[0, {remote['num_blocks']}) of {peer}'s cache")
        num_tokens = req.dst_sel.num_tokens
        if -(-num_tokens // remote["block_size"]) != src_ids.size:
            raise InvalidArgument(f"num_tokens={num_tokens} fills {-(-num_tokens // remote['block_size'])} of {peer}'s "
                                  f"{remote['block_size']}-token blocks but {src_ids.size} src_blocks were given")
        dst_sel = req.dst_sel
        boxes = plan_chunks((dst_sel.layer_start, dst_sel.layer_stop), num_tokens, dst_sel.token_layer_bytes,
                            link.chunk_bytes, layerwise=req.layerwise)
        return ChunkedPull(req, src_ids, boxes)

    def start_pull(self, link, handle, op) -> None:
        dst_sel = op.req.dst_sel
        handle.stats.payload_bytes = dst_sel.cache_bytes
        handle.stats.wire_bytes = dst_sel.payload_bytes
        handle.stats.chunks = len(op.boxes)
        self.ctx.engine.post(self.begin, link, handle, on_error=lambda exc: _not_started(handle, exc))

    def begin(self, link, handle) -> None:
        """Progress thread: send the PULL (and queue our side's work)."""
        if link.failed:  # it went down after pull() looked
            handle._finish(f"link failed: {link.failed}", kind=LinkDown)
            return
        op, dst_sel = handle._op, handle._op.req.dst_sel
        link.pending[handle.xfer] = handle
        self.ctx.engine.send(link, control.encode(
            "PULL", xfer=handle.xfer, request=handle.request, src_blocks=op.src_ids.tolist(),
            num_tokens=dst_sel.num_tokens, layers=[dst_sel.layer_start, dst_sel.layer_stop],
            heads=list(op.req.src_heads), chunks=[list(b) for b in op.boxes], layerwise=handle.layerwise,
            counter=[0, 0], checksum=self.config.checksum, wire="fp8" if dst_sel.wire_fp8 else ""))
        self.receive(link, handle, op)

    def receive(self, link, handle, op) -> None:
        """Queue what our side does for the pull's chunks (the NCCL receives); mark it started."""
        raise NotImplementedError

    def accept_pull(self, link, message: dict) -> Serve | None:
        serve = Serve(xfer=message["xfer"], request=message["request"], num_tokens=message["num_tokens"],
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
            heads = message.get("heads")
            if isinstance(heads, list) and len(heads) == 2 and all(isinstance(h, int) for h in heads):
                serve.heads = tuple(heads)
            # the receiver may have planned one receive per chunk (NCCL): keep the boxes to answer each
            serve.boxes = [tuple(b) for b in message["chunks"] if isinstance(b, list) and len(b) == 4
                           and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in b)]
            self.ctx.serving.refuse(link, serve, str(exc))
            return serve if self.serves_refused_chunks else None
        return serve

    def refused_chunk_bytes(self, link, serve: Serve, box) -> int:
        """Size the decode side expects for a chunk of a pull we refused (it planned with its own layout)."""
        remote = link.remote_layout
        element_bytes = torch.empty(0, dtype=getattr(torch, remote["dtype"])).element_size()
        row_bytes = wire_row_bytes(remote["head_dim"], element_bytes, serve.wire == "fp8")
        heads = serve.heads[1] - serve.heads[0] if serve.heads[1] > serve.heads[0] else remote["num_heads"]
        token_layer_bytes = remote["num_kv"] * heads * row_bytes
        return HEADER_BYTES + min(link.chunk_bytes, box_payload_bytes(tuple(box), token_layer_bytes))


@dataclass
class ChunkedPull:
    """Decode side: a chunked pull's plan, and its progress: the chunks unpacked so far (host
    transport), its status words and what they said (nccl)."""

    req: PullRequest
    src_ids: np.ndarray
    boxes: list
    chunks_done: int = 0
    status: object = None
    status_read: tuple | None = None


def _not_started(handle, exc: Exception) -> None:
    """A pull whose command could not run (the endpoint closed first, or it raised)."""
    if isinstance(exc, EndpointClosed):
        handle._finish("endpoint closed")
    else:
        handle._finish(f"could not start: {exc}")
