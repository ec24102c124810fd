"""Constructors that describe each serving engine's KV cache as a :class:`CacheLayout`.

Each takes the engine's own tensors (per-layer list or dict in layer order, or the one pool
tensor) and returns zero-copy ``[block, token, head, head_dim]`` views of them. Shapes use
B blocks, N tokens per block, H KV heads, D head dim, L layers.

| preset                  | engine tensor(s)                                            |
| ----------------------- | ----------------------------------------------------------- |
| ``vllm_flash_attn``     | per layer ``[2, B, N, H, D]`` (NHD) or ``[2, B, H, N, D]`` (HND) |
| ``vllm_flashinfer``     | per layer ``[B, 2, N, H, D]`` (NHD) or ``[B, 2, H, N, D]`` (HND) |
| ``flashinfer``          | same as ``vllm_flashinfer``, or a ``(k, v)`` pair per layer of ``[B, N, H, D]`` / ``[B, H, N, D]`` |
| ``vllm_2026``           | per layer logical ``[B, H, N, C]`` strided views, C = 2*D holding K then V |
| ``vllm_mla``            | per layer ``[B, N, 576]`` (fp8: uint8 ``[B, N, 656]``)       |
| ``sglang_mha``          | per layer K and V, each ``[num_slots, H, D]``; a page is ``page_size`` slots |
| ``sglang_mla``          | per layer ``[num_slots, 1, 576]``                            |
| ``tensorrt_llm``        | one pool ``[B, L, 2, H, N, D]``: a block holds every local layer |

:func:`allocate` builds an engine-shaped cache of any preset (tests, benchmarks, examples).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from kvlink.layout import CacheLayout

KV_LAYOUTS = ("NHD", "HND")


def _layer_list(name: str, tensors) -> list:
    if isinstance(tensors, Mapping):
        tensors = list(tensors.values())  # dict order is layer order in vLLM and SGLang
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name}: expected a list or dict of per-layer tensors, got one tensor")
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError(f"{name}: expected a non-empty list or dict of per-layer tensors")
    return list(tensors)


def _check_kv_layout(name: str, kv_layout: str) -> str:
    kv_layout = kv_layout.upper()
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"{name}: kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    return kv_layout


def _to_bnhd(view: torch.Tensor, kv_layout: str) -> torch.Tensor:
    """``[B, N, H, D]`` from a ``[B, N, H, D]`` (NHD) or ``[B, H, N, D]`` (HND) view."""
    return view if kv_layout == "NHD" else view.transpose(1, 2)


def _check_dims(name: str, layer_idx: int, tensor, ndim: int, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: layer {layer_idx}: expected torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name}: layer {layer_idx}: expected {what}, got shape {tuple(tensor.shape)}")


def vllm_flash_attn(kv_caches, kv_layout: str = "NHD") -> CacheLayout:
    """vLLM FlashAttention (older): per layer ``[2, B, N, H, D]``, or ``[2, B, H, N, D]`` for HND."""
    name = f"vllm_flash_attn_{_check_kv_layout('vllm_flash_attn', kv_layout).lower()}"
    kv_layout = kv_layout.upper()
    planes = []
    for layer_idx, t in enumerate(_layer_list(name, kv_caches)):
        _check_dims(name, layer_idx, t, 5, "[2, B, N, H, D]")
        if t.shape[0] != 2:
            raise ValueError(f"{name}: layer {layer_idx}: dim 0 must be 2 (K, V), got shape {tuple(t.shape)}")
        planes.append([_to_bnhd(t[0], kv_layout), _to_bnhd(t[1], kv_layout)])
    return CacheLayout.from_planes(name, planes)


def vllm_flashinfer(kv_caches, kv_layout: str = "NHD", *, _name: str = "vllm_flashinfer") -> CacheLayout:
    """vLLM FlashInfer/Triton and newer FlashAttention: per layer ``[B, 2, N, H, D]`` or HND ``[B, 2, H, N, D]``."""
    name = f"{_name}_{_check_kv_layout(_name, kv_layout).lower()}"
    kv_layout = kv_layout.upper()
    planes = []
    for layer_idx, t in enumerate(_layer_list(name, kv_caches)):
        if isinstance(t, (tuple, list)):
            if _name != "flashinfer":
                raise TypeError(f"{name}: layer {layer_idx}: separate (K, V) tensors are the flashinfer preset's form")
            if len(t) != 2:
                raise ValueError(f"{name}: layer {layer_idx}: expected a (K, V) pair, got {len(t)} tensors")
            for part in t:
                _check_dims(name, layer_idx, part, 4, "[B, N, H, D] (or HND [B, H, N, D])")
            planes.append([_to_bnhd(t[0], kv_layout), _to_bnhd(t[1], kv_layout)])
            continue
        _check_dims(name, layer_idx, t, 5, "[B, 2, N, H, D]")
        if t.shape[1] != 2:
            raise ValueError(f"{name}: layer {layer_idx}: dim 1 must be 2 (K, V), got shape {tuple(t.shape)}")
        planes.append([_to_bnhd(t[:, 0], kv_layout), _to_bnhd(t[:, 1], kv_layout)])
    return CacheLayout.from_planes(name, planes)


def flashinfer(paged_kv_caches, kv_layout: str = "NHD") -> CacheLayout:
    """FlashInfer: per layer ``[P, 2, N, H, D]`` (NHD) / ``[P, 2, H, N, D]`` (HND), or a ``(k, v)`` pair."""
    return vllm_flashinfer(paged_kv_caches, kv_layout, _name="flashinfer")


def vllm_2026(kv_caches) -> CacheLayout:
    """vLLM 2026: per-layer logical ``[B, H, N, C]`` views (strided, into one buffer).

    C = 2 * head_dim holds a token-head's K in ``[0, D)`` and V in ``[D, 2D)``. The physical
    order of the shared buffer (LBNHC by default) is read from the views' strides; see
    :func:`allocate_vllm_2026` for how such views arise.
    """
    name = "vllm_2026"
    planes = []
    for layer_idx, t in enumerate(_layer_list(name, kv_caches)):
        _check_dims(name, layer_idx, t, 4, "logical [B, H, N, C]")
        if t.shape[3] % 2:
            raise ValueError(f"{name}: layer {layer_idx}: C must be 2 * head_dim (K then V), got {t.shape[3]}")
        head_dim = t.shape[3] // 2
        bnhc = t.transpose(1, 2)
        planes.append([bnhc[..., :head_dim], bnhc[..., head_dim:]])
    return CacheLayout.from_planes(name, planes)


def vllm_mla(kv_caches) -> CacheLayout:
    """vLLM MLA: per layer ``[B, N, 576]`` latent (fp8 variant: uint8 ``[B, N, 656]``)."""
    name = "vllm_mla"
    planes = []
    for layer_idx, t in enumerate(_layer_list(name, kv_caches)):
        _check_dims(name, layer_idx, t, 3, "[B, N, latent]")
        planes.append([t.unsqueeze(2)])
    return CacheLayout.from_planes(name, planes)


def _pages(name: str, layer_idx: int, slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[num_slots, ...]`` -> ``[num_pages, page_size, ...]``; trailing slots past the last full page are unused."""
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"{name}: page_size must be a positive int, got {page_size!r}")
    num_pages = slots.shape[0] // page_size
    if num_pages == 0:
        raise ValueError(f"{name}: layer {layer_idx}: {slots.shape[0]} slots hold no full page of {page_size}")
    return slots[: num_pages * page_size].unflatten(0, (num_pages, page_size))


def sglang_mha(k_buffers, v_buffers, page_size: int) -> CacheLayout:
    """SGLang MHA: per layer separate K and V, each ``[num_slots, H, D]``; page p is slots ``[p*page_size, (p+1)*page_size)``."""
    name = "sglang_mha"
    k_list, v_list = _layer_list(name, k_buffers), _layer_list(name, v_buffers)
    if len(k_list) != len(v_list):
        raise ValueError(f"{name}: {len(k_list)} K buffers but {len(v_list)} V buffers")
    planes = []
    for layer_idx, (k, v) in enumerate(zip(k_list, v_list)):
        _check_dims(name, layer_idx, k, 3, "K [num_slots, H, D]")
        _check_dims(name, layer_idx, v, 3, "V [num_slots, H, D]")
        planes.append([_pages(name, layer_idx, k, page_size), _pages(name, layer_idx, v, page_size)])
    return CacheLayout.from_planes(name, planes)


def sglang_mla(kv_buffers, page_size: int) -> CacheLayout:
    """SGLang MLA: per layer ``[num_slots, 1, 576]``."""
    name = "sglang_mla"
    planes = []
    for layer_idx, t in enumerate(_layer_list(name, kv_buffers)):
        _check_dims(name, layer_idx, t, 3, "[num_slots, 1, latent]")
        planes.append([_pages(name, layer_idx, t, page_size)])
    return CacheLayout.from_planes(name, planes)


def tensorrt_llm(pool: torch.Tensor) -> CacheLayout:
    """TensorRT-LLM: one pool ``[B, L, 2, H, N, D]``; a block holds K and V of every local layer."""
    name = "tensorrt_llm"
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"{name}: expected the pool tensor, got {type(pool).__name__}")
    if pool.dim() != 6 or pool.shape[2] != 2:
        raise ValueError(f"{name}: expected pool [B, L, 2, H, N, D], got shape {tuple(pool.shape)}")
    planes = [[pool[:, layer, kv].transpose(1, 2) for kv in range(2)] for layer in range(pool.shape[1])]
    return CacheLayout.from_planes(name, planes)


# ---------------------------------------------------------------------------------- allocation
PRESETS = (
    "vllm_flash_attn_nhd",
    "vllm_flash_attn_hnd",
    "vllm_flashinfer_nhd",
    "vllm_flashinfer_hnd",
    "flashinfer_nhd",
    "flashinfer_hnd",
    "flashinfer_split_nhd",
    "vllm_2026",
    "vllm_2026_lhnbc",
    "vllm_mla",
    "sglang_mha",
    "sglang_mla",
    "tensorrt_llm",
)
MLA_PRESETS = ("vllm_mla", "sglang_mla")


def allocate_vllm_2026(
    num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
    dtype: torch.dtype, device, physical_order: str = "LBNHC",
) -> list[torch.Tensor]:
    """One buffer in ``physical_order`` (a permutation of "LBHNC"), returned as per-layer logical ``[B, H, N, C]`` views."""
    logical = "LBHNC"
    if sorted(physical_order) != sorted(logical):
        raise ValueError(f"physical_order must be a permutation of {logical!r}, got {physical_order!r}")
    sizes = dict(L=num_layers, B=num_blocks, H=num_heads, N=block_size, C=2 * head_dim)
    buffer = torch.empty([sizes[d] for d in physical_order], dtype=dtype, device=device)
    logical_view = buffer.permute([physical_order.index(d) for d in logical])
    return [logical_view[layer] for layer in range(num_layers)]


def allocate(
    preset: str, *, num_layers: int, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
    dtype: torch.dtype = torch.bfloat16, device="cpu", fill: Callable[[torch.Tensor], None] | None = None,
):
    """Allocate an engine-shaped cache for ``preset`` and return ``(engine_tensors, layout)``.

    ``engine_tensors`` is what the engine itself would hold (a per-layer list, a pair of lists
    for SGLang MHA, or one pool tensor). MLA presets use ``num_heads == 1`` and ``head_dim``
    as the latent width. ``fill`` (e.g. a random filler) is applied to each underlying buffer.
    """
    L, B, N, H, D = num_layers, num_blocks, block_size, num_heads, head_dim

    def new(*shape):
        t = torch.empty(shape, dtype=dtype, device=device)
        if fill is not None:
            fill(t)
        return t

    if preset in MLA_PRESETS and H != 1:
        raise ValueError(f"{preset}: MLA has one latent 'head', got num_heads={H}")
    if preset.startswith("vllm_flash_attn_"):
        kv_layout = preset.rsplit("_", 1)[1].upper()
        shape = (2, B, N, H, D) if kv_layout == "NHD" else (2, B, H, N, D)
        tensors = [new(*shape) for _ in range(L)]
        return tensors, vllm_flash_attn(tensors, kv_layout)
    if preset.startswith("flashinfer_split_"):
        kv_layout = preset.rsplit("_", 1)[1].upper()
        shape = (B, N, H, D) if kv_layout == "NHD" else (B, H, N, D)
        tensors = [(new(*shape), new(*shape)) for _ in range(L)]
        return tensors, flashinfer(tensors, kv_layout)
    if preset.startswith(("vllm_flashinfer_", "flashinfer_")):
        kv_layout = preset.rsplit("_", 1)[1].upper()
        shape = (B, 2, N, H, D) if kv_layout == "NHD" else (B, 2, H, N, D)
        tensors = [new(*shape) for _ in range(L)]
        build = flashinfer if preset.startswith("flashinfer_") else vllm_flashinfer
        return tensors, build(tensors, kv_layout)
    if preset in ("vllm_2026", "vllm_2026_lhnbc"):
        order = "LBNHC" if preset == "vllm_2026" else "LHNBC"
        views = allocate_vllm_2026(L, B, N, H, D, dtype, device, order)
        if fill is not None:
            fill(_base_of(views[0]))
        return views, vllm_2026(views)
    if preset == "vllm_mla":
        tensors = [new(B, N, D) for _ in range(L)]
        return tensors, vllm_mla(tensors)
    if preset == "sglang_mha":
        k = [new(B * N, H, D) for _ in range(L)]
        v = [new(B * N, H, D) for _ in range(L)]
        return (k, v), sglang_mha(k, v, page_size=N)
    if preset == "sglang_mla":
        tensors = [new(B * N, 1, D) for _ in range(L)]
        return tensors, sglang_mla(tensors, page_size=N)
    if preset == "tensorrt_llm":
        pool = new(B, L, 2, H, N, D)
        return pool, tensorrt_llm(pool)
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _base_of(view: torch.Tensor) -> torch.Tensor:
    """The whole flat buffer a view was cut from (so a filler touches every byte once)."""
    storage = view.untyped_storage()
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        storage, 0, (storage.nbytes() // view.element_size(),), (1,)
    )
