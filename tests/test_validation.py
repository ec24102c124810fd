"""Bad input raises a clear ValueError/TypeError before any byte of the destination moves."""

import pytest
import torch

import kvlink
from engine_access import snapshot
from roundtrip import make_cache


@pytest.fixture
def pair(generator):
    src = make_cache("vllm_flash_attn_nhd", generator, num_blocks=10, block_size=4)
    dst = make_cache("flashinfer_hnd", generator, num_blocks=10, block_size=4)
    chunk = torch.empty(kvlink.packed_nbytes(src.layout, 10), dtype=torch.uint8)
    kvlink.pack(src.layout, [1, 2, 3], 10, chunk)
    return src, dst, chunk


def unpack_must_refuse(dst, exc, match, *args, **kwargs):
    before = snapshot(dst.preset, dst.engine)
    with pytest.raises(exc, match=match):
        kvlink.unpack(dst.layout, *args, **kwargs)
    for a, b in zip(snapshot(dst.preset, dst.engine), before):
        assert torch.equal(a, b), "a refused unpack wrote to the cache"


def test_block_id_out_of_range(pair):
    src, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, r"block_ids\[2\]=10 is out of range \[0, 10\)", [0, 1, 10], 10, chunk)
    unpack_must_refuse(dst, ValueError, r"block_ids\[0\]=-1", [-1, 1, 2], 10, chunk)
    with pytest.raises(ValueError, match="out of range"):
        kvlink.pack(src.layout, [0, 99, 1], 10, chunk)


def test_duplicated_destination_blocks(pair):
    _, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, "destination block_ids repeat block 4", [4, 5, 4], 10, chunk)


def test_token_count_larger_than_blocks_hold(pair):
    src, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, r"num_tokens=13 does not fit 3 blocks of 4 tokens", [0, 1, 2], 13, chunk)
    unpack_must_refuse(dst, ValueError, "num_tokens=0", [0, 1, 2], 0, chunk)
    unpack_must_refuse(dst, ValueError, "fills 2 blocks of 4 but 3 block ids", [0, 1, 2], 8, chunk)
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        kvlink.pack(src.layout, [0, 1, 2], 10.0, chunk)


def test_dtype_mismatch(pair, generator):
    src, _, chunk = pair
    fp16 = make_cache("flashinfer_hnd", generator, num_blocks=10, block_size=4, dtype=torch.float16)
    unpack_must_refuse(fp16, ValueError, "dtype is torch.bfloat16, expected torch.float16", [0, 1, 2], 10, chunk)
    unpack_must_refuse(fp16, TypeError, "chunk must be uint8 bytes", [0, 1, 2], 10, chunk.view(torch.float16))
    with pytest.raises(TypeError, match="must hold integers"):
        kvlink.pack(src.layout, [0.0, 1.0, 2.0], 10, chunk)


def test_device_mismatch(pair):
    src, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, r"chunk is on meta but the cache .* is on cpu", [0, 1, 2], 10,
                       torch.empty(chunk.numel(), dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="stream given"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk, stream=object())


def test_head_range_outside_the_heads(pair):
    src, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, r"heads=\(2, 5\) is outside \[0, 4\)", [0, 1, 2], 10, chunk, heads=(2, 5))
    unpack_must_refuse(dst, ValueError, r"heads=\(2, 2\)", [0, 1, 2], 10, chunk, heads=(2, 2))
    with pytest.raises(ValueError, match=r"heads=\(-1, 2\)"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk, heads=(-1, 2))


def test_chunk_of_another_shape_is_refused(pair):
    """Header words are checked: a different token or layer box, or a short buffer, never lands."""
    _, dst, chunk = pair
    unpack_must_refuse(dst, ValueError, "token_stop is 10, expected 9", [0, 1, 2], 9, chunk)
    unpack_must_refuse(dst, ValueError, "layer_start is 0, expected 1", [0, 1, 2], 10, chunk, layers=(1, 3))
    unpack_must_refuse(dst, ValueError, "holds 63 bytes", [0, 1, 2], 10, chunk[:63])
    corrupt = chunk.clone()
    corrupt[:4] = torch.tensor(list(b"XXXX"), dtype=torch.uint8)
    unpack_must_refuse(dst, ValueError, "not a kvlink chunk", [0, 1, 2], 10, corrupt)


def test_short_chunk_refused_by_pack(pair):
    src, _, chunk = pair
    with pytest.raises(ValueError, match="needs"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk[:-1])
    with pytest.raises(ValueError, match="contiguous 1-D"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk.view(-1, 1))


def test_bad_backend_and_layout_arguments(pair):
    src, _, chunk = pair
    with pytest.raises(ValueError, match="backend must be one of"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk, backend="nccl")
    with pytest.raises(ValueError, match="backend='cuda' needs a GPU cache"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk, backend="cuda")
    with pytest.raises(TypeError, match="layout must be a kvlink CacheLayout"):
        kvlink.pack(src.engine, [0, 1, 2], 10, chunk)
    with pytest.raises(TypeError, match=r"layers must be a \(start, stop\) pair"):
        kvlink.pack(src.layout, [0, 1, 2], 10, chunk, layers=3)
    with pytest.raises(ValueError, match="block_ids is empty"):
        kvlink.pack(src.layout, [], 10, chunk)
    with pytest.raises(ValueError, match="must be 1-D"):
        kvlink.pack(src.layout, [[0, 1, 2]], 10, chunk)


def test_prepare_is_a_no_op_on_the_reference_path(pair):
    src, _, _ = pair
    kvlink.prepare(src.layout)
    with pytest.raises(TypeError, match="layout must be a kvlink CacheLayout"):
        kvlink.prepare(src.engine)
