"""Which part of a cache one packed chunk covers, validated before any byte moves.

A request's KV lives in an ordered list of blocks holding ``num_tokens`` tokens (the last
block may be partial). A chunk covers a box of it: layers ``[layer_start, layer_stop)``,
tokens ``[token_start, token_stop)`` counted from the request's first token, and heads
``[head_start, head_stop)`` of the local cache. Pack reads that box from the source; unpack
writes the same box (same layers and tokens, possibly other head positions) into the
destination's own blocks.
"""

from __future__ import annotations

import array as array_module
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
        # NOTE: a copy of the fields, not dataclasses.replace (which re-runs __init__: microseconds
        # a chunk on the pipeline's per-chunk path)
        fields = dict(self.__dict__, layer_start=layers[0], layer_stop=layers[1], token_start=tokens[0],
                      token_stop=tokens[1])
        return _from_fields(fields)

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
        # NOTE: written out, not num_planes * plane_bytes: every pack and unpack call reads it
        return ((self.layer_stop - self.layer_start) * self.layout.num_kv * (self.token_stop - self.token_start)
                * (self.head_stop - self.head_start) * self.wire_row_bytes)

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
    return _from_fields(dict(sel.__dict__, wire_fp8=True))


_TORCH_INTS = frozenset((torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))
# signed dtype -> the unsigned one of its size: viewed so, a negative id is larger than any block count
_UNSIGNED = {np.dtype(t): np.dtype(u) for t, u in ((np.int8, np.uint8), (np.int16, np.uint16),
                                                     (np.int32, np.uint32), (np.int64, np.uint64))}


def _int_array(block_ids, name: str) -> np.ndarray:
    """``block_ids`` as a 1-D numpy array of some integer dtype (a view where it can be); TypeError/ValueError
    naming ``name`` for anything else."""
    if type(block_ids) is np.ndarray:
        array = block_ids
    elif isinstance(block_ids, torch.Tensor):
        if block_ids.dtype in _TORCH_INTS and block_ids.dim() == 1 and block_ids.is_cpu:
            return block_ids.numpy()  # the common case, a view (an integer tensor cannot require grad)
        if block_ids.dtype.is_floating_point or block_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ArgumentTypeError(f"{name} must hold integers, got {block_ids.dtype}")
        array = block_ids.detach().to("cpu").numpy()
    else:
        if type(block_ids) in (list, tuple) and block_ids and type(block_ids[0]) is not bool:
            # NOTE: array.array takes ints only (a float or str raises) and is faster than np.asarray
            try:
                return np.frombuffer(array_module.array("q", block_ids), dtype=np.int64)
            except (TypeError, OverflowError):
                pass  # np.asarray below names what is wrong
        array = np.asarray(block_ids)
        if array.size == 0 and array.ndim == 1:
            return np.zeros(0, dtype=np.int64)
        if array.dtype == object:
            raise ArgumentTypeError(f"{name} must hold integers, got {block_ids!r:.80}")
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InvalidArgument(f"{name} must be 1-D, got shape {array.shape}")
    return array


def block_ids_to_numpy(block_ids, name: str = "block_ids") -> np.ndarray:
    """Accept a list, tuple, numpy array or torch tensor of ints; return a 1-D int64 numpy array."""
    return _int_array(block_ids, name).astype(np.int64, copy=False)


def checked_block_ids(block_ids, num_blocks: int, *, name: str = "block_ids", where: str = "",
                      distinct: bool = False) -> np.ndarray:
    """``block_ids`` validated against a cache of ``num_blocks`` blocks: a new int32 array (the caller's
    may change after the call). ValueError names the argument and the first bad entry: out of range
    (``where`` ends that message), or, with ``distinct``, repeated.

    NOTE: the checks are sized for the per-call budget (a few microseconds): one sort for the
    distinct case (its ends are the minimum and the maximum), else one maximum over the ids seen
    as unsigned (a negative one is then huge), and nothing kept beyond the int32 copy.
    """
    array = _int_array(block_ids, name)
    count = array.shape[0]
    if count == 0:
        raise InvalidArgument(f"{name} is empty")
    ordered = None
    if count == 1:
        bad = not 0 <= array[0] < num_blocks
    elif distinct:
        ordered = np.sort(array)
        bad = ordered[0] < 0 or ordered[-1] >= num_blocks
    else:
        unsigned = _UNSIGNED.get(array.dtype)
        if unsigned is not None:
            bad = _MAXIMUM(array.view(unsigned)) >= num_blocks
        else:  # unsigned already, or a byte order of its own
            bad = _MAXIMUM(array) >= num_blocks or (array.dtype.kind == "i" and np.minimum.reduce(array) < 0)
    if bad:
        out = (array < 0) | (array >= num_blocks)
        raise InvalidArgument(f"{name}[{int(np.argmax(out))}]={int(array[out][0])} is out of range "
                              f"[0, {num_blocks}) {where}")
    if ordered is not None and np.count_nonzero(ordered[1:] == ordered[:-1]):
        repeats = ordered[1:] == ordered[:-1]
        raise InvalidArgument(f"destination {name} repeat block {int(ordered[1:][repeats][0])}")
    return array.astype(np.int32)


_MAXIMUM = np.maximum.reduce


def _from_fields(fields: dict) -> Selection:
    """A Selection from its fields, already checked (no __init__: the frozen dataclass's costs a
    microsecond a call)."""
    sel = object.__new__(Selection)
    sel.__dict__.update(fields)
    return sel


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
    ids = checked_block_ids(block_ids, layout.num_blocks, name=ids_name, distinct=destination,
                            where=("of " + owner) if owner else ("for " + layout.name))
    if type(num_tokens) is not int and (isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral)):
        raise ArgumentTypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    num_tokens = int(num_tokens)
    count = ids.shape[0]
    capacity = count * layout.block_size
    if num_tokens <= 0 or num_tokens > capacity:
        raise InvalidArgument(
            f"num_tokens={num_tokens} does not fit {count} blocks of {layout.block_size} tokens (at most {capacity})"
        )
    needed_blocks = -(-num_tokens // layout.block_size)
    if needed_blocks != count:
        raise InvalidArgument(
            f"num_tokens={num_tokens} fills {needed_blocks} blocks of {layout.block_size} but {count} {ids_name.replace('_', ' ')} "
            "were given"
        )
    layer_start, layer_stop = (0, layout.num_layers) if layers is None else _as_range("layers", layers, layout.num_layers)
    token_start, token_stop = (0, num_tokens) if tokens is None else _as_range("tokens", tokens, num_tokens)
    head_start, head_stop = (0, layout.num_heads) if heads is None else _as_range("heads", heads, layout.num_heads)
    return _from_fields({"layout": layout, "block_ids": ids, "num_tokens": num_tokens, "layer_start": layer_start,
                         "layer_stop": layer_stop, "token_start": token_start, "token_stop": token_stop,
                         "head_start": head_start, "head_stop": head_stop, "wire_fp8": False})
