"""Real vLLM 0.33 engines on the CPU, for the connector's tests.

Each :class:`VllmEngine` is one engine as vLLM builds it: a real ``VllmConfig`` of a tiny local
Llama, a ``KVCacheConfig`` from vLLM's planner, the real ``Scheduler`` or ``AsyncScheduler`` (whose
scheduler-side connector vLLM's factory creates), and one worker-side connector per TP rank,
created by ``KVConnectorFactory`` with caches from vLLM's ``allocate_kv_cache``. A step is what
vLLM's engine core does: ``schedule()``, then every worker runs the model runner's connector code
(``KVConnectorModelRunnerMixin``: bind, start_load_kv before or after the forward, per-layer
wait_for_layer_load/save_kv_layer, wait_for_save, get_transfer_results, load errors, worker meta,
clear), vLLM's ``KVOutputAggregator`` merges the ranks' outputs, and ``update_from_output`` takes
them; with async scheduling the engine core's batch queue (two batches in flight) is followed.

The forward pass writes each scheduled token's KV with a deterministic byte pattern of (engine
salt, layer, position, global head, token), through the engine's own block table, so tests can
tell what decode computed itself from what it loaded, and compare decode's cache with prefill's.
Prefill and decode run in one process, linked by kvlink's host transport on loopback.

``KVLINK_VLLM_CONNECTOR_MODULE`` points the engines at another module (e.g. a copy of an older
connector, to see these tests fail on it); ``KVLINK_VLLM_DISABLE_HMA=1`` runs them with vLLM's
hybrid KV-cache manager off.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import tempfile
import time

import torch
from transformers import LlamaConfig
from vllm import SamplingParams
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, ParallelConfig,
                         SchedulerConfig, VllmConfig)
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import set_forward_context
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin as ModelRunnerMixin
from vllm.v1.worker.utils import allocate_kv_cache

from kvlink.resharding import heads_of_rank

CONNECTOR_MODULE = os.environ.get("KVLINK_VLLM_CONNECTOR_MODULE", "kvlink.integrations.vllm")
DISABLE_HMA = os.environ.get("KVLINK_VLLM_DISABLE_HMA") == "1" or None
EOS = 2
TOKEN = 5  # what the model "samples" (never EOS, so requests run to max_tokens)
HEAD_SIZE = 16
MLA_WIDTH = 72
_MODELS: dict[int, str] = {}
_hashing_ready = False


def model_dir(num_kv_heads: int) -> str:
    """A tiny local Llama (config only: the engine's forward pass is the harness's)."""
    if num_kv_heads not in _MODELS:
        path = tempfile.mkdtemp(prefix=f"kvlink_tiny_llama_kv{num_kv_heads}_")
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=num_kv_heads, max_position_embeddings=1024, eos_token_id=EOS,
                    bos_token_id=1).save_pretrained(path)
        _MODELS[num_kv_heads] = path
    return _MODELS[num_kv_heads]


def make_request(request_id: str, prompt: list[int], *, max_tokens: int = 1, kv_transfer_params=None,
                 block_size: int = 16, abort_immediately: bool = False) -> Request:
    """A vLLM Request as the engine core builds it (params through SamplingParams.extra_args)."""
    global _hashing_ready
    if not _hashing_ready:
        init_none_hash(sha256)
        _hashing_ready = True
    sampling = SamplingParams(max_tokens=max_tokens,
                              extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None
                              else None)
    sampling.update_from_generation_config({}, EOS)
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=sampling,
                   pooling_params=None, mm_features=None, block_hasher=get_request_block_hasher(block_size, sha256),
                   abort_immediately=abort_immediately)


def until(condition, *, timeout: float = 60.0, what: str = "condition", step=None):
    """Call ``step`` (if any) until ``condition()`` holds; generous timeout, no speed assumption."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.001)


class VllmEngine:
    """One vLLM engine: real config, scheduler, per-rank worker connectors and CPU caches."""

    def __init__(self, kv_role: str, *, tp: int = 1, num_kv_heads: int = 2, async_scheduling: bool = False,
                 block_size: int = 16, num_blocks: int = 64, num_layers: int = 2, draft_layers: int = 0,
                 kind: str = "mha", layout: str = "LBNHC", extra: dict | None = None, policy: str = "fail",
                 prefix_caching: bool = True, max_batched_tokens: int = 64, kernel_block_size: int | None = None,
                 hybrid: bool = False, disable_hma: bool | None = DISABLE_HMA, salt: int = 0, poison: bool = True,
                 handshake: bool = True):
        self.tp, self.block_size, self.salt, self.kind = tp, block_size, salt, kind
        self.num_kv_heads = 1 if kind == "mla" else num_kv_heads
        self.layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers + draft_layers)]
        extra = {"transport": "host", "timeout": 20.0, **(extra or {})}
        model = model_dir(num_kv_heads)
        model_config = ModelConfig(model=model, tokenizer=model, skip_tokenizer_init=True, dtype="float16", seed=0,
                                   max_model_len=1024)
        scheduler_config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched_tokens,
                                           max_model_len=1024, enable_chunked_prefill=True, is_encoder_decoder=False,
                                           async_scheduling=async_scheduling,
                                           disable_hybrid_kv_cache_manager=disable_hma)
        cache_config = CacheConfig(block_size=block_size, gpu_memory_utilization=0.9, cache_dtype="auto",
                                   enable_prefix_caching=prefix_caching)
        kv_transfer = KVTransferConfig(kv_connector="KVLinkConnector", kv_connector_module_path=CONNECTOR_MODULE,
                                       kv_role=kv_role, kv_connector_extra_config=extra, kv_load_failure_policy=policy)
        self.vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                                      cache_config=cache_config, kv_transfer_config=kv_transfer,
                                      parallel_config=ParallelConfig(tensor_parallel_size=tp),
                                      device_config=DeviceConfig("cpu"))
        self.vllm_config.cache_config.kv_cache_layout = layout  # resolved, as the engine core does first
        if disable_hma is None:
            # vLLM turns its hybrid KV-cache manager off on platforms without it (the CPU); on a GPU it is on
            # by default, which the connector must support: turned on again after the config's checks
            self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = False
        self.kv_cache_config = self._plan(num_blocks, hybrid, draft_layers)
        self.vllm_config.cache_config.num_gpu_blocks = self.kv_cache_config.num_blocks
        scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
        self.scheduler = scheduler_cls(vllm_config=self.vllm_config, kv_cache_config=self.kv_cache_config,
                                       log_stats=True,
                                       structured_output_manager=StructuredOutputManager(self.vllm_config),
                                       block_size=block_size)
        self.connector = self.scheduler.connector
        self.workers, self.caches = [], []
        resolved = self.vllm_config.cache_config.get_resolved_kv_cache_layout()
        kernel_sizes = [kernel_block_size] if kernel_block_size else None
        for rank in range(tp):
            config = copy.copy(self.vllm_config)
            config.kv_transfer_config = dataclasses.replace(kv_transfer,
                                                            kv_connector_extra_config={**extra, "tp_rank": rank})
            worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, self.kv_cache_config)
            caches = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), resolved, kernel_sizes)
            if poison:
                generator = torch.Generator().manual_seed(1000 * salt + rank)
                for tensor in caches.values():
                    raw = tensor.view(torch.uint8)
                    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))
            worker.register_kv_caches(caches)
            self.workers.append(worker)
            self.caches.append(caches)
        handshakes = {rank: w.get_handshake_metadata() for rank, w in enumerate(self.workers)}
        if handshake and all(handshakes.values()):
            self.connector.set_xfer_handshake_metadata(handshakes)  # what the engine core passes at start-up
        self.aggregator = KVOutputAggregator.from_connector(self.connector, tp)
        self.batch_queue: collections.deque = collections.deque()
        self.outputs: dict[str, list] = collections.defaultdict(list)
        self.finished: dict[str, object] = {}   # request id -> its final EngineCoreOutput
        self.written: dict[str, set[int]] = collections.defaultdict(set)  # positions this engine computed
        self.kv_outputs: list = []              # every aggregated KVConnectorOutput
        self.block_tables: dict[str, list[int]] = {}
        self.snapshots: dict[str, torch.Tensor] = {}
        self._watch: dict[str, int] = {}         # request id -> tokens to snapshot when it finishes
        self.step_seconds: list[float] = []
        self.steps = 0

    def _plan(self, num_blocks: int, hybrid: bool, draft_layers: int):
        """Per-layer specs as the model runner reports them, grouped and planned by vLLM itself."""
        heads = 1 if self.kind == "mla" else max(1, self.num_kv_heads // self.tp)
        if self.kind == "mla":
            spec = MLAAttentionSpec(block_size=self.block_size, num_kv_heads=1, head_size=MLA_WIDTH,
                                    dtype=torch.float16)
        else:
            dtype = torch.float8_e4m3fn if self.kind == "fp8" else torch.float16
            spec = FullAttentionSpec(block_size=self.block_size, num_kv_heads=heads, head_size=HEAD_SIZE, dtype=dtype)
        specs = {name: spec for name in self.layer_names}
        if hybrid:  # every other layer a sliding window (as Gemma, gpt-oss)
            for name in self.layer_names[1::2]:
                specs[name] = SlidingWindowSpec(block_size=self.block_size, num_kv_heads=heads, head_size=HEAD_SIZE,
                                                dtype=spec.dtype, sliding_window=32)
        for name in self.layer_names[len(self.layer_names) - draft_layers:] if draft_layers else ():
            specs[name] = dataclasses.replace(specs[name], is_draft=True)  # what the model runner marks
        groups = get_kv_cache_groups(self.vllm_config, specs)
        memory = spec.page_size_bytes * len(self.layer_names) * num_blocks
        return get_kv_cache_config_from_groups(self.vllm_config, groups, available_memory=memory)

    # ------------------------------------------------------------------ requests
    def add(self, request: Request, snapshot_tokens: int | None = None) -> Request:
        """``EngineCore.add_request``: add, and abort at once when the request says so."""
        self.scheduler.add_request(request)
        if snapshot_tokens:
            self._watch[request.request_id] = snapshot_tokens
        if request.abort_immediately:
            self.abort(request.request_id)
        return request

    def abort(self, request_id: str) -> None:
        """``EngineCore.abort_requests``."""
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)

    # ------------------------------------------------------------------ one engine-core step
    def step(self) -> None:
        started = time.perf_counter()
        try:
            if self.vllm_config.scheduler_config.async_scheduling:
                self._step_with_batch_queue()
            elif self.scheduler.has_requests():
                output = self.scheduler.schedule()
                self._update(output, self._execute(output))
        finally:
            self.step_seconds.append(time.perf_counter() - started)
            self.steps += 1

    def _step_with_batch_queue(self) -> None:
        """``EngineCore.step_with_batch_queue`` with two batches in flight."""
        if self.scheduler.has_requests():
            output = self.scheduler.schedule()
            self.batch_queue.appendleft((output, self._execute(output)))
            if len(self.batch_queue) < 2 and (output.total_num_scheduled_tokens > 0 or self.scheduler.has_requests()):
                return
        if self.batch_queue:
            output, result = self.batch_queue.pop()
            self._update(output, result)

    def _execute(self, scheduler_output) -> ModelRunnerOutput:
        for request_id in scheduler_output.num_scheduled_tokens:
            self.block_tables[request_id] = list(self.scheduler.kv_cache_manager.get_block_ids(request_id)[0])
        results = []
        for rank, worker in enumerate(self.workers):
            kv_transfer_state._KV_CONNECTOR_AGENT = worker  # what ensure_kv_transfer_initialized sets per worker
            try:
                if scheduler_output.total_num_scheduled_tokens == 0:
                    results.append(ModelRunnerMixin.kv_connector_no_forward(scheduler_output, self.vllm_config))
                    continue
                with set_forward_context(None, self.vllm_config), \
                        ModelRunnerMixin._get_kv_connector_output(scheduler_output) as kv_output:
                    self._forward(rank, worker, scheduler_output)
                results.append(self._runner_output(scheduler_output, kv_output))
            finally:
                kv_transfer_state._KV_CONNECTOR_AGENT = None
        if self.tp == 1:
            merged = results[0]  # one worker: vLLM's uniprocess executor hands its output over as is
        else:  # the multiprocess executor: each worker's output arrives as its own (deserialised) object
            merged = self.aggregator.aggregate([copy.copy(r) for r in results], 0)
        if merged.kv_connector_output is not None:
            self.kv_outputs.append(merged.kv_connector_output)
        return merged

    def _runner_output(self, scheduler_output, kv_output) -> ModelRunnerOutput:
        ids = list(scheduler_output.num_scheduled_tokens)
        sampled = []
        for request_id in ids:
            request = self.scheduler.requests.get(request_id)
            partial = request is not None and request.num_computed_tokens < request.num_prompt_tokens
            sampled.append([] if partial else [TOKEN])  # a partial prefill chunk samples nothing
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled, kv_connector_output=kv_output)

    def _forward(self, rank: int, worker, scheduler_output) -> None:
        """The attention layers' part of a forward pass: per layer, wait for its load, write the
        scheduled tokens' KV, save the layer."""
        spans = []
        for data in scheduler_output.scheduled_new_reqs:
            spans.append((data.req_id, data.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            spans.append((request_id, cached.num_computed_tokens[i]))
        for layer, name in enumerate(self.layer_names):
            worker.wait_for_layer_load(name)
            for request_id, start in spans:
                count = scheduler_output.num_scheduled_tokens[request_id]
                request = self.scheduler.requests[request_id]
                positions = torch.arange(start, start + count)
                self._write(rank, name, layer, self.block_tables[request_id], positions, request)
                if rank == 0 and layer == 0:
                    self.written[request_id].update(positions.tolist())
            worker.save_kv_layer(name, self.caches[rank][name], None)

    # ------------------------------------------------------------------ KV bytes
    def _heads(self, rank: int) -> list[int]:
        if self.kind == "mla":
            return [0]
        first, stop = heads_of_rank(self.num_kv_heads, self.tp, rank)
        return list(range(first, stop))

    def pattern(self, layer: int, positions: torch.Tensor, head: int, tokens: torch.Tensor, width: int) -> torch.Tensor:
        """The bytes this engine's forward writes for (layer, positions, global head): [n, width] uint8."""
        j = torch.arange(width)
        value = (tokens[:, None] * 131 + positions[:, None] * 31 + layer * 7 + head * 3 + j[None, :] * 17
                 + self.salt * 101)
        return (value % 251).to(torch.uint8)

    def _tokens(self, request, positions: torch.Tensor) -> torch.Tensor:
        prompt = torch.tensor(request.prompt_token_ids)
        inside = positions < len(prompt)
        return torch.where(inside, prompt[positions.clamp(max=len(prompt) - 1)], torch.full_like(positions, -1))

    def _index(self, block_table: list[int], positions: torch.Tensor, raw: torch.Tensor):
        ratio = raw.shape[0] // self.kv_cache_config.num_blocks  # kernel blocks per scheduler block
        kernel = self.block_size // ratio
        blocks = torch.tensor(block_table)[positions // self.block_size] * ratio
        blocks = blocks + (positions % self.block_size) // kernel
        return blocks, positions % kernel

    def _write(self, rank, name, layer, block_table, positions, request) -> None:
        raw = self.caches[rank][name].view(torch.uint8)  # [B, H, N, bytes]
        blocks, offsets = self._index(block_table, positions, raw)
        tokens = self._tokens(request, positions)
        for local, head in enumerate(self._heads(rank)):
            raw[blocks, local, offsets] = self.pattern(layer, positions, head, tokens, raw.shape[3])

    def rows(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A request's KV bytes, [layers, tokens, global heads, bytes], assembled from every rank."""
        positions = torch.arange(num_tokens)
        out = None
        for rank in range(self.tp):
            for name_index, name in enumerate(self.layer_names):
                raw = self.caches[rank][name].view(torch.uint8)
                if out is None:
                    out = torch.zeros(len(self.layer_names), num_tokens, self.num_kv_heads, raw.shape[3],
                                      dtype=torch.uint8)
                blocks, offsets = self._index(block_table, positions, raw)
                for local, head in enumerate(self._heads(rank)):
                    out[name_index, :, head] = raw[blocks, local, offsets]
        return out

    def expected_rows(self, prompt: list[int], num_tokens: int, width: int) -> torch.Tensor:
        """What this engine's own forward writes for a prompt's first ``num_tokens`` tokens."""
        positions = torch.arange(num_tokens)
        tokens = torch.tensor(prompt[:num_tokens])
        out = torch.zeros(len(self.layer_names), num_tokens, self.num_kv_heads, width, dtype=torch.uint8)
        for layer in range(len(self.layer_names)):
            for head in range(self.num_kv_heads):
                out[layer, :, head] = self.pattern(layer, positions, head, tokens, width)
        return out

    def _update(self, scheduler_output, result) -> None:
        outputs = self.scheduler.update_from_output(scheduler_output, result)
        for engine_outputs in outputs.values():
            for output in engine_outputs.outputs:
                self.outputs[output.request_id].append(output)
                if output.finish_reason is not None:
                    self.finished[output.request_id] = output
                    tokens = self._watch.pop(output.request_id, None)
                    if tokens:  # the blocks are free now but not yet reused: read them before the next step
                        table = self.block_tables.get(output.request_id) or []
                        self.snapshots[output.request_id] = self.rows(table, tokens)

    # ------------------------------------------------------------------ views on the engine's state
    def holds(self, request_id: str) -> bool:
        """Whether the scheduler still holds the request (and its blocks)."""
        return request_id in self.scheduler.requests

    def status(self, request_id: str):
        request = self.scheduler.requests.get(request_id)
        return None if request is None else request.status

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()


def run(*engines: VllmEngine, until_done, timeout: float = 60.0, what: str = "condition"):
    """Step every engine in turn until ``until_done()``."""
    def step():
        for engine in engines:
            engine.step()
    return until(until_done, timeout=timeout, what=what, step=step)


def prefill(engine: VllmEngine, request_id: str, prompt: list[int], *, params=None, snapshot: bool = True,
            timeout: float = 60.0) -> dict:
    """Run a prefill request (``do_remote_decode``) to its end; its output's kv_transfer_params."""
    request = make_request(request_id, prompt, max_tokens=1, block_size=engine.block_size,
                           kv_transfer_params={"do_remote_decode": True, **(params or {})})
    engine.add(request, snapshot_tokens=len(prompt) if snapshot else None)
    until(lambda: request_id in engine.finished, timeout=timeout, what=f"prefill of {request_id}", step=engine.step)
    return engine.finished[request_id].kv_transfer_params


def check_bytes(prefill_engine: VllmEngine, prefill_id: str, decode_engine: VllmEngine, decode_id: str,
                prompt: list[int], *, num_tokens: int | None = None, local_prefix: int = 0) -> int:
    """Decode's cache for the request's first ``num_tokens`` tokens: what prefill's cache held for
    them, except the tokens decode computed itself (its prefix-cache hit, the recomputed last token),
    which hold decode's own bytes. Returns how many tokens came from prefill."""
    num_tokens = num_tokens or len(prompt)
    prefill_rows = prefill_engine.snapshots[prefill_id][:, :num_tokens]
    decode_rows = decode_engine.snapshots[decode_id][:, :num_tokens]
    width = decode_rows.shape[3]
    assert torch.equal(prefill_rows, prefill_engine.expected_rows(prompt, num_tokens, width)), "prefill's own KV"
    own = torch.zeros(num_tokens, dtype=torch.bool)
    own[:local_prefix] = True
    own[[p for p in decode_engine.written[decode_id] if p < num_tokens]] = True
    loaded = ~own
    for layer in range(decode_rows.shape[0]):
        for head in range(decode_rows.shape[2]):
            got, want = decode_rows[layer, loaded, head], prefill_rows[layer, loaded, head]
            if not torch.equal(got, want):
                bad = loaded.nonzero().flatten()[(got != want).any(dim=1)]
                raise AssertionError(f"layer {layer} head {head}: decode's loaded tokens {bad.tolist()[:8]} differ "
                                     "from prefill's")
    mine = decode_engine.expected_rows(prompt, num_tokens, width)
    assert torch.equal(decode_rows[:, own], mine[:, own]), "tokens decode computed (or had cached) were overwritten"
    return int(loaded.sum())
