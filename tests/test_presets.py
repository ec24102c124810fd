"""Layouts read shape and strides from the engines' tensors and refuse what they cannot address."""

import pytest
import torch

from kvlink import CacheLayout, presets


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_geometry_read_from_tensors(preset):
    mla = preset in presets.MLA_PRESETS
    _, layout = presets.allocate(preset, num_layers=3, num_blocks=7, block_size=5, num_heads=1 if mla else 4,
                                 head_dim=576 if mla else 32)
    assert (layout.num_layers, layout.num_blocks, layout.block_size) == (3, 7, 5)
    assert layout.num_kv == (1 if mla else 2)
    assert layout.num_heads == (1 if mla else 4) and layout.head_dim == (576 if mla else 32)
    assert len(layout.planes) == layout.num_planes and len(set(layout.plane_ptrs())) == layout.num_planes
    assert preset.split("_")[0] in layout.describe()


def test_fingerprint_ignores_block_size_layout_and_heads_only():
    _, a = presets.allocate("vllm_flash_attn_nhd", num_layers=2, num_blocks=4, block_size=16, num_heads=8, head_dim=128)
    _, b = presets.allocate("tensorrt_llm", num_layers=2, num_blocks=9, block_size=32, num_heads=2, head_dim=128)
    _, c = presets.allocate("tensorrt_llm", num_layers=2, num_blocks=9, block_size=32, num_heads=2, head_dim=128,
                            dtype=torch.float16)
    _, d = presets.allocate("tensorrt_llm", num_layers=3, num_blocks=9, block_size=32, num_heads=2, head_dim=128)
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    a.check_compatible(b)
    with pytest.raises(ValueError, match="dtype is bfloat16 in vllm_flash_attn_nhd but float16"):
        a.check_compatible(c)  # the cache's own bytes cannot land in a cache of another dtype
    a.check_compatible(c, wire_dtype="fp8")  # bf16 -> fp16 meets through fp8 on the wire
    _, e = presets.allocate("tensorrt_llm", num_layers=2, num_blocks=9, block_size=32, num_heads=2, head_dim=128,
                            dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype is bfloat16 in vllm_flash_attn_nhd but int8 in tensorrt_llm"):
        a.check_compatible(e)
    _, f = presets.allocate("tensorrt_llm", num_layers=2, num_blocks=9, block_size=32, num_heads=2, head_dim=128,
                            dtype=torch.float8_e4m3fn)
    a.check_compatible(f, wire_dtype="fp8")  # a bf16 prefill can fill an fp8 decode cache
    with pytest.raises(ValueError, match="dtype is float8_e4m3fn in tensorrt_llm but bfloat16"):
        f.check_compatible(a, wire_dtype="fp8")  # not the other way: e4m3 rows carry no scales to expand with
    with pytest.raises(ValueError, match="num_layers is 2"):
        a.check_compatible(d)


def test_vllm_2026_reads_any_physical_order():
    views = presets.allocate_vllm_2026(2, 6, 4, 3, 8, torch.float16, "cpu", "LHNBC")
    layout = presets.vllm_2026(views)
    assert not views[0].is_contiguous()
    # LHNBC: C innermost (16), then B (6), then N (4), then H
    assert (layout.token_stride, layout.block_stride, layout.head_stride) == (2 * 16 * 6, 2 * 16, 2 * 16 * 6 * 4)
    with pytest.raises(ValueError, match="permutation"):
        presets.allocate_vllm_2026(2, 6, 4, 3, 8, torch.float16, "cpu", "LBNHX")


def test_wrong_shapes_are_named():
    with pytest.raises(ValueError, match=r"vllm_flash_attn_nhd: layer 0: dim 0 must be 2"):
        presets.vllm_flash_attn([torch.zeros(3, 4, 4, 2, 8)])
    with pytest.raises(ValueError, match=r"layer 1: expected \[2, B, N, H, D\]"):
        presets.vllm_flash_attn([torch.zeros(2, 4, 4, 2, 8), torch.zeros(2, 4, 4, 2)])
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        presets.vllm_flash_attn([torch.zeros(2, 4, 4, 2, 8)], "NDH")
    with pytest.raises(TypeError, match="got one tensor"):
        presets.vllm_mla(torch.zeros(4, 16, 576))
    with pytest.raises(ValueError, match=r"tensorrt_llm: expected pool \[B, L, 2, H, N, D\]"):
        presets.tensorrt_llm(torch.zeros(4, 2, 3, 2, 16, 8))
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        presets.sglang_mha([torch.zeros(32, 2, 8)], [torch.zeros(32, 2, 8)], page_size=0)
    with pytest.raises(ValueError, match="1 K buffers but 2 V buffers"):
        presets.sglang_mha([torch.zeros(32, 2, 8)], [torch.zeros(32, 2, 8)] * 2, page_size=4)


def test_inconsistent_layers_are_named():
    a = torch.zeros(2, 4, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"layer 1 plane 0: dtype torch.float16 differs"):
        presets.vllm_flash_attn([a, torch.zeros(2, 4, 4, 2, 8, dtype=torch.float16)])
    with pytest.raises(ValueError, match="layer 1 plane 0: shape"):
        presets.vllm_flash_attn([a, torch.zeros(2, 5, 4, 2, 8, dtype=torch.bfloat16)])
    strided = torch.zeros(2, 4, 4, 2, 16, dtype=torch.bfloat16)[..., :8]
    with pytest.raises(ValueError, match="strides .* differ from layer 0"):
        presets.vllm_flash_attn([a, strided])


def test_unaddressable_views_refused():
    with pytest.raises(ValueError, match="head_dim must be the innermost unit-stride"):
        presets.vllm_flash_attn([torch.zeros(2, 4, 4, 8, 2).transpose(3, 4)])
    with pytest.raises(ValueError, match="overlap"):
        CacheLayout.from_planes("custom", [[torch.zeros(64).as_strided((4, 4, 2, 8), (8, 8, 8, 1))]])
    with pytest.raises(TypeError, match="unsupported cache dtype"):
        presets.vllm_mla([torch.zeros(4, 4, 8, dtype=torch.int64)])
    shared = torch.zeros(4, 4, 2, 8)
    with pytest.raises(ValueError, match="same address"):
        CacheLayout.from_planes("custom", [[shared, shared]])
