"""One pack -> unpack round trip between two engine caches, verified byte for byte.

Shared by the CPU reference tests and the GPU kernel tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kvlink
from engine_access import as_bytes, engine_index, random_fill, snapshot
from kvlink import presets


@dataclass
class Cache:
    preset: str
    engine: object
    layout: kvlink.CacheLayout


def make_cache(preset: str, generator: torch.Generator, *, num_layers=3, num_blocks=40, block_size=16,
               num_heads=4, head_dim=64, dtype=torch.bfloat16, device="cpu") -> Cache:
    if preset in presets.MLA_PRESETS:
        num_heads = 1
    engine, layout = presets.allocate(
        preset, num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, num_heads=num_heads,
        head_dim=head_dim, dtype=dtype, device=device, fill=random_fill(generator),
    )
    return Cache(preset, engine, layout)


def random_blocks(layout: kvlink.CacheLayout, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    needed = -(-num_tokens // layout.block_size)
    return torch.randperm(layout.num_blocks, generator=generator)[:needed]


def rows(cache: Cache, layer: int, kv: int, block_ids: torch.Tensor, token_idx: torch.Tensor, heads: slice):
    block_size = cache.layout.block_size
    blocks = block_ids[token_idx // block_size].to(cache.layout.device)
    offsets = (token_idx % block_size).to(cache.layout.device)
    tensor, index = engine_index(cache.preset, cache.engine, layer, kv, blocks, offsets, heads, block_size)
    return tensor, index


def verify_unpacked(src: Cache, src_ids, dst: Cache, dst_ids, dst_before: list[torch.Tensor],
                    dst_rows_before: dict, *, layers, tokens, src_heads: slice, dst_heads: slice) -> None:
    """Every selected row equals the source's, and no other byte of the destination changed."""
    token_idx = torch.arange(*tokens)
    for layer in range(*layers):
        for kv in range(src.layout.num_kv):
            s_tensor, s_index = rows(src, layer, kv, src_ids, token_idx, src_heads)
            d_tensor, d_index = rows(dst, layer, kv, dst_ids, token_idx, dst_heads)
            got, want = as_bytes(d_tensor[d_index]), as_bytes(s_tensor[s_index])
            if not torch.equal(got, want):
                bad = (got != want).reshape(got.shape[0], -1).any(dim=1).nonzero().flatten()
                raise AssertionError(
                    f"{src.preset}->{dst.preset}: layer {layer} kv {kv}: {bad.numel()} tokens differ, first token {int(bad[0]) + tokens[0]}"
                )
            # restore the rows we wrote: anything else that changed is a stray write
            d_tensor[d_index] = dst_rows_before[(layer, kv)]
    after = snapshot(dst.preset, dst.engine)
    for i, (a, b) in enumerate(zip(after, dst_before)):
        if not torch.equal(a, b):
            raise AssertionError(f"{dst.preset}: buffer {i}: {(a != b).sum().item()} bytes written outside the request's rows")


def capture_rows(dst: Cache, dst_ids, *, layers, tokens, dst_heads: slice) -> dict:
    token_idx = torch.arange(*tokens)
    saved = {}
    for layer in range(*layers):
        for kv in range(dst.layout.num_kv):
            tensor, index = rows(dst, layer, kv, dst_ids, token_idx, dst_heads)
            saved[(layer, kv)] = tensor[index].clone()
    return saved


def roundtrip(src: Cache, dst: Cache, num_tokens: int, generator: torch.Generator, *, layers=None, tokens=None,
              src_heads=None, dst_heads=None, backend="auto", chunk_offset: int = 0,
              max_ctas: int | None = None) -> torch.Tensor:
    """Pack from ``src``, unpack into ``dst`` (random blocks each), verify; returns the packed chunk."""
    src_ids = random_blocks(src.layout, num_tokens, generator)
    dst_ids = random_blocks(dst.layout, num_tokens, generator)
    layers = layers or (0, src.layout.num_layers)
    tokens = tokens or (0, num_tokens)
    src_heads = src_heads or (0, src.layout.num_heads)
    dst_heads = dst_heads or (0, dst.layout.num_heads)
    nbytes = kvlink.packed_nbytes(src.layout, num_tokens, layers=layers, tokens=tokens, heads=src_heads)
    storage = torch.randint(0, 256, (nbytes + chunk_offset,), dtype=torch.uint8, generator=generator)
    chunk = storage.to(src.layout.device)[chunk_offset:]  # poisoned: random bytes, possibly misaligned
    kvlink.pack(src.layout, src_ids, num_tokens, chunk, layers=layers, tokens=tokens, heads=src_heads, backend=backend,
                max_ctas=max_ctas)
    before = snapshot(dst.preset, dst.engine)
    saved = capture_rows(dst, dst_ids, layers=layers, tokens=tokens, dst_heads=slice(*dst_heads))
    status = kvlink.unpack(dst.layout, dst_ids, num_tokens, chunk, layers=layers, tokens=tokens, heads=dst_heads,
                           backend=backend, max_ctas=max_ctas)
    kvlink.check_status(status)
    verify_unpacked(src, src_ids, dst, dst_ids, before, saved, layers=layers, tokens=tokens,
                    src_heads=slice(*src_heads), dst_heads=slice(*dst_heads))
    return chunk
