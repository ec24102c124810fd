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

from kvlink.layout import DTYPE_CODES
from kvlink.reference import inverse_cache_scale
from kvlink.selection import FP8_DESTINATION_DTYPES, FP8_SOURCE_DTYPES, Selection
from kvlink.wire import HEADER_CHECK_MASK

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
KERNEL_KINDS = ("pack", "unpack", "copy", "copy_inline")
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
        from kvlink import cuda_driver
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
    that holds for any subset of planes.
    """
    facts = layout.__dict__.get("_kernel_facts")
    if facts is None:
        ptrs = layout.plane_ptrs()
        facts = {"ptrs": ptrs, "alignment": functools.reduce(
            math.gcd, ptrs, math.gcd(layout.block_stride, layout.token_stride, layout.head_stride))}
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
    return table


def _row_split(sels: tuple[Selection, ...], extra_alignment: int) -> tuple[int, int, int]:
    """(vector width, row bytes, heads per row) valid for every selection in ``sels``.

    A token's selected heads merge into one row when they sit back to back in every cache:
    fewer divisions per vector, and the common NHD case becomes runs of heads*head_dim bytes.
    """
    first = sels[0]
    heads = first.num_selected_heads
    row_bytes = first.layout.row_bytes
    heads_per_token = heads
    if heads == 1 or all(s.layout.head_stride == s.layout.row_bytes for s in sels):
        row_bytes *= heads
        heads_per_token = 1
    alignment = math.gcd(extra_alignment, row_bytes, *(_layout_facts(s.layout)["alignment"] for s in sels))
    vec = next(w for w in VEC_WIDTHS if alignment % w == 0)
    return vec, row_bytes, heads_per_token


def _geometry_record(sel: Selection, vec: int, row_bytes: int, heads_per_token: int,
                     status_overwrite: bool) -> tuple[bytes, int]:
    """The Geometry record's bytes and the number of tiles for ``sel`` cut into ``vec``-byte vectors."""
    layout = sel.layout
    vecs_per_row = row_bytes // vec
    vecs_per_plane = sel.num_selected_tokens * heads_per_token * vecs_per_row
    if vecs_per_plane >= 2**31:
        raise ValueError(
            f"one plane of this chunk is {sel.plane_bytes} bytes in {vec}-byte vectors, over the kernel's 2**31 "
            "vectors; split the request into several chunks (tokens=...)"
        )
    tiles_per_plane = -(-vecs_per_plane // (THREADS * UNROLL))
    num_tiles = tiles_per_plane * sel.num_planes
    if num_tiles >= 2**31:
        raise ValueError(f"chunk of {sel.payload_bytes} bytes has too many tiles for one launch; split it (tokens=...)")
    # field order of GEOMETRY_DTYPE
    record = (
        layout.block_stride, layout.token_stride, layout.head_stride, sel.plane_bytes,
        sel.num_planes, vecs_per_plane,
        vecs_per_row, *fast_divisor(vecs_per_row),
        heads_per_token, *fast_divisor(heads_per_token),
        layout.block_size, *fast_divisor(layout.block_size),
        sel.token_start, sel.head_start, HEADER_CHECK_MASK,
        tiles_per_plane, *fast_divisor(tiles_per_plane), num_tiles, int(status_overwrite), layout.head_dim, 0,
    )
    return GEOMETRY_STRUCT.pack(*record), num_tiles


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
    vec, row_bytes, heads_per_token = _row_split((sel,), math.gcd(chunk_ptr + 64, sel.plane_bytes))
    record, num_tiles = _geometry_record(sel, vec, row_bytes, heads_per_token, status_overwrite)
    return record, vec, num_tiles


def _copy_geometry(src: Selection, dst: Selection) -> tuple[bytes, bytes, int, int]:
    """Source and destination Geometry records of one copy launch (same vectors on both sides)."""
    if (src.num_planes, src.num_selected_tokens, src.num_selected_heads) != \
            (dst.num_planes, dst.num_selected_tokens, dst.num_selected_heads) or \
            src.layout.row_bytes != dst.layout.row_bytes:
        raise ValueError(f"copy boxes differ: source {src.num_planes} planes x {src.num_selected_tokens} tokens x "
                         f"{src.num_selected_heads} heads, destination {dst.num_planes} x {dst.num_selected_tokens} "
                         f"x {dst.num_selected_heads}")
    vec, row_bytes, heads_per_token = _row_split((src, dst), 0)
    src_record, num_tiles = _geometry_record(src, vec, row_bytes, heads_per_token, False)
    dst_record, _ = _geometry_record(dst, vec, row_bytes, heads_per_token, False)
    return src_record, dst_record, vec, num_tiles


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


def _grid(sel: Selection, num_tiles: int, max_ctas: int | None) -> int:
    """One thread block per tile, or at most ``max_ctas`` blocks looping over the tiles."""
    if max_ctas is None:
        max_ctas = CTAS_PER_SM * _sm_count(sel.layout.device.index) if CTAS_PER_SM > 0 else num_tiles
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
    for name in KERNEL_NAMES:
        _kernel(device_index, name)
    _plane_table(layout)
    key = (device_index, stream.cuda_stream)
    if key not in _RINGS:
        _RINGS[key] = _MetadataRing(device_index)


def launch(kind: str, sel: Selection, chunk: torch.Tensor, stream: torch.cuda.Stream, header: bytes,
           *, status: torch.Tensor | None = None, max_ctas: int | None = None,
           cache_scale: float = 1.0) -> torch.Tensor | None:
    """Launch ``kvlink_pack`` or ``kvlink_unpack`` (their fp8 forms for an fp8 selection) on ``stream``.

    For unpack, returns the int32 status word: ``status`` if given (only ever set to 1), else a
    new one the kernel sets to 0 or 1.
    """
    device_index = sel.layout.device.index
    own_status = kind == "unpack" and status is None
    name, geometry, num_tiles = _launch_plan(kind, sel, chunk.data_ptr(), own_status, cache_scale)
    if sel.wire_fp8 and max_ctas:
        max_ctas *= 2  # NOTE: quantizing is arithmetic per element: twice the SM budget of a plain copy
    with _on_device(device_index):
        meta_address, _keep_alive = _upload_metadata(sel, geometry, header, stream)
        planes_ptr = _plane_table(sel.layout).data_ptr() + 8 * sel.first_plane
        args = [meta_address, planes_ptr, chunk.data_ptr()]
        if kind == "unpack":
            if own_status:
                status = torch.empty(1, dtype=torch.int32, device=sel.layout.device)
                status.record_stream(stream)  # may be allocated for another stream; keep it until ours is done
            args.append(status.data_ptr())
        _launch_kernel(device_index, name, _grid(sel, num_tiles, max_ctas), tuple(args), stream)
    return status


def _launch_plan(kind: str, sel: Selection, chunk_ptr: int, own_status: bool,
                 cache_scale: float = 1.0) -> tuple[str, bytes, int]:
    """(kernel name, Geometry record, work items for the grid) of a pack/unpack launch; pure Python."""
    if kind not in ("pack", "unpack"):
        raise ValueError(f"kind must be 'pack' or 'unpack', got {kind!r}")
    if sel.wire_fp8:
        geometry, num_rows = _fp8_geometry(sel, own_status, cache_scale)
        lanes = _fp8_vectorized(sel, chunk_ptr)
        code = DTYPE_CODES[sel.layout.dtype]
        if lanes:  # template arguments: the cache's element type, lanes per row
            return (kernel_name(f"kvlink_{kind}_fp8_vec", code, lanes), geometry,
                    -(-num_rows // (THREADS // lanes * FP8_ROWS)))
        # the template argument: the cache's element type
        return kernel_name(f"kvlink_{kind}_fp8", code), geometry, -(-num_rows // WARPS)
    geometry, vec, num_tiles = _geometry(sel, chunk_ptr, own_status)
    return kernel_name(f"kvlink_{kind}", vec), geometry, num_tiles


def _copy_kernel(vec: int, inline: bool) -> str:
    """The copy kernel for ``vec``-byte vectors: metadata as launch parameters (inline) or uploaded."""
    return kernel_name("kvlink_copy_inline" if inline else "kvlink_copy", vec)


def _inline_copy_params(src_meta: bytes, dst_meta: bytes, src_planes: int, dst_planes: int) -> bytes | None:
    """The CopyParams bytes of kvlink_copy_inline, or None when the two records do not fit."""
    if len(src_meta) + len(dst_meta) > INLINE_META_BYTES:
        return None
    return b"".join((INLINE_PARAMS_HEADER.pack(src_planes, dst_planes, 0, len(src_meta)), src_meta, dst_meta,
                     bytes(INLINE_META_BYTES - len(src_meta) - len(dst_meta))))


def launch_copy(src: Selection, dst: Selection, stream: torch.cuda.Stream, *, max_ctas: int | None = None,
                stamps: dict | None = None) -> None:
    """Launch ``kvlink_copy``: the box ``src`` (any cache addressable from this GPU, a peer's
    included) into the box ``dst`` of a cache on this GPU, on ``stream``.

    Requests of up to ~450 blocks a side pass their metadata as the launch's parameters
    (``kvlink_copy_inline``): one driver call, no upload. ``stamps``, if given, receives host
    times (perf_counter) after each step, for profiling.
    """
    device_index = dst.layout.device.index
    src_geometry, dst_geometry, vec, num_tiles = _copy_geometry(src, dst)
    src_meta = _metadata(src_geometry, b"", src.block_ids)
    dst_meta = _metadata(dst_geometry, b"", dst.block_ids)
    src_planes = _plane_table(src.layout).data_ptr() + 8 * src.first_plane
    dst_planes = _plane_table(dst.layout).data_ptr() + 8 * dst.first_plane
    grid = _grid(dst, num_tiles, max_ctas)
    params = _inline_copy_params(src_meta, dst_meta, src_planes, dst_planes)
    function = _function_handle(device_index, _copy_kernel(vec, inline=True)) \
        if params is not None and _DRIVER_LAUNCH[0] else None
    if stamps is not None:
        stamps["geometry"] = time.perf_counter()
    with _on_device(device_index):
        if function is not None:
            from kvlink import cuda_driver
            cuda_driver.launch_kernel_with_struct(function, grid, THREADS, params, stream.cuda_stream)
        else:
            meta_address, _keep_alive = _upload(src_meta + dst_meta, dst.layout.device, stream)
            args = (meta_address, src_planes, meta_address + len(src_meta), dst_planes)
            _launch_kernel(device_index, _copy_kernel(vec, inline=False), grid, args, stream)
    if stamps is not None:
        stamps["launch"] = time.perf_counter()


def _on_device(device_index: int):
    """``torch.cuda.device(device_index)``, or nothing when it is current already (the usual case)."""
    if torch.cuda.current_device() == device_index:
        return contextlib.nullcontext()
    return torch.cuda.device(device_index)
