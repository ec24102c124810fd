"""kvlink's SGLang backend inside SGLang 0.5.23's real call sequences (CPU, host transport).

Each test runs SGLang's own PrefillBootstrapQueue, the prefill scheduler mixin's
``send_kv_chunk``/``_send_kv_chunk``/``process_disagg_prefill_inflight_queue``, and the decode
side's ``DecodePreallocQueue``/``DecodeTransferQueue`` (``pop_transferred`` through the metadata
gate and the commit of the first token), over real pools, KVArgs and MetadataBuffers
(:mod:`sglang_engine`). Requests reach completion in SGLang's state machine; the decode pool
and metadata rows are compared byte for byte with the prefill's.

The numbered issues (``#n``) name the failure of the original adapter each test pins down.
"""

import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("sglang.srt.disaggregation.decode", reason="SGLang is not installed in this environment")

import sglang_engine as se  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH  # noqa: E402

from kvlink import control  # noqa: E402
backend = se.backend()  # kvlink.integrations.sglang (see sglang_engine.backend)

pytestmark = pytest.mark.timeout(120)

ROOMS = iter(range(1_000_001, 2_000_000, 7919))


@pytest.fixture(scope="module", autouse=True)
def _process():
    se.setup_process()
    yield
    se.teardown_process()


@pytest.fixture
def bootstrap():
    server = backend.KVLinkKVBootstrapServer("127.0.0.1", 0)
    yield server
    server.close()


@pytest.fixture
def pairs(bootstrap):
    made = []

    def make(**kw):
        pair = se.Pair(bootstrap.port, **kw)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


def snapshot_metadata_at_commit(rank):
    """The decode metadata row as SGLang's commit reads it (the slot is cleared right after)."""
    seen = {}
    original = rank.transfer._commit_transfer_to_req

    def commit(decode_req):
        seen[decode_req.req.rid] = se.aux_row(rank, decode_req.metadata_buffer_index)
        return original(decode_req)

    rank.transfer._commit_transfer_to_req = commit
    return seen


def run(pair, request, chunks=None, first_token=42):
    pair.submit(request)
    pair.bootstrap(request)
    pair.run_prefill(request, chunks=chunks, first_token=first_token)
    return pair.finish(request)


# ---------------------------------------------------------------------------------- one request
@pytest.mark.parametrize("chunks", [None, [16, 32]], ids=["one-chunk", "chunked-prefill"])
def test_a_request_completes_in_both_engines_byte_exact_with_its_metadata_row(pairs, chunks):
    """#2 #3 #5 #6 #7 #8 (aux): the whole path, as SGLang drives it, to completion on both sides."""
    pair = pairs()
    seen = snapshot_metadata_at_commit(pair.decode[0])
    request = pair.request("r-basic", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    p_req = request.prefill[0]
    assert p_req.disagg_kv_sender.poll() == se.KVPoll.WaitingForInput and not p_req.pending_bootstrap
    pair.run_prefill(request, chunks=chunks, first_token=42)
    prefill_row = se.aux_row(pair.prefill[0], p_req.metadata_buffer_index)
    done_p, done_d = pair.finish(request)
    # prefill: SGLang's inflight queue finished it (not aborted) and freed its metadata row
    assert isinstance(done_p[0].finished_reason, FINISH_LENGTH) and done_p[0].metadata_buffer_index == -1
    assert pair.prefill[0].sched.streamed[-1] is p_req
    # decode: the commit took the first token and the metadata from the row kvlink moved
    d_req = done_d[0]
    assert list(d_req.output_ids) == [42] and not se.is_aborted(d_req)
    assert seen["r-basic"] == prefill_row, "the metadata row (first token, cached tokens, room...) differs"
    assert np.frombuffer(seen["r-basic"][-1], dtype=np.uint64)[0] == request.room
    pair.assert_bytes_equal(request)


GEOMETRY = dict(heads_total=2, head_dim=16, layers=2, pages=48, page_size=16, dtype=torch.bfloat16)


@pytest.fixture
def ranks(bootstrap):
    """Single ranks, built as SGLang builds them (for contracts of one side)."""
    made = []

    def make(kind, **kw):
        cls = se.PrefillRank if kind == "prefill" else se.DecodeRank
        rank = cls(se.server_args(kind, bootstrap.port), 0, **{**GEOMETRY, **kw})
        made.append(rank)
        return rank

    yield make
    for rank in made:
        getattr(rank.kv_manager, "close", lambda: None)()


def test_the_prefill_manager_registers_itself_when_sglang_builds_it(ranks, bootstrap):
    """#2: SGLang never calls register_to_bootstrap(); the constructor must register (without blocking)."""
    prefill = ranks("prefill")
    deadline = time.monotonic() + 10
    route = {}
    while time.monotonic() < deadline and not route.get("ranks"):
        route = backend._http("GET", f"http://127.0.0.1:{bootstrap.port}/route") or {}
        time.sleep(0.01)
    assert route.get("ranks"), "no prefill rank registered with the bootstrap server"
    (entry,) = route["ranks"].values()
    assert entry["address"] == prefill.kv_manager.endpoint.address and entry["tp_size"] == 1


def test_sglang_reads_kv_args_at_the_last_chunk(ranks):
    """#3: _send_kv_chunk reads kv_manager.kv_args.state_types at every last chunk."""
    prefill = ranks("prefill")
    manager = prefill.kv_manager
    assert manager.kv_args.kv_data_ptrs == [b.data_ptr() for b in prefill.buffers()]
    assert manager.kv_args.aux_data_ptrs == prefill.metadata.get_buf_infos()[0]
    req = se.make_req("r-kvargs", 20, next(ROOMS), 1)
    prefill.add(req)
    with prefill.active():
        req.metadata_buffer_index = prefill.metadata_allocator.alloc()
        req.disagg_kv_sender.init(2, req.metadata_buffer_index)
    prefill.allocate(req)
    req.output_ids.append(3)
    req.extend_end = 20
    with prefill.active():
        prefill.sched.send_kv_chunk(req, last_chunk=True)  # reads kv_manager.kv_args.state_types
    assert req.disagg_kv_sender.pages == prefill.slots(req, 0, 20)[::16].div(16, rounding_mode="floor").tolist()


def test_a_decode_manager_builds_from_decodes_kvargs_without_kv_head_num(ranks, pairs):
    """#4: decode's KVArgs carries no kv_head_num (only under SGLANG_DISAGG_STAGING_BUFFER)."""
    decode = ranks("decode")
    assert "kv_head_num" not in vars(decode.kv_manager.kv_args)  # the real DecodePreallocQueue's KVArgs
    assert decode.kv_manager.kv_args.kv_data_ptrs == [b.data_ptr() for b in decode.buffers()]
    pair = pairs()  # the heads come from the prefill's registration; a request completes
    request = pair.request("r-heads", 20, next(ROOMS))
    run(pair, request)
    assert pair.decode[0].kv_manager.layout.num_heads == 2
    pair.assert_bytes_equal(request)


def test_decode_learns_the_prefill_through_prefill_info_table_and_try_ensure_parallel_info(pairs, bootstrap):
    """#5: the decode preallocation queue's dp-rank resolution (fast path, then the slow path)."""
    pair = pairs()
    decode = pair.decode[0]
    address = f"127.0.0.1:{bootstrap.port}"
    assert decode.kv_manager.prefill_info_table.get(address) is None
    first = pair.request("r-info-1", 24, next(ROOMS))
    run(pair, first)
    info = decode.kv_manager.prefill_info_table[address]
    assert (info.dp_size, info.follow_bootstrap_room, info.tp_size, info.error) == (1, True, 1, None)
    second = pair.request("r-info-2", 24, next(ROOMS))
    pair.submit(second)  # now the fast path: _resolve_prefill_dp_rank answers at add()
    assert not decode.prealloc.pending_reqs
    pair.bootstrap(second)
    pair.run_prefill(second)
    pair.finish(second)
    pair.assert_bytes_equal(second)


def _decode_metadata(manager, room, num_pages, prefix=0, decode_tp=1, decode_rank=0):
    """The META a decode rank sends once its pages exist (kvlink's own protocol, typed)."""
    args = manager.kv_args
    return backend.encode_message(backend.RoomMetadata(
        room=room, nonce="n" * 16, decode_rank=decode_rank, decode_tp=decode_tp, decode_prefix_len=prefix,
        num_pages=num_pages, page_size=16, pulls=True, reply_to="tcp://127.0.0.1:1", endpoint="",
        aux_item_lens=tuple(args.aux_item_lens), state_types=(), state_item_lens=(), state_counts=()))


def test_the_prefill_is_waiting_for_input_before_init(ranks):
    """#6: pop_bootstrapped calls init() only after poll() says WaitingForInput (no deadlock)."""
    import zmq

    prefill = ranks("prefill")
    req = se.make_req("r-wfi", 33, next(ROOMS), 1)
    prefill.add(req)
    assert req.disagg_kv_sender.poll() == se.KVPoll.Bootstrapping  # no decode metadata yet
    channel = getattr(prefill.kv_manager, "channel", None)
    if channel is not None:
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.connect(channel.address)
        push.send(_decode_metadata(prefill.kv_manager, req.bootstrap_room, num_pages=3))
        push.close(linger=1000)
    popped = []
    se.drive(lambda: popped.extend(prefill.pop_bootstrapped()), lambda: popped, timeout=10)
    assert popped == [req] and not req.pending_bootstrap
    assert req.disagg_kv_sender.num_pages == 3  # SGLang's finalize_bootstrap ran init(num_pages, index)


def test_send_takes_sglangs_num_kv_tokens(ranks):
    """#7: _send_kv_chunk calls send(page_indices, state_indices, num_kv_tokens=...)."""
    prefill = ranks("prefill")
    req = se.make_req("r-send", 40, next(ROOMS), 1)
    prefill.add(req)
    with prefill.active():  # what finalize_bootstrap does once the decode side is there
        req.metadata_buffer_index = prefill.metadata_allocator.alloc()
        req.disagg_kv_sender.init(3, req.metadata_buffer_index)
        req.pending_bootstrap = False
    prefill.allocate(req)
    with prefill.active():
        for end in (16, 32):  # chunked prefill: two non-last chunks of one page each
            req.extend_end = end
            prefill.sched.send_kv_chunk(req)
    sender = req.disagg_kv_sender
    assert sender.poll() != se.KVPoll.Failed and req.start_send_idx == 32
    assert sender.pages == prefill.slots(req, 0, 32)[::16].div(16, rounding_mode="floor").tolist()
    assert sender.num_tokens == 32


def test_a_request_waits_for_input_then_completes(pairs):
    """#6 end to end: Bootstrapping until the decode side named its pages, then a full transfer."""
    pair = pairs()
    request = pair.request("r-wfi-e2e", 33, next(ROOMS))
    pair.submit(request)
    assert request.prefill[0].disagg_kv_sender.poll() == se.KVPoll.Bootstrapping
    pair.bootstrap(request)
    pair.run_prefill(request)
    pair.finish(request)
    pair.assert_bytes_equal(request)


def test_optimistic_prefill_sends_once_the_decode_side_arrives(pairs):
    """#6 #7: a request prefilled while Bootstrapping; SGLang sends it from the inflight queue later."""
    pair = pairs(prefill_args={"optimistic_prefill_attempts": 1})
    request = pair.request("r-optimistic", 40, next(ROOMS))
    prefill = pair.prefill[0]
    prefill.add(request.prefill[0])
    popped = prefill.pop_bootstrapped()
    assert popped == [request.prefill[0]] and request.prefill[0].pending_bootstrap  # prefilled optimistically
    pair.run_prefill(request)
    for rank, req in zip(pair.decode, request.decode):
        rank.add(req)
    pair.finish(request)
    pair.assert_bytes_equal(request)


# ---------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1), (2, 2)])
def test_prefill_and_decode_tp_differ(pairs, prefill_tp, decode_tp):
    """#9: decode's TP comes from the bootstrap exchange, never from invented ServerArgs fields."""
    pair = pairs(prefill_tp=prefill_tp, decode_tp=decode_tp, heads=4)
    request = pair.request(f"r-tp{prefill_tp}{decode_tp}", 37, next(ROOMS))
    done_p, done_d = run(pair, request)
    assert all(list(r.output_ids) == [42] for r in done_d.values())
    pair.assert_bytes_equal(request)


def test_a_prefill_rank_waits_for_every_decode_rank_that_reads_it(pairs):
    """#9: prefill TP 1, decode TP 2: no Success (pages freed) before decode rank 1 has pulled."""
    pair = pairs(prefill_tp=1, decode_tp=2, heads=2)
    request = pair.request("r-wait-both", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.run_prefill(request)
    done_p, done_d = {}, {}

    def step_rank0():
        done_p.update(enumerate(pair.prefill[0].inflight()))
        done_d.update({0: r for r in pair.decode[0].step()})

    se.drive(step_rank0, lambda: 0 in done_d)
    for _ in range(50):  # decode rank 1 has not pulled: the prefill must hold the pages
        step_rank0()
        time.sleep(0.002)
    assert not done_p, "prefill reported Success before decode rank 1 read its pages"
    pair.finish(request, decode_ranks=[1])
    pair.assert_bytes_equal(request)


def test_mla_pool(pairs):
    pair = pairs(mla=True, head_dim=72, prefill_tp=2, decode_tp=1)
    request = pair.request("r-mla", 35, next(ROOMS))
    run(pair, request)
    pair.assert_bytes_equal(request)


DTYPES = [("fp8_e5m2", torch.float8_e5m2), ("fp8_e4m3", torch.float8_e4m3fn), ("bfloat16", torch.bfloat16)]


@pytest.mark.parametrize("kv_cache_dtype,dtype", DTYPES)
def test_the_layout_takes_kv_cache_dtype_str(ranks, kv_cache_dtype, dtype):
    """#10: KVArgs.kv_cache_dtype_str decides the element type (fp8_e5m2 was unmapped)."""
    prefill = ranks("prefill", dtype=dtype, kv_cache_dtype_str=kv_cache_dtype)
    layout = prefill.kv_manager.layout
    assert layout.dtype == dtype and layout.head_dim == 16 and layout.num_heads == 2
    assert prefill.kv_manager.kv_args.kv_cache_dtype_str == kv_cache_dtype


@pytest.mark.parametrize("kv_cache_dtype,dtype", DTYPES)
def test_fp8_kv_caches_travel_byte_exact(pairs, kv_cache_dtype, dtype):
    pair = pairs(kv_cache_dtype=kv_cache_dtype, dtype=dtype)
    request = pair.request(f"r-{kv_cache_dtype}", 30, next(ROOMS))
    run(pair, request)
    assert pair.decode[0].kv_manager.layout.dtype == dtype
    pair.assert_bytes_equal(request)


def test_draft_layers_pair_each_layers_k_and_v(ranks):
    """#10: a draft pool's buffers follow the target's; layer l is (K_l, V_l), never half the list."""
    prefill = ranks("prefill", layers=2, draft_layers=1)
    layout = prefill.kv_manager.layout
    assert layout.num_layers == 3
    pools = [(prefill.pool, 0), (prefill.pool, 1), (prefill.draft, 0)]
    for layer, (pool, l) in enumerate(pools):
        k_plane, v_plane = layout.planes[2 * layer], layout.planes[2 * layer + 1]
        assert k_plane.data_ptr() == pool.k_buffer[l].data_ptr(), f"layer {layer}: K plane"
        assert v_plane.data_ptr() == pool.v_buffer[l].data_ptr(), f"layer {layer}: V plane"
    assert prefill.kv_manager.kv_args.num_draft_entries == 2  # what SGLang told the manager


def test_draft_model_layers_travel_with_the_request(pairs):
    pair = pairs(layers=2, draft_layers=1)
    request = pair.request("r-draft", 41, next(ROOMS))
    run(pair, request)
    pair.assert_bytes_equal(request)  # read_slots covers target and draft buffers


def test_a_wildcard_host_advertises_a_routable_address(ranks):
    """#10: with --host 0.0.0.0 the registered endpoint carries SGLang's get_local_ip_auto()."""
    from sglang.srt.utils.network import get_local_ip_auto

    ip = get_local_ip_auto()
    assert ip not in ("0.0.0.0", "")
    prefill = se.PrefillRank(se.server_args("prefill", 1, host="0.0.0.0"), 0, **GEOMETRY)
    try:
        assert prefill.kv_manager.endpoint.address.startswith(f"tcp://{ip}:")
        assert prefill.kv_manager.channel.address.startswith(f"tcp://{ip}:")
    finally:
        prefill.kv_manager.close()


def test_a_request_completes_between_wildcard_hosts(pairs):
    pair = pairs(prefill_args={"host": "0.0.0.0"}, decode_args={"host": "0.0.0.0"})
    request = pair.request("r-wildcard", 20, next(ROOMS))
    run(pair, request)
    pair.assert_bytes_equal(request)


def test_a_local_prefix_hit_on_decode_is_not_sent_again(pairs):
    """#8 (decode_prefix_len): decode's radix cache holds a prefix; prefill sends only the rest."""
    pair = pairs(decode_args={"disaggregation_decode_enable_radix_cache": True}, radix=True)
    first = pair.request("r-prefix-1", 48, next(ROOMS), seed=5)
    done_p, done_d = run(pair, first)
    decode = pair.decode[0]
    with decode.active():  # the decode request finishes; its KV goes into the radix tree
        from sglang.srt.mem_cache.common import release_kv_cache

        d_req = done_d[0]
        d_req.finished_reason = FINISH_LENGTH(length=0)
        release_kv_cache(d_req, decode.tree_cache, checkpoint=True)
    second = pair.request("r-prefix-2", 64, next(ROOMS), seed=5)  # the same first 48 tokens, 16 more
    assert list(second.prefill[0].origin_input_ids[:48]) == list(first.prefill[0].origin_input_ids)
    pair.submit(second)
    pair.bootstrap(second)
    sender = second.prefill[0].disagg_kv_sender
    assert second.prefill[0].start_send_idx == 48 and sender.num_pages == 1
    pair.run_prefill(second)
    pair.finish(second)
    assert sender.num_tokens == 16  # only the suffix travelled
    slots = second.decode_slots(pair, 0)
    got = se.read_slots(decode, slots[48:])
    want = se.read_slots(pair.prefill[0], second.prefill_slots[0][48:])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------- failures
def test_a_decode_abort_releases_the_prefill_promptly(pairs):
    """Aborts: the decode side gives up after its metadata; the prefill fails at once, not by lease."""
    with se.env(SGLANG_DISAGGREGATION_WAITING_TIMEOUT=600):
        pair = pairs()
    request = pair.request("r-abort-d", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.decode[0].abort(request.decode[0])
    pair.run_prefill(request)
    done = []
    se.drive(lambda: done.extend(pair.prefill[0].inflight()) or pair.decode[0].step(), lambda: done, timeout=10)
    assert isinstance(done[0].finished_reason, FINISH_ABORT)
    assert "decode rank 0 gave up" in done[0].finished_reason.message
    assert not pair.decode[0].transfer.queue  # decode released its side too


def test_a_prefill_abort_releases_the_decode_promptly(pairs):
    with se.env(SGLANG_DISAGGREGATION_WAITING_TIMEOUT=600):
        pair = pairs()
    request = pair.request("r-abort-p", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.prefill[0].abort(request.prefill[0])
    decode = pair.decode[0]
    se.drive(decode.step, lambda: not decode.transfer.queue, timeout=10)
    assert se.is_aborted(request.decode[0])
    assert "prefill rank 0 gave up" in request.decode[0].finished_reason.message


def test_a_decode_abort_before_preallocation_fails_the_prefill_bootstrap(pairs):
    with se.env(SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT=600):
        pair = pairs()
    request = pair.request("r-abort-early", 40, next(ROOMS))
    decode = pair.decode[0]
    decode.metadata_allocator.free_slots.clear()  # no metadata slot: the request waits in prealloc
    pair.submit(request)
    se.drive(decode.step, lambda: decode.prealloc.queue and decode.prealloc.queue[0].waiting_for_input, 10)
    receiver = decode.prealloc.queue[0].kv_receiver
    decode.abort(request.decode[0])
    prefill = pair.prefill[0]
    se.drive(lambda: prefill.pop_bootstrapped(), lambda: not prefill.queue.queue, timeout=10)
    assert se.is_aborted(request.prefill[0]) and receiver.abort_notified


def test_the_decode_waits_no_longer_than_sglangs_waiting_timeout(pairs):
    """Timeouts come from SGLang's own settings: a prefill that never sends fails the decode."""
    with se.env(SGLANG_DISAGGREGATION_WAITING_TIMEOUT=1):
        pair = pairs()
    request = pair.request("r-timeout", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)  # ... and the prefill never computes it
    decode = pair.decode[0]
    se.drive(decode.step, lambda: not decode.transfer.queue, timeout=15)
    assert "SGLANG_DISAGGREGATION_WAITING_TIMEOUT=1" in request.decode[0].finished_reason.message


def test_the_prefill_lease_is_the_last_resort(pairs):
    """A decode rank that stops answering after its metadata: the prefill frees the pages after the
    lease (SGLANG_DISAGGREGATION_WAITING_TIMEOUT), never before, never never."""
    with se.env(SGLANG_DISAGGREGATION_WAITING_TIMEOUT=1):
        pair = pairs()
    request = pair.request("r-lease", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.run_prefill(request)  # ... and the decode scheduler never polls again
    done = []
    se.drive(lambda: done.extend(pair.prefill[0].inflight()), lambda: done, timeout=15)
    assert isinstance(done[0].finished_reason, FINISH_ABORT)
    assert "lease" in done[0].finished_reason.message


def test_a_decode_rank_that_goes_away_releases_the_prefill_at_once(pairs):
    """Its kvlink link drops (the endpoint said BYE): the prefill does not wait for the lease."""
    with se.env(SGLANG_DISAGGREGATION_WAITING_TIMEOUT=600):
        pair = pairs()
    request = pair.request("r-gone", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.decode[0].kv_manager.close()
    pair.run_prefill(request)
    done = []
    se.drive(lambda: done.extend(pair.prefill[0].inflight()), lambda: done, timeout=15)
    assert isinstance(done[0].finished_reason, FINISH_ABORT)
    assert "is down" in done[0].finished_reason.message


def test_an_incompatible_decode_fails_the_request_with_a_clear_reason(pairs):
    """Page sizes differ: every request fails on both sides with the reason; nothing raises."""
    pair = pairs()
    decode = pair.decode[0]
    decode.kv_manager.geometry = backend.dataclasses.replace(decode.kv_manager.geometry, page_size=8)
    request = pair.request("r-mismatch", 40, next(ROOMS))
    pair.submit(request)
    se.drive(decode.step, lambda: not decode.prealloc.queue and not decode.transfer.queue, timeout=10)
    assert "page size differs" in request.decode[0].finished_reason.message


def test_an_unreachable_bootstrap_server_fails_the_decode_request_without_blocking(pairs):
    pair = pairs()
    decode = pair.decode[0]
    decode.prealloc._max_ensure_retries, decode.prealloc._ensure_retry_interval = 3, 0.05
    request = pair.request("r-nobootstrap", 40, next(ROOMS))
    for req in request.decode:
        req.bootstrap_port = _dead_port()
    started = time.monotonic()
    decode.add(request.decode[0])
    assert time.monotonic() - started < 2
    se.drive(decode.step, lambda: not decode.prealloc.queue, timeout=20)
    assert se.is_aborted(request.decode[0])


def test_hostile_control_messages_and_registrations_are_dropped(pairs, bootstrap):
    """Nothing a peer sends raises into the scheduler: garbage is logged and dropped."""
    import zmq

    pair = pairs()
    ctx = zmq.Context()
    try:
        for manager in (pair.prefill[0].kv_manager, pair.decode[0].kv_manager):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(manager.channel.address)
            for junk in (b"", b"\xff" * 64, backend.msgpack.packb({"t": "META", "v": 1, "room": -1}),
                         backend.msgpack.packb({"t": "PAGES", "v": 1, "room": 1, "nonce": "x", "prefill_rank": 0,
                                                "pages": ["a"], "num_tokens": 1, "aux": [], "state": []}),
                         backend.msgpack.packb({"t": "NOPE", "v": 1})):
                push.send(junk)
            push.close()
    finally:
        ctx.term()
    with pytest.raises(backend.urllib.error.HTTPError):
        backend._http("PUT", f"http://127.0.0.1:{bootstrap.port}/route", {"tp_rank": "zero"})
    request = pair.request("r-after-junk", 30, next(ROOMS))
    run(pair, request)
    pair.assert_bytes_equal(request)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_operation_blocks_an_engine_step(pairs, bootstrap):
    """A prefill endpoint that never answers the handshake: init()/poll() return at once, and the
    request fails after kvlink's connect timeout instead of hanging the decode scheduler."""
    import zmq

    pair = pairs()
    silent = zmq.Context().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    decode = pair.decode[0]
    request = pair.request("r-silent", 40, next(ROOMS))
    pair.submit(request)
    address = f"127.0.0.1:{bootstrap.port}"
    se.drive(decode.step, lambda: address in decode.kv_manager.prefill_info_table, 10)
    # a second request to an instance whose registered endpoint never answers
    info = decode.kv_manager.prefill_info_table[address]
    reg = info.rank(0, 0)
    info.ranks["0/0"] = backend.dataclasses.replace(reg, address=f"tcp://127.0.0.1:{port}")
    hung = pair.request("r-silent-2", 40, next(ROOMS))
    calls = []
    worker = threading.Thread(target=lambda: (decode.add(hung.decode[0]), decode.step(), calls.append(1)))
    worker.start()
    worker.join(5)
    assert calls, "add()/step() blocked on a handshake"
    receiver = next(dr.kv_receiver for dr in decode.prealloc.queue if dr.req is hung.decode[0])
    assert receiver.poll() == se.KVPoll.Bootstrapping
    # the peer finally refuses: the request fails with its reason, the scheduler never waited
    identity, hello = silent.recv_multipart()
    assert control.decode(hello)["type"] == "HELLO"
    silent.send_multipart([identity, control.encode("REJECT", reason="not today")])
    se.drive(decode.step, lambda: se.is_aborted(hung.decode[0]), timeout=10)
    assert "not today" in hung.decode[0].finished_reason.message
    silent.close(0)
    decode.kv_manager.forget_prefill(address)


def test_a_decode_abort_holds_its_pages_until_no_write_can_land(pairs):
    """SGLang's deferred decode KV release: pages come back only once kvlink's pull is cancelled."""
    pair = pairs()
    decode = pair.decode[0]
    request = pair.request("r-deferred", 40, next(ROOMS))
    pair.submit(request)
    pair.bootstrap(request)
    pair.run_prefill(request)
    gate = threading.Event()
    serving = pair.prefill[0].kv_manager.endpoint  # the prefill sends no chunk until the gate opens ...
    decoding = decode.kv_manager.endpoint  # ... and the decode endpoint takes no cancel until then
    serving.set_serve_hook(lambda request, chunk, payload: (gate.wait(30), payload)[1])
    # NOTE: no public seam holds a decode-side cancel back; the host transport's cancel is wrapped
    host = decoding._transports["host"]
    cancel = host.cancel
    host.cancel = lambda link, handle: (gate.wait(30), cancel(link, handle))
    try:
        se.drive(decode.step, lambda: request.room in decode.kv_manager._pulls, timeout=10)
        free_before = decode.allocator.available_size()
        decode.abort(request.decode[0])
        for _ in range(20):
            decode.step()
        assert decode.transfer.has_pending_deferred_releases(), "pages freed while a pull could still write"
        assert decode.allocator.available_size() == free_before
    finally:
        gate.set()
        serving.set_serve_hook(None)
        host.cancel = cancel
    se.drive(decode.step, lambda: not decode.transfer.has_pending_deferred_releases(), timeout=10)
    assert decode.allocator.available_size() > free_before
    done = []
    se.drive(lambda: done.extend(pair.prefill[0].inflight()), lambda: done, timeout=10)
    assert isinstance(done[0].finished_reason, FINISH_ABORT)


# ---------------------------------------------------------------------------------- state buffers
def test_sliding_window_state_rows_travel_with_the_request(pairs):
    """#8 (state): a hybrid SWA pool: the SWA layers' window rows are SGLang state (state_indices)."""
    window = 32
    pair = pairs(layers=3, swa_window=window)
    prefill, decode = pair.prefill[0], pair.decode[0]
    assert [t.value for t in prefill.kv_manager.kv_args.state_types] == ["swa"]
    request = pair.request("r-swa", 70, next(ROOMS))
    run(pair, request)
    pair.assert_bytes_equal(request)  # the full-attention layer
    start = (70 - window) // 16 * 16  # SGLang's window start, page-aligned
    d_slots = request.decode_slots(pair, 0)
    got = se.read_slots(decode, decode.swa_slots(d_slots[start:]), swa=True)
    want = se.read_slots(prefill, request.prefill_swa_slots[0][start:], swa=True)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want)), "SWA window rows differ"


def test_state_between_different_tp_sizes_fails_clearly(pairs):
    """What kvlink cannot move (state sliced by TP) fails the request with the reason; never a silent Success."""
    pair = pairs(layers=3, swa_window=32, prefill_tp=1, decode_tp=2)
    request = pair.request("r-swa-tp", 70, next(ROOMS))
    pair.submit(request)
    prefill = pair.prefill[0]
    se.drive(lambda: (prefill.pop_bootstrapped(), [d.step() for d in pair.decode]),
             lambda: not prefill.queue.queue, timeout=20)
    assert se.is_aborted(request.prefill[0])
    assert "only between equal TP sizes" in request.prefill[0].finished_reason.message
    se.drive(lambda: [d.step() for d in pair.decode], lambda: all(not d.transfer.queue for d in pair.decode), 20)
    assert all(se.is_aborted(r) for r in request.decode)


# ---------------------------------------------------------------------------------- the GPU tests' twin
def test_sglang_makes_the_calls_the_gpu_tests_replay(pairs):
    """tests/test_sglang_backend.py replays SGLang's calls on GPUs, where SGLang cannot run here:
    the real queues must make exactly those calls (sglang_sequence), in that order."""
    import sglang_sequence as seq

    recorder = seq.Recorder()
    recorder.install(backend.KVLinkKVSender, seq.SENDER_METHODS)
    recorder.install(backend.KVLinkKVReceiver, seq.RECEIVER_METHODS)
    recorder.install(backend.KVLinkKVManager, seq.MANAGER_METHODS)
    try:
        pair = pairs()
        request = pair.request("r-sequence", 40, next(ROOMS))
        run(pair, request, chunks=[16])
    finally:
        recorder.uninstall()
    assert recorder.of(request.prefill[0].disagg_kv_sender) == seq.SENDER_CALLS
    receiver_calls = next(calls for calls in recorder.calls.values() if calls[0] == seq.RECEIVER_CALLS[0])
    assert receiver_calls == seq.RECEIVER_CALLS
    assert recorder.of(pair.decode[0].kv_manager) == seq.MANAGER_CALLS
    pair.assert_bytes_equal(request)


def test_sglangs_dp_rank_query_gets_the_room_rule_from_kvlinks_bootstrap_server(bootstrap):
    """DP attention on prefill: SGLang's own query (CommonKVReceiver.query_prefill_dp_ranks) is
    answered with kvlink prefill's rule, room % dp_size."""
    from sglang.srt.disaggregation.common.conn import CommonKVReceiver

    for dp_rank in (0, 1):
        reg = backend.PrefillRegistration(
            tp_rank=0, tp_size=1, dp_rank=dp_rank, dp_size=2, address="tcp://127.0.0.1:1",
            control="tcp://127.0.0.1:2", page_size=16, kv_cache_dtype="auto", num_kv_heads=2, local_heads=2,
            token_bytes=128, num_layers=2, is_mla=False, follow_bootstrap_room=True)
        backend._http("PUT", f"http://127.0.0.1:{bootstrap.port}/route", reg.to_dict())
    answer = CommonKVReceiver.query_prefill_dp_ranks(f"127.0.0.1:{bootstrap.port}", [10, 11, 7])
    assert answer == {"10": 0, "11": 1, "7": 1}
    info = backend.prefill_info_from_route(backend._http("GET", f"http://127.0.0.1:{bootstrap.port}/route"))
    assert (info.dp_size, info.follow_bootstrap_room, sorted(info.ranks)) == (2, True, ["0/0", "1/0"])


def test_every_server_args_field_the_backend_reads_exists_in_sglang():
    """#9: no invented ServerArgs fields (disaggregation_decode_tp, kvlink_transport, ...): decode's TP
    comes from the bootstrap exchange, timeouts from SGLang's own settings, the transport from
    KVLINK_TRANSPORT."""
    import inspect
    import re

    from sglang.srt.server_args import ServerArgs

    source = inspect.getsource(backend)
    read = set(re.findall(r"getattr\(server_args, \"(\w+)\"", source))
    read |= set(re.findall(r"server_args\.(\w+)", source))
    assert read, "the backend reads no ServerArgs field?"
    assert read <= set(ServerArgs.__struct_fields__), sorted(read - set(ServerArgs.__struct_fields__))
