"""pack and unpack: the public entry points of the data path's first and last stage.

``pack`` gathers a request's scattered blocks (all selected layers, K and V, a head range)
into one contiguous chunk; ``unpack`` scatters a chunk into the destination's own blocks,
which may use another block size or layout. Both validate everything on the host before any
byte moves, then run the CUDA kernel on the caller's stream (no synchronize) when the cache is
on a GPU and CuPy is installed, or the torch reference otherwise.
"""

from __future__ import annotations

import os

import torch

from kvlink import kernels, reference
from kvlink.errors import ArgumentTypeError, InvalidArgument
from kvlink.layout import CacheLayout
from kvlink.selection import HEADER_BYTES, WIRE_DTYPES, Selection, _as_range, select, wire_row_bytes, with_wire
from kvlink.wire import ChunkHeader

BACKENDS = ("auto", "cuda", "torch")


def packed_nbytes(layout: CacheLayout, num_tokens: int, *, layers=None, tokens=None, heads=None,
                  wire_dtype: str | None = None) -> int:
    """Bytes of the chunk (header included) that :func:`pack` writes for this box."""
    if not isinstance(layout, CacheLayout):
        raise ArgumentTypeError(f"layout must be a kvlink CacheLayout, got {type(layout).__name__}")
    layer_start, layer_stop = _as_range("layers", layers, layout.num_layers)
    token_start, token_stop = _as_range("tokens", tokens, num_tokens)
    head_start, head_stop = _as_range("heads", heads, layout.num_heads)
    planes = (layer_stop - layer_start) * layout.num_kv
    if wire_dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    row_bytes = wire_row_bytes(layout.head_dim, layout.element_size, wire_dtype == "fp8")
    return HEADER_BYTES + planes * (token_stop - token_start) * (head_stop - head_start) * row_bytes


def _resolve_backend(layout: CacheLayout, backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("KVLINK_BACKEND", "auto")
        if backend not in BACKENDS:
            raise InvalidArgument(f"KVLINK_BACKEND must be one of {BACKENDS}, got {backend!r}")
    on_gpu = layout.device.type == "cuda"
    if backend == "auto":
        return "cuda" if on_gpu and kernels.cuda_available() else "torch"
    if backend == "cuda" and not on_gpu:
        raise InvalidArgument(f"backend='cuda' needs a GPU cache, but {layout.name} is on {layout.device}")
    if backend == "cuda" and not kernels.cuda_available():
        raise RuntimeError("backend='cuda' needs CuPy (pip install 'kvlink[cuda13]' or 'kvlink[cuda12]')")
    return backend


def _resolve_stream(layout: CacheLayout, stream):
    """The stream given (checked), or None: the current stream of the cache's device, which the
    kernels look up themselves (a torch.cuda.Stream object costs microseconds a call to build)."""
    if layout.device.type != "cuda":
        if stream is not None:
            raise InvalidArgument(f"stream given, but {layout.name} is on {layout.device}")
        return None
    if stream is None:
        return None
    if not isinstance(stream, torch.cuda.Stream):
        raise ArgumentTypeError(f"stream must be a torch.cuda.Stream, got {type(stream).__name__}")
    if stream.device.index != layout.device.index:
        raise InvalidArgument(f"stream is on {stream.device} but the cache is on {layout.device}")
    return stream


def _check_chunk(name: str, chunk, sel: Selection) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dtype != torch.uint8:
        raise ArgumentTypeError(f"{name} must be uint8 bytes, got {chunk.dtype}")
    if chunk.device != sel.layout.device:
        raise InvalidArgument(f"{name} is on {chunk.device} but the cache ({sel.layout.name}) is on {sel.layout.device}")
    if chunk.dim() != 1 or not chunk.is_contiguous():
        raise InvalidArgument(f"{name} must be a contiguous 1-D byte tensor, got shape {tuple(chunk.shape)}")
    needed = sel.chunk_bytes
    if chunk.numel() < needed:
        raise InvalidArgument(f"{name} holds {chunk.numel()} bytes but this chunk needs {needed}")


def prepare(layout: CacheLayout, stream: torch.cuda.Stream | None = None, *, backend: str = "auto") -> None:
    """Do the one-time work of a layout's first pack/unpack now (at registration, not on a request).

    Compiles the kernels (NVRTC, or CuPy's disk cache), uploads the plane table and creates the
    metadata ring of ``stream`` (default: the current stream). Safe to call more than once; a
    no-op for the torch backend.
    """
    if not isinstance(layout, CacheLayout):
        raise ArgumentTypeError(f"layout must be a kvlink CacheLayout, got {type(layout).__name__}")
    if _resolve_backend(layout, backend) == "cuda":
        kernels.prepare(layout, _resolve_stream(layout, stream) or torch.cuda.current_stream(layout.device.index))


def pack(
    layout: CacheLayout,
    block_ids,
    num_tokens: int,
    chunk: torch.Tensor,
    *,
    layers: tuple[int, int] | None = None,
    tokens: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
    max_ctas: int | None = None,
    wire_dtype: str | None = None,
) -> ChunkHeader:
    """Gather a request's blocks into ``chunk`` (header + payload, see :mod:`kvlink.wire`).

    Args:
        layout: the source cache (:mod:`kvlink.presets`).
        block_ids: the request's blocks in token order (list, numpy array or CPU tensor).
        num_tokens: tokens held by those blocks; the last block may be partial.
        chunk: contiguous uint8 tensor on the cache's device, at least :func:`packed_nbytes` long.
        layers, tokens, heads: ``(start, stop)`` box to pack; default everything.
        stream: CUDA stream to run on (default: the current stream). Nothing synchronizes.
        backend: ``"auto"`` (CUDA kernel when possible), ``"cuda"`` or ``"torch"`` (reference).
        max_ctas: cap on thread blocks, to leave SMs to concurrent work (e.g. NCCL).
        wire_dtype: ``"fp8"`` quantizes the rows to e4m3 with a float32 scale per token and head
            (lossy, about half the bytes of bf16; see :mod:`kvlink.wire`); None copies the bytes.

    Returns:
        The header written at the front of ``chunk``.
    """
    sel = with_wire(select(layout, block_ids, num_tokens, layers=layers, tokens=tokens, heads=heads), wire_dtype,
                    role="source")
    _check_chunk("chunk", chunk, sel)
    return pack_selection(sel, chunk, _resolve_stream(layout, stream), _resolve_backend(layout, backend), max_ctas)


def pack_selection(sel: Selection, chunk: torch.Tensor, stream, backend: str, max_ctas: int | None = None) -> ChunkHeader:
    """pack() after validation: for callers (the endpoint) that validated the request once for all its chunks.

    ``stream``: a torch.cuda.Stream, or None for the current stream (of the cache's device).
    """
    header = ChunkHeader.for_selection(sel)
    if backend == "cuda":
        kernels.launch("pack", sel, chunk, stream, max_ctas=max_ctas)  # the header's bytes: the launch plan's
    elif stream is not None:
        with torch.cuda.stream(stream):
            reference.pack_reference(sel, chunk)
    else:
        reference.pack_reference(sel, chunk)
    return header


def unpack(
    layout: CacheLayout,
    block_ids,
    num_tokens: int,
    chunk: torch.Tensor,
    *,
    layers: tuple[int, int] | None = None,
    tokens: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
    max_ctas: int | None = None,
    status: torch.Tensor | None = None,
    wire_dtype: str | None = None,
    cache_scale: float = 1.0,
) -> torch.Tensor:
    """Scatter a packed ``chunk`` into the destination's blocks.

    The box (layers, tokens, number of heads) must match what the sender packed; ``heads`` says
    where the chunk's heads go in this cache. ``block_ids`` must not repeat.

    A chunk whose header does not match is refused whole. The torch backend raises ValueError at
    once. The CUDA kernel cannot raise without a sync, so it writes nothing and sets the returned
    int32 ``status`` word on the device to 1 (:data:`kvlink.wire.STATUS_HEADER_MISMATCH`);
    :func:`kvlink.wire.check_status` waits for it and raises. Pass your own zeroed ``status`` to
    collect every chunk of a request in one word.

    ``wire_dtype="fp8"`` reads an fp8 chunk (see :func:`pack`) and converts it to the cache's
    dtype; an e4m3 cache stores ``x / cache_scale`` (its per-tensor scale, as vLLM's k/v_scale).
    """
    sel = with_wire(select(layout, block_ids, num_tokens, layers=layers, tokens=tokens, heads=heads,
                           destination=True), wire_dtype, role="destination")
    if wire_dtype is None and layout.dtype == torch.float8_e4m3fn and cache_scale != 1.0:
        raise InvalidArgument("cache_scale applies to fp8 chunks (wire_dtype='fp8') only")
    if not isinstance(cache_scale, (int, float)) or not cache_scale > 0 or cache_scale == float("inf"):
        raise InvalidArgument(f"cache_scale must be a positive finite number, got {cache_scale!r}")
    _check_chunk("chunk", chunk, sel)
    backend = _resolve_backend(layout, backend)
    stream = _resolve_stream(layout, stream)
    if status is not None:
        if not isinstance(status, torch.Tensor) or status.dtype != torch.int32 or status.numel() < 1:
            raise ArgumentTypeError("status must be an int32 tensor with at least one element")
        if status.device != layout.device:
            raise InvalidArgument(f"status is on {status.device} but the cache is on {layout.device}")
    return unpack_selection(sel, chunk, stream, backend, max_ctas, status, cache_scale=float(cache_scale))


def unpack_selection(sel: Selection, chunk: torch.Tensor, stream, backend: str, max_ctas: int | None = None,
                     status: torch.Tensor | None = None, *, cache_scale: float = 1.0) -> torch.Tensor:
    """unpack() after validation (see :func:`pack_selection`)."""
    layout = sel.layout
    if backend == "cuda":
        return kernels.launch("unpack", sel, chunk, stream, status=status, max_ctas=max_ctas, cache_scale=cache_scale)
    if status is None:
        status = torch.zeros(1, dtype=torch.int32, device=layout.device)
    if stream is not None:
        with torch.cuda.stream(stream):
            reference.unpack_reference(sel, chunk, cache_scale=cache_scale)
    else:
        reference.unpack_reference(sel, chunk, cache_scale=cache_scale)
    return status
