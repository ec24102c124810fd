"""Which part of a cache one packed chunk covers, validated before any byte moves.

A request's KV lives in an ordered list of blocks holding ``num_tokens`` tokens (the last
block may be partial). A chunk covers a box of it: layers ``[layer_start, layer_stop)``,
tokens ``[token_start, token_stop)`` counted from the request's first token, and heads
``[head_start, head_stop)`` of the local cache. Pack reads that box from the source; unpack
writes the same box (same layers and tokens, possibly other head positions) into the
destination's own blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from kvlink.errors import ArgumentTypeError, InvalidArgument
from kvlink.layout import CacheLayout

HEADER_BYTES = 64  # see kvlink.wire; here so payload offsets need no import cycle
FP8_SCALE_BYTES = 4  # fp8 wire: one float32 scale per (plane, token, head) row
WIRE_DTYPES = (None, "fp8")
# fp8 on the wire (e4m3, a scale per token and head): caches it can quantize, and caches it can land in
FP8_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DESTINATION_DTYPES = FP8_SOURCE_DTYPES + (torch.float8_e4m3fn,)


def wire_row_bytes(head_dim: int, element_bytes: int, wire_fp8: bool) -> int:
    """Chunk bytes of one (token, head) row: head_dim elements, or for fp8 head_dim bytes and a scale."""
    return head_dim + FP8_SCALE_BYTES if wire_fp8 else head_dim * element_bytes


@dataclass(frozen=True, eq=False)
class Selection:
    """A validated (layout, blocks, tokens, layers, heads) box; build with :func:`select`."""

    layout: CacheLayout
    block_ids: np.ndarray  # int32, 1-D
    num_tokens: int
    layer_start: int
    layer_stop: int
    token_start: int
    token_stop: int
    head_start: int
    head_stop: int
    wire_fp8: bool = False  # the chunk carries e4m3 values and a scale per row (see kvlink.wire)

    def box(self, layers: tuple[int, int], tokens: tuple[int, int]) -> "Selection":
        """The same request restricted to a sub-box, without validating again (callers check the bounds)."""
        return dataclasses.replace(self, layer_start=layers[0], layer_stop=layers[1],
                                   token_start=tokens[0], token_stop=tokens[1])

    @property
    def num_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def num_planes(self) -> int:
        return self.num_layers * self.layout.num_kv

    @property
    def first_plane(self) -> int:
        return self.layer_start * self.layout.num_kv

    @property
    def num_selected_tokens(self) -> int:
        return self.token_stop - self.token_start

    @property
    def num_selected_heads(self) -> int:
        return self.head_stop - self.head_start

    @property
    def wire_row_bytes(self) -> int:
        return wire_row_bytes(self.layout.head_dim, self.layout.element_size, self.wire_fp8)

    @property
    def token_layer_bytes(self) -> int:
        """Payload bytes of one token in one layer: K and V (or the latent) of the selected heads."""
        return self.layout.num_kv * self.num_selected_heads * self.wire_row_bytes

    @property
    def plane_bytes(self) -> int:
        """Payload bytes of one plane: tokens x heads rows (for fp8 both regions' share of the plane)."""
        return self.num_selected_tokens * self.num_selected_heads * self.wire_row_bytes

    @property
    def payload_bytes(self) -> int:
        return self.num_planes * self.plane_bytes

    @property
    def cache_bytes(self) -> int:
        """Bytes the box occupies in the cache (the payload's size without wire compression)."""
        return self.num_planes * self.num_selected_tokens * self.num_selected_heads * self.layout.row_bytes

    @property
    def chunk_bytes(self) -> int:
        """Header plus payload: the size of the staging buffer pack writes."""
        return HEADER_BYTES + self.payload_bytes


def _as_range(name: str, value, limit: int) -> tuple[int, int]:
    if value is None:
        return 0, limit
    # NOTE: fast path for the common (int, int) tuple: the generic checks below (ABC isinstance)
    # cost microseconds per call, and every pull validates three ranges per side.
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and 0 <= value[0] < value[1] <= limit:
        return value
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ArgumentTypeError(f"{name} must be a (start, stop) pair, got {value!r}")
    start, stop = value
    for v in (start, stop):
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ArgumentTypeError(f"{name} must hold ints, got {value!r}")
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= limit:
        raise InvalidArgument(f"{name}={value!r} is outside [0, {limit}) or empty")
    return start, stop


def with_wire(sel: Selection, wire_dtype: str | None, *, role: str) -> Selection:
    """``sel`` travelling as ``wire_dtype`` (None: the cache's own bytes; "fp8"); ValueError if it cannot.

    ``role`` is "source" (the cache is quantized) or "destination" (the chunk is converted into it).
    """
    if wire_dtype not in WIRE_DTYPES:
        raise InvalidArgument(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    if wire_dtype is None:
        return sel
    layout = sel.layout
    allowed = FP8_SOURCE_DTYPES if role == "source" else FP8_DESTINATION_DTYPES
    if layout.dtype not in allowed:
        raise InvalidArgument(f"wire_dtype='fp8' needs a {role} cache of {', '.join(str(d).removeprefix('torch.') for d in allowed)}; "
                         f"{layout.name} is {str(layout.dtype).removeprefix('torch.')}")
    if layout.head_dim % 4:
        raise InvalidArgument(f"wire_dtype='fp8' needs head_dim divisible by 4 (aligned scales), {layout.name} has "
                         f"{layout.head_dim}")
    return dataclasses.replace(sel, wire_fp8=True)


def block_ids_to_numpy(block_ids, name: str = "block_ids") -> np.ndarray:
    """Accept a list, tuple, numpy array or torch tensor of ints; return a 1-D int64 numpy array."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype.is_floating_point or block_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ArgumentTypeError(f"{name} must hold integers, got {block_ids.dtype}")
        array = block_ids.detach().to("cpu").numpy()
    else:
        array = np.asarray(block_ids)
        if array.size == 0 and array.ndim == 1:
            return np.zeros(0, dtype=np.int64)
        if array.dtype == object:
            raise ArgumentTypeError(f"{name} must hold integers, got {block_ids!r:.80}")
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def select(
    layout: CacheLayout,
    block_ids,
    num_tokens: int,
    *,
    layers: tuple[int, int] | None = None,
    tokens: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    destination: bool = False,
    ids_name: str = "block_ids",
    owner: str | None = None,
) -> Selection:
    """Validate a chunk's box against ``layout``; raise ValueError/TypeError naming the bad argument.

    Args:
        block_ids: the request's blocks in token order (list, numpy array or CPU tensor of ints).
        num_tokens: tokens the request holds in those blocks; every block must hold at least one.
        layers, tokens, heads: ``(start, stop)`` ranges; ``None`` means all.
        destination: the blocks will be written, so duplicates are refused.
        ids_name, owner: how errors name the block list and the cache (default ``block_ids`` and
            the layout's name).
    """
    if not isinstance(layout, CacheLayout):
        raise ArgumentTypeError(f"layout must be a kvlink CacheLayout, got {type(layout).__name__}")
    ids = block_ids_to_numpy(block_ids, ids_name)
    if ids.size == 0:
        raise InvalidArgument(f"{ids_name} is empty")
    if ids.min() < 0 or ids.max() >= layout.num_blocks:
        bad = (ids < 0) | (ids >= layout.num_blocks)
        raise InvalidArgument(
            f"{ids_name}[{int(np.argmax(bad))}]={int(ids[bad][0])} is out of range [0, {layout.num_blocks}) "
            + (f"of {owner}" if owner else f"for {layout.name}")
        )
    if destination and ids.size > 1:
        ordered = np.sort(ids)
        repeats = ordered[1:] == ordered[:-1]
        if repeats.any():
            raise InvalidArgument(f"destination {ids_name} repeat block {int(ordered[1:][repeats][0])}")
    if type(num_tokens) is not int and (isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral)):
        raise ArgumentTypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    num_tokens = int(num_tokens)
    capacity = ids.size * layout.block_size
    if num_tokens <= 0 or num_tokens > capacity:
        raise InvalidArgument(
            f"num_tokens={num_tokens} does not fit {ids.size} blocks of {layout.block_size} tokens (at most {capacity})"
        )
    needed_blocks = -(-num_tokens // layout.block_size)
    if needed_blocks != ids.size:
        raise InvalidArgument(
            f"num_tokens={num_tokens} fills {needed_blocks} blocks of {layout.block_size} but {ids.size} {ids_name.replace('_', ' ')} "
            "were given"
        )
    layer_start, layer_stop = _as_range("layers", layers, layout.num_layers)
    token_start, token_stop = _as_range("tokens", tokens, num_tokens)
    head_start, head_stop = _as_range("heads", heads, layout.num_heads)
    return Selection(
        layout=layout,
        block_ids=ids.astype(np.int32),
        num_tokens=num_tokens,
        layer_start=layer_start,
        layer_stop=layer_stop,
        token_start=token_start,
        token_stop=token_stop,
        head_start=head_start,
        head_stop=head_stop,
    )
