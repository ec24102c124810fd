"""Stand-ins for the few vLLM objects KVLinkConnector reads, and vLLM's call sequence over them.

For what cannot run inside the real engine on a CPU: the connector's GPU call-sequence tests
(tests/test_vllm_connector.py) run in the project's environment, where vLLM is not installed. Each
of those tests has a real-engine twin (tests/engines/test_vllm_lifecycle.py, vLLM 0.33.0) that
drives the same sequence through vLLM's own scheduler and model-runner code; the fakes carry only
the attributes the connector reads there, so a connector that reached for anything else fails here.

:class:`FakeEngine` follows the order vLLM 0.33 calls the connector in (the real engine's order,
recorded in /work/engines/NOTES.md section 2.2 and vllm/v1/worker/kv_connector_model_runner_mixin.py):
scheduler ``on_new_request`` -> ``get_num_new_matched_tokens`` -> ``update_state_after_alloc`` ->
``build_connector_meta``; each worker ``bind_connector_metadata`` -> per layer ``wait_for_layer_load``
/ ``save_kv_layer`` -> ``start_load_kv`` (after the forward: loads are asynchronous) ->
``wait_for_save`` -> ``get_transfer_results`` -> ``get_block_ids_with_load_errors`` ->
``build_connector_worker_meta`` -> ``clear_connector_metadata``; the workers' results are merged as
vLLM's KVOutputAggregator does and handed to ``update_connector_output``; a finished request goes to
``request_finished_all_groups``.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class KVTransferConfig:
    kv_role: str
    kv_connector_extra_config: dict = field(default_factory=dict)
    kv_connector: str = "KVLinkConnector"
    kv_connector_module_path: str = "kvlink.integrations.vllm"
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class CacheConfig:
    block_size: int = 16


@dataclass
class ModelConfig:
    num_kv_heads: int

    def get_total_num_kv_heads(self) -> int:
        return self.num_kv_heads


@dataclass
class VllmConfig:
    kv_transfer_config: KVTransferConfig
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    model_config: ModelConfig | None = None


class RequestStatus(enum.Enum):
    WAITING = 1
    WAITING_FOR_REMOTE_KVS = 3
    RUNNING = 5
    FINISHED_STOPPED = 7
    FINISHED_LENGTH_CAPPED = 8
    FINISHED_ABORTED = 9


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class KVCacheBlock:
    block_id: int
    block_hash: object = None  # set on a block of the prefix cache
    is_null: bool = False


@dataclass
class KVCacheBlocks:
    blocks: tuple  # one list of KVCacheBlock per KV-cache group

    @classmethod
    def of(cls, block_ids, cached: int = 0) -> KVCacheBlocks:
        """One group; its first ``cached`` blocks come from the prefix cache."""
        return cls(([KVCacheBlock(b, block_hash=("hash", i) if i < cached else None)
                     for i, b in enumerate(block_ids)],))

    def get_block_ids(self):
        return tuple([b.block_id for b in group] for group in self.blocks)


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict = field(default_factory=dict)
    finished_req_ids: set = field(default_factory=set)


@dataclass
class KVConnectorOutput:
    finished_sending: set | None = None
    finished_recving: set | None = None
    failed_recving: set = field(default_factory=set)
    invalid_block_ids: set = field(default_factory=set)
    kv_connector_worker_meta: object = None


def config(role: str, tp: int = 1, block_size: int = 16, num_kv_heads: int | None = None, engine_id: str | None = None,
           **extra) -> VllmConfig:
    transfer = KVTransferConfig(role, extra)
    if engine_id is not None:
        transfer.engine_id = engine_id
    return VllmConfig(transfer, ParallelConfig(tp), CacheConfig(block_size),
                      ModelConfig(num_kv_heads) if num_kv_heads else None)


def layer_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


class FakeEngine:
    """One engine's connectors (a scheduler, a worker per TP rank) driven in vLLM's call order."""

    def __init__(self, kv_role: str, tp: int, rank_caches: list, num_kv_heads: int, **extra):
        from kvlink.integrations.vllm import KVConnectorRole, KVLinkConnector

        extra.setdefault("transport", "host")
        block = rank_caches[0][1].block_size
        engine_id = uuid.uuid4().hex[:12]
        self.scheduler = KVLinkConnector(config(kv_role, tp, block, num_kv_heads, engine_id, **extra),
                                         KVConnectorRole.SCHEDULER)
        self.workers, self.tensors = [], []
        for rank, (tensors, _) in enumerate(rank_caches):
            worker = KVLinkConnector(config(kv_role, tp, block, num_kv_heads, engine_id, tp_rank=rank, **extra),
                                     KVConnectorRole.WORKER)
            worker.register_kv_caches(dict(zip(layer_names(len(tensors)), tensors)))
            self.workers.append(worker)
            self.tensors.append(tensors)
        handshakes = {w.tp_rank: w.get_handshake_metadata() for w in self.workers}
        if all(handshakes.values()):
            self.scheduler.set_xfer_handshake_metadata(handshakes)
        self._remaining: dict[tuple[str, str], int] = {}  # KVOutputAggregator's per-request countdown
        self.finished_sending: set[str] = set()
        self.finished_recving: set[str] = set()
        self.failed_recving: set[str] = set()

    def add(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def step(self, scheduled: dict | None = None, finished=frozenset()) -> KVConnectorOutput:
        """One engine step: metadata to every worker, the forward's connector calls, results merged."""
        meta = self.scheduler.build_connector_meta(SchedulerOutput(dict(scheduled or {}), set(finished)))
        merged = KVConnectorOutput(set(), set())
        worker_meta = None
        for worker, tensors in zip(self.workers, self.tensors):
            worker.bind_connector_metadata(meta)
            if scheduled:
                for name, tensor in zip(layer_names(len(tensors)), tensors):
                    worker.wait_for_layer_load(name)
                    worker.save_kv_layer(name, tensor, None)
            worker.start_load_kv(None)  # after the forward: the loads are asynchronous
            worker.wait_for_save()
            results = worker.get_transfer_results(set(finished))
            merged.invalid_block_ids |= worker.get_block_ids_with_load_errors()
            meta_out = worker.build_connector_worker_meta()
            if meta_out is not None:
                worker_meta = meta_out if worker_meta is None else worker_meta.aggregate(meta_out)
            worker.clear_connector_metadata()
            for kind, ids in (("send", results.finished_sending), ("recv", results.finished_recving)):
                for request_id in ids:
                    left = self._remaining.get((kind, request_id), len(self.workers)) - 1
                    self._remaining[(kind, request_id)] = left
                    if left == 0:
                        del self._remaining[(kind, request_id)]
                        (merged.finished_sending if kind == "send" else merged.finished_recving).add(request_id)
            merged.failed_recving |= results.failed_recving
        merged.kv_connector_worker_meta = worker_meta
        merged.failed_recving &= merged.finished_recving
        self.scheduler.update_connector_output(merged)
        self.finished_sending |= merged.finished_sending
        self.finished_recving |= merged.finished_recving
        self.failed_recving |= merged.failed_recving
        return merged

    def until(self, condition, timeout: float = 30.0, what: str = "condition"):
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline:
                raise AssertionError(f"{what} not reached within {timeout} s")
            self.step()
            time.sleep(0.001)

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()


def run_prefill(engine: FakeEngine, request_id: str, num_tokens: int, block_ids: list[int]) -> dict:
    """A prefill request through the scheduler's hooks and one forward step; its kv_transfer_params."""
    request = Request(request_id, list(range(num_tokens)), {"do_remote_decode": True})
    engine.add(request)
    assert engine.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    engine.scheduler.update_state_after_alloc(request, KVCacheBlocks.of(block_ids), 0)
    engine.step({request_id: num_tokens})  # the prefill forward pass
    request.num_computed_tokens, request.status = num_tokens, RequestStatus.FINISHED_LENGTH_CAPPED
    delay_free, params = engine.scheduler.request_finished_all_groups(request, (list(block_ids),))
    assert delay_free is True and params["do_remote_prefill"]
    return params


def prefill_process_main(conn, seed: int, truth_shape: dict, tp: int, decode_tp: int, device: str, transport: str,
                         block_ids: list[int], num_tokens: int) -> None:
    """A prefill engine (FakeEngine) in its own process on ``device``: runs one request, sends its
    kv_transfer_params, then steps until decode has confirmed it (the GPU call-sequence test)."""
    import torch

    from kvlink.resharding import heads_of_rank
    from sharded_caches import make_truth, rank_cache

    torch.cuda.set_device(torch.device(device))
    truth = make_truth(seed, **truth_shape)
    heads = truth_shape["num_heads"]
    caches = [rank_cache("vllm_flash_attn_nhd", truth, heads_of_rank(heads, tp, r), device) for r in range(tp)]
    engine = FakeEngine("kv_producer", tp, caches, heads, decode_tp_size=decode_tp, transport=transport, timeout=30.0)
    try:
        conn.send(run_prefill(engine, "cmpl-gpu-prefill", num_tokens, block_ids))
        engine.step(finished={"cmpl-gpu-prefill"})
        engine.until(lambda: "cmpl-gpu-prefill" in engine.finished_sending, timeout=60,
                     what="decode confirming the request")
        conn.send(("sent", sorted(link["transport"] for w in engine.workers for link in w.endpoint.links())))
        conn.recv()  # until the test is done with this process
    finally:
        engine.close()
