"""End-to-end transfer cases shared by the host-transport (CPU) and NCCL (two GPUs) test modules.

Each module provides the fixtures ``prefill`` (a PrefillProcess), ``mirror`` (the prefill cache
rebuilt from its seed) and ``decode`` ((endpoint, peer, engine, layout)).
"""

import time

import pytest
import torch

import kvlink
from engine_access import snapshot

DST_PRESET = "flashinfer_hnd"


def packed(layout, ids, num_tokens):
    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8, device=layout.device)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[kvlink.HEADER_BYTES:].cpu()


def test_many_concurrent_requests_of_random_sizes(prefill, mirror, decode, generator):
    endpoint, peer, _, layout = decode
    dst_free = torch.randperm(layout.num_blocks, generator=generator).tolist()
    handles, requests = [], []
    for i in range(24):
        num_tokens = int(torch.randint(1, 200, (1,), generator=generator))
        src = torch.randperm(mirror.num_blocks, generator=generator)[: -(-num_tokens // mirror.block_size)].tolist()
        dst = [dst_free.pop() for _ in range(-(-num_tokens // layout.block_size))]
        handles.append(endpoint.pull(peer, f"req-{i}", src, dst, num_tokens))
        requests.append((src, dst, num_tokens))
    for handle, (src, dst, num_tokens) in zip(handles, requests):
        handle.wait(20)
        assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens)), handle.request
        assert handle.stats.payload_bytes == num_tokens * layout.bytes_per_token
    deadline = time.time() + 10
    confirmed = []
    while len(confirmed) < len(handles) and time.time() < deadline:
        confirmed += prefill.call("finished_sends")
        time.sleep(0.05)
    assert sorted(confirmed) == sorted((f"req-{i}", True) for i in range(24))


def test_layerwise_mode_waits_for_each_layer(prefill, mirror, decode, generator):
    endpoint, peer, _, layout = decode
    src, dst, num_tokens = [5, 9, 200, 3], list(range(100, 116)), 61
    handle = endpoint.pull(peer, "layered", src, dst[:8], num_tokens, layerwise=True)
    time.sleep(0.3)
    assert not handle.done(), "a layer-wise pull finished before prefill wrote any layer"
    prefill.call("layer_ready", "layered", [0, 1, 2])
    time.sleep(0.3)
    assert not handle.done(), "finished without layer 3"
    prefill.call("layer_ready", "layered", [3])
    handle.wait(10)
    assert torch.equal(packed(layout, dst[:8], num_tokens), packed(mirror, src, num_tokens))


def test_incompatible_layouts_fail_the_handshake(prefill, mirror):
    _, layout = kvlink.presets.allocate("flashinfer_hnd", num_layers=4, num_blocks=8, block_size=8, num_heads=4,
                                        head_dim=2 * mirror.head_dim, device=prefill.decode_device)
    with kvlink.Endpoint(layout, name="decode-bad", listen=None, timeout=10) as endpoint:
        with pytest.raises(ConnectionRefusedError, match=f"incompatible layouts: head_dim is {mirror.head_dim} in "
                                                         f"vllm_flash_attn_nhd but {2 * mirror.head_dim}"):
            endpoint.connect(prefill.address)


def test_blocks_that_do_not_exist_fail_before_anything_is_written(prefill, decode):
    endpoint, peer, engine, layout = decode
    before = snapshot(DST_PRESET, engine)
    with pytest.raises(ValueError, match=r"src_blocks\[1\]=256 is out of range \[0, 256\) of prefill's cache"):
        endpoint.pull(peer, "missing", [0, 256], [1, 2, 3], 20)
    with pytest.raises(ValueError, match=r"block_ids\[0\]=700 is out of range"):
        endpoint.pull(peer, "missing-dst", [0, 1], [700, 2, 3], 20)
    # a decode side with a stale view of the prefill cache: the prefill side refuses the pull
    endpoint.set_remote_view(peer, num_blocks=10_000)
    if endpoint.links()[0]["transport"] == "ipc":
        # the decode side reads the prefill's cache itself: its mapped view refuses the block at once
        with pytest.raises(ValueError, match=r"src_blocks\[1\]=9000 is out of range \[0, 256\) of prefill's cache"):
            endpoint.pull(peer, "stale", [0, 9000], [1, 2, 3], 20)
    else:
        handle = endpoint.pull(peer, "stale", [0, 9000], [1, 2, 3], 20)
        with pytest.raises(kvlink.TransferError,
                           match=r"request 'stale' from prefill: .*block_ids\[1\]=9000 is out of range"):
            handle.wait(10)
    for a, b in zip(snapshot(DST_PRESET, engine), before):
        assert torch.equal(a, b), "a refused pull wrote to the cache"


def test_pull_errors_name_the_argument(decode):
    endpoint, peer, _, _ = decode
    with pytest.raises(ValueError, match="no link to peer 'nobody'"):
        endpoint.pull("nobody", "r", [0], [0], 1)
    with pytest.raises(TypeError, match="request must be a non-empty str"):
        endpoint.pull(peer, 17, [0], [0], 1)
    with pytest.raises(ValueError, match="destination block_ids repeat block 3"):
        endpoint.pull(peer, "r", [0, 1], [3, 3, 4], 20)
    with pytest.raises(ValueError, match="must lie in"):
        endpoint.pull(peer, "r", [0, 1], [3, 4, 5], 20, src_heads=(0, 5))


def test_wait_times_out_naming_request_and_peer(prefill, decode):
    endpoint, peer, _, _ = decode
    handle = endpoint.pull(peer, "never-ready", [1], [1, 2], 16, layerwise=True)
    with pytest.raises(TimeoutError, match=r"request 'never-ready' from prefill: not done after 0.3 s"):
        handle.wait(0.3)
    prefill.call("layer_ready", "never-ready", [0, 1, 2, 3])  # let the link move on
    handle.wait(10)


def test_a_request_id_in_flight_is_refused_until_its_pull_ends(prefill, mirror, decode, generator):
    """The prefill side knows a pull by its request id (notifications, layer_ready, cancels): a second
    pull of an id still in flight on the link is refused before anything is sent; once the first
    pull is done the id may be pulled again, and each pull is reported sent once."""
    endpoint, peer, _, layout = decode
    src, num_tokens = [7, 30, 11], 40
    num_dst = -(-num_tokens // layout.block_size)
    first_dst, second_dst = list(range(200, 200 + num_dst)), list(range(300, 300 + num_dst))
    first = endpoint.pull(peer, "twice", src, first_dst, num_tokens, layerwise=True)  # held back by its layers
    with pytest.raises(ValueError, match=f"request 'twice' is already being pulled from {peer}"):
        endpoint.pull(peer, "twice", src, second_dst, num_tokens)
    prefill.call("layer_ready", "twice", list(range(layout.num_layers)))
    first.wait(10)
    endpoint.pull(peer, "twice", src, second_dst, num_tokens).wait(10)
    for dst in (first_dst, second_dst):
        assert torch.equal(packed(layout, dst, num_tokens), packed(mirror, src, num_tokens))
    deadline = time.time() + 10
    confirmed = []
    while len(confirmed) < 2 and time.time() < deadline:
        confirmed += [c for c in prefill.call("finished_sends") if c[0] == "twice"]
        time.sleep(0.05)
    assert confirmed == [("twice", True), ("twice", True)]
