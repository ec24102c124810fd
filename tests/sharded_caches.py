"""Tensor-parallel caches for the resharding tests, built from one global "truth" through engine_access.

The truth is the model's whole cache, ``[L, kv, B, N, H, D]`` (every KV head), random bytes. A
rank's cache holds the truth's heads for that rank, written through the engine's own indexing
(tests/engine_access.py), so neither the fixture nor the check goes through kvlink's layouts.
"""

from __future__ import annotations

import torch

from engine_access import as_bytes, engine_index, random_fill
from kvlink import presets


def make_truth(seed: int, *, num_layers: int, num_kv: int, num_blocks: int, block_size: int, num_heads: int,
               head_dim: int, dtype: torch.dtype = torch.bfloat16, finite: bool = False) -> torch.Tensor:
    """Random bytes viewed as ``dtype``, shape ``[L, kv, B, N, H, D]`` (NaN patterns included: compare bytes).

    ``finite``: normal values instead (fp8 on the wire has no encoding for NaN).
    """
    if finite:
        generator = torch.Generator().manual_seed(seed)
        shape = (num_layers, num_kv, num_blocks, block_size, num_heads, head_dim)
        return (torch.randn(shape, generator=generator) *
                torch.exp2(torch.randint(-4, 5, shape[:-1], generator=generator).float())[..., None]).to(dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shape = (num_layers, num_kv, num_blocks, block_size, num_heads, head_dim * itemsize)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype)


def _all_positions(num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(num_blocks).repeat_interleave(block_size), torch.arange(block_size).repeat(num_blocks))


def rank_cache(preset: str, truth: torch.Tensor, heads: tuple[int, int], device="cpu", poison_seed: int = 0):
    """``(engine, layout)`` of ``preset`` holding ``truth``'s heads ``[heads[0], heads[1])`` in every block."""
    num_layers, num_kv, num_blocks, block_size, _, head_dim = truth.shape
    engine, layout = presets.allocate(preset, num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                                      num_heads=heads[1] - heads[0], head_dim=head_dim, dtype=truth.dtype,
                                      device=device, fill=random_fill(torch.Generator().manual_seed(poison_seed)))
    blocks, tokens = _all_positions(num_blocks, block_size)
    for layer in range(num_layers):
        for kv in range(num_kv):
            tensor, index = engine_index(preset, engine, layer, kv, blocks.to(device), tokens.to(device),
                                         slice(None), block_size)
            tensor[index] = truth[layer, kv, blocks, tokens, heads[0]:heads[1]].to(device)
    return engine, layout


def poisoned_cache(preset: str, *, num_layers: int, num_blocks: int, block_size: int, num_heads: int,
                   head_dim: int, dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 1):
    """A destination cache full of random bytes."""
    return presets.allocate(preset, num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                            num_heads=num_heads, head_dim=head_dim, dtype=dtype, device=device,
                            fill=random_fill(torch.Generator().manual_seed(seed)))


def read_rows(preset: str, engine, layout, block_ids, num_tokens: int) -> torch.Tensor:
    """Bytes of a request's rows, ``[L, kv, T, H, row bytes]``, read through the engine's own indexing."""
    ids = torch.as_tensor(block_ids)
    t = torch.arange(num_tokens)
    blocks, tokens = ids[t // layout.block_size], t % layout.block_size
    device = layout.device
    out = []
    for layer in range(layout.num_layers):
        per_kv = []
        for kv in range(layout.num_kv):
            tensor, index = engine_index(preset, engine, layer, kv, blocks.to(device), tokens.to(device),
                                         slice(None), layout.block_size)
            per_kv.append(as_bytes(tensor[index]).cpu())
        out.append(torch.stack(per_kv))
    return torch.stack(out)


def truth_rows(truth: torch.Tensor, block_ids, num_tokens: int, heads: tuple[int, int]) -> torch.Tensor:
    """The truth's bytes for a request's rows on heads ``[heads[0], heads[1])``, ``[L, kv, T, h, row bytes]``."""
    ids = torch.as_tensor(block_ids)
    block_size = truth.shape[3]
    t = torch.arange(num_tokens)
    rows = truth[:, :, ids[t // block_size], t % block_size, heads[0]:heads[1]]
    return as_bytes(rows)


def other_blocks(preset: str, engine, layout, block_ids) -> torch.Tensor:
    """Bytes of every block not in ``block_ids`` (all their tokens): what must not change."""
    keep = sorted(set(range(layout.num_blocks)) - {int(b) for b in block_ids})
    return read_rows(preset, engine, layout, keep, len(keep) * layout.block_size)


def converted_truth_rows(truth: torch.Tensor, block_ids, num_tokens: int, heads: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """What fp8 on the wire must land for those rows: the reference quantize -> dequantize, as bytes."""
    from kvlink.reference import dequantize_rows, quantize_rows

    ids = torch.as_tensor(block_ids)
    block_size = truth.shape[3]
    t = torch.arange(num_tokens)
    rows = truth[:, :, ids[t // block_size], t % block_size, heads[0]:heads[1]]
    return as_bytes(dequantize_rows(*quantize_rows(rows), dtype))
