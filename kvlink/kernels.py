"""The CUDA pack/unpack kernels (csrc/pack_unpack.cu): compiled at first use, launched on the caller's stream.

Nothing here runs at import: CuPy is imported, and NVRTC compiles, on the first launch.
CuPy caches the compiled module on disk, keyed by source and options (``CUPY_CACHE_DIR``),
so later processes skip compilation.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch

from kvlink import cuda_driver
from kvlink.layout import DTYPE_CODES
from kvlink.reference import inverse_cache_scale
from kvlink.selection import FP8_DESTINATION_DTYPES, FP8_SOURCE_DTYPES, Selection
from kvlink.wire import HEADER_CHECK_MASK, header_bytes

import re

# Extra NVRTC options for tuning experiments, e.g. "-DKVLINK_UNROLL=8 -DKVLINK_THREADS=512".
EXTRA_OPTIONS = tuple(os.environ.get("KVLINK_NVRTC_OPTIONS", "").split())
_defines = dict(re.findall(r"-DKVLINK_(THREADS|UNROLL)=(\d+)", " ".join(EXTRA_OPTIONS)))
THREADS = int(_defines.get("THREADS", 256))
UNROLL = int(_defines.get("UNROLL", 4))
# Without max_ctas, launch one thread block per tile (0), or cap the grid at this many blocks
# per SM (KVLINK_CTAS_PER_SM, for tuning).
CTAS_PER_SM = int(os.environ.get("KVLINK_CTAS_PER_SM", "0"))
VEC_WIDTHS = (16, 8, 4, 2, 1)
KERNEL_KINDS = ("pack", "unpack", "copy", "copy_inline", "pack_inline", "unpack_inline")
# fp8 wire kernels, instantiated per element type (kvlink.layout.DTYPE_CODES) instead of vector width:
# pack quantizes the caches kvlink.selection lets travel as fp8, unpack lands in those it lets receive it.
FP8_KERNELS = {"pack_fp8": tuple(DTYPE_CODES[d] for d in FP8_SOURCE_DTYPES),
               "unpack_fp8": tuple(DTYPE_CODES[d] for d in FP8_DESTINATION_DTYPES)}
WARPS = THREADS // 32  # fp8 kernels: one warp per row
# vectorized fp8 kernels: <element type, lanes per row>, 16 bytes of the cache per lane, 4 rows per thread
FP8_VEC_LANES = (1, 2, 4, 8, 16, 32)
FP8_ROWS = 4


def _instantiations():
    for kind in KERNEL_KINDS:
        for vec in VEC_WIDTHS:
            yield f"kvlink_{kind}", (vec,)
    for kind, codes in FP8_KERNELS.items():
        for code in codes:
            yield f"kvlink_{kind}", (code,)
            for lanes in FP8_VEC_LANES:
                yield f"kvlink_{kind}_vec", (code, lanes)
    for verify in (0, 1):  # a chunk's payload checksum: written (0) or checked (1)
        yield "kvlink_checksum", (verify,)


def name_expression(template: str, args: tuple[int, ...]) -> str:
    """The C++ name of one instantiation, as NVRTC takes it: ``kvlink_pack_fp8_vec<2, 16>``."""
    return f"{template}<{', '.join(str(int(a)) for a in args)}>"


# THE list of kernel instantiations in csrc/pack_unpack.cu: (template, its int template arguments).
# The launcher compiles exactly these (RawModule name_expressions) and can fetch no other
# (kernel_name), and kvlink.compile_check compiles every one of them and checks each is in the
# compiled code. Pure Python: importing it touches no GPU, CuPy or compiler.
KERNEL_INSTANTIATIONS: tuple[tuple[str, tuple[int, ...]], ...] = tuple(_instantiations())
KERNEL_NAMES: tuple[str, ...] = tuple(name_expression(t, a) for t, a in KERNEL_INSTANTIATIONS)
_KERNEL_NAME_SET = frozenset(KERNEL_NAMES)
assert len(_KERNEL_NAME_SET) == len(KERNEL_NAMES)


def kernel_name(template: str, *args: int) -> str:
    """The name expression of ``template<args...>``; LookupError unless it is in KERNEL_NAMES."""
    name = name_expression(template, args)
    if name not in _KERNEL_NAME_SET:
        raise LookupError(f"{name} is not a kernel kvlink compiles (kvlink.kernels.KERNEL_NAMES)")
    return name

META_HEADER_OFFSET = 128
META_BLOCK_IDS_OFFSET = 192
SOURCE_NAME = "pack_unpack.cu"

# Mirrors struct Geometry in csrc/pack_unpack.cu (offsets must match).
GEOMETRY_DTYPE = np.dtype([
    ("block_stride", "<i8"), ("token_stride", "<i8"), ("head_stride", "<i8"), ("plane_bytes", "<u8"),
    ("num_planes", "<u4"), ("vecs_per_plane", "<u4"),
    ("vecs_per_row", "<u4"), ("vpr_mul", "<u4"), ("vpr_shift", "<u4"),
    ("heads_per_token", "<u4"), ("hpt_mul", "<u4"), ("hpt_shift", "<u4"),
    ("tokens_per_block", "<u4"), ("tpb_mul", "<u4"), ("tpb_shift", "<u4"),
    ("token_start", "<u4"), ("head_start", "<u4"), ("check_mask", "<u4"),
    ("tiles_per_plane", "<u4"), ("tpp_mul", "<u4"), ("tpp_shift", "<u4"), ("num_tiles", "<u4"),
    ("status_overwrite", "<u4"), ("head_dim", "<u4"), ("inv_cache_scale_bits", "<u4"),
])
assert GEOMETRY_DTYPE.itemsize <= META_HEADER_OFFSET
# kvlink_copy_inline's by-value parameter (struct CopyParams): plane tables, record offsets, records.
INLINE_META_BYTES = 4000
INLINE_PARAMS_HEADER = struct.Struct("<QQII8x")
INLINE_PARAMS_BYTES = INLINE_PARAMS_HEADER.size + INLINE_META_BYTES
# The same record packed with struct (a few microseconds faster a launch than numpy).
GEOMETRY_STRUCT = struct.Struct("<qqqQ" + "I" * (len(GEOMETRY_DTYPE.names) - 4))
assert GEOMETRY_STRUCT.size == GEOMETRY_DTYPE.itemsize
# kvlink_pack_inline / kvlink_unpack_inline's by-value parameter (struct ChunkParams): plane table,
# chunk and status addresses, then one metadata record as _metadata() lays it out.
CHUNK_PARAMS_HEADER = struct.Struct("<QQQ8x")
CHUNK_PARAMS_BYTES = CHUNK_PARAMS_HEADER.size + INLINE_META_BYTES
INLINE_MAX_IDS = (INLINE_META_BYTES - META_BLOCK_IDS_OFFSET) // 4  # block ids one inline record holds
TILE_VECTORS = THREADS * UNROLL  # vectors of one plane a tile covers


def csrc_dir() -> Path:
    """Where the CUDA sources are: ``KVLINK_CSRC_DIR``, the installed package, or the checkout."""
    override = os.environ.get("KVLINK_CSRC_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / "csrc", here.parent / "csrc"]
    for candidate in candidates:
        if (candidate / SOURCE_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"kvlink CUDA sources ({SOURCE_NAME}) not found in {[str(c) for c in candidates]}")


def kernel_source() -> str:
    return (csrc_dir() / SOURCE_NAME).read_text()


@functools.lru_cache(maxsize=4096)
def fast_divisor(d: int) -> tuple[int, int]:
    """(mul, shift) with ``(umulhi(n, mul) + n) >> shift == n // d`` for every ``0 <= n < 2**31``."""
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor {d} outside [1, 2**31)")
    shift = (d - 1).bit_length()  # ceil(log2(d))
    mul = ((1 << 32) * ((1 << shift) - d)) // d + 1
    return mul & 0xFFFFFFFF, shift


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """True when torch sees a GPU and CuPy imports (the kernels' two needs)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy built for another CUDA
        return False
    return True


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        # CuPy picks the device's architecture itself.
        module = cupy.RawModule(code=kernel_source(), options=EXTRA_OPTIONS, name_expressions=list(KERNEL_NAMES))
        module.compile()
    return module


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, name: str):
    """The compiled kernel ``name`` (a KERNEL_NAMES entry: the only names the module was compiled with)."""
    if name not in _KERNEL_NAME_SET:
        raise LookupError(f"{name} is not a kernel kvlink compiles (kvlink.kernels.KERNEL_NAMES)")
    return _module(device_index).get_function(name)


@functools.lru_cache(maxsize=None)
def _function_handle(device_index: int, name: str) -> int | None:
    """The kernel's CUfunction, for launches straight through the driver (None: launch through CuPy)."""
    import cupy

    try:
        with cupy.cuda.Device(device_index):
            return int(_kernel(device_index, name).kernel.ptr)
    except Exception:  # a CuPy without RawKernel.kernel.ptr
        return None


_DRIVER_LAUNCH = [os.environ.get("KVLINK_DRIVER_LAUNCH", "1") == "1"]


def _launch_kernel(device_index: int, name: str, grid: int, args: tuple[int, ...], stream) -> None:
    """Launch on ``stream`` (the caller holds ``device_index`` current).

    NOTE: through cuLaunchKernel directly when possible: CuPy's launch path (device and stream
    context managers, argument boxing) costs tens of microseconds a call from Python, the same
    order as a small request's whole transfer.
    """
    function = _function_handle(device_index, name) if _DRIVER_LAUNCH[0] else None
    if function is not None:
        try:
            cuda_driver.launch_kernel(function, grid, THREADS, args, stream.cuda_stream)
            return
        except cuda_driver.CudaDriverError:
            _DRIVER_LAUNCH[0] = False  # e.g. no current context on this thread: CuPy sets one up
    import cupy

    with cupy.cuda.Device(device_index), _cupy_stream(stream, device_index):
        _kernel(device_index, name)((grid,), (THREADS,), tuple(np.uint64(a) for a in args))


def _layout_facts(layout) -> dict:
    """Per-layout facts every launch needs, computed once (frozen dataclass: stored out of band).

    ``alignment`` is the gcd of every plane address and byte stride: a bound on the vector width
    that holds for any subset of planes. ``merge_heads``: a token's heads sit back to back (see
    _geometry). ``table``: the plane table's device address, once uploaded (_plane_table).
    ``plans``, ``copy_plans``: the launch plans of the boxes seen so far (_chunk_plan, _copy_plan).
    """
    facts = layout.__dict__.get("_kernel_facts")
    if facts is None:
        ptrs = layout.plane_ptrs()
        facts = {"ptrs": ptrs, "alignment": functools.reduce(
            math.gcd, ptrs, math.gcd(layout.block_stride, layout.token_stride, layout.head_stride)),
            "row_bytes": layout.row_bytes, "merge_heads": layout.head_stride == layout.row_bytes,
            "strides": (layout.block_stride, layout.token_stride, layout.head_stride),
            "block_size": (layout.block_size, *fast_divisor(layout.block_size)), "table": None,
            "plans": {}, "copy_plans": {}}
        object.__setattr__(layout, "_kernel_facts", facts)
    return facts


def _plane_table(layout) -> torch.Tensor:
    """The plane base addresses on the layout's device, uploaded once per layout."""
    table = layout.__dict__.get("_plane_table")
    if table is None:
        # NOTE: uploaded on a side stream and only that stream is waited for, so first use never
        # waits for the engine's queued work.
        side = torch.cuda.Stream(layout.device)
        with torch.cuda.stream(side):
            table = torch.tensor(_layout_facts(layout)["ptrs"], dtype=torch.int64).pin_memory().to(
                layout.device, non_blocking=True)
        side.synchronize()
        object.__setattr__(layout, "_plane_table", table)
        _layout_facts(layout)["table"] = table.data_ptr()
    return table


def _planes_address(sel: Selection) -> int:
    """Device address of the plane table's entry for ``sel``'s first plane."""
    address = _layout_facts(sel.layout)["table"]
    if address is None:
        address = _plane_table(sel.layout).data_ptr()
    return address + 8 * sel.layer_start * sel.layout.num_kv


def _geometry_values(sel: Selection, vec: int, row_bytes: int, heads_per_token: int,
                     status_overwrite: bool) -> tuple[tuple, int]:
    """The Geometry record's fields (GEOMETRY_DTYPE order) and the number of tiles for ``sel`` cut
    into ``vec``-byte vectors (plain kernels: the chunk holds the cache's own bytes)."""
    layout = sel.layout
    facts = _layout_facts(layout)
    tokens = sel.token_stop - sel.token_start
    planes = (sel.layer_stop - sel.layer_start) * layout.num_kv
    vecs_per_row = row_bytes // vec
    vecs_per_plane = tokens * heads_per_token * vecs_per_row
    if vecs_per_plane >= 2**31:
        raise ValueError(
            f"one plane of this chunk is {sel.plane_bytes} bytes in {vec}-byte vectors, over the kernel's 2**31 "
            "vectors; split the request into several chunks (tokens=...)"
        )
    tiles_per_plane = -(-vecs_per_plane // TILE_VECTORS)
    num_tiles = tiles_per_plane * planes
    if num_tiles >= 2**31:
        raise ValueError(f"chunk of {sel.payload_bytes} bytes has too many tiles for one launch; split it (tokens=...)")
    plane_bytes = tokens * (sel.head_stop - sel.head_start) * facts["row_bytes"]
    return (*facts["strides"], plane_bytes, planes, vecs_per_plane,
            vecs_per_row, *fast_divisor(vecs_per_row),
            heads_per_token, *fast_divisor(heads_per_token),
            *facts["block_size"],
            sel.token_start, sel.head_start, HEADER_CHECK_MASK,
            tiles_per_plane, *fast_divisor(tiles_per_plane), num_tiles, int(status_overwrite), layout.head_dim,
            0), num_tiles


def _fp8_geometry(sel: Selection, status_overwrite: bool, cache_scale: float) -> tuple[bytes, int]:
    """Geometry of an fp8 pack/unpack launch (a "vector" is one row; see csrc) and its number of rows."""
    layout = sel.layout
    heads = sel.num_selected_heads
    rows_per_plane = sel.num_selected_tokens * heads
    num_rows = rows_per_plane * sel.num_planes
    if num_rows >= 2**31:
        raise ValueError(f"chunk of {num_rows} rows is too large for one fp8 launch; split it (tokens=...)")
    record = (
        layout.block_stride, layout.token_stride, layout.head_stride, rows_per_plane * layout.head_dim,
        sel.num_planes, rows_per_plane,
        1, *fast_divisor(1),
        heads, *fast_divisor(heads),
        layout.block_size, *fast_divisor(layout.block_size),
        sel.token_start, sel.head_start, HEADER_CHECK_MASK,
        rows_per_plane, *fast_divisor(rows_per_plane), num_rows, int(status_overwrite), layout.head_dim,
        struct.unpack("<I", struct.pack("<f", inverse_cache_scale(cache_scale)))[0],
    )
    return GEOMETRY_STRUCT.pack(*record), num_rows


def _fp8_vectorized(sel: Selection, chunk_ptr: int) -> int | None:
    """Lanes per row for the vectorized fp8 kernels (16-byte accesses), or None where they do not apply."""
    layout = sel.layout
    elems = 16 // layout.element_size
    lanes = layout.head_dim // elems
    if layout.head_dim % elems or lanes not in FP8_VEC_LANES or chunk_ptr % 16 or \
            _layout_facts(layout)["alignment"] % 16:
        return None
    return lanes


def _geometry(sel: Selection, chunk_ptr: int, status_overwrite: bool) -> tuple[bytes, int, int]:
    """The Geometry record's bytes, the vector width and the number of tiles for a pack/unpack launch."""
    facts = _layout_facts(sel.layout)
    heads = sel.head_stop - sel.head_start
    row_bytes = facts["row_bytes"]
    heads_per_token = heads
    # A token's selected heads merge into one row when they sit back to back in the cache: fewer
    # divisions per vector, and the common NHD case becomes runs of heads*head_dim bytes.
    if heads == 1 or facts["merge_heads"]:
        row_bytes *= heads
        heads_per_token = 1
    plane_bytes = (sel.token_stop - sel.token_start) * heads * facts["row_bytes"]
    alignment = math.gcd(chunk_ptr + 64, plane_bytes, row_bytes, facts["alignment"])
    vec = min(16, alignment & -alignment)  # the widest of VEC_WIDTHS dividing it
    values, num_tiles = _geometry_values(sel, vec, row_bytes, heads_per_token, status_overwrite)
    return GEOMETRY_STRUCT.pack(*values), vec, num_tiles


def _copy_geometry(src: Selection, dst: Selection) -> tuple[bytes, bytes, int, int]:
    """Source and destination Geometry records of one copy launch (same vectors on both sides)."""
    if (src.layer_stop - src.layer_start, src.token_stop - src.token_start, src.head_stop - src.head_start) != \
            (dst.layer_stop - dst.layer_start, dst.token_stop - dst.token_start, dst.head_stop - dst.head_start) or \
            src.layout.num_kv != dst.layout.num_kv or src.layout.row_bytes != dst.layout.row_bytes:
        raise ValueError(f"copy boxes differ: source {src.num_planes} planes x {src.num_selected_tokens} tokens x "
                         f"{src.num_selected_heads} heads, destination {dst.num_planes} x {dst.num_selected_tokens} "
                         f"x {dst.num_selected_heads}")
    # heads merge into one row only when they sit back to back in both caches (see _geometry); the
    # vector width must suit both
    src_facts, dst_facts = _layout_facts(src.layout), _layout_facts(dst.layout)
    heads = src.head_stop - src.head_start
    row_bytes, heads_per_token = src_facts["row_bytes"], heads
    if heads == 1 or (src_facts["merge_heads"] and dst_facts["merge_heads"]):
        row_bytes *= heads
        heads_per_token = 1
    alignment = math.gcd(row_bytes, src_facts["alignment"], dst_facts["alignment"])
    vec = min(16, alignment & -alignment)
    src_values, num_tiles = _geometry_values(src, vec, row_bytes, heads_per_token, False)
    dst_values, _ = _geometry_values(dst, vec, row_bytes, heads_per_token, False)
    return GEOMETRY_STRUCT.pack(*src_values), GEOMETRY_STRUCT.pack(*dst_values), vec, num_tiles


# Launch plans (Geometry records, header, vector width, tiles) depend on a box's shape, not on its
# block ids, so a layout keeps the plans of the boxes it has seen: a request of a shape seen before
# costs one dict lookup instead of the records' arithmetic. Bounded: a full cache starts over.
PLAN_CACHE_ENTRIES = 4096


def _chunk_plan(sel: Selection, chunk_ptr: int, status_overwrite: bool) -> tuple[bytes, bytes, int, int]:
    """(Geometry record, header bytes, vector width, tiles) of a plain pack/unpack of ``sel``'s box
    into or out of a chunk at ``chunk_ptr``, from the layout's plan cache."""
    plans = _layout_facts(sel.layout)["plans"]
    # the vector width depends on the chunk's address only through its alignment (at most 16)
    key = (sel.layer_start, sel.layer_stop, sel.token_start, sel.token_stop, sel.head_start, sel.head_stop,
           chunk_ptr & 15, status_overwrite)
    plan = plans.get(key)
    if plan is None:
        geometry, vec, num_tiles = _geometry(sel, chunk_ptr, status_overwrite)
        plan = (geometry, header_bytes(sel), vec, num_tiles)
        if len(plans) >= PLAN_CACHE_ENTRIES:
            plans.clear()
        plans[key] = plan
    return plan


def _copy_plan(src: Selection, dst: Selection) -> tuple[bytes, bytes, int, int]:
    """_copy_geometry(src, dst), from the destination layout's plan cache."""
    plans = _layout_facts(dst.layout)["copy_plans"]
    # NOTE: keyed by the source layout itself (a strong reference), so no other layout can take its place
    key = (src.layout, src.layer_start, src.layer_stop, src.token_start, src.token_stop, src.head_start,
           src.head_stop, dst.layer_start, dst.layer_stop, dst.token_start, dst.token_stop, dst.head_start,
           dst.head_stop)
    plan = plans.get(key)
    if plan is None:
        plan = _copy_geometry(src, dst)
        if len(plans) >= PLAN_CACHE_ENTRIES:
            plans.clear()
        plans[key] = plan
    return plan


class _MetadataRing:
    """Pinned host and device slots for per-launch metadata, one ring per (device, stream).

    A launch copies its metadata into the next free slot and issues one async host-to-device
    copy; an event per slot says when the host side may be rewritten. The device side needs no
    event: the ring belongs to one stream, so a later copy into a slot runs after the kernel that
    read it. A busy slot or oversized metadata falls back to a fresh pinned buffer: a launch
    never waits.
    """

    SLOT_BYTES = 16384  # fits a copy's two records with 1952 block ids each
    NUM_SLOTS = 128

    def __init__(self, device_index: int):
        total = self.SLOT_BYTES * self.NUM_SLOTS
        self.host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        self.host_view = memoryview(self.host.numpy())
        self.device = torch.empty(total, dtype=torch.uint8, device=device_index)
        self.events = [None] * self.NUM_SLOTS
        self.next_slot = 0

    def upload(self, meta: bytes, stream: torch.cuda.Stream) -> int | None:
        """Device address of ``meta`` once the queued copy runs, or None if no slot is free."""
        slot = self.next_slot
        event = self.events[slot]
        if len(meta) > self.SLOT_BYTES or (event is not None and not event.query()):
            return None
        self.next_slot = (slot + 1) % self.NUM_SLOTS
        offset = slot * self.SLOT_BYTES
        self.host_view[offset: offset + len(meta)] = meta
        import cupy

        cupy.cuda.runtime.memcpyAsync(self.device.data_ptr() + offset, self.host.data_ptr() + offset, len(meta),
                                      cupy.cuda.runtime.memcpyHostToDevice, stream.cuda_stream)
        if event is None:
            event = self.events[slot] = torch.cuda.Event()
        event.record(stream)
        return self.device.data_ptr() + offset


_RINGS: dict[tuple[int, int], _MetadataRing] = {}


def _metadata(geometry: bytes, header: bytes, block_ids) -> bytes:
    """One launch record: [Geometry | pad to 128 | header (64 B) | block ids (int32)], padded to 16 bytes."""
    ids = block_ids.astype("<i4", copy=False).tobytes()
    pad = -(META_BLOCK_IDS_OFFSET + len(ids)) % 16
    return b"".join((geometry, bytes(META_HEADER_OFFSET - len(geometry)), header.ljust(64, b"\0"), ids, bytes(pad)))


def _upload(meta: bytes, device: torch.device, stream) -> tuple[int, object]:
    """Copy ``meta`` to the device on ``stream``; (device address, keep-alive)."""
    key = (device.index, stream.cuda_stream)
    ring = _RINGS.get(key)
    if ring is None:
        ring = _RINGS[key] = _MetadataRing(device.index)
    address = ring.upload(meta, stream)
    if address is not None:
        return address, ring
    # Fallback: a pinned copy of its own, allocated on ``stream`` so torch's caching allocators
    # keep both sides until the stream has used them.
    with torch.cuda.stream(stream):
        device_meta = torch.frombuffer(bytearray(meta), dtype=torch.uint8).pin_memory().to(device, non_blocking=True)
    return device_meta.data_ptr(), device_meta


def _upload_metadata(sel: Selection, geometry: bytes, header: bytes, stream) -> tuple[int, object]:
    """Copy [Geometry | header | block ids] to the device on ``stream``; (device address, keep-alive)."""
    return _upload(_metadata(geometry, header, sel.block_ids), sel.layout.device, stream)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(device_index: int, num_tiles: int, max_ctas: int | None) -> int:
    """One thread block per tile, or at most ``max_ctas`` blocks looping over the tiles."""
    if max_ctas is None:
        max_ctas = CTAS_PER_SM * _sm_count(device_index) if CTAS_PER_SM > 0 else num_tiles
    return max(1, min(num_tiles, max_ctas))


_CUPY_STREAMS: dict[tuple[int, int], object] = {}


def _cupy_stream(stream: torch.cuda.Stream, device_index: int):
    """A CuPy handle on the torch stream, made once per stream."""
    key = (device_index, stream.cuda_stream)
    handle = _CUPY_STREAMS.get(key)
    if handle is None:
        import cupy

        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            handle = cupy.cuda.Stream.from_external(stream)
        else:
            handle = cupy.cuda.ExternalStream(stream.cuda_stream, device_index)
        _CUPY_STREAMS[key] = handle
    return handle


def prepare(layout, stream: torch.cuda.Stream) -> None:
    """One-time setup off the critical path: compile the kernels, upload the plane table, make the stream's metadata ring."""
    device_index = layout.device.index
    load_kernels(device_index)
    _plane_table(layout)
    key = (device_index, stream.cuda_stream)
    if key not in _RINGS:
        _RINGS[key] = _MetadataRing(device_index)


@functools.lru_cache(maxsize=None)
def load_kernels(device_index: int) -> None:
    """Compile the module and load every kernel of it now (see cuda_driver.load_function: a
    lazily loaded kernel's first launch may synchronize the context)."""
    import logging

    for name in KERNEL_NAMES:
        _kernel(device_index, name)
    try:
        with _on_device(device_index):
            cuda_driver.ensure_context(device_index)
            for name in KERNEL_NAMES:
                function = _function_handle(device_index, name)
                if function is not None:
                    cuda_driver.load_function(function)
    except cuda_driver.CudaDriverError as exc:
        logging.getLogger("kvlink").warning("kvlink: kernels left to load at first launch (%s)", exc)


CHECKSUM_MAX_CTAS_PER_SM = 4


def _checksum_kernel(verify: bool) -> str:
    return kernel_name("kvlink_checksum", 1 if verify else 0)


def launch_checksum(device_index: int, chunk_address: int, payload_offset: int, payload_bytes: int,
                    checksum_offset: int, scratch_address: int, stream: torch.cuda.Stream, *,
                    verify_into: int = 0) -> None:
    """Queue on ``stream`` the payload checksum of the chunk at ``chunk_address`` (csrc:
    kvlink_checksum): written into its header, or, given ``verify_into`` (the address of an int32
    flag), checked against it: a mismatch spoils the chunk's magic word and sets the flag.
    ``scratch_address``: three int32 words, zero, that no other checksum uses meanwhile (left zero
    after)."""
    grid = max(1, min(-(-payload_bytes // (4 * THREADS)), CHECKSUM_MAX_CTAS_PER_SM * _sm_count(device_index)))
    _launch_kernel(device_index, _checksum_kernel(bool(verify_into)), grid,
                   (chunk_address, payload_offset, payload_bytes, checksum_offset, scratch_address, verify_into), stream)


# The inline pack/unpack kernels (metadata as the launch's parameter): on unless KVLINK_INLINE_LAUNCH=0;
# a launch the driver refuses turns them off for the process (the uploaded-metadata kernels take over).
_INLINE_LAUNCH = [os.environ.get("KVLINK_INLINE_LAUNCH", "1") == "1"]
_INLINE_OFF_REASON = ["KVLINK_INLINE_LAUNCH=0" if not _INLINE_LAUNCH[0] else ""]
_INLINE_KERNELS = {(kind, vec): kernel_name(f"kvlink_{kind}_inline", vec) for kind in ("pack", "unpack")
                   for vec in VEC_WIDTHS}


def inline_launch_state() -> str:
    """"on", or "off: <why>": whether pack/unpack pass their metadata as launch parameters (for reports)."""
    return "on" if _INLINE_LAUNCH[0] else f"off: {_INLINE_OFF_REASON[0]}"


def _inline_off(reason: str) -> bool:
    if _INLINE_LAUNCH[0]:
        import logging
        logging.getLogger("kvlink").warning("kvlink: inline pack/unpack launches off (%s); uploading metadata instead",
                                            reason)
    _INLINE_LAUNCH[0] = False
    _INLINE_OFF_REASON[0] = reason
    return False


_DRIVER_EVENTS = [os.environ.get("KVLINK_DRIVER_EVENTS", "1") == "1"]


def completion_event(device_index: int, stream: torch.cuda.Stream):
    """An event recorded on ``stream`` now, for a pull's completion: a pooled driver event
    (cuda_driver.CompletionEvent: one driver call), or torch's where the driver's is not to be had."""
    if _DRIVER_EVENTS[0]:
        try:
            cuda_driver.ensure_context(device_index)
            event = cuda_driver.CompletionEvent.take(device_index)
            event.record(stream.cuda_stream)
            return event
        except cuda_driver.CudaDriverError as exc:
            import logging
            logging.getLogger("kvlink").warning("kvlink: completion events through torch (driver events: %s)", exc)
            _DRIVER_EVENTS[0] = False
    event = torch.cuda.Event()
    event.record(stream)
    return event


def current_stream_handle(device_index: int) -> int:
    """The CUstream handle of the current torch stream of ``device_index``, without building a
    torch.cuda.Stream object (torch.cuda.current_stream() costs microseconds a call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


class _StatusWords:
    """Status words for unpacks given none, one of its own per unpack: views of an int32 block
    allocated for the stream 256 at a time (a torch allocation per unpack costs more than the
    launch). The block is freed, behind the stream's work, once every view of it is gone."""

    BLOCK = 256

    def __init__(self, device_index: int, stream: torch.cuda.Stream):
        self.device, self.stream, self.words = torch.device("cuda", device_index), stream, []

    def take(self) -> torch.Tensor:
        try:
            return self.words.pop()
        except IndexError:
            pass
        block = torch.empty(self.BLOCK, dtype=torch.int32, device=self.device)
        block.record_stream(self.stream)  # allocated for the current stream, written on ours
        words = list(block.split(1))
        words.reverse()
        self.words = words
        return words.pop()


_STATUS_WORDS: dict[tuple[int, int], _StatusWords] = {}


def _status_word(device_index: int, stream_handle: int, stream) -> torch.Tensor:
    pool = _STATUS_WORDS.get((device_index, stream_handle))
    if pool is None:
        pool = _STATUS_WORDS[(device_index, stream_handle)] = _StatusWords(
            device_index, stream if stream is not None else torch.cuda.current_stream(device_index))
    return pool.take()


def record_bytes(num_ids: int) -> int:
    """Bytes of one metadata record (_metadata's layout) holding ``num_ids`` block ids."""
    return -(-(META_BLOCK_IDS_OFFSET + 4 * num_ids) // 16) * 16


def _write_record(view: memoryview, offset: int, geometry: bytes | None, header: bytes, block_ids) -> None:
    """One metadata record, laid out as _metadata() does, into ``view`` at ``offset``: the Geometry
    record, the header and the block ids, each where given. What lies between them is left as it
    was: no kernel reads it."""
    if geometry is not None:
        view[offset:offset + GEOMETRY_STRUCT.size] = geometry
    if header:
        view[offset + META_HEADER_OFFSET:offset + META_BLOCK_IDS_OFFSET] = header
    if block_ids is not None:
        start = offset + META_BLOCK_IDS_OFFSET
        view[start:start + 4 * block_ids.shape[0]] = block_ids.tobytes()


class BoxLauncher:
    """Launches the inline pack or unpack kernel for boxes of one request (the NCCL pipeline's
    chunks): the request's block ids are written once, into a parameter buffer of its own; a box
    of a shape seen before costs its plan's lookup, its addresses and one driver call (no
    Selection is made for it).

    ``usable`` is False where the inline kernels do not apply (fp8 on the wire, more than
    INLINE_MAX_IDS blocks, inline launches off): the caller then takes pack/unpack_selection.
    """

    def __init__(self, kind: str, sel: Selection, *, status_ptr: int = 0, max_ctas: int | None = None):
        if kind not in ("pack", "unpack"):
            raise ValueError(f"kind must be 'pack' or 'unpack', got {kind!r}")
        self.kind, self.sel, self.status_ptr, self.max_ctas = kind, sel, status_ptr, max_ctas
        self.usable = _INLINE_LAUNCH[0] and not sel.wire_fp8 and sel.block_ids.shape[0] <= INLINE_MAX_IDS
        if self.usable:
            self.params = cuda_driver.ParamBuffer(CHUNK_PARAMS_BYTES)
            _write_record(self.params.view, CHUNK_PARAMS_HEADER.size, None, b"", sel.block_ids)
            self.plans = _layout_facts(sel.layout)["plans"]
            self.table = _planes_address(sel) - 8 * sel.layer_start * sel.layout.num_kv  # layer 0's plane
            self.plane_step = 8 * sel.layout.num_kv

    def launch(self, box: tuple[int, int, int, int], chunk_ptr: int, stream_handle: int) -> bool:
        """Queue the kernel for ``box`` (layer_start, layer_stop, token_start, token_stop) of the
        request and the chunk at ``chunk_ptr`` on ``stream_handle``; False if it could not (the
        caller falls back)."""
        if not self.usable:
            return False
        sel = self.sel
        # the key of _chunk_plan, made from the box (no status word of its own: the request's)
        plan = self.plans.get((box[0], box[1], box[2], box[3], sel.head_start, sel.head_stop, chunk_ptr & 15, False))
        if plan is None:
            plan = _chunk_plan(sel.box(box[:2], box[2:]), chunk_ptr, False)
        self.usable = _launch_inline(self.kind, self.params, plan, self.table + self.plane_step * box[0], chunk_ptr,
                                     None, self.status_ptr, self.max_ctas, stream_handle, sel.layout.device.index)
        return self.usable


def _launch_inline(kind: str, params, plan: tuple, planes: int, chunk_ptr: int, header: bytes | None,
                   status_ptr: int, max_ctas: int | None, stream_handle: int, device_index: int) -> bool:
    """Write a launch plan's Geometry, the header (default: the plan's) and the addresses into
    ``params`` (its block ids are there already) and launch the inline kernel; False (inline
    launches now off) if it could not."""
    geometry, own_header, vec, num_tiles = plan
    function = _function_handle(device_index, _INLINE_KERNELS[kind, vec])
    if function is None:
        return _inline_off("this CuPy gives no CUfunction handles")
    view = params.view
    CHUNK_PARAMS_HEADER.pack_into(view, 0, planes, chunk_ptr, status_ptr)
    _write_record(view, CHUNK_PARAMS_HEADER.size, geometry, header or own_header, None)
    try:
        cuda_driver.ensure_context(device_index)
        cuda_driver.launch_with_params(function, _grid(device_index, num_tiles, max_ctas), THREADS, params,
                                       stream_handle)
    except cuda_driver.CudaDriverError as exc:
        return _inline_off(str(exc))
    return True


def _launch_record(kind: str, params, sel: Selection, chunk_ptr: int, header: bytes | None, status_ptr: int,
                   status_overwrite: bool, max_ctas: int | None, stream_handle: int, block_ids=None) -> bool:
    """The inline launch of ``sel``'s box (its plan from the layout's cache), writing ``block_ids``
    into ``params`` first unless it holds them already."""
    if block_ids is not None:
        _write_record(params.view, CHUNK_PARAMS_HEADER.size, None, b"", block_ids)
    return _launch_inline(kind, params, _chunk_plan(sel, chunk_ptr, status_overwrite), _planes_address(sel),
                          chunk_ptr, header, status_ptr, max_ctas, stream_handle, sel.layout.device.index)


def launch(kind: str, sel: Selection, chunk: torch.Tensor, stream: torch.cuda.Stream | None,
           header: bytes | None = None, *, status: torch.Tensor | None = None, max_ctas: int | None = None,
           cache_scale: float = 1.0) -> torch.Tensor | None:
    """Launch ``kvlink_pack`` or ``kvlink_unpack`` (their fp8 forms for an fp8 selection) on ``stream``
    (None: the device's current stream). ``header``: the chunk's header bytes (default: ``sel``'s).

    Records of up to INLINE_MAX_IDS block ids travel as the launch's parameter (the _inline
    kernels: one driver call); others, and fp8, are uploaded through the stream's metadata ring.
    For unpack, returns the int32 status word: ``status`` if given (only ever set to 1), else a
    new one the kernel sets to 0 or 1.
    """
    if kind not in ("pack", "unpack"):
        raise ValueError(f"kind must be 'pack' or 'unpack', got {kind!r}")
    device_index = sel.layout.device.index
    own_status = kind == "unpack" and status is None
    chunk_ptr = chunk.data_ptr()
    with _on_device(device_index):
        if _INLINE_LAUNCH[0] and not sel.wire_fp8 and sel.block_ids.shape[0] <= INLINE_MAX_IDS:
            handle = stream.cuda_stream if stream is not None else current_stream_handle(device_index)
            if own_status:
                status = _status_word(device_index, handle, stream)
            if _launch_record(kind, cuda_driver.param_buffer(CHUNK_PARAMS_BYTES), sel, chunk_ptr, header,
                              0 if status is None else status.data_ptr(), own_status, max_ctas, handle,
                              sel.block_ids):
                return status
        if stream is None:
            stream = torch.cuda.current_stream(device_index)
        if header is None:
            header = header_bytes(sel)
        name, geometry, num_tiles = _launch_plan(kind, sel, chunk_ptr, own_status, cache_scale)
        if sel.wire_fp8 and max_ctas:
            max_ctas *= 2  # NOTE: quantizing is arithmetic per element: twice the SM budget of a plain copy
        meta_address, _keep_alive = _upload_metadata(sel, geometry, header, stream)
        args = [meta_address, _planes_address(sel), chunk_ptr]
        if kind == "unpack":
            if status is None:
                status = torch.empty(1, dtype=torch.int32, device=sel.layout.device)
                status.record_stream(stream)  # may be allocated for another stream; keep it until ours is done
            args.append(status.data_ptr())
        _launch_kernel(device_index, name, _grid(device_index, num_tiles, max_ctas), tuple(args), stream)
    return status


def _launch_plan(kind: str, sel: Selection, chunk_ptr: int, own_status: bool,
                 cache_scale: float = 1.0, inline: bool = False) -> tuple[str, bytes, int]:
    """(kernel name, Geometry record, work items for the grid) of a pack/unpack launch; pure Python.

    ``inline``: name the kernel taking its metadata as the launch's parameter (not for fp8).
    """
    if kind not in ("pack", "unpack"):
        raise ValueError(f"kind must be 'pack' or 'unpack', got {kind!r}")
    if sel.wire_fp8:
        if inline:
            raise ValueError("fp8 kernels take uploaded metadata only")
        geometry, num_rows = _fp8_geometry(sel, own_status, cache_scale)
        lanes = _fp8_vectorized(sel, chunk_ptr)
        code = DTYPE_CODES[sel.layout.dtype]
        if lanes:  # template arguments: the cache's element type, lanes per row
            return (kernel_name(f"kvlink_{kind}_fp8_vec", code, lanes), geometry,
                    -(-num_rows // (THREADS // lanes * FP8_ROWS)))
        # the template argument: the cache's element type
        return kernel_name(f"kvlink_{kind}_fp8", code), geometry, -(-num_rows // WARPS)
    geometry, vec, num_tiles = _geometry(sel, chunk_ptr, own_status)
    return (_INLINE_KERNELS[kind, vec] if inline else kernel_name(f"kvlink_{kind}", vec)), geometry, num_tiles


def _copy_kernel(vec: int, inline: bool) -> str:
    """The copy kernel for ``vec``-byte vectors: metadata as launch parameters (inline) or uploaded."""
    return kernel_name("kvlink_copy_inline" if inline else "kvlink_copy", vec)


_COPY_INLINE_KERNELS = {vec: _copy_kernel(vec, inline=True) for vec in VEC_WIDTHS}


def _inline_copy_params(src_meta: bytes, dst_meta: bytes, src_planes: int, dst_planes: int) -> bytes | None:
    """The CopyParams bytes of kvlink_copy_inline, or None when the two records do not fit."""
    if len(src_meta) + len(dst_meta) > INLINE_META_BYTES:
        return None
    return b"".join((INLINE_PARAMS_HEADER.pack(src_planes, dst_planes, 0, len(src_meta)), src_meta, dst_meta,
                     bytes(INLINE_META_BYTES - len(src_meta) - len(dst_meta))))


def write_copy_params(view: memoryview, src: Selection, dst: Selection, src_geometry: bytes, dst_geometry: bytes,
                      src_planes: int, dst_planes: int) -> None:
    """kvlink_copy_inline's CopyParams written in place: what _inline_copy_params() builds from
    _metadata() records, without building them (the ipc pull's per-request path). The caller
    checked that both records fit (record_bytes)."""
    src_bytes = record_bytes(src.block_ids.shape[0])
    INLINE_PARAMS_HEADER.pack_into(view, 0, src_planes, dst_planes, 0, src_bytes)
    _write_record(view, INLINE_PARAMS_HEADER.size, src_geometry, b"", src.block_ids)
    _write_record(view, INLINE_PARAMS_HEADER.size + src_bytes, dst_geometry, b"", dst.block_ids)


def launch_copy(src: Selection, dst: Selection, stream: torch.cuda.Stream, *, max_ctas: int | None = None,
                stamps: dict | None = None) -> None:
    """Launch ``kvlink_copy``: the box ``src`` (any cache addressable from this GPU, a peer's
    included) into the box ``dst`` of a cache on this GPU, on ``stream``.

    Requests of up to ~450 blocks a side pass their metadata as the launch's parameters
    (``kvlink_copy_inline``): one driver call, no upload. ``stamps``, if given, receives host
    times (perf_counter) after each step, for profiling.
    """
    device_index = dst.layout.device.index
    src_geometry, dst_geometry, vec, num_tiles = _copy_plan(src, dst)
    src_planes, dst_planes = _planes_address(src), _planes_address(dst)
    grid = _grid(device_index, num_tiles, max_ctas)
    fits = record_bytes(src.block_ids.shape[0]) + record_bytes(dst.block_ids.shape[0]) <= INLINE_META_BYTES
    function = _function_handle(device_index, _COPY_INLINE_KERNELS[vec]) if fits and _DRIVER_LAUNCH[0] else None
    if stamps is not None:
        stamps["geometry"] = time.perf_counter()
    with _on_device(device_index):
        if function is not None:
            params = cuda_driver.param_buffer(INLINE_PARAMS_BYTES)
            write_copy_params(params.view, src, dst, src_geometry, dst_geometry, src_planes, dst_planes)
            cuda_driver.launch_with_params(function, grid, THREADS, params, stream.cuda_stream)
        else:
            src_meta = _metadata(src_geometry, b"", src.block_ids)
            dst_meta = _metadata(dst_geometry, b"", dst.block_ids)
            meta_address, _keep_alive = _upload(src_meta + dst_meta, dst.layout.device, stream)
            args = (meta_address, src_planes, meta_address + len(src_meta), dst_planes)
            _launch_kernel(device_index, _copy_kernel(vec, inline=False), grid, args, stream)
    if stamps is not None:
        stamps["launch"] = time.perf_counter()


_NULL_CONTEXT = contextlib.nullcontext()


def _on_device(device_index: int):
    """``torch.cuda.device(device_index)``, or nothing when it is current already (the usual case)."""
    # NOTE: torch._C._cuda_getDevice is torch.cuda.current_device() without its lazy-init check:
    # a launch has a CUDA tensor in hand, so CUDA is initialized
    get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
    if get_device() == device_index:
        return _NULL_CONTEXT
    return torch.cuda.device(device_index)
