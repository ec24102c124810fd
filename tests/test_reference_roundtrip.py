"""Every preset round-trips byte-exact through the torch reference (the CPU path and the kernels' oracle)."""

import itertools

import pytest
import torch

from kvlink import presets
from roundtrip import make_cache, roundtrip

MHA = [p for p in presets.PRESETS if p not in presets.MLA_PRESETS]
MLA = list(presets.MLA_PRESETS)
PAIRS = list(itertools.product(MHA, MHA)) + list(itertools.product(MLA, MLA))


@pytest.mark.parametrize("src_preset,dst_preset", PAIRS)
def test_every_layout_pair_roundtrips(src_preset, dst_preset, generator):
    """Pack from one layout, unpack into another with other block ids and another block size."""
    head_dim = 576 if src_preset in MLA else 64
    src = make_cache(src_preset, generator, block_size=16, head_dim=head_dim)
    dst = make_cache(dst_preset, generator, block_size=32 if src_preset != dst_preset else 8, head_dim=head_dim)
    roundtrip(src, dst, num_tokens=16 * 5 + 7, generator=generator)  # partial last block


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_same_layout_one_token_one_block(preset, generator):
    head_dim = 576 if preset in MLA else 64
    src = make_cache(preset, generator, head_dim=head_dim)
    dst = make_cache(preset, generator, head_dim=head_dim)
    roundtrip(src, dst, num_tokens=1, generator=generator)


@pytest.mark.parametrize("src_bs,dst_bs", [(16, 32), (32, 16), (16, 1), (1, 16), (5, 3)])
def test_block_size_conversion(src_bs, dst_bs, generator):
    src = make_cache("vllm_flash_attn_nhd", generator, block_size=src_bs, num_blocks=64)
    dst = make_cache("flashinfer_hnd", generator, block_size=dst_bs, num_blocks=200)
    roundtrip(src, dst, num_tokens=3 * max(src_bs, dst_bs) + 1, generator=generator)


@pytest.mark.parametrize("src_heads,dst_heads", [((0, 2), (0, 2)), ((2, 4), (0, 2)), ((1, 3), (3, 5)), ((3, 4), (0, 1))])
def test_head_ranges(src_heads, dst_heads, generator):
    """A sender packs a head range; the receiver places it at its own head positions."""
    src = make_cache("vllm_flashinfer_nhd", generator, num_heads=4)
    dst = make_cache("sglang_mha", generator, num_heads=6)
    roundtrip(src, dst, num_tokens=50, generator=generator, src_heads=src_heads, dst_heads=dst_heads)


@pytest.mark.parametrize("layers,tokens", [((1, 2), None), ((0, 1), (10, 37)), (None, (36, 37)), ((2, 3), (0, 1))])
def test_layer_and_token_ranges(layers, tokens, generator):
    src = make_cache("tensorrt_llm", generator)
    dst = make_cache("vllm_2026", generator, block_size=8)
    roundtrip(src, dst, num_tokens=37, generator=generator, layers=layers, tokens=tokens)


def test_chunks_compose_into_a_whole_request(generator):
    """Token-range chunks, packed and unpacked one by one, fill the request exactly (the pipeline's use)."""
    import kvlink
    from roundtrip import capture_rows, random_blocks, verify_unpacked
    from engine_access import snapshot

    src = make_cache("vllm_flash_attn_hnd", generator, block_size=16, num_blocks=64)
    dst = make_cache("vllm_flashinfer_nhd", generator, block_size=32, num_blocks=64)
    num_tokens = 16 * 20 + 3
    src_ids, dst_ids = random_blocks(src.layout, num_tokens, generator), random_blocks(dst.layout, num_tokens, generator)
    before = snapshot(dst.preset, dst.engine)
    saved = capture_rows(dst, dst_ids, layers=(0, 3), tokens=(0, num_tokens), dst_heads=slice(0, 4))
    bounds = [0, 1, 17, 100, 256, num_tokens]
    for start, stop in zip(bounds, bounds[1:]):
        for layer in range(3):
            chunk = torch.empty(kvlink.packed_nbytes(src.layout, num_tokens, layers=(layer, layer + 1),
                                                     tokens=(start, stop)), dtype=torch.uint8)
            kvlink.pack(src.layout, src_ids, num_tokens, chunk, layers=(layer, layer + 1), tokens=(start, stop))
            kvlink.unpack(dst.layout, dst_ids, num_tokens, chunk, layers=(layer, layer + 1), tokens=(start, stop))
    verify_unpacked(src, src_ids, dst, dst_ids, before, saved, layers=(0, 3), tokens=(0, num_tokens),
                    src_heads=slice(0, 4), dst_heads=slice(0, 4))


@pytest.mark.parametrize("num_blocks", [1, 2, 7, 300, 4096])
def test_random_block_lists(num_blocks, generator):
    """Random block lists of 1 to 4096 blocks, last block partial."""
    src = make_cache("vllm_flash_attn_nhd", generator, num_layers=2, num_blocks=4096 + 5, block_size=16,
                     num_heads=2, head_dim=16)
    dst = make_cache("sglang_mha", generator, num_layers=2, num_blocks=4096 + 9, block_size=16, num_heads=2,
                     head_dim=16)
    num_tokens = (num_blocks - 1) * 16 + int(torch.randint(1, 17, (1,), generator=generator))
    roundtrip(src, dst, num_tokens=num_tokens, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8])
def test_dtypes_copy_bit_exact(dtype, generator):
    src = make_cache("vllm_flashinfer_hnd", generator, dtype=dtype)
    dst = make_cache("tensorrt_llm", generator, dtype=dtype, block_size=4)
    roundtrip(src, dst, num_tokens=33, generator=generator)


def test_vllm_fp8_mla_656_bytes(generator):
    """vLLM's fp8 MLA cache: 656 raw bytes a token."""
    src = make_cache("vllm_mla", generator, head_dim=656, dtype=torch.uint8)
    dst = make_cache("sglang_mla", generator, head_dim=656, dtype=torch.uint8, block_size=64)
    roundtrip(src, dst, num_tokens=100, generator=generator)
