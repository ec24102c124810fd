"""fp8 (e4m3) on the wire: error bounds, chunk format, conversion into fp8 caches, transfers, and kernel parity on a GPU.

The stated bound, per element x with row scale s = max|row| / 448: after quantization and
dequantization into a cache of dtype T, ``|x' - x| <= 2**-4 |x| + 2**-10 s`` (e4m3 keeps 3
mantissa bits: half an ulp is 2**-4 relative for normal values, and the subnormal step is
2**-9 s) plus T's own rounding of the result (bf16: 2**-8 |x'|, fp16: 2**-11 |x'|).
"""

import pytest
import torch

import kvlink
from kvlink import presets
from kvlink.reference import FP8_MAX, dequantize_rows, quantize_rows
from kvlink.wire import FLAG_FP8_SCALED, ChunkHeader
from markers import requires_gpu

ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}


def finite_fill(generator, scale_spread=True):
    """Normal values with per-row magnitudes spread over 2**-6 .. 2**6 (and some all-zero rows)."""
    def fill(t):
        x = torch.randn(t.shape, generator=generator)
        if scale_spread and t.dim() >= 2:
            x = x * torch.exp2(torch.randint(-6, 7, t.shape[:-1], generator=generator).float())[..., None]
        t.copy_(x.to(t.dtype))
    return fill


def assert_within_bound(original: torch.Tensor, received: torch.Tensor, dtype: torch.dtype):
    x, y = original.float(), received.float()
    scale = x.abs().amax(-1, keepdim=True) / FP8_MAX
    bound = 2.0**-4 * x.abs() + 2.0**-10 * scale + ROUNDING[dtype] * y.abs()
    excess = (y - x).abs() - bound
    assert excess.max() <= 0, f"fp8 error exceeds the stated bound by {excess.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_dequantize_stays_within_the_stated_bound(dtype):
    generator = torch.Generator().manual_seed(0)
    rows = torch.empty(512, 8, 128, dtype=dtype)
    finite_fill(generator)(rows)
    rows[3] = 0  # zero rows: scale 0, values 0
    values, scales = quantize_rows(rows)
    assert values.dtype == torch.uint8 and scales.dtype == torch.float32
    assert (scales[3] == 0).all() and (values[3] == 0).all()
    back = dequantize_rows(values, scales, dtype)
    assert_within_bound(rows, back, dtype)
    # the largest element of each row is representable exactly: it maps to +-448
    peak = rows.float().abs().argmax(-1, keepdim=True)
    assert ((values.gather(-1, peak) & 0x7F == 0x7E) | (scales[..., None] == 0)).all()


@pytest.mark.parametrize("preset", [p for p in presets.PRESETS if p not in ("vllm_mla",)])
def test_fp8_chunks_round_trip_on_every_preset_within_bound(preset, generator):
    heads = 1 if preset in presets.MLA_PRESETS else 4
    head_dim = 64 if preset in presets.MLA_PRESETS else 32
    shape = dict(num_layers=3, num_blocks=12, block_size=8, num_heads=heads, head_dim=head_dim)
    src_engine, src = presets.allocate(preset, fill=finite_fill(generator), **shape)
    _, dst = presets.allocate("flashinfer_hnd" if heads > 1 else "sglang_mla", fill=finite_fill(generator),
                              **dict(shape, block_size=16))
    src_ids, dst_ids, num_tokens = [7, 2, 9, 4], [5, 1], 29
    chunk = torch.empty(kvlink.packed_nbytes(src, num_tokens, wire_dtype="fp8"), dtype=torch.uint8)
    plain = kvlink.packed_nbytes(src, num_tokens)
    assert chunk.numel() - 64 == (plain - 64) * (head_dim + 4) // (2 * head_dim), "fp8 is head_dim + 4 bytes a row"
    header = kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype="fp8")
    assert header.flags == FLAG_FP8_SCALED and header.element_bytes == 1
    parsed = ChunkHeader.from_bytes(chunk[:64].numpy().tobytes())
    assert parsed == header
    kvlink.unpack(dst, dst_ids, num_tokens, chunk, wire_dtype="fp8")
    sent = _rows(src, src_ids, num_tokens)
    got = _rows(dst, dst_ids, num_tokens)
    assert_within_bound(sent, got, torch.bfloat16)


def _rows(layout, ids, num_tokens):
    """[planes, tokens, heads, head_dim] of a request, through kvlink's plain (lossless) pack."""
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8, device=layout.device)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[64:].view(layout.dtype).view(layout.num_planes, num_tokens, layout.num_heads, layout.head_dim).cpu()


def test_an_fp8_chunk_is_refused_by_a_plain_unpack_and_the_other_way_round(generator):
    shape = dict(num_layers=2, num_blocks=6, block_size=8, num_heads=2, head_dim=16)
    _, src = presets.allocate("vllm_flash_attn_nhd", fill=finite_fill(generator), **shape)
    engine, dst = presets.allocate("flashinfer_nhd", fill=finite_fill(generator), **shape)
    before = [t.clone() for t in engine]
    fp8 = torch.empty(kvlink.packed_nbytes(src, 12, wire_dtype="fp8"), dtype=torch.uint8)
    kvlink.pack(src, [1, 2], 12, fp8, wire_dtype="fp8")
    plain = torch.empty(kvlink.packed_nbytes(src, 12), dtype=torch.uint8)
    kvlink.pack(src, [1, 2], 12, plain)
    with pytest.raises(ValueError, match="received chunk does not match the destination"):
        kvlink.unpack(dst, [3, 4], 12, torch.cat([fp8, torch.zeros(plain.numel(), dtype=torch.uint8)]))
    with pytest.raises(ValueError, match="received chunk does not match the destination"):
        kvlink.unpack(dst, [3, 4], 12, torch.cat([plain, plain]), wire_dtype="fp8")
    assert all(torch.equal(a, b) for a, b in zip(before, engine)), "a refused chunk wrote something"


def test_fp8_wire_into_an_fp8_cache_applies_its_scale(generator):
    shape = dict(num_layers=2, num_blocks=6, block_size=8, num_heads=2, head_dim=16)
    _, src = presets.allocate("vllm_flash_attn_nhd", fill=finite_fill(generator, scale_spread=False), **shape)
    engine, dst = presets.allocate("vllm_flash_attn_nhd", dtype=torch.float8_e4m3fn, **shape)
    for t in engine:
        t.view(torch.uint8).fill_(0x55)
    chunk = torch.empty(kvlink.packed_nbytes(src, 12, wire_dtype="fp8"), dtype=torch.uint8)
    kvlink.pack(src, [1, 2], 12, chunk, wire_dtype="fp8")
    kvlink.unpack(dst, [4, 0], 12, chunk, wire_dtype="fp8", cache_scale=0.5)
    values, scales = chunk[64: 64 + 4 * 12 * 2 * 16].view(4, 12, 2, 16), chunk[64 + 4 * 12 * 2 * 16:].view(
        torch.float32).view(4, 12, 2)
    want = dequantize_rows(values, scales, torch.float8_e4m3fn, 0.5)
    got = _rows(dst, [4, 0], 12)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # as values: x / 0.5 within the bound (e4m3 rounding twice: 2 * 2**-4)
    sent = _rows(src, [1, 2], 12).float()
    assert ((got.float() * 0.5 - sent).abs() <= 2.0**-3 * sent.abs() + 2.0**-8 * sent.abs().amax(-1, keepdim=True)).all()
    with pytest.raises(ValueError, match="cache_scale must be a positive finite number"):
        kvlink.unpack(dst, [4, 0], 12, chunk, wire_dtype="fp8", cache_scale=0.0)


@pytest.mark.parametrize("dtype,match", [(torch.int8, "needs a source cache of float16, bfloat16, float32"),
                                         (torch.uint8, "needs a source cache of")])
def test_fp8_wire_refuses_caches_it_cannot_quantize(dtype, match):
    _, layout = presets.allocate("vllm_flash_attn_nhd", num_layers=1, num_blocks=2, block_size=4, num_heads=1,
                                 head_dim=8, dtype=dtype)
    chunk = torch.empty(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        kvlink.pack(layout, [0], 4, chunk, wire_dtype="fp8")
    _, odd = presets.allocate("vllm_flash_attn_nhd", num_layers=1, num_blocks=2, block_size=4, num_heads=1,
                              head_dim=6)
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        kvlink.pack(odd, [0], 4, chunk, wire_dtype="fp8")
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        kvlink.pack(odd, [0], 4, chunk, wire_dtype="fp16")


# ---------------------------------------------------------------------------------- transfers (host transport)
def _endpoints(src, dst, **decode_options):
    prefill = kvlink.Endpoint(src, name="prefill-fp8", timeout=10)
    decode = kvlink.Endpoint(dst, name="decode-fp8", listen=None, timeout=10, chunk_bytes=64 * 1024, **decode_options)
    return prefill, decode


@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_fp8_pulls_land_what_the_reference_would_and_send_about_half_the_bytes(dst_dtype, generator):
    shape = dict(num_layers=4, num_blocks=64, num_heads=4, head_dim=64)
    _, src = presets.allocate("vllm_flash_attn_nhd", block_size=16, fill=finite_fill(generator), **shape)
    engine, dst = presets.allocate("flashinfer_hnd", block_size=8, dtype=dst_dtype, **shape)
    _, expected = presets.allocate("flashinfer_hnd", block_size=8, dtype=dst_dtype, **shape)
    num_tokens = 301
    src_ids = torch.randperm(64, generator=generator)[:19].tolist()
    dst_ids = torch.randperm(64, generator=generator)[:38].tolist()
    explicit = {} if dst_dtype == torch.float8_e4m3fn else {"wire_dtype": "fp8"}  # an fp8 cache implies it
    prefill, decode = _endpoints(src, dst, cache_scale=2.0 if dst_dtype == torch.float8_e4m3fn else 1.0)
    with prefill, decode:
        peer = decode.connect(prefill.address)
        handle = decode.pull(peer, "fp8-req", src_ids, dst_ids, num_tokens, **explicit).wait(10)
        assert handle.stats.chunks > 1, "the test should cross several chunks"
        assert handle.stats.payload_bytes == num_tokens * dst.bytes_per_token
        assert handle.stats.wire_bytes == num_tokens * src.num_planes * 4 * (64 + 4)
        if dst_dtype == torch.float16:  # another dtype without fp8 asked for: refused before anything moves
            with pytest.raises(ValueError, match="pull with wire_dtype='fp8' to convert"):
                decode.pull(peer, "plain", src_ids, dst_ids, num_tokens)
    # the same bytes as packing and unpacking here, in one chunk
    chunk = torch.empty(kvlink.packed_nbytes(src, num_tokens, wire_dtype="fp8"), dtype=torch.uint8)
    kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype="fp8")
    kvlink.unpack(expected, dst_ids, num_tokens, chunk, wire_dtype="fp8",
                  cache_scale=2.0 if dst_dtype == torch.float8_e4m3fn else 1.0)
    assert torch.equal(_rows(dst, dst_ids, num_tokens).view(torch.uint8),
                       _rows(expected, dst_ids, num_tokens).view(torch.uint8))


def test_an_fp8_decode_endpoint_does_not_offer_ipc_and_says_so():
    _, layout = presets.allocate("flashinfer_hnd", num_layers=1, num_blocks=2, block_size=4, num_heads=1, head_dim=8)
    with kvlink.Endpoint(layout, name="x", listen=None, wire_dtype="fp8") as endpoint:
        assert "ipc" not in endpoint.offered_transports()
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        kvlink.Endpoint(layout, wire_dtype="int4")


# ---------------------------------------------------------------------------------- GPU kernels
def test_vectorized_fp8_kernels_are_picked_for_aligned_power_of_two_rows():
    from kvlink import kernels
    from kvlink.selection import select, with_wire

    for head_dim, dtype, lanes in ((128, torch.bfloat16, 16), (128, torch.float32, 32), (64, torch.float16, 8),
                                   (128, torch.float8_e4m3fn, 8), (576, torch.bfloat16, None), (24, torch.bfloat16, None)):
        _, layout = presets.allocate("vllm_flash_attn_nhd", num_layers=1, num_blocks=2, block_size=4, num_heads=2,
                                     head_dim=head_dim, dtype=dtype)
        role = "destination" if dtype == torch.float8_e4m3fn else "source"
        sel = with_wire(select(layout, [0], 4), "fp8", role=role)
        assert kernels._fp8_vectorized(sel, 4096) == lanes, (head_dim, dtype)
        assert kernels._fp8_vectorized(sel, 4100) is None  # a chunk off 16-byte alignment


@requires_gpu
@pytest.mark.parametrize("path", ["vectorized", "generic"])
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_fp8_kernels_match_the_reference_bit_for_bit(src_dtype, dst_dtype, path, generator):
    shape = dict(num_layers=3, num_blocks=300, block_size=16, num_heads=8, head_dim=128)
    _, src = presets.allocate("vllm_flash_attn_nhd", dtype=src_dtype, device="cuda", fill=finite_fill(generator),
                              **shape)
    num_tokens = 4000  # 250 blocks, partial last one
    src_ids = torch.randperm(300, generator=generator)[:250].tolist()
    dst_ids = torch.randperm(600, generator=generator)[:500].tolist()
    size = kvlink.packed_nbytes(src, num_tokens, wire_dtype="fp8")
    offset = 0 if path == "vectorized" else 4  # a chunk off 16-byte alignment takes the generic kernels
    chunks = {}
    for backend in ("cuda", "torch"):
        chunk = torch.full((size + 16,), 0xAB, dtype=torch.uint8, device="cuda")[offset: offset + size]
        kvlink.pack(src, src_ids, num_tokens, chunk, wire_dtype="fp8", backend=backend)
        chunks[backend] = chunk
    torch.cuda.synchronize()
    assert torch.equal(chunks["cuda"], chunks["torch"]), "fp8 pack kernel differs from the reference"
    results = {}
    for backend in ("cuda", "torch"):
        engine, dst = presets.allocate("flashinfer_hnd", dtype=dst_dtype, device="cuda",
                                       **dict(shape, num_blocks=600, block_size=8))
        for t in engine:
            t.view(torch.uint8).fill_(0x3C)
        status = kvlink.unpack(dst, dst_ids, num_tokens, chunks["torch"], wire_dtype="fp8", backend=backend,
                               cache_scale=0.25 if dst_dtype == torch.float8_e4m3fn else 1.0)
        kvlink.check_status(status)
        results[backend] = [t.view(torch.uint8).clone() for t in engine]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(results["cuda"], results["torch"])), \
        "fp8 unpack kernel differs from the reference (or wrote outside the request's blocks)"


@requires_gpu
def test_fp8_unpack_kernel_refuses_a_plain_chunk(generator):
    shape = dict(num_layers=2, num_blocks=8, block_size=16, num_heads=2, head_dim=64)
    _, src = presets.allocate("vllm_flash_attn_nhd", device="cuda", fill=finite_fill(generator), **shape)
    engine, dst = presets.allocate("flashinfer_hnd", device="cuda", fill=finite_fill(generator), **shape)
    before = [t.view(torch.uint8).clone() for t in engine]  # bytes: a NaN never equals itself
    plain = torch.empty(kvlink.packed_nbytes(src, 40), dtype=torch.uint8, device="cuda")
    kvlink.pack(src, [1, 2, 3], 40, plain)
    status = kvlink.unpack(dst, [4, 5, 6], 40, plain, wire_dtype="fp8")
    with pytest.raises(kvlink.wire.ChunkError):
        kvlink.check_status(status)
    assert all(torch.equal(a, b.view(torch.uint8)) for a, b in zip(before, engine)), "a refused chunk wrote something"
