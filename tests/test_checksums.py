"""End-to-end payload checksums: the function itself, a corrupted chunk on the host transport
that must be caught before it is unpacked (CPU, runs in CI), and the GPU checksum kernel of the
NCCL pipeline against the same function (skipped without a GPU)."""

import numpy as np
import pytest
import torch

import kvlink
from kvlink.wire import payload_checksum_numpy, payload_checksum_torch
from markers import requires_gpu

SHAPE = dict(num_layers=2, num_blocks=64, block_size=8, num_heads=2, head_dim=16)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 4097, 1 << 20])
def test_numpy_and_torch_agree_and_catch_corruption(size):
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    value = payload_checksum_numpy(data)
    assert value == int(payload_checksum_torch(torch.from_numpy(data)))
    if size >= 8:
        flipped = data.copy()
        flipped[size // 2] ^= 0x10
        assert payload_checksum_numpy(flipped) != value
        swapped = data.copy()
        swapped[:4], swapped[4:8] = data[4:8], data[:4]
        if not np.array_equal(data[:4], data[4:8]):
            assert payload_checksum_numpy(swapped) != value, "reordered words must change the checksum"


def caches(generator):
    from engine_access import random_fill
    return (kvlink.presets.allocate("vllm_flash_attn_nhd", fill=random_fill(generator), **SHAPE),
            kvlink.presets.allocate("flashinfer_hnd", fill=random_fill(generator), **SHAPE))


def packed(layout, ids, num_tokens):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[64:]


def test_checksummed_pulls_are_byte_exact(generator):
    (_, src), (_, dst) = caches(generator)
    with kvlink.Endpoint(src, name="p", chunk_bytes=4096, timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, chunk_bytes=4096, timeout=5, checksum=True) as decode:
        seen = []
        prefill.set_serve_hook(lambda request, chunk_index, payload: seen.append(payload) or payload)
        peer = decode.connect(prefill.address)
        src_ids, dst_ids = list(range(10, 23)), list(range(30, 43))
        handle = decode.pull(peer, "checked", src_ids, dst_ids, 100)
        handle.wait(5)
        assert handle.stats.chunks > 1 and len(seen) == handle.stats.chunks
        assert all(int(c[60:64].view("<u4")[0]) == payload_checksum_numpy(c[64:]) for c in seen)
        assert torch.equal(packed(dst, dst_ids, 100), packed(src, src_ids, 100))


@pytest.mark.parametrize("checksum", [True, False])
def test_a_chunk_corrupted_on_the_way(generator, checksum):
    """With checksums the corrupted chunk is refused before any byte lands; without, it lands silently."""
    from engine_access import snapshot
    (_, src), (dst_engine, dst) = caches(generator)
    with kvlink.Endpoint(src, name="p", chunk_bytes=4096, timeout=5) as prefill, \
            kvlink.Endpoint(dst, name="d", listen=None, chunk_bytes=4096, timeout=5, checksum=checksum) as decode:
        def corrupting(request, chunk_index, payload):
            chunk = payload.copy()
            chunk[64 + 17] ^= 0x01  # one bit, in each chunk's payload (the first one fails the pull)
            return chunk
        prefill.set_serve_hook(corrupting)
        peer = decode.connect(prefill.address)
        before = snapshot("flashinfer_hnd", dst_engine)
        handle = decode.pull(peer, "corrupted", [1, 2, 3], [4, 5, 6], 20)
        if checksum:
            with pytest.raises(kvlink.TransferError, match=r"chunk 0 refused: checksum mismatch: the chunk was "
                                                           r"corrupted on the way; the destination blocks are untouched"):
                handle.wait(5)
            assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                       for a, b in zip(snapshot("flashinfer_hnd", dst_engine), before))
        else:
            handle.wait(5)
            assert not torch.equal(packed(dst, [4, 5, 6], 20), packed(src, [1, 2, 3], 20))


@requires_gpu
@pytest.mark.parametrize("size", [1, 3, 4, 5, 4097, 262_139, 1 << 22])
def test_the_gpu_checksum_kernel_writes_and_checks_what_numpy_computes(size):
    """kvlink_checksum (the NCCL pipeline's, no temporaries): written into the header, it equals
    the numpy checksum; checked, an intact chunk passes and keeps its magic, a chunk with one
    byte flipped loses its magic and sets the flag; its scratch is left zero for the next."""
    from kvlink import kernels
    from kvlink.wire import CHECKSUM_OFFSET, HEADER_BYTES, MAGIC

    rng = np.random.default_rng(size)
    stream = torch.cuda.current_stream()
    chunk = torch.from_numpy(rng.integers(0, 256, HEADER_BYTES + size + 4, dtype=np.uint8)).cuda()
    chunk[:4] = torch.frombuffer(bytearray(MAGIC), dtype=torch.uint8).cuda()
    scratch = torch.zeros(3, dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    kernels.load_kernels(0)

    def run(verify: bool):
        kernels.launch_checksum(0, chunk.data_ptr(), HEADER_BYTES, size, CHECKSUM_OFFSET, scratch.data_ptr(),
                                stream, verify_into=flag.data_ptr() if verify else 0)
        torch.cuda.synchronize()
        assert not scratch.any(), "the scratch words must be left zero"

    run(verify=False)
    host = chunk.cpu().numpy()
    assert int(host[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0]) == payload_checksum_numpy(host[HEADER_BYTES:][:size])
    tail = host[HEADER_BYTES + size:].copy()
    run(verify=True)
    assert int(flag) == 0 and bytes(chunk[:4].cpu().numpy()) == MAGIC
    assert np.array_equal(chunk.cpu().numpy()[HEADER_BYTES + size:], tail), "bytes past the payload changed"
    chunk[HEADER_BYTES + size - 1] ^= 0x01
    run(verify=True)
    assert int(flag) == 1 and bytes(chunk[:4].cpu().numpy()) != MAGIC


@requires_gpu
def test_the_gpu_checksum_kernel_reads_unaligned_payloads():
    from kvlink import kernels
    from kvlink.wire import CHECKSUM_OFFSET, HEADER_BYTES

    rng = np.random.default_rng(7)
    base = torch.from_numpy(rng.integers(0, 256, 4096, dtype=np.uint8)).cuda()
    scratch = torch.zeros(3, dtype=torch.int32, device="cuda")
    kernels.load_kernels(0)
    for offset, size in ((1, 1001), (2, 2046), (3, 7)):
        chunk = base[offset:]
        kernels.launch_checksum(0, chunk.data_ptr(), HEADER_BYTES, size, CHECKSUM_OFFSET, scratch.data_ptr(),
                                torch.cuda.current_stream())
        host = chunk.cpu().numpy()
        assert int(host[CHECKSUM_OFFSET:HEADER_BYTES].view("<u4")[0]) == \
            payload_checksum_numpy(host[HEADER_BYTES:HEADER_BYTES + size]), (offset, size)
