"""The SGLang backend driven through SGLang's call sequence, real transfers on the host transport.

Prefill: manager -> register_to_bootstrap; per request a sender: init -> send (once per prefill
chunk) -> poll. Decode: a receiver: init -> send_metadata -> poll. Both poll through to Success,
then the decode pool is compared byte for byte with the prefill's; failures end in KVPoll.Failed
with an error naming the room, within the timeout.
"""

import inspect
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_access import random_fill
from kvlink import kernels, presets
from kvlink.integrations import sglang as kv_sglang
from kvlink.integrations.sglang import (KVLinkKVBootstrapServer, KVLinkKVManager, KVLinkKVReceiver, KVLinkKVSender,
                                        KVPoll, KVTransferError)
from sharded_caches import make_truth, rank_cache, read_rows, truth_rows

LAYERS, HEADS, HEAD_DIM, PAGES, PAGE = 3, 4, 16, 32, 16


def kv_args(engine, layout, *, rank=0, mla=False, total_heads=HEADS, device="cpu"):
    """KVArgs as SGLang's pools fill it: K buffers of every layer then V buffers, page bytes, page size."""
    buffers = engine if mla else list(engine[0]) + list(engine[1])
    page_bytes = buffers[0][0].nbytes * layout.block_size
    return SimpleNamespace(engine_rank=rank, kv_data_ptrs=[b.data_ptr() for b in buffers],
                           kv_data_lens=[b.nbytes for b in buffers], kv_item_lens=[page_bytes] * len(buffers),
                           page_size=layout.block_size, kv_head_num=layout.num_heads, total_kv_head_num=total_heads,
                           gpu_id=torch.device(device).index or 0, device=device)


def server_args(bootstrap_port, tp=1, decode_tp=None, timeout=5.0, transport="host", **extra):
    return SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=bootstrap_port, kv_cache_dtype="bfloat16",
                           tp_size=tp, disaggregation_decode_tp=decode_tp, disaggregation_transfer_timeout=timeout,
                           kvlink_transport=transport, **extra)


@pytest.fixture
def bootstrap():
    server = KVLinkKVBootstrapServer("127.0.0.1", 0)
    yield server
    server.close()


def poll_until(objects, state, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [o.poll() for o in objects]
        if min(states) == state:  # SGLang min-reduces polls across its TP group
            return
        if KVPoll.Failed in states:
            raise AssertionError([o.error for o in objects])
        time.sleep(0.005)
    raise AssertionError(f"not {state} within {timeout} s: {[o.poll() for o in objects]}")


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and kernels.cuda_available()


@pytest.mark.parametrize("prefill_tp,decode_tp,transport", [
    (1, 1, "host"), (2, 1, "host"), (1, 2, "host"),
    *[pytest.param(1, 1, t, marks=pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")) for t in ("nccl", "ipc")]])
def test_sender_and_receiver_poll_through_to_success_and_the_pool_is_byte_exact(
        bootstrap, prefill_tp, decode_tp, transport, generator):
    seed = int(generator.initial_seed())
    prefill_device, decode_device = ("cuda:0", "cuda:1") if transport != "host" else ("cpu", "cpu")
    truth = make_truth(seed, num_layers=LAYERS, num_kv=2, num_blocks=PAGES, block_size=PAGE, num_heads=HEADS,
                       head_dim=HEAD_DIM)
    from kvlink.resharding import heads_of_rank

    prefill_pools = [rank_cache("sglang_mha", truth, heads_of_rank(HEADS, prefill_tp, r), prefill_device)
                     for r in range(prefill_tp)]
    decode_pools = [presets.allocate("sglang_mha", num_layers=LAYERS, num_blocks=PAGES, block_size=PAGE,
                                     num_heads=HEADS // decode_tp, head_dim=HEAD_DIM, device=decode_device,
                                     fill=random_fill(torch.Generator().manual_seed(seed + r)))
                    for r in range(decode_tp)]
    prefill = [KVLinkKVManager(kv_args(e, l, rank=r, device=prefill_device), "prefill",
                               server_args(bootstrap.port, prefill_tp, decode_tp, timeout=20.0, transport=transport))
               for r, (e, l) in enumerate(prefill_pools)]
    decode = [KVLinkKVManager(kv_args(e, l, rank=r, device=decode_device), "decode",
                              server_args(bootstrap.port, decode_tp, timeout=20.0, transport=transport))
              for r, (e, l) in enumerate(decode_pools)]
    try:
        for manager in prefill:
            manager.register_to_bootstrap()
        address = f"127.0.0.1:{bootstrap.port}"
        room = 4242
        src_pages = np.array([7, 3, 19, 25], dtype=np.int32)   # 64 slots, the prompt's last page partly used
        dst_pages = np.array([12, 0, 30, 5], dtype=np.int32)
        receivers = [KVLinkKVReceiver(m, address, room) for m in decode]
        for receiver in receivers:
            assert receiver.poll() == KVPoll.Bootstrapping
            receiver.init(0)
            assert receiver.poll() == KVPoll.WaitingForInput
            receiver.send_metadata(dst_pages)
        senders = [KVLinkKVSender(m, address, room, dest_tp_ranks=list(range(decode_tp)), pp_rank=0) for m in prefill]
        for sender in senders:
            sender.init(len(src_pages))
            assert sender.poll() == KVPoll.WaitingForInput
            sender.send(src_pages[:3])    # chunked prefill: two calls
            assert sender.poll() == KVPoll.WaitingForInput
            sender.send(src_pages[3:])
        poll_until(receivers, KVPoll.Success, timeout=30)
        poll_until(senders, KVPoll.Success, timeout=30)
        assert all(link["transport"] == transport for m in decode for link in m.endpoint.links())
        for rank, (engine, layout) in enumerate(decode_pools):
            got = read_rows("sglang_mha", engine, layout, dst_pages.tolist(), len(src_pages) * PAGE)
            want = truth_rows(truth, src_pages.tolist(), len(src_pages) * PAGE, heads_of_rank(HEADS, decode_tp, rank))
            assert torch.equal(got, want), f"decode rank {rank} differs"
    finally:
        for manager in prefill + decode:
            manager.close()


def test_a_room_never_published_fails_within_the_timeout_naming_it(bootstrap, generator):
    engine, layout = presets.allocate("sglang_mha", num_layers=2, num_blocks=8, block_size=8, num_heads=2, head_dim=16)
    p_engine, p_layout = presets.allocate("sglang_mha", num_layers=2, num_blocks=8, block_size=8, num_heads=2,
                                          head_dim=16)
    prefill = KVLinkKVManager(kv_args(p_engine, p_layout, total_heads=2), "prefill",
                              server_args(bootstrap.port, timeout=1.0, kvlink_lease_seconds=0.5))
    decode = KVLinkKVManager(kv_args(engine, layout, total_heads=2), "decode", server_args(bootstrap.port, timeout=1.0))
    try:
        prefill.register_to_bootstrap()
        receiver = KVLinkKVReceiver(decode, f"127.0.0.1:{bootstrap.port}", 77)
        receiver.init(0)
        receiver.send_metadata(np.array([1, 2]))
        started = time.time()
        while receiver.poll() != KVPoll.Failed:
            assert time.time() - started < 5.0, "no failure within 5 s"
            time.sleep(0.01)
        with pytest.raises(KVTransferError, match="room 77 .*did not publish its pages within 1.0 s"):
            receiver.failure_exception()
        # a sender nobody pulls from fails once its lease runs out (its pages can then be freed)
        sender = KVLinkKVSender(prefill, f"127.0.0.1:{bootstrap.port}", 78)
        sender.init(1)
        sender.send(np.array([3]))
        started = time.time()
        while sender.poll() != KVPoll.Failed:
            assert time.time() - started < 5.0
            time.sleep(0.01)
        with pytest.raises(KVTransferError, match="room 78 .*no decode rank confirmed"):
            sender.failure_exception()
    finally:
        prefill.close()
        decode.close()


def test_a_receiver_without_a_bootstrap_server_fails_instead_of_hanging(generator):
    engine, layout = presets.allocate("sglang_mha", num_layers=2, num_blocks=8, block_size=8, num_heads=2, head_dim=16)
    decode = KVLinkKVManager(kv_args(engine, layout, total_heads=2), "decode", server_args(1, timeout=1.0))
    try:
        receiver = KVLinkKVReceiver(decode, "127.0.0.1:1", 5)
        receiver.init(0)
        assert receiver.poll() == KVPoll.Failed
        with pytest.raises(KVTransferError, match="room 5 .*bootstrap failed"):
            receiver.failure_exception()
    finally:
        decode.close()


def test_mla_pool_from_kvargs(bootstrap, generator):
    seed = int(generator.initial_seed())
    truth = make_truth(seed, num_layers=2, num_kv=1, num_blocks=8, block_size=8, num_heads=1, head_dim=72)
    p_engine, p_layout = rank_cache("sglang_mla", truth, (0, 1))
    d_engine, d_layout = presets.allocate("sglang_mla", num_layers=2, num_blocks=8, block_size=8, num_heads=1,
                                          head_dim=72)
    prefill = KVLinkKVManager(kv_args(p_engine, p_layout, mla=True), "prefill", server_args(bootstrap.port),
                              is_mla_backend=True)
    decode = KVLinkKVManager(kv_args(d_engine, d_layout, mla=True), "decode", server_args(bootstrap.port),
                             is_mla_backend=True)
    try:
        prefill.register_to_bootstrap()
        address = f"127.0.0.1:{bootstrap.port}"
        receiver = KVLinkKVReceiver(decode, address, 9)
        receiver.init(0)
        receiver.send_metadata(np.array([6, 2]))
        sender = KVLinkKVSender(prefill, address, 9)
        sender.init(2)
        sender.send(np.array([1, 4]))
        poll_until([receiver], KVPoll.Success)
        poll_until([sender], KVPoll.Success)
        assert torch.equal(read_rows("sglang_mla", d_engine, d_layout, [6, 2], 16), truth_rows(truth, [1, 4], 16, (0, 1)))
    finally:
        prefill.close()
        decode.close()


def test_bad_kvargs_and_modes_are_refused(bootstrap):
    engine, layout = presets.allocate("sglang_mha", num_layers=2, num_blocks=8, block_size=8, num_heads=2, head_dim=16)
    args = kv_args(engine, layout)
    with pytest.raises(ValueError, match="disaggregation_mode must be PREFILL or DECODE"):
        KVLinkKVManager(args, "null", server_args(bootstrap.port))
    args.kv_item_lens = [args.kv_item_lens[0] + 2] * len(args.kv_item_lens)
    with pytest.raises(ValueError, match="is not 8 slots x 2 heads"):
        KVLinkKVManager(args, "prefill", server_args(bootstrap.port))


@pytest.mark.skipif(not kv_sglang.HAVE_SGLANG, reason="SGLang is not installed here")
def test_the_backend_implements_sglangs_real_base_classes():
    from sglang.srt.disaggregation.base import conn

    for ours, theirs in ((KVLinkKVManager, conn.BaseKVManager), (KVLinkKVSender, conn.BaseKVSender),
                         (KVLinkKVReceiver, conn.BaseKVReceiver), (KVLinkKVBootstrapServer, conn.BaseKVBootstrapServer)):
        assert issubclass(ours, theirs)
        for name in theirs.__abstractmethods__:
            a, b = inspect.signature(getattr(ours, name)), inspect.signature(getattr(theirs, name))
            assert list(a.parameters)[:len(b.parameters)] == list(b.parameters), (ours, name)
