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


def pack_reference(sel: Selection, chunk: torch.Tensor) -> None:
    """Write ``sel``'s header and payload into ``chunk`` (uint8, at least ``sel.chunk_bytes``)."""
    header = ChunkHeader.for_selection(sel).to_bytes()
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


def unpack_reference(sel: Selection, chunk: torch.Tensor, *, check_header: bool = True) -> None:
    """Scatter ``chunk`` into ``sel``'s blocks; with ``check_header``, refuse a mismatched chunk before writing."""
    if check_header:
        received = ChunkHeader.from_bytes(chunk[:HEADER_BYTES].cpu().numpy().tobytes())
        received.check_matches(ChunkHeader.for_selection(sel))
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
