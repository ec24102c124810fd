"""The CUDA pack/unpack kernels equal the torch reference byte for byte (skipped without a GPU).

Fresh random inputs, poisoned outputs, every layout preset in both directions, odd alignments.
"""

import pytest
import torch

import kvlink
from markers import requires_gpu
from engine_access import snapshot
from kvlink import presets
from roundtrip import make_cache, random_blocks, roundtrip

pytestmark = [requires_gpu, pytest.mark.gpu]

MHA = [p for p in presets.PRESETS if p not in presets.MLA_PRESETS]
MLA = list(presets.MLA_PRESETS)


def gpu_cache(preset, generator, **kw):
    kw.setdefault("head_dim", 576 if preset in MLA else 128)
    return make_cache(preset, generator, device="cuda", **kw)


def pack_both_ways(layout, ids, num_tokens, generator, offset=0, **box):
    """Pack with the kernel and with the reference into differently poisoned buffers; they must agree."""
    nbytes = kvlink.packed_nbytes(layout, num_tokens, **box)
    a = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8, generator=generator).cuda()[offset:]
    b = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8, generator=generator).cuda()[offset:]
    kvlink.pack(layout, ids, num_tokens, a, backend="cuda", **box)
    kvlink.pack(layout, ids, num_tokens, b, backend="torch", **box)
    torch.cuda.synchronize()
    assert torch.equal(a, b), f"kernel pack differs from reference in {(a != b).sum().item()} bytes"
    return a


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_every_preset_both_directions(preset, generator):
    """Pack from the preset, unpack into another preset and back into the preset itself, via the kernel."""
    other = {"vllm_mla": "sglang_mla", "sglang_mla": "vllm_mla"}.get(preset, "tensorrt_llm" if preset != "tensorrt_llm" else "vllm_flash_attn_hnd")
    a = gpu_cache(preset, generator, block_size=16)
    b = gpu_cache(other, generator, block_size=32)
    num_tokens = 16 * 11 + 5
    pack_both_ways(a.layout, random_blocks(a.layout, num_tokens, generator), num_tokens, generator)
    roundtrip(a, b, num_tokens, generator, backend="cuda")
    roundtrip(b, a, num_tokens, generator, backend="cuda")


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 36), (torch.bfloat16, 13),
                                            (torch.float32, 7), (torch.uint8, 656)])
def test_odd_alignments(offset, dtype, head_dim, generator):
    """Chunk addresses and row sizes that are not multiples of 16 fall back to narrower vectors, still exact."""
    src = gpu_cache("vllm_flash_attn_hnd", generator, dtype=dtype, head_dim=head_dim, num_heads=3)
    dst = gpu_cache("sglang_mha", generator, dtype=dtype, head_dim=head_dim, num_heads=3, block_size=8)
    ids = random_blocks(src.layout, 77, generator)
    pack_both_ways(src.layout, ids, 77, generator, offset=offset, heads=(1, 3))
    roundtrip(src, dst, 77, generator, backend="cuda", chunk_offset=offset, src_heads=(1, 3), dst_heads=(0, 2))


@pytest.mark.parametrize("src_heads,dst_heads", [((0, 1), (3, 4)), ((2, 6), (0, 4)), ((0, 8), (0, 8))])
@pytest.mark.parametrize("src_preset", ["vllm_flashinfer_nhd", "flashinfer_hnd", "vllm_2026_lhnbc"])
def test_head_ranges_and_partial_boxes(src_preset, src_heads, dst_heads, generator):
    src = gpu_cache(src_preset, generator, num_heads=8, block_size=16)
    dst = gpu_cache("vllm_flash_attn_nhd", generator, num_heads=8, block_size=64)
    roundtrip(src, dst, 200, generator, backend="cuda", src_heads=src_heads, dst_heads=dst_heads,
              layers=(1, 3), tokens=(17, 190))


@pytest.mark.parametrize("num_blocks", [1, 4096])
def test_one_block_and_many_thousands(num_blocks, generator):
    src = gpu_cache("vllm_flash_attn_nhd", generator, num_layers=4, num_blocks=4100, num_heads=2)
    dst = gpu_cache("vllm_2026", generator, num_layers=4, num_blocks=4100, num_heads=2)
    roundtrip(src, dst, (num_blocks - 1) * 16 + 9, generator, backend="cuda")


@pytest.mark.parametrize("max_ctas", [1, 3, 64])
def test_small_grids_still_cover_everything(max_ctas, generator):
    """The SM budget (max_ctas) only changes speed: grid-stride loops cover every byte."""
    src = gpu_cache("tensorrt_llm", generator)
    dst = gpu_cache("flashinfer_split_nhd", generator)
    num_tokens = 16 * 9 + 1
    pack_both_ways(src.layout, random_blocks(src.layout, num_tokens, generator), num_tokens, generator)
    roundtrip(src, dst, num_tokens, generator, backend="cuda", max_ctas=max_ctas)


def test_mismatched_header_writes_nothing(generator):
    src = gpu_cache("vllm_flashinfer_nhd", generator)
    dst = gpu_cache("vllm_flashinfer_nhd", generator)
    chunk = torch.empty(kvlink.packed_nbytes(src.layout, 40), dtype=torch.uint8, device="cuda")
    kvlink.pack(src.layout, [0, 1, 2], 40, chunk, backend="cuda")
    before = snapshot(dst.preset, dst.engine)
    corrupt = chunk.clone()
    corrupt[9 * 4] ^= 1  # head_dim word
    status = kvlink.unpack(dst.layout, [5, 6, 7], 40, corrupt, backend="cuda")
    with pytest.raises(kvlink.ChunkError):
        kvlink.check_status(status)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(dst.preset, dst.engine), before))
    # the head-range words are not checked: a receiver places heads where it wants them
    ok = chunk.clone()
    ok[7 * 4] ^= 1
    kvlink.check_status(kvlink.unpack(dst.layout, [5, 6, 7], 40, ok, backend="cuda"))


def test_runs_on_the_callers_stream_without_sync(generator):
    src = gpu_cache("vllm_flash_attn_nhd", generator)
    dst = gpu_cache("vllm_flashinfer_hnd", generator)
    chunk = torch.empty(kvlink.packed_nbytes(src.layout, 64), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    kvlink.prepare(src.layout, side)  # one-time work: compile, plane tables, the stream's metadata ring
    kvlink.prepare(dst.layout, side)
    torch.cuda.synchronize()
    gate = torch.cuda.Event()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # hold the side stream busy; a hidden sync would wait for it
        gate.record(side)
    kvlink.pack(src.layout, [1, 2, 3, 4], 64, chunk, stream=side, backend="cuda")
    status = kvlink.unpack(dst.layout, [9, 8, 7, 6], 64, chunk, stream=side, backend="cuda")
    assert not gate.query(), "pack/unpack waited for the stream: a hidden synchronize"
    side.synchronize()
    kvlink.check_status(status)
    for layer in range(src.layout.num_layers):
        got = src.engine[layer][0, 2, 5]  # K of request token 21: source block 2 (slot 1), offset 5
        want = dst.engine[layer][8, 0, :, 5]  # destination block 8 (slot 1), K, HND [H, N, D], offset 5
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_caller_status_collects_every_chunk_of_a_request(generator):
    """A caller-owned status word is only ever raised: one refused chunk marks the whole request."""
    src = gpu_cache("vllm_flash_attn_nhd", generator)
    dst = gpu_cache("vllm_flash_attn_nhd", generator)
    chunk = torch.empty(kvlink.packed_nbytes(src.layout, 32, layers=(0, 1)), dtype=torch.uint8, device="cuda")
    kvlink.pack(src.layout, [3, 4], 32, chunk, layers=(0, 1), backend="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    kvlink.unpack(dst.layout, [1, 2], 32, chunk, layers=(0, 1), status=status, backend="cuda")
    assert status.item() == 0
    kvlink.unpack(dst.layout, [1, 2], 32, chunk, layers=(1, 2), status=status, backend="cuda")  # wrong layer
    kvlink.unpack(dst.layout, [1, 2], 32, chunk, layers=(0, 1), status=status, backend="cuda")
    assert status.item() == 1


def test_many_queued_launches_reuse_metadata_slots_safely(generator):
    """Hundreds of launches queued behind a busy stream: slot reuse must never corrupt a launch's metadata."""
    src = gpu_cache("vllm_flashinfer_hnd", generator, num_blocks=64)
    stream = torch.cuda.Stream()
    requests, chunks = [], []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(20_000_000)
    for i in range(400):
        num_tokens = int(torch.randint(1, 60, (1,), generator=generator))
        ids = random_blocks(src.layout, num_tokens, generator)
        chunk = torch.empty(kvlink.packed_nbytes(src.layout, num_tokens), dtype=torch.uint8, device="cuda")
        kvlink.pack(src.layout, ids, num_tokens, chunk, stream=stream, backend="cuda")
        requests.append((ids, num_tokens))
        chunks.append(chunk)
    stream.synchronize()
    for (ids, num_tokens), chunk in zip(requests, chunks):
        expected = torch.empty_like(chunk)
        kvlink.pack(src.layout, ids, num_tokens, expected, backend="torch")
        assert torch.equal(chunk, expected)


# ---------------------------------------------------------------------------- the copy kernel (ipc transport)
def copy_and_verify(src, dst, num_tokens, generator, *, layers=None, src_heads=None, dst_heads=None, max_ctas=None):
    """kvlink_copy from ``src`` into ``dst`` (random blocks each); every selected row equal, nothing else written."""
    from kvlink.kernels import launch_copy
    from kvlink.selection import select
    from roundtrip import capture_rows, verify_unpacked
    layers = layers or (0, src.layout.num_layers)
    src_heads = src_heads or (0, src.layout.num_heads)
    dst_heads = dst_heads or (0, dst.layout.num_heads)
    src_ids = random_blocks(src.layout, num_tokens, generator)
    dst_ids = random_blocks(dst.layout, num_tokens, generator)
    before = snapshot(dst.preset, dst.engine)
    saved = capture_rows(dst, dst_ids, layers=layers, tokens=(0, num_tokens), dst_heads=slice(*dst_heads))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    launch_copy(select(src.layout, src_ids, num_tokens, layers=layers, heads=src_heads),
                select(dst.layout, dst_ids, num_tokens, layers=layers, heads=dst_heads, destination=True),
                stream, max_ctas=max_ctas)
    torch.cuda.current_stream().wait_stream(stream)
    verify_unpacked(src, src_ids, dst, dst_ids, before, saved, layers=layers, tokens=(0, num_tokens),
                    src_heads=slice(*src_heads), dst_heads=slice(*dst_heads))


@pytest.mark.parametrize("preset", presets.PRESETS)
def test_copy_kernel_between_layouts_and_block_sizes(preset, generator):
    other = {"vllm_mla": "sglang_mla", "sglang_mla": "vllm_mla"}.get(preset, "flashinfer_hnd")
    a = gpu_cache(preset, generator, block_size=16)
    b = gpu_cache(other, generator, block_size=8, num_blocks=90)
    num_tokens = 16 * 11 + 5
    copy_and_verify(a, b, num_tokens, generator)
    copy_and_verify(b, a, num_tokens, generator)


@pytest.mark.parametrize("num_blocks,max_ctas", [(1, None), (4096, 64), (300, 1)])
def test_copy_kernel_one_block_many_blocks_small_grids(num_blocks, max_ctas, generator):
    a = gpu_cache("vllm_flash_attn_nhd", generator, num_layers=2, num_blocks=num_blocks + 3, block_size=16,
                  num_heads=2, head_dim=64)
    b = gpu_cache("vllm_2026_lhnbc", generator, num_layers=2, num_blocks=num_blocks + 5, block_size=16, num_heads=2,
                  head_dim=64)
    copy_and_verify(a, b, 16 * num_blocks - 3 if num_blocks > 1 else 1, generator, max_ctas=max_ctas)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 36), (torch.bfloat16, 13), (torch.float32, 7)])
def test_copy_kernel_odd_rows_and_head_ranges(dtype, head_dim, generator):
    a = gpu_cache("vllm_flash_attn_hnd", generator, dtype=dtype, head_dim=head_dim, num_heads=8)
    b = gpu_cache("sglang_mha", generator, dtype=dtype, head_dim=head_dim, num_heads=4, block_size=32)
    copy_and_verify(a, b, 77, generator, layers=(1, 3), src_heads=(5, 8), dst_heads=(1, 4))
