"""Pack and unpack in plain torch, on CPU or GPU.

The oracle for every kernel test, and the path used where no GPU (or no CuPy) is present.
Works on bytes (``uint8`` views of each plane), so every dtype, fp8 included, is copied
bit-exactly. Callers validate first (:func:`kvlink.selection.select`); these functions
trust their Selection.
"""

from __future__ import annotations

import numpy as np
import torch

from kvlink.selection import HEADER_BYTES, Selection
from kvlink.wire import ChunkHeader


def _token_positions(sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset in block) for each selected token, on the layout's device."""
    blocks, offsets = _numpy_positions(sel)
    device = sel.layout.device
    return torch.from_numpy(blocks).to(device, torch.int64), torch.from_numpy(offsets).to(device, torch.int64)


def _byte_plane(sel: Selection, plane_idx: int) -> torch.Tensor:
    """``[block, token, head, row_bytes]`` uint8 view of one plane."""
    plane = sel.layout.planes[plane_idx]
    return plane.view(torch.uint8) if plane.dtype != torch.uint8 else plane


def _numpy_planes(sel: Selection) -> list[np.ndarray]:
    """Byte views of a CPU layout's planes as numpy arrays (made once; numpy indexing costs a few us, torch's tens)."""
    layout = sel.layout
    planes = layout.__dict__.get("_numpy_planes")
    if planes is None:
        planes = [_byte_plane(sel, i).numpy() for i in range(layout.num_planes)]
        object.__setattr__(layout, "_numpy_planes", planes)
    return planes


def _numpy_positions(sel: Selection) -> tuple[np.ndarray, np.ndarray]:
    token_idx = np.arange(sel.token_start, sel.token_stop)
    return sel.block_ids[token_idx // sel.layout.block_size], token_idx % sel.layout.block_size


FP8_MAX = 448.0  # largest finite e4m3 value


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 wire: rows ``[..., head_dim]`` -> (e4m3 bytes ``[..., head_dim]`` uint8, float32 scales ``[...]``).

    ``s = max|x| / 448`` is stored; ``q = e4m3(clamp(x * m, -448, 448))`` with ``m = 448 / max|x|``
    (round to nearest even; q = 0 for an all-zero row). The CUDA kernels do the same float32
    operations, so the two agree bit for bit on finite inputs.
    """
    x = rows.float()
    # NOTE: divisions by full tensors, never by a Python scalar: torch may turn x / scalar into
    # x * (1 / scalar) (CUDA does), which rounds differently from the kernel's true division.
    amax = x.abs().amax(-1)
    limit = torch.full_like(amax, FP8_MAX)
    scale = amax / limit
    multiplier = torch.where(amax > 0, limit / torch.where(amax > 0, amax, limit), torch.zeros_like(amax))
    q = (x * multiplier[..., None]).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).view(torch.uint8), scale


def inverse_cache_scale(cache_scale: float) -> float:
    """The float32 ``1 / cache_scale`` the kernels multiply by (an e4m3 cache stores value / scale)."""
    return float(np.float32(1.0) / np.float32(cache_scale))


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, cache_scale: float = 1.0):
    """fp8 wire: e4m3 bytes and their row scales -> rows of ``dtype`` (an e4m3 cache: times 1 / ``cache_scale``)."""
    x = values.view(torch.float8_e4m3fn).float() * scales[..., None]
    if dtype == torch.float8_e4m3fn:
        return (x * torch.full_like(x, inverse_cache_scale(cache_scale))).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def _fp8_regions(sel: Selection, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[planes, tokens, heads, head_dim]`` uint8, scales ``[planes, tokens, heads]`` float32) of an fp8 chunk."""
    rows = sel.num_planes * sel.num_selected_tokens * sel.num_selected_heads
    shape = (sel.num_planes, sel.num_selected_tokens, sel.num_selected_heads)
    start = HEADER_BYTES
    values = chunk[start: start + rows * sel.layout.head_dim].view(*shape, sel.layout.head_dim)
    scales = chunk[start + rows * sel.layout.head_dim: start + sel.payload_bytes].view(torch.float32).view(shape)
    return values, scales


def _plane_rows(sel: Selection, plane_idx: int, blocks, offsets) -> tuple[torch.Tensor, tuple]:
    plane = sel.layout.planes[plane_idx]
    return plane, (blocks, offsets, slice(sel.head_start, sel.head_stop))


def pack_reference(sel: Selection, chunk: torch.Tensor) -> None:
    """Write ``sel``'s header and payload into ``chunk`` (uint8, at least ``sel.chunk_bytes``)."""
    header = ChunkHeader.for_selection(sel).to_bytes()
    if sel.wire_fp8:
        chunk[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        values, scales = _fp8_regions(sel, chunk)
        blocks, offsets = _token_positions(sel)
        for i in range(sel.num_planes):
            plane, index = _plane_rows(sel, sel.first_plane + i, blocks, offsets)
            values[i], scales[i] = quantize_rows(plane[index])
        return
    if chunk.device.type == "cpu":
        out = chunk.numpy()
        out[:HEADER_BYTES] = np.frombuffer(header, dtype=np.uint8)
        payload = out[HEADER_BYTES: sel.chunk_bytes].reshape(sel.num_planes, sel.num_selected_tokens,
                                                             sel.num_selected_heads, sel.layout.row_bytes)
        blocks, offsets = _numpy_positions(sel)
        planes = _numpy_planes(sel)
        for i in range(sel.num_planes):
            payload[i] = planes[sel.first_plane + i][blocks, offsets, sel.head_start: sel.head_stop]
        return
    chunk[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    blocks, offsets = _token_positions(sel)
    payload = chunk[HEADER_BYTES: sel.chunk_bytes].view(sel.num_planes, sel.num_selected_tokens,
                                                        sel.num_selected_heads, sel.layout.row_bytes)
    for i in range(sel.num_planes):
        plane = _byte_plane(sel, sel.first_plane + i)
        payload[i].copy_(plane[blocks, offsets, sel.head_start: sel.head_stop])


def unpack_reference(sel: Selection, chunk: torch.Tensor, *, check_header: bool = True,
                     cache_scale: float = 1.0) -> None:
    """Scatter ``chunk`` into ``sel``'s blocks; with ``check_header``, refuse a mismatched chunk before writing."""
    if check_header:
        received = ChunkHeader.from_bytes(chunk[:HEADER_BYTES].cpu().numpy().tobytes())
        received.check_matches(ChunkHeader.for_selection(sel))
    if sel.wire_fp8:
        values, scales = _fp8_regions(sel, chunk)
        blocks, offsets = _token_positions(sel)
        for i in range(sel.num_planes):
            plane, index = _plane_rows(sel, sel.first_plane + i, blocks, offsets)
            rows = dequantize_rows(values[i], scales[i], plane.dtype, cache_scale)
            if plane.dtype == torch.float8_e4m3fn:  # index_put has no fp8 kernels: write the bytes
                plane, rows = plane.view(torch.uint8), rows.view(torch.uint8)
            plane[index] = rows
        return
    if chunk.device.type == "cpu":
        payload = chunk.numpy()[HEADER_BYTES: sel.chunk_bytes].reshape(
            sel.num_planes, sel.num_selected_tokens, sel.num_selected_heads, sel.layout.row_bytes)
        blocks, offsets = _numpy_positions(sel)
        planes = _numpy_planes(sel)
        for i in range(sel.num_planes):
            planes[sel.first_plane + i][blocks, offsets, sel.head_start: sel.head_stop] = payload[i]
        return
    blocks, offsets = _token_positions(sel)
    payload = chunk[HEADER_BYTES: sel.chunk_bytes].view(sel.num_planes, sel.num_selected_tokens,
                                                        sel.num_selected_heads, sel.layout.row_bytes)
    for i in range(sel.num_planes):
        plane = _byte_plane(sel, sel.first_plane + i)
        plane[blocks, offsets, sel.head_start: sel.head_stop] = payload[i]
