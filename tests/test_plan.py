"""Chunk plans cover every (layer, token) exactly once, fit the staging slots, and keep layer-wise chunks to one layer."""

import pytest
import torch

from kvlink.plan import box_payload_bytes, plan_chunks

MiB = 1 << 20


def coverage(boxes, layers, num_tokens):
    seen = torch.zeros(layers[1], num_tokens, dtype=torch.int32)
    for l0, l1, t0, t1 in boxes:
        assert layers[0] <= l0 < l1 <= layers[1] and 0 <= t0 < t1 <= num_tokens
        assert l1 - l0 == 1 or (t0, t1) == (0, num_tokens), "a multi-layer chunk must hold whole layers"
        seen[l0:l1, t0:t1] += 1
    return seen[layers[0]:layers[1]]


@pytest.mark.parametrize("num_tokens", [1, 15, 16, 17, 512, 4095, 4096, 70_000])
@pytest.mark.parametrize("chunk_mb", [1, 16, 64])
@pytest.mark.parametrize("layerwise", [False, True])
def test_every_token_of_every_layer_once_and_within_the_slot(num_tokens, chunk_mb, layerwise):
    token_layer_bytes = 2 * 8 * 256
    boxes = plan_chunks((0, 32), num_tokens, token_layer_bytes, chunk_mb * MiB, layerwise=layerwise)
    assert (coverage(boxes, (0, 32), num_tokens) == 1).all()
    assert all(box_payload_bytes(b, token_layer_bytes) <= chunk_mb * MiB for b in boxes)
    if layerwise:
        assert all(b[1] - b[0] == 1 for b in boxes)


def test_small_requests_are_one_chunk_and_large_ones_ramp():
    tlb = 2 * 8 * 256
    assert plan_chunks((0, 32), 16, tlb, 64 * MiB) == [(0, 32, 0, 16)]
    assert len(plan_chunks((0, 32), 512, tlb, 64 * MiB)) == 1  # 64 MiB: one chunk, no ramp
    sizes = [box_payload_bytes(b, tlb) for b in plan_chunks((0, 32), 4096, tlb, 64 * MiB)]
    assert sizes[0] < max(sizes) and sizes[-1] < max(sizes), "the first and last chunks are the small ones"
    assert max(sizes) == 64 * MiB


def test_layer_range_and_bad_arguments():
    boxes = plan_chunks((3, 5), 100, 1024, 1 << 20)
    assert (coverage(boxes, (3, 5), 100) == 1).all()
    with pytest.raises(ValueError, match="empty request"):
        plan_chunks((0, 4), 0, 1024, 1 << 20)
    with pytest.raises(ValueError, match="cannot hold one token"):
        plan_chunks((0, 4), 10, 4096, 1024)
