"""Raw per-engine indexing, written independently of kvlink's layout code.

Tests read and write engine caches through these expressions, the way each engine's own
kernels address them, so a wrong view in kvlink.presets cannot hide behind itself.
"""

from __future__ import annotations

import torch

from kvlink import presets


def engine_index(preset: str, engine, layer: int, kv: int, blocks: torch.Tensor, tokens: torch.Tensor,
                 heads: slice, block_size: int):
    """(tensor, index) such that ``tensor[index]`` is the ``[T, heads, D]`` rows of the given tokens."""
    if preset.startswith("vllm_flash_attn_nhd"):
        return engine[layer], (kv, blocks, tokens, heads)
    if preset.startswith("vllm_flash_attn_hnd"):
        return engine[layer], (kv, blocks, heads, tokens)
    if preset in ("vllm_flashinfer_nhd", "flashinfer_nhd"):
        return engine[layer], (blocks, kv, tokens, heads)
    if preset in ("vllm_flashinfer_hnd", "flashinfer_hnd"):
        return engine[layer], (blocks, kv, heads, tokens)
    if preset == "flashinfer_split_nhd":
        return engine[layer][kv], (blocks, tokens, heads)
    if preset in ("vllm_2026", "vllm_2026_lhnbc"):
        head_dim = engine[layer].shape[3] // 2
        return engine[layer], (blocks, heads, tokens, slice(kv * head_dim, (kv + 1) * head_dim))
    if preset == "vllm_mla":
        return engine[layer].unsqueeze(2), (blocks, tokens, heads)
    if preset == "sglang_mha":
        return engine[kv][layer], (blocks * block_size + tokens, heads)
    if preset == "sglang_mla":
        return engine[layer], (blocks * block_size + tokens, heads)
    if preset == "tensorrt_llm":
        return engine, (blocks, layer, kv, heads, tokens)
    raise AssertionError(f"no accessor for {preset}")


def engine_buffers(preset: str, engine) -> list[torch.Tensor]:
    """Every tensor the engine owns, each whole (for before/after comparisons)."""
    if preset == "tensorrt_llm":
        return [engine]
    if preset == "sglang_mha":
        return list(engine[0]) + list(engine[1])
    if preset == "flashinfer_split_nhd":
        return [t for pair in engine for t in pair]
    if preset in ("vllm_2026", "vllm_2026_lhnbc"):
        return [presets._base_of(engine[0])]
    return list(engine)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t.contiguous()


def snapshot(preset: str, engine) -> list[torch.Tensor]:
    return [as_bytes(b).clone() for b in engine_buffers(preset, engine)]


def random_fill(generator: torch.Generator):
    """A filler for presets.allocate: fresh random bytes (never zeros), also NaN bit patterns."""
    def fill(t: torch.Tensor) -> None:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator).to(raw.device))
    return fill
