"""The failures the real vLLM 0.33 showed, each reproduced inside the real engine (issue items 1-6).

Checked against the connector as it was (``git show 20989ed:kvlink/integrations/vllm.py`` copied to
a module of its own, ``KVLINK_VLLM_CONNECTOR_MODULE`` pointing at it and ``KVLINK_VLLM_DISABLE_HMA=1``,
since that connector was not SupportsHMA): every test_1, test_2, test_5 and test_6 fails there; of
test_3 the mid-prefill cases (an aborted request that was never scheduled holds no blocks, so the
"waiting" cases pass on both); of test_4 the rejection, the abort before scheduling
(``decode_steps=0``) and the abort while prefill does not answer (the old connector's blocking
connect finished the others' loads within the step, so their NOTIFY freed prefill).
"""

import copy
import logging
import socket

import pytest

pytest.importorskip("vllm")

import zmq  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

import vllm_harness as h  # noqa: E402

PROMPT = list(range(10, 87))  # 77 tokens
LEASE = {"lease_seconds": 600.0}  # so that only a prompt release frees prefill's blocks within a test
PROMPT_RELEASE = 20.0  # how long a test waits for a release: far below the lease, far above any step




def local_run(engine, request_id, prompt, max_tokens=1):
    """A plain request, computed by the engine itself (it fills the prefix cache)."""
    engine.add(h.make_request(request_id, prompt, max_tokens=max_tokens, block_size=engine.block_size))
    h.until(lambda: request_id in engine.finished, step=engine.step, what=f"local request {request_id}")


def released(prefill, request_id, *others):
    h.run(prefill, *others, until_done=lambda: not prefill.holds(request_id), timeout=PROMPT_RELEASE,
          what=f"prefill freeing {request_id} (a RELEASE, not its lease)")


# ---------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["Scheduler", "AsyncScheduler"])
def test_1_a_local_prefix_hit_loads_only_the_tokens_after_it(engines, async_scheduling):
    """vLLM's prefix cache (on by default) holds the first 48 tokens: decode loads tokens 48-76 into its
    new blocks and leaves the shared ones alone."""
    prefill = engines("kv_producer", salt=1, extra=LEASE, async_scheduling=async_scheduling)
    decode = engines("kv_consumer", salt=2, async_scheduling=async_scheduling)
    local_run(decode, "warm", PROMPT[:48] + [250, 251])  # caches 3 full blocks of the prompt's prefix
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d" in decode.finished and not prefill.holds("p"),
          timeout=PROMPT_RELEASE, what="the decode request and prefill's release")
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    assert decode.scheduler.kv_cache_manager.prefix_cache_stats is not None
    loaded = h.check_bytes(prefill, "p", decode, "d", PROMPT, local_prefix=48)
    assert loaded == len(PROMPT) - 48 - 1


def test_1_a_prefix_hit_covering_all_prefill_holds_releases_it(engines):
    """A follow-up turn: decode's prompt extends prefill's, and decode has more of it cached than prefill
    computed. Decode reads nothing and tells prefill at once."""
    prefill = engines("kv_producer", salt=1, extra=LEASE)
    decode = engines("kv_consumer", salt=2)
    turn = PROMPT[:32] + list(range(120, 152))
    local_run(decode, "warm", turn[:48] + [250])
    params = h.prefill(prefill, "p", PROMPT[:32])
    decode.add(h.make_request("d", turn, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(turn))
    released(prefill, "p", decode)
    h.until(lambda: "d" in decode.finished, step=decode.step)
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    assert h.check_bytes(prefill, "p", decode, "d", turn, num_tokens=32, local_prefix=48) == 0


@pytest.mark.parametrize("cached_tokens,loads", [(16, False), (32, True)])
def test_1_a_prefix_hit_off_prefills_block_boundary(engines, cached_tokens, loads):
    """Prefill's blocks hold 32 tokens, decode's 16. A 16-token hit cannot start a pull (pulls start at
    a block's first token): decode computes the prompt itself and releases prefill. A 32-token hit starts
    at prefill's second block."""
    prefill = engines("kv_producer", salt=1, block_size=32, extra=LEASE)
    decode = engines("kv_consumer", salt=2, block_size=16)
    local_run(decode, "warm", PROMPT[:cached_tokens] + [250])
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    released(prefill, "p", decode)
    h.until(lambda: "d" in decode.finished, step=decode.step)
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    loaded = h.check_bytes(prefill, "p", decode, "d", PROMPT, local_prefix=cached_tokens)
    assert loaded == (len(PROMPT) - cached_tokens - 1 if loads else 0)


# ---------------------------------------------------------------------------------------------- 2
def _good(prefill_params):
    return {key: copy.deepcopy(value) for key, value in prefill_params.items()}


BAD = {  # what a client may send; each must fail alone, computed locally
    "missing-all": {"do_remote_prefill": True},
    "block-ids-a-string": {"remote_block_ids": "abc"},
    "block-ids-negative": {"remote_block_ids": [-1, 2, 3, 4, 5]},
    "block-ids-too-few": {"remote_block_ids": [1]},
    "block-ids-huge": {"remote_block_ids": [2**40] * 5},
    "num-tokens-negative": {"num_tokens": -5},
    "num-tokens-a-string": {"num_tokens": "77"},
    "num-tokens-a-bool": {"num_tokens": True},
    "num-tokens-past-the-prompt": {"num_tokens": 10_000},
    "addresses-not-strings": {"remote_addresses": [123]},
    "addresses-a-string": {"remote_addresses": "tcp://127.0.0.1:1"},
    "tp-size-zero": {"remote_tp_size": 0},
    "tp-size-mismatch": {"remote_tp_size": 3},
    "transfer-id-an-int": {"transfer_id": 7},
    "heads-a-float": {"remote_num_kv_heads": 2.5},
    "block-size-zero": {"remote_block_size": 0},
}


def test_2_malformed_kv_transfer_params_never_raise_out_of_the_scheduler(engines, caplog):
    prefill = engines("kv_producer", salt=1, extra=LEASE)
    decode = engines("kv_consumer", salt=2)
    valid = h.prefill(prefill, "p", PROMPT)
    requests = {}
    for i, (name, change) in enumerate(BAD.items()):
        params = change if name == "missing-all" else {**_good(valid), **change}
        prompt = [200 + i] + PROMPT[1:]  # no two share a prefix: each is computed in full
        requests[name] = decode.add(h.make_request(f"bad-{name}", prompt, max_tokens=2, kv_transfer_params=params))
    # (a non-dict never reaches the connector: vLLM's API layer types it, and its scheduler reads it first)
    odd = h.make_request("bad-not-a-dict", PROMPT, kv_transfer_params=["do_remote_prefill"])
    assert decode.connector.get_num_new_matched_tokens(odd, 0) == (0, False)
    with caplog.at_level(logging.WARNING, logger="kvlink.vllm"):
        h.until(lambda: len(decode.finished) == len(requests), step=decode.step, what="every bad request finishing")
    for name, request in requests.items():
        assert decode.finished[request.request_id].finish_reason.name == "LENGTH", name
        assert set(range(len(PROMPT))) <= decode.written[request.request_id], f"{name} was not computed locally"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("bad-block-ids-a-string" in w and "remote_block_ids" in w for w in warnings), warnings
    assert any("bad-num-tokens-negative" in w and "num_tokens" in w for w in warnings)
    # the bad requests that still named prefill's transfer and addresses released it
    released(prefill, "p", decode)


# ---------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
@pytest.mark.parametrize("when", ["waiting", "mid-prefill"])
def test_3_a_prefill_request_that_does_not_finish_normally_frees_its_blocks_at_once(engines, status, when):
    prefill = engines("kv_producer", salt=1, extra=LEASE, max_batched_tokens=32)
    free = prefill.free_blocks()
    request = prefill.add(h.make_request("p", list(range(3, 103)), kv_transfer_params={"do_remote_decode": True}))
    if when == "mid-prefill":
        prefill.step()  # the first 32-token chunk
        assert request.num_computed_tokens == 32
    prefill.scheduler.finish_requests(["p"], status)
    assert not prefill.holds("p"), "vLLM drops an aborted request's kv_transfer_params: no decode will pull"
    h.until(lambda: not prefill.scheduler.has_requests(), step=prefill.step)
    assert prefill.free_blocks() == free


# ---------------------------------------------------------------------------------------------- 4
def test_4_a_rejected_decode_request_releases_prefill(engines):
    """vLLM's serving layer rejects a request it had to turn down with notify_kv_transfer_request_rejected:
    prompt [0], max_tokens 1, abort_immediately; the connector sees only request_finished."""
    prefill = engines("kv_producer", salt=1, extra=LEASE, tp=2)
    decode = engines("kv_consumer", salt=2, tp=2)
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("rejected", [0], max_tokens=1, kv_transfer_params=params, abort_immediately=True))
    assert not decode.holds("rejected")
    released(prefill, "p", decode)  # decode steps only while vLLM would: the pending RELEASE keeps it stepping
    assert not decode.scheduler.has_requests()


@pytest.mark.parametrize("decode_steps", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1), (1, 2)], ids=["1-1", "2-1", "1-2"])
def test_4_a_decode_request_aborted_while_it_loads_frees_both_sides(engines, decode_steps, prefill_tp, decode_tp):
    """Aborted before it was scheduled, while linking, while pulling, or after its load: decode's blocks are
    freed once no pull writes them, and every prefill rank hears (a NOTIFY or a RELEASE)."""
    prefill = engines("kv_producer", salt=1, tp=prefill_tp, extra={**LEASE, "decode_tp_size": decode_tp})
    decode = engines("kv_consumer", salt=2, tp=decode_tp)
    free = decode.free_blocks()
    params = h.prefill(prefill, "p", PROMPT)
    decode.add(h.make_request("d", PROMPT, max_tokens=50, kv_transfer_params=params))
    for _ in range(decode_steps):
        decode.step()
    decode.abort("d")
    released(prefill, "p", decode)
    h.until(lambda: not decode.holds("d") and not decode.scheduler.has_requests(), step=decode.step,
            what="decode freeing the aborted request")
    assert decode.free_blocks() == free


def test_4_an_abort_while_prefill_does_not_answer_frees_decode_at_once(engines):
    decode = engines("kv_consumer", salt=2, extra={"timeout": 60.0})
    with silent_prefill() as address:
        params = {**fake_params(address), "num_tokens": len(PROMPT)}
        decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params))
        for _ in range(3):
            decode.step()
        assert decode.status("d") == RequestStatus.WAITING_FOR_REMOTE_KVS
        decode.abort("d")
        h.until(lambda: not decode.holds("d"), step=decode.step, timeout=PROMPT_RELEASE,
                what="the aborted request's blocks freed before the 60 s handshake timeout")


# ---------------------------------------------------------------------------------------------- 5
class silent_prefill:
    """An address where a prefill should be: ``silent`` accepts and never answers, ``dead`` refuses."""

    def __init__(self, kind="silent"):
        self.kind = kind

    def __enter__(self):
        if self.kind == "dead":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            self.context = self.socket = None
            return f"tcp://127.0.0.1:{port}"
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    def __exit__(self, *exc):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.context.term()


def fake_params(address):
    return {"do_remote_prefill": True, "transfer_id": "t-nobody", "remote_block_ids": [1, 2, 3, 4, 5],
            "remote_addresses": [address], "remote_tp_size": 1, "num_tokens": len(PROMPT)}


@pytest.mark.parametrize("policy", ["fail", "recompute"])
@pytest.mark.parametrize("kind", ["silent", "dead"])
def test_5_an_unreachable_prefill_never_stalls_the_decode_engine(engines, kind, policy):
    """The handshake runs in the background: the request waits in WAITING_FOR_REMOTE_KVS, every engine
    step returns at once and other requests keep decoding; when the handshake timeout passes the load
    fails alone (FINISHED_ERROR, or computed locally under kv_load_failure_policy='recompute')."""
    timeout = 4.0
    decode = engines("kv_consumer", salt=2, policy=policy, extra={"timeout": timeout})
    decode.add(h.make_request("busy", list(range(3, 40)), max_tokens=400))
    with silent_prefill(kind) as address:
        decode.add(h.make_request("remote", PROMPT, max_tokens=2, kv_transfer_params=fake_params(address)))
        decode.step()
        decode.step()
        assert decode.status("remote") == RequestStatus.WAITING_FOR_REMOTE_KVS
        tokens_before = len(decode.outputs["busy"])
        h.until(lambda: "remote" in decode.finished, step=decode.step, timeout=timeout + 30,
                what="the remote request ending")
    assert max(decode.step_seconds) < timeout / 2, f"an engine step took {max(decode.step_seconds):.2f} s"
    assert len(decode.outputs["busy"]) - tokens_before >= 10, "the other request stopped while the link waited"
    assert any("remote" in o.failed_recving for o in decode.kv_outputs), "not reported through failed_recving"
    if policy == "fail":
        assert decode.finished["remote"].finish_reason.name == "ERROR"
    else:
        assert decode.finished["remote"].finish_reason.name == "LENGTH"
        assert set(range(len(PROMPT))) <= decode.written["remote"]


# ---------------------------------------------------------------------------------------------- 6
def test_6_the_layout_comes_from_vllm_0_33s_connector_layout_function(monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector import utils

    module = __import__(h.CONNECTOR_MODULE, fromlist=["_vllm_kv_layout"])
    assert not hasattr(utils, "get_kv_cache_layout") and hasattr(utils, "get_kv_connector_cache_layout")
    monkeypatch.setattr(utils, "get_kv_connector_cache_layout", lambda vllm_config=None: "HND")
    assert module._vllm_kv_layout() == "HND"


def free_port_range(count):
    for _ in range(50):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
        probe.close()
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise RuntimeError("no free port range")


def test_6_remote_num_kv_heads_comes_from_the_model_with_port_addresses(engines):
    """Addresses from the ``port`` config (no handshake metadata): the params still carry the model's KV
    heads, which decode needs when prefill's TP replicates them (2 heads over 4 ranks)."""
    port = free_port_range(4)
    prefill = engines("kv_producer", tp=4, salt=1, handshake=False, extra={"port": port, "decode_tp_size": 1})
    decode = engines("kv_consumer", salt=2)
    params = h.prefill(prefill, "p", PROMPT)
    assert params["remote_addresses"] == [f"tcp://127.0.0.1:{port + r}" for r in range(4)]
    assert params["remote_num_kv_heads"] == 2
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params), snapshot_tokens=len(PROMPT))
    h.run(prefill, decode, until_done=lambda: "d" in decode.finished and not prefill.holds("p"))
    assert decode.finished["d"].finish_reason.name == "LENGTH"
    h.check_bytes(prefill, "p", decode, "d", PROMPT)


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_6_a_failed_load_reaches_vllm_through_failed_recving(engines, policy):
    """A load that fails after linking (the blocks it names lie past the end of prefill's cache)."""
    prefill = engines("kv_producer", salt=1, extra=LEASE)
    decode = engines("kv_consumer", salt=2, policy=policy)
    params = h.prefill(prefill, "p", PROMPT)
    params = {**params, "remote_block_ids": [1000] * 5}  # past the end of prefill's cache
    decode.add(h.make_request("d", PROMPT, max_tokens=2, kv_transfer_params=params))
    h.until(lambda: "d" in decode.finished, step=decode.step)
    assert any("d" in o.failed_recving and "d" in o.finished_recving for o in decode.kv_outputs)
    assert any(o.invalid_block_ids for o in decode.kv_outputs)  # also for engines that read only those
    assert decode.finished["d"].finish_reason.name == ("ERROR" if policy == "fail" else "LENGTH")


def test_6_the_connector_supports_vllms_hybrid_kv_cache_manager():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma

    module = __import__(h.CONNECTOR_MODULE, fromlist=["KVLinkConnector"])
    assert supports_hma(module.KVLinkConnector)
    engine = h.VllmEngine("kv_consumer", disable_hma=None)  # on, as vLLM's default on a GPU
    try:
        assert engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
        assert type(engine.connector).__name__ == "KVLinkConnector"
    finally:
        engine.close()


def _state(obj, depth=0):
    """A comparable picture of the connector's own state (its objects' attributes, recursively)."""
    if depth > 6:
        return "..."
    if isinstance(obj, dict):
        return {repr(k): _state(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_state(v, depth + 1) for v in obj]
        return sorted(map(repr, items)) if isinstance(obj, (set, frozenset)) else items
    if type(obj).__module__.startswith(("kvlink", h.CONNECTOR_MODULE)) and hasattr(obj, "__dict__"):
        return {k: _state(v, depth + 1) for k, v in vars(obj).items() if k != "worker"}
    return repr(obj) if isinstance(obj, (int, float, str, bool, type(None))) else type(obj).__name__


def test_6_get_num_new_matched_tokens_has_no_side_effects(engines):
    """The base class documents it as free of side effects: vLLM may call it many times, or for a
    request it then cannot schedule."""
    decode = engines("kv_both", salt=2)
    connector = decode.connector
    requests = [h.make_request("to-load", PROMPT, kv_transfer_params=fake_params("tcp://127.0.0.1:9")),
                h.make_request("to-offer", PROMPT, kv_transfer_params={"do_remote_decode": True}),
                h.make_request("bad", PROMPT, kv_transfer_params={"do_remote_prefill": True, "num_tokens": "x"})]
    before = _state(connector)
    for request in requests:
        for computed in (0, 16, 32, 0):
            connector.get_num_new_matched_tokens(request, computed)
    assert _state(connector) == before
