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
    nccl.py                  the NCCL communicator of one prefill/decode GPU pair
    endpoint.py              the object an engine holds: links, pulls, the pipeline
"""

from kvlink import presets
from kvlink.endpoint import Endpoint, TransferError, TransferHandle
from kvlink.layout import CacheLayout
from kvlink.pack import pack, packed_nbytes, prepare, unpack
from kvlink.selection import Selection, select
from kvlink.wire import HEADER_BYTES, ChunkError, ChunkHeader, check_status

__version__ = "0.1.0"

__all__ = [
    "CacheLayout",
    "Endpoint",
    "TransferError",
    "TransferHandle",
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
