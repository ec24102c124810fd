"""The kernels' launch metadata, checked on the CPU against a Python model of csrc/pack_unpack.cu.

The model decodes the Geometry record that kernels.py uploads, walks the same flat tile list,
divides with the same (mul, shift) pairs and addresses bytes with the same formula as the CUDA
code. It must reproduce the torch reference byte for byte, so CI catches a wrong stride, vector
width, divisor, tile count or header word without a GPU.
"""

import numpy as np
import pytest
import torch

import kvlink
from kvlink import kernels
from kvlink.selection import select
from kvlink.wire import ChunkHeader
from roundtrip import make_cache, random_blocks


def fast_div(n, mul, shift):
    n = n.astype(np.uint64)
    return ((((n * np.uint64(mul)) >> np.uint64(32)) + n) >> np.uint64(shift)).astype(np.int64)


def storage_bytes(tensor):
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy(), storage.data_ptr()


def model_offsets(sel, chunk_ptr):
    """(geometry, vec, per-plane byte offsets of every vector) as the CUDA kernel computes them."""
    geometry_bytes, vec, num_tiles = kernels._geometry(sel, chunk_ptr, status_overwrite=False)
    return model_walk(sel, geometry_bytes, vec, num_tiles)


def model_walk(sel, geometry_bytes, vec, num_tiles):
    """The tile walk and addressing of one Geometry record over ``sel``'s blocks."""
    g = np.frombuffer(geometry_bytes, dtype=kernels.GEOMETRY_DTYPE)[0]
    tile = kernels.THREADS * kernels.UNROLL
    assert num_tiles == g["num_tiles"] == g["num_planes"] * g["tiles_per_plane"]
    # the tile walk: tile -> (plane, base); thread t, step u -> j = base + t + u * THREADS
    tiles = np.arange(num_tiles)
    planes = fast_div(tiles, g["tpp_mul"], g["tpp_shift"])
    assert (planes == tiles // g["tiles_per_plane"]).all()
    j_in_tile = (np.arange(kernels.THREADS)[None, :] + kernels.THREADS * np.arange(kernels.UNROLL)[:, None]).ravel()
    js = ((tiles - planes * g["tiles_per_plane"]) * tile)[:, None] + j_in_tile[None, :]
    first_plane_js = np.sort(js[planes == 0].ravel())
    first_plane_js = first_plane_js[first_plane_js < g["vecs_per_plane"]]
    assert (first_plane_js == np.arange(g["vecs_per_plane"])).all(), "the tiles must cover every vector once"
    j = np.arange(g["vecs_per_plane"])
    row = fast_div(j, g["vpr_mul"], g["vpr_shift"])
    v = j - row * g["vecs_per_row"]
    t = fast_div(row, g["hpt_mul"], g["hpt_shift"])
    h = row - t * g["heads_per_token"]
    token = g["token_start"] + t
    slot = fast_div(token, g["tpb_mul"], g["tpb_shift"])
    in_block = token - slot * g["tokens_per_block"]
    block = sel.block_ids.astype(np.int64)[slot]
    offsets = (block * g["block_stride"] + in_block * g["token_stride"] + (g["head_start"] + h) * g["head_stride"]
               + v * vec)
    return g, vec, offsets


def model_copy(sel, chunk, direction):
    """Run the modelled kernel: "pack" gathers the cache into ``chunk``, "unpack" scatters ``chunk`` into it."""
    g, vec, offsets = model_offsets(sel, chunk.data_ptr())
    buffer = chunk.numpy()
    if direction == "pack":
        buffer[:64] = np.frombuffer(ChunkHeader.for_selection(sel).to_bytes(), dtype=np.uint8)
    payload = buffer[64:]
    lanes = np.arange(vec)
    for p in range(g["num_planes"]):
        plane = sel.layout.planes[sel.first_plane + p]
        data, base = storage_bytes(plane)
        in_cache = ((plane.data_ptr() - base) + offsets[:, None] + lanes[None, :]).ravel()
        in_chunk = (p * int(g["plane_bytes"]) + (np.arange(offsets.size) * vec)[:, None] + lanes[None, :]).ravel()
        if direction == "pack":
            payload[in_chunk] = data[in_cache]
        else:
            data[in_cache] = payload[in_chunk]


CASES = [
    ("vllm_flash_attn_nhd", torch.bfloat16, 64, None, 0),
    ("vllm_flash_attn_hnd", torch.bfloat16, 64, (1, 3), 0),
    ("flashinfer_split_nhd", torch.float16, 36, (0, 2), 4),
    ("vllm_2026_lhnbc", torch.bfloat16, 13, (2, 4), 1),
    ("tensorrt_llm", torch.float32, 7, None, 8),
    ("sglang_mha", torch.bfloat16, 64, (3, 4), 2),
    ("vllm_mla", torch.uint8, 656, None, 0),
    ("sglang_mla", torch.bfloat16, 576, None, 12),
]


@pytest.mark.parametrize("preset,dtype,head_dim,heads,offset", CASES)
def test_model_of_the_kernels_matches_the_reference(preset, dtype, head_dim, heads, offset, generator):
    cache = make_cache(preset, generator, dtype=dtype, head_dim=head_dim, block_size=16, num_blocks=40)
    num_tokens = 16 * 7 + 5
    ids = random_blocks(cache.layout, num_tokens, generator)
    for layers, tokens in (((0, 3), (0, num_tokens)), ((1, 2), (17, 100))):
        sel = select(cache.layout, ids, num_tokens, layers=layers, tokens=tokens, heads=heads)
        storage = torch.randint(0, 256, (sel.chunk_bytes + offset,), dtype=torch.uint8, generator=generator)
        modelled = storage[offset:]
        model_copy(sel, modelled, "pack")
        expected = torch.empty(sel.chunk_bytes, dtype=torch.uint8)
        kvlink.pack(cache.layout, ids, num_tokens, expected, layers=layers, tokens=tokens, heads=heads)
        assert torch.equal(modelled, expected), f"{preset}: the kernel model packs differently"
        # and back: scatter the chunk into a zeroed copy of the cache through the model
        dst = make_cache(preset, generator, dtype=dtype, head_dim=head_dim, block_size=16, num_blocks=40)
        dst_ids = random_blocks(dst.layout, num_tokens, generator)
        dst_sel = select(dst.layout, dst_ids, num_tokens, layers=layers, tokens=tokens, heads=heads,
                         destination=True)
        model_copy(dst_sel, modelled, "unpack")
        repacked = torch.empty_like(expected)
        kvlink.pack(dst.layout, dst_ids, num_tokens, repacked, layers=layers, tokens=tokens, heads=heads)
        assert torch.equal(repacked[64:], expected[64:]), f"{preset}: the kernel model unpacks differently"


def test_vector_width_follows_alignment(generator):
    cache = make_cache("vllm_flash_attn_nhd", generator, head_dim=64)
    sel = select(cache.layout, [0, 1], 20)
    chunk = torch.empty(sel.chunk_bytes + 16, dtype=torch.uint8)
    widths = {off: kernels._geometry(sel, chunk[off:].data_ptr(), False)[1] for off in (0, 1, 2, 4, 8)}
    base = chunk.data_ptr() % 16
    assert widths[0] == (16 if base == 0 else widths[0])
    assert all(w <= 16 and (chunk[off:].data_ptr() + 64) % w == 0 for off, w in widths.items())
    assert widths[1] in (1, 2, 4, 8, 16) and (chunk[1:].data_ptr() + 64) % widths[1] == 0


COPY_CASES = [  # (source preset, destination preset, dtype, head_dim, source heads, destination heads, block sizes)
    ("vllm_flash_attn_nhd", "flashinfer_hnd", torch.bfloat16, 64, (0, 4), (0, 4), (16, 8)),
    ("vllm_flash_attn_hnd", "vllm_flash_attn_nhd", torch.bfloat16, 64, (1, 3), (2, 4), (16, 16)),
    ("vllm_2026_lhnbc", "sglang_mha", torch.float16, 36, (0, 2), (2, 4), (8, 32)),
    ("tensorrt_llm", "flashinfer_split_nhd", torch.float32, 7, (3, 4), (0, 1), (16, 4)),
    ("vllm_mla", "sglang_mla", torch.uint8, 656, None, None, (16, 1)),
]


@pytest.mark.parametrize("src_preset,dst_preset,dtype,head_dim,src_heads,dst_heads,block_sizes", COPY_CASES)
def test_model_of_the_copy_kernel_matches_pack_then_unpack(src_preset, dst_preset, dtype, head_dim, src_heads,
                                                           dst_heads, block_sizes, generator):
    """kvlink_copy (the ipc transport's kernel) must equal the reference pack -> unpack, layout conversion included."""
    src = make_cache(src_preset, generator, dtype=dtype, head_dim=head_dim, block_size=block_sizes[0], num_blocks=40)
    dst = make_cache(dst_preset, generator, dtype=dtype, head_dim=head_dim, block_size=block_sizes[1],
                     num_blocks=40 * 16 // block_sizes[1] + 8)
    num_tokens = 16 * 7 + 5
    src_ids = random_blocks(src.layout, num_tokens, generator)
    dst_ids = random_blocks(dst.layout, num_tokens, generator)
    expected = make_cache(dst_preset, generator, dtype=dtype, head_dim=head_dim, block_size=block_sizes[1],
                          num_blocks=dst.layout.num_blocks)
    for plane_expected, plane_dst in zip(expected.layout.planes, dst.layout.planes):
        plane_expected.copy_(plane_dst)
    for layers, tokens in (((0, 3), (0, num_tokens)), ((1, 2), (17, 100))):
        src_sel = select(src.layout, src_ids, num_tokens, layers=layers, tokens=tokens, heads=src_heads)
        dst_sel = select(dst.layout, dst_ids, num_tokens, layers=layers, tokens=tokens, heads=dst_heads,
                         destination=True)
        src_geometry, dst_geometry, vec, num_tiles = kernels._copy_geometry(src_sel, dst_sel)
        gs, _, src_offsets = model_walk(src_sel, src_geometry, vec, num_tiles)
        gd, _, dst_offsets = model_walk(dst_sel, dst_geometry, vec, num_tiles)
        assert gs["vecs_per_plane"] == gd["vecs_per_plane"] and gs["num_tiles"] == gd["num_tiles"] == num_tiles
        lanes = np.arange(vec)
        for p in range(gd["num_planes"]):
            s_plane, d_plane = src_sel.layout.planes[src_sel.first_plane + p], dst.layout.planes[dst_sel.first_plane + p]
            s_data, s_base = storage_bytes(s_plane)
            d_data, d_base = storage_bytes(d_plane)
            s_index = ((s_plane.data_ptr() - s_base) + src_offsets[:, None] + lanes[None, :]).ravel()
            d_index = ((d_plane.data_ptr() - d_base) + dst_offsets[:, None] + lanes[None, :]).ravel()
            d_data[d_index] = s_data[s_index]
        # the reference: pack the source box, unpack it into the expected copy of the destination
        chunk = torch.empty(src_sel.chunk_bytes, dtype=torch.uint8)
        kvlink.pack(src.layout, src_ids, num_tokens, chunk, layers=layers, tokens=tokens, heads=src_heads)
        kvlink.check_status(kvlink.unpack(expected.layout, dst_ids, num_tokens, chunk, layers=layers, tokens=tokens,
                                          heads=dst_heads))
        for got, want in zip(dst.layout.planes, expected.layout.planes):
            assert torch.equal(got.view(torch.uint8) if got.dtype != torch.uint8 else got,
                               want.view(torch.uint8) if want.dtype != torch.uint8 else want), \
                f"{src_preset} -> {dst_preset}: the copy kernel model differs from pack -> unpack"


def test_copy_refuses_boxes_of_different_shape(generator):
    src = make_cache("vllm_flash_attn_nhd", generator, head_dim=64)
    dst = make_cache("flashinfer_hnd", generator, head_dim=64)
    a = select(src.layout, [0, 1], 20, heads=(0, 2))
    b = select(dst.layout, [2, 3], 20, heads=(0, 3), destination=True)
    with pytest.raises(ValueError, match="copy boxes differ"):
        kernels._copy_geometry(a, b)


def test_inline_copy_parameters_match_the_cuda_struct(generator):
    """kvlink_copy_inline's by-value CopyParams: header fields, record offsets and size as the .cu declares."""
    import re
    source = kernels.kernel_source()
    assert int(re.search(r"INLINE_META_BYTES = (\d+);", source).group(1)) == kernels.INLINE_META_BYTES
    src = make_cache("vllm_flash_attn_nhd", generator, head_dim=64)
    dst = make_cache("flashinfer_hnd", generator, head_dim=64, block_size=8, num_blocks=90)
    a = select(src.layout, [3, 1, 4], 40)
    b = select(dst.layout, [9, 2, 6, 5, 3], 40, destination=True)
    src_geometry, dst_geometry, _, _ = kernels._copy_geometry(a, b)
    src_meta = kernels._metadata(src_geometry, b"", a.block_ids)
    dst_meta = kernels._metadata(dst_geometry, b"", b.block_ids)
    assert len(src_meta) % 16 == 0 and len(dst_meta) % 16 == 0
    params = kernels._inline_copy_params(src_meta, dst_meta, 0x1111, 0x2222)
    assert len(params) == kernels.INLINE_PARAMS_BYTES and kernels.INLINE_PARAMS_BYTES % 16 == 0
    src_planes, dst_planes, src_at, dst_at = kernels.INLINE_PARAMS_HEADER.unpack_from(params)
    meta = params[kernels.INLINE_PARAMS_HEADER.size:]
    assert (src_planes, dst_planes) == (0x1111, 0x2222)
    assert meta[src_at:src_at + len(src_meta)] == src_meta and meta[dst_at:dst_at + len(dst_meta)] == dst_meta
    ids = np.frombuffer(meta, dtype="<i4", count=5, offset=dst_at + kernels.META_BLOCK_IDS_OFFSET)
    assert ids.tolist() == [9, 2, 6, 5, 3]
    big = kernels._metadata(src_geometry, b"", np.arange(500, dtype=np.int32))  # 500 blocks a side: 4384 bytes
    assert kernels._inline_copy_params(big, big, 1, 2) is None, "oversized metadata must take the upload path"
