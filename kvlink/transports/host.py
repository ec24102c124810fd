"""The host transport: chunks as ZeroMQ messages over TCP (CPU caches; the slow path for GPU ones).

Prefill side: each chunk is packed into host memory and sent as a DATA message (control frame
plus the bytes), a few per progress turn and none while the peer has not taken the last ones,
so a long pull neither queues its whole payload in memory nor keeps other links waiting.
Decode side: each DATA is checked (order, size, checksum) and unpacked into the destination
blocks as it arrives; the pull completes with its last chunk.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from kvlink import control
from kvlink.errors import TransferRefused
from kvlink.pack import pack_selection, unpack_selection
from kvlink.plan import Box, box_payload_bytes
from kvlink.selection import HEADER_BYTES
from kvlink.serving import DONE, MORE, WAITING, Serve
from kvlink.transports.base import ChunkedTransport
from kvlink.wire import CHECKSUM_OFFSET, STATUS_OK, payload_checksum_numpy

log = logging.getLogger("kvlink")

CHUNKS_PER_TURN = 8  # chunks one serve hands to ZeroMQ per progress turn


class HostTransport(ChunkedTransport):
    name = "host"

    def describe(self, link) -> str:
        return (f"transport host (TCP through ZeroMQ, {self.layout.device} cache)"
                + (" -- slow path for a GPU cache" if self.ctx.on_gpu else ""))

    # ------------------------------------------------------------------ decode side
    def receive(self, link, handle, op) -> None:
        handle._started_on_host()  # the chunks arrive as messages; each is unpacked as it does

    def forget(self, link, handle) -> None:
        link.pending.pop(handle.xfer, None)  # nothing is queued on a GPU: what still comes is late

    def on_message(self, link, handle, kind: str, message: dict, frames) -> None:
        if kind != "DATA":
            return super().on_message(link, handle, kind, message, frames)
        if len(frames) != 2:
            log.error("kvlink %s: DATA from %s in %d frames (expected 2), ignored", self.ctx.name, link.name, len(frames))
            return
        op = handle._op
        chunk_index = message["chunk"]
        if chunk_index != op.chunks_done or chunk_index >= len(op.boxes):
            handle._finish(f"chunk {chunk_index} arrived out of order (expected {op.chunks_done})", kind=TransferRefused)
            self.notify(link, handle)
            return
        try:
            self._unpack(op, chunk_index, frames[1])
        except ValueError as exc:
            handle._finish(f"chunk {chunk_index} refused: {exc}", kind=TransferRefused)
            self.forget(link, handle)
            return
        op.chunks_done += 1
        handle._landed()
        if op.chunks_done == len(op.boxes):
            handle._finish()
            self.notify(link, handle)

    def _unpack(self, op, chunk_index: int, frame) -> None:
        box, dst_sel = op.boxes[chunk_index], op.req.dst_sel
        data = np.frombuffer(frame.buffer, dtype=np.uint8)
        needed = HEADER_BYTES + box_payload_bytes(box, dst_sel.token_layer_bytes)
        if data.size < needed:
            raise ValueError(f"chunk {chunk_index} holds {data.size} bytes, fewer than its box needs")
        if self.config.checksum:
            sent = int(data[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0])
            if payload_checksum_numpy(data[HEADER_BYTES:needed]) != sent:
                raise ValueError("checksum mismatch: the chunk was corrupted on the way")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only ZeroMQ buffer: unpack only reads it
            chunk = torch.from_numpy(data)
        stream = None
        if self.ctx.on_gpu:
            chunk = chunk.to(self.layout.device)
            stream = torch.cuda.current_stream(self.ctx.device_index)
            if op.req.after is not None:
                stream.wait_event(op.req.after)  # pull(stream=): not before the caller's work
        status = unpack_selection(dst_sel.box(box[:2], box[2:]), chunk, stream, self.ctx.backend, self.config.max_ctas,
                                  cache_scale=self.config.cache_scale)
        if self.ctx.on_gpu:
            stream.synchronize()  # the host transport is the slow path: its unpack is waited for
            if int(status.item()) != STATUS_OK:
                raise ValueError("header mismatch")

    # ------------------------------------------------------------------ prefill side
    def serve(self, link, serve: Serve, ready: dict) -> str:
        sent = 0
        while serve.next_chunk < len(serve.boxes):
            box = serve.boxes[serve.next_chunk]
            if self.waits_for_layers(serve, box, ready):
                return WAITING
            if link.channel.outbox:  # the peer reads slower than we pack: hold no more chunks than it has
                return WAITING
            if sent == CHUNKS_PER_TURN:
                return MORE
            payload = self._packed(serve, box)
            hook = self.ctx.serving.hook
            if hook is not None:
                payload = hook(serve.request, serve.next_chunk, payload)
            if not self.ctx.engine.send(link, control.encode("DATA", xfer=serve.xfer, chunk=serve.next_chunk),
                                        payload, copy=False):
                return WAITING  # the link failed: the serve ends with it
            sent += 1
            serve.next_chunk += 1
        return DONE

    def _packed(self, serve: Serve, box: Box) -> np.ndarray:
        """The packed chunk of ``box`` as host bytes, with its payload checksum if asked for."""
        nbytes = HEADER_BYTES + box_payload_bytes(box, serve.sel.token_layer_bytes)
        chunk = torch.empty(nbytes, dtype=torch.uint8, device=self.layout.device)
        stream = torch.cuda.current_stream(self.ctx.device_index) if self.ctx.on_gpu else None
        pack_selection(serve.sel.box(box[:2], box[2:]), chunk, stream, self.ctx.backend, self.config.max_ctas)
        payload = chunk.cpu().numpy()  # synchronizes a GPU cache: the host transport is the slow path
        if serve.checksum:
            payload[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0] = payload_checksum_numpy(payload[HEADER_BYTES:])
        return payload
