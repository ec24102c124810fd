"""kvlink: moves paged KV-cache blocks from prefill GPUs to decode GPUs.

Importing kvlink touches no GPU, NCCL or compiler; CUDA kernels compile on first use.

The data path, one module a stage:
    layout.py / presets.py   describe an engine's cache from its real tensors
    selection.py             validate which blocks, tokens, layers and heads a chunk covers
    wire.py                  the packed chunk's format and header
    pack.py                  pack (gather into a chunk) and unpack (scatter out of one)
    kernels.py + csrc/       the CUDA kernels behind pack/unpack
    reference.py             the same operations in plain torch (the oracle; the CPU path)
    plan.py                  cut a request into pipeline chunks
    control.py               control-plane messages (msgpack over ZeroMQ)
    nccl.py / ipc.py         the NCCL communicator of a GPU pair; CUDA IPC memory sharing

The transfer layer, one module a job:
    endpoint.py              the object an engine holds: a facade over what follows
    config.py                EndpointConfig: every setting, KVLINK_* read when an endpoint is built
    errors.py                KVLinkError and its subclasses
    handle.py                TransferHandle: one pull as the decode side sees it
    progress.py              the progress thread: sockets, commands, outboxes, liveness; never blocks
    handshake.py             linking: HELLO/WELCOME, the transport, its setup
    serving.py               the prefill side: serve queues, layer readiness, notifications
    link.py                  a link's shared fields and its non-blocking channel
    transports/              one module per transport (ipc, nccl, host) behind one interface
"""

from kvlink import presets
from kvlink.config import EndpointConfig, Transport
from kvlink.endpoint import Endpoint
from kvlink.errors import (ArgumentTypeError, EndpointClosed, InvalidArgument, IPCError, KVLinkError, KVLinkTimeout,
                           LinkDown, LinkError, LinkRefused, ProtocolError, TransferCancelled, TransferError,
                           TransferRefused)
from kvlink.handle import DstState, TransferHandle, TransferStats
from kvlink.layout import CacheLayout
from kvlink.pack import pack, packed_nbytes, prepare, unpack
from kvlink.selection import Selection, select
from kvlink.wire import HEADER_BYTES, ChunkError, ChunkHeader, check_status

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "CacheLayout",
    "DstState",
    "Endpoint",
    "EndpointClosed",
    "EndpointConfig",
    "InvalidArgument",
    "IPCError",
    "KVLinkError",
    "KVLinkTimeout",
    "LinkDown",
    "LinkError",
    "LinkRefused",
    "ProtocolError",
    "Transport",
    "TransferCancelled",
    "TransferError",
    "TransferHandle",
    "TransferRefused",
    "TransferStats",
    "ChunkError",
    "ChunkHeader",
    "HEADER_BYTES",
    "Selection",
    "check_status",
    "pack",
    "packed_nbytes",
    "prepare",
    "presets",
    "select",
    "unpack",
]
