"""SGLang 0.5.23's real prefill and decode queues on CPU, around kvlink's backend.

What is real: the plug-in (found through the installed kvlink's entry point), ServerArgs and
their published runtime context (one per simulated rank), ``MHATokenToKVPool`` /
``MLATokenToKVPool`` on the CPU, the paged allocator, the request pools, ``MetadataBuffers``
and their index allocator, the radix tree, ``Req``, ``PrefillBootstrapQueue`` (which builds
KVArgs and the manager), the prefill scheduler mixin's ``send_kv_chunk`` / ``_send_kv_chunk``
/ ``process_disagg_prefill_inflight_queue``, ``DecodePreallocQueue`` (KVArgs, manager,
``try_ensure_parallel_info``, ``_init_receiver``, preallocation, ``send_metadata``) and
``DecodeTransferQueue`` (``pop_transferred`` through the real metadata gate and commit).

What is not: the Scheduler object itself (it needs a model runner and GPUs), so a small
stand-in carries the attributes those queues read; the forward pass, replaced by writing
known bytes into the prefill pool's slots; and process groups, one gloo group of one rank per
process (every simulated rank polls for itself; SGLang's MIN all-reduce across ranks is
replayed by :func:`min_polls` where a test needs it).
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from sglang.srt import runtime_context as rc
from sglang.srt.disaggregation import decode as sg_decode
from sglang.srt.disaggregation import prefill as sg_prefill
from sglang.srt.disaggregation import utils as du
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.plugins import load_plugins
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

HIDDEN = 64  # hidden size of the stand-in model: one metadata row of hidden states
VOCAB = 1000


def backend():
    """The backend module "kvlink" resolves to (``KVLINK_TEST_SGLANG_BACKEND`` names another one, e.g.
    an older version of kvlink/integrations/sglang.py saved as a module, to check a test fails there)."""
    import importlib

    from kvlink.integrations import sglang_plugin

    name = os.environ.get("KVLINK_TEST_SGLANG_BACKEND")
    if name:
        sglang_plugin.BACKEND_MODULE = name
    return importlib.import_module(sglang_plugin.BACKEND_MODULE)


_OWN_GROUP = False


def setup_process() -> None:
    """The plug-in through SGLang's own discovery, and a gloo group of one (see teardown_process)."""
    global _OWN_GROUP
    backend()
    load_plugins()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    assert hasattr(du.TransferBackend, "KVLINK"), "the kvlink entry point did not register (pip install -e .?)"


def teardown_process() -> None:
    """Drop the process group setup_process made (other engines' tests may run in this process next)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def server_args(mode: str, bootstrap_port: int, *, tp: int = 1, page_size: int = 16, kv_cache_dtype: str = "auto",
                host: str = "127.0.0.1", **extra) -> ServerArgs:
    return ServerArgs(model_path="dummy", device="cpu", disaggregation_mode=mode,
                      disaggregation_transfer_backend="kvlink", disaggregation_bootstrap_port=bootstrap_port,
                      tp_size=tp, host=host, page_size=page_size, kv_cache_dtype=kv_cache_dtype, **extra)


class Rank:
    """One simulated scheduler rank: its published context, pools and stand-in scheduler."""

    def __init__(self, sa: ServerArgs, rank: int, *, heads_total: int, head_dim: int, layers: int, pages: int,
                 page_size: int, dtype: torch.dtype, mla: bool = False, draft_layers: int = 0,
                 kv_cache_dtype_str: str = "auto", max_reqs: int = 8, metadata_slots: int = 8,
                 swa_window: int | None = None):
        self.sa, self.rank, self.mla = sa, rank, mla
        self.ctx = rc.create_context(sa, role="test", ranks=rc.SpawnRanks(world_rank=rank, gpu_id=0))
        tp = sa.tp_size
        self.ctx.parallel.override_permanently(
            attn_tp_group=SimpleNamespace(cpu_group=None, world_size=tp),
            tp_group=SimpleNamespace(cpu_group=None, world_size=tp))
        self.page_size, self.dtype, self.layers = page_size, dtype, layers
        self.heads = 1 if mla else max(1, heads_total // tp)
        self.heads_total = heads_total
        size = pages * page_size
        self.swa_window = swa_window
        if swa_window:  # layer 0 full attention, the others sliding-window (their KV is SGLang "state")
            self.pool = SWAKVPool(size=size, size_swa=size, page_size=page_size, dtype=dtype, head_num=self.heads,
                                  head_dim=head_dim, swa_attention_layer_ids=list(range(1, layers)),
                                  full_attention_layer_ids=[0], device="cpu", enable_memory_saver=False,
                                  enable_alt_stream=False)
        elif mla:
            self.pool = MLATokenToKVPool(size, page_size, dtype, kv_lora_rank=head_dim - 8, qk_rope_head_dim=8,
                                         layer_num=layers, device="cpu", enable_memory_saver=False)
        else:
            self.pool = MHATokenToKVPool(size, page_size, dtype, self.heads, head_dim, layers, "cpu", False,
                                         enable_alt_stream=False)
        self.draft = None
        if draft_layers:
            self.draft = MHATokenToKVPool(size, page_size, dtype, self.heads, head_dim, draft_layers, "cpu", False,
                                          enable_alt_stream=False)
        if swa_window:
            self.allocator = SWATokenToKVPoolAllocator(size, size, page_size, dtype, "cpu", self.pool, need_sort=False)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(size, page_size, dtype, "cpu", self.pool, need_sort=False)
        self.metadata = du.MetadataBuffers(metadata_slots, HIDDEN, torch.float16, max_sampling_mask_tokens=8)
        self.metadata_allocator = du.ReqToMetadataIdxAllocator(metadata_slots)
        self.kv_cache_dtype_str = kv_cache_dtype_str
        self.max_reqs = max_reqs

    @contextlib.contextmanager
    def active(self):
        with rc.use_context(self.ctx):
            yield

    def model_config(self):
        return SimpleNamespace(hf_text_config=SimpleNamespace(), num_hidden_layers=self.layers,
                               get_total_num_kv_heads=lambda: self.heads_total)

    def tree(self, r2t, disable: bool = True) -> UnifiedRadixCache:
        components = (ComponentType.FULL, ComponentType.SWA) if self.swa_window else (ComponentType.FULL,)
        return UnifiedRadixCache(CacheInitParams(disable=disable, req_to_token_pool=r2t,
                                                 token_to_kv_pool_allocator=self.allocator,
                                                 page_size=self.page_size, tree_components=components,
                                                 sliding_window_size=self.swa_window))

    # -- KV bytes ----------------------------------------------------------------------------
    def buffers(self) -> list[torch.Tensor]:
        """Every per-layer buffer the transfer covers (target K, V, then draft), [slots, heads, dim]."""
        pools = [self.pool.full_kv_pool if self.swa_window else self.pool]
        pools += [self.draft] if self.draft is not None else []
        out = []
        for pool in pools:
            if isinstance(pool, MLATokenToKVPool):
                out += list(pool.kv_buffer)
            else:
                out += list(pool.k_buffer) + list(pool.v_buffer)
        return out

    def swa_buffers(self) -> list[torch.Tensor]:
        """The sliding-window layers' buffers (indexed by SWA slots): what SGLang moves as SWA state."""
        return list(self.pool.swa_kv_pool.k_buffer) + list(self.pool.swa_kv_pool.v_buffer)

    def swa_slots(self, full_slots: torch.Tensor) -> torch.Tensor:
        """SWA slots of live full-pool slots (freed slots map to 0: read them while the request lives)."""
        return self.allocator.translate_swa_indices_for_transfer(full_slots).to(torch.int64)

    def slots(self, req: Req, start: int, stop: int) -> torch.Tensor:
        return self.r2t.req_to_token[req.kv.req_pool_idx, start:stop].to(torch.int64)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def fill_slots(rank: Rank, slots: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    targets = [(buf, slots) for buf in rank.buffers()]
    if rank.swa_window:
        targets += [(buf, rank.swa_slots(slots)) for buf in rank.swa_buffers()]
    for buf, where in targets:
        raw = _raw(buf)
        raw[where] = torch.randint(0, 255, (len(where),) + tuple(raw.shape[1:]), generator=g, dtype=torch.uint8)


def read_slots(rank: Rank, slots: torch.Tensor, heads: tuple[int, int] | None = None, swa: bool = False
               ) -> list[torch.Tensor]:
    out = []
    for buf in (rank.swa_buffers() if swa else rank.buffers()):
        rows = _raw(buf)[slots]
        if heads is not None:
            rows = rows[:, heads[0]:heads[1]]
        out.append(rows.clone())
    return out


def aux_row(rank: Rank, index: int) -> list[bytes]:
    m = rank.metadata
    bufs = [m.output_ids, m.cached_tokens, m.output_token_logprobs_val, m.output_token_logprobs_idx,
            m.output_top_logprobs_val, m.output_top_logprobs_idx, m.output_topk_p, m.output_topk_index,
            m.output_hidden_states, m.bootstrap_room]
    return [b[index].contiguous().view(torch.uint8).numpy().tobytes() for b in bufs]


# ---------------------------------------------------------------------------------- prefill
class PrefillScheduler(sg_prefill.SchedulerDisaggregationPrefillMixin):
    """The attributes of SGLang's Scheduler that the real prefill queue and mixin read."""

    def __init__(self, rank: Rank):
        self.server_args = rank.sa
        self.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(
            effective_logical_max_total_num_tokens=rank.allocator.size, kv_cache_dtype_str=rank.kv_cache_dtype_str))
        self.kv_shard_widening = 1
        self.token_to_kv_pool_allocator = rank.allocator
        self.rust_server = None
        self.model_config = rank.model_config()
        self.req_to_token_pool = rank.r2t
        self.tree_cache = rank.tree_cache
        self.streamed: list = []
        self.output_streamer = SimpleNamespace(stream_output=lambda reqs, *a, **k: self.streamed.extend(reqs))
        self.processed_tokens_counter = 0
        self.metrics_reporter = SimpleNamespace(enable_metrics=False, kv_transfer_latency_ms=0,
                                                kv_transfer_speed_gb_s=0)
        self.req_to_metadata_buffer_idx_allocator = rank.metadata_allocator
        self.disagg_metadata_buffers = rank.metadata
        self.disagg_prefill_inflight_queue: list = []
        self.disagg_prefill_pending_chunk_rids: set = set()
        self.attn_cp_cpu_group = None
        self.attn_tp_cpu_group = None
        self.enable_staging = False
        self.enable_overlap = False
        self.kv_checksum_computer = None
        self.waiting_queue: list = []
        self.chunked_req = None
        self.scheduler_stage_metrics = None
        self.sliding_window_size = rank.swa_window

    def _release_aborted_request(self, req):  # Scheduler's bookkeeping of aborted requests
        pass

    def retire_unadmitted_request(self, req):
        pass


class PrefillRank(Rank):
    """A prefill rank: SGLang's PrefillBootstrapQueue over real pools, with kvlink as its backend."""

    def __init__(self, sa: ServerArgs, rank: int, **kw):
        super().__init__(sa, rank, **kw)
        self.r2t = ReqToTokenPool(self.max_reqs, 4096, "cpu", False)
        self.tree_cache = self.tree(self.r2t)
        self.sched = PrefillScheduler(self)
        with self.active():
            self.queue = sg_prefill.PrefillBootstrapQueue(
                token_to_kv_pool=self.pool, draft_token_to_kv_pool=self.draft,
                req_to_metadata_buffer_idx_allocator=self.metadata_allocator, metadata_buffers=self.metadata,
                gpu_id=0, bootstrap_port=sa.disaggregation_bootstrap_port,
                max_total_num_tokens=self.allocator.size, scheduler=self.sched,
                scheduler_stage_metrics=None, transfer_backend=du.TransferBackend.KVLINK)
        self.sched.disagg_prefill_bootstrap_queue = self.queue
        self.kv_manager = self.queue.kv_manager

    def add(self, req: Req) -> None:
        with self.active():
            self.queue.add(req, num_kv_heads=self.heads)

    def pop_bootstrapped(self) -> list[Req]:
        with self.active():
            return self.queue.pop_bootstrapped()

    def allocate(self, req: Req) -> None:
        """What the scheduler's PrefillAdder does: a request row and KV slots for the prompt."""
        n = len(req.origin_input_ids)
        with self.active():
            self.r2t.alloc([req])
            loc = sg_decode.alloc_for_decode_prealloc(self.allocator, req=req, fill_len=n, delta_len=n, prefix_len=0,
                                                     total_prefix_len=0, prefix_indices=None, uses_swa_tail=False,
                                                     swa_tail_len=0)
            assert loc is not None, "prefill pool full"
            self.r2t.write((req.kv.req_pool_idx, slice(0, n)), loc)
            req.kv.kv_committed_len = n
            req.prefix_len = 0
            req.full_untruncated_fill_ids = array("q", list(req.origin_input_ids))

    def prefill(self, req: Req, *, chunks: list[int] | None = None, first_token: int = 7,
                seed: int = 0) -> torch.Tensor:
        """Allocate, 'compute' the KV (known bytes), send each chunk as the mixin does, then the last
        one; returns the prompt's slots (the request row is freed once the transfer is done)."""
        self.allocate(req)
        n = len(req.origin_input_ids)
        slots = self.slots(req, 0, n).clone()
        fill_slots(self, slots, seed)
        with self.active():
            for end in chunks or []:  # non-overlap chunked prefill: process_prefill_chunk -> send_kv_chunk
                req.extend_end = end
                self.sched.send_kv_chunk(req)
            req.extend_end = n
            req.output_ids.append(first_token)  # process_batch_result_disagg_prefill
            self.sched.checkpoint_disagg_prefill(req)
            self.sched.disagg_prefill_inflight_queue.append(req)
            if not req.pending_bootstrap:
                self.sched.send_kv_chunk(req, last_chunk=True)
        return slots

    def inflight(self) -> list[Req]:
        with self.active():
            return self.sched.process_disagg_prefill_inflight_queue()

    def abort(self, req: Req) -> None:
        """Scheduler.abort_request on a prefill: the bootstrap or inflight queue's sender.abort()."""
        with self.active():
            req.disagg_kv_sender.abort()


# ---------------------------------------------------------------------------------- decode
class DecodeScheduler(SimpleNamespace):
    pass


class DecodeRank(Rank):
    """A decode rank: SGLang's DecodePreallocQueue and DecodeTransferQueue over real pools."""

    def __init__(self, sa: ServerArgs, rank: int, *, radix: bool = False, **kw):
        super().__init__(sa, rank, **kw)
        self.r2t = sg_decode.DecodeReqToTokenPool(self.max_reqs, 4096, "cpu", False, pre_alloc_size=self.max_reqs)
        self.tree_cache = self.tree(self.r2t, disable=not radix)
        self.streamed: list = []
        self.sched = DecodeScheduler(
            server_args=sa, tp_worker=SimpleNamespace(is_hybrid_swa=bool(self.swa_window), model_runner=SimpleNamespace(
                kv_cache_dtype_str=self.kv_cache_dtype_str)),
            enable_hisparse=False, hisparse_coordinator=None, model_config=self.model_config(), random_seed=0,
            running_batch=SimpleNamespace(reqs=[]), enable_priority_scheduling=False, enable_lora=False,
            enable_decode_hicache=False, spec_algorithm=SimpleNamespace(is_none=lambda: True),
            output_streamer=SimpleNamespace(stream_output=lambda reqs, *a, **k: self.streamed.extend(reqs)),
            metrics_reporter=SimpleNamespace(enable_metrics=False), kv_checksum_computer=None,
            batch_result_processor=SimpleNamespace(_maybe_update_reasoning_tokens=lambda req, tok: None),
            sliding_window_size=self.swa_window, disagg_decode_prealloc_queue=None, waiting_queue=[], last_batch=None,
            retire_unadmitted_request=lambda req: None)
        with self.active():
            self.transfer = sg_decode.DecodeTransferQueue(self.metadata_allocator, self.metadata, self.sched,
                                                          self.tree_cache)
            self.prealloc = sg_decode.DecodePreallocQueue(
                req_to_token_pool=self.r2t, token_to_kv_pool_allocator=self.allocator,
                draft_token_to_kv_pool=self.draft, req_to_metadata_buffer_idx_allocator=self.metadata_allocator,
                metadata_buffers=self.metadata, scheduler=self.sched, transfer_queue=self.transfer,
                tree_cache=self.tree_cache, gpu_id=0, bootstrap_port=sa.disaggregation_bootstrap_port,
                max_total_num_tokens=self.allocator.size, num_reserved_decode_tokens=16,
                transfer_backend=du.TransferBackend.KVLINK)
        self.sched.disagg_decode_prealloc_queue = self.prealloc
        self.kv_manager = self.prealloc.kv_manager

    def add(self, req: Req) -> None:
        with self.active():
            self.prealloc.add(req)

    def step(self) -> list[Req]:
        """One pass of the decode event loop's queue work: preallocate, then poll transfers."""
        with self.active():
            ready, _failed = self.prealloc.pop_preallocated()
            self.transfer.extend(ready)
            done = self.transfer.pop_transferred()
            self.transfer.resolve_deferred_releases()
            return done

    def abort(self, req: Req) -> None:
        """Scheduler.abort_request on a decode: the prealloc or transfer queue's receiver.abort()."""
        with self.active():
            for dr in self.prealloc.queue + self.transfer.queue:
                if dr.req is req and dr.kv_receiver is not None:
                    dr.kv_receiver.abort()


# ---------------------------------------------------------------------------------- requests
def make_req(rid: str, prompt_len: int, room: int, bootstrap_port: int, *, seed: int = 0) -> Req:
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.integers(3, VOCAB, prompt_len)]
    req = Req(rid, "", array("q", ids), SamplingParams(max_new_tokens=8), bootstrap_host="127.0.0.1",
              bootstrap_port=bootstrap_port, bootstrap_room=room, vocab_size=VOCAB)
    return req


def twin(req: Req) -> Req:
    """The decode side's copy of a request (the router sends the same one to both sides)."""
    return Req(req.rid, "", array("q", req.origin_input_ids), SamplingParams(max_new_tokens=8),
               bootstrap_host=req.bootstrap_host, bootstrap_port=req.bootstrap_port,
               bootstrap_room=req.bootstrap_room, vocab_size=VOCAB)


def is_aborted(req: Req) -> bool:
    return isinstance(req.finished_reason, FINISH_ABORT) or isinstance(getattr(req, "to_finish", None), FINISH_ABORT)


def drive(step, until, timeout: float = 20.0, interval: float = 0.002):
    """Call ``step()`` until ``until()`` holds; fail after ``timeout`` seconds (a hang, never speed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step()
        if until():
            return
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout:.0f} s")


class Request:
    """One request as every rank sees it: a Req per prefill rank and per decode rank (SGLang runs a
    scheduler per TP rank, each with its own copy), sharing the prompt and the bootstrap room."""

    def __init__(self, pair: "Pair", rid: str, prompt_len: int, room: int, seed: int = 0):
        self.rid, self.room, self.prompt_len = rid, room, prompt_len
        first = make_req(rid, prompt_len, room, pair.port, seed=seed)
        self.prefill = [first] + [twin(first) for _ in pair.prefill[1:]]
        self.decode = [twin(first) for _ in pair.decode]
        self.prefill_slots: list[torch.Tensor] = []
        self.prefill_swa_slots: list[torch.Tensor] = []

    def decode_slots(self, pair: "Pair", rank: int) -> torch.Tensor:
        d = pair.decode[rank]
        return d.r2t.req_to_token[self.decode[rank].kv.req_pool_idx, :self.prompt_len].to(torch.int64).clone()


class Pair:
    """A prefill instance and a decode instance of the same stand-in model, linked by kvlink."""

    def __init__(self, port: int, *, prefill_tp: int = 1, decode_tp: int = 1, heads: int = 2, head_dim: int = 16,
                 layers: int = 2, pages: int = 48, page_size: int = 16, dtype=torch.bfloat16, mla: bool = False,
                 draft_layers: int = 0, kv_cache_dtype: str = "auto", prefill_args: dict | None = None,
                 decode_args: dict | None = None, radix: bool = False, swa_window: int | None = None):
        self.port = port
        geo = dict(heads_total=heads, head_dim=head_dim, layers=layers, pages=pages, page_size=page_size,
                   dtype=dtype, mla=mla, draft_layers=draft_layers, swa_window=swa_window,
                   kv_cache_dtype_str=kv_cache_dtype if kv_cache_dtype != "auto" else "auto")
        self.heads, self.mla = heads, mla
        self.prefill = [PrefillRank(server_args("prefill", port, tp=prefill_tp, page_size=page_size,
                                                **(prefill_args or {})), r, **geo) for r in range(prefill_tp)]
        self.decode = [DecodeRank(server_args("decode", port, tp=decode_tp, page_size=page_size,
                                              **(decode_args or {})), r, radix=radix, **geo)
                       for r in range(decode_tp)]

    def close(self) -> None:
        for rank in self.prefill + self.decode:
            close = getattr(rank.kv_manager, "close", None)
            if close is not None:
                close()

    def request(self, rid: str, prompt_len: int, room: int, seed: int = 0) -> Request:
        return Request(self, rid, prompt_len, room, seed)

    def submit(self, request: Request) -> None:
        for rank, req in zip(self.prefill, request.prefill):
            rank.add(req)
        for rank, req in zip(self.decode, request.decode):
            rank.add(req)

    def bootstrap(self, request: Request, timeout: float = 20.0) -> None:
        """Until every prefill rank's bootstrap queue let the request go (decode metadata arrived)."""
        popped: set[int] = set()

        def step():
            for i, rank in enumerate(self.prefill):
                if any(r is request.prefill[i] for r in rank.pop_bootstrapped()):
                    popped.add(i)
            for rank in self.decode:
                rank.step()

        drive(step, lambda: len(popped) == len(self.prefill), timeout)

    def prefill_seed(self, rank: int) -> int:
        """Replicas of one head get the same bytes (as in a real model), other ranks other bytes."""
        from kvlink.resharding import heads_of_rank

        total = 1 if self.mla else self.heads
        return 1000 + heads_of_rank(total, len(self.prefill), rank)[0]

    def run_prefill(self, request: Request, chunks: list[int] | None = None, first_token: int = 42) -> None:
        request.prefill_slots = [rank.prefill(req, chunks=chunks, first_token=first_token,
                                              seed=self.prefill_seed(i))
                                 for i, (rank, req) in enumerate(zip(self.prefill, request.prefill))]
        request.prefill_swa_slots = [rank.swa_slots(slots) if rank.swa_window else None
                                     for rank, slots in zip(self.prefill, request.prefill_slots)]

    def finish(self, request: Request, timeout: float = 20.0, decode_ranks=None):
        """Until both sides' queues release the request; returns (prefill done reqs, decode done reqs)."""
        decode_ranks = range(len(self.decode)) if decode_ranks is None else decode_ranks
        done_p: dict[int, Req] = {}
        done_d: dict[int, Req] = {}

        def step():
            for i, rank in enumerate(self.prefill):
                for r in rank.inflight():
                    done_p[i] = r
            for i in decode_ranks:
                for r in self.decode[i].step():
                    done_d[i] = r

        drive(step, lambda: len(done_p) == len(self.prefill) and len(done_d) == len(decode_ranks), timeout)
        return done_p, done_d

    def expected_decode_bytes(self, request: Request, rank: int) -> list[torch.Tensor]:
        """What decode rank ``rank`` must hold: its heads, gathered from the prefill ranks that hold them."""
        from kvlink.resharding import heads_of_rank

        total, ptp, dtp = (1 if self.mla else self.heads), len(self.prefill), len(self.decode)
        first, stop = heads_of_rank(total, dtp, rank)
        parts = []
        for head in range(first, stop):
            holder = next(p for p in range(ptp) if heads_of_rank(total, ptp, p)[0] <= head < heads_of_rank(
                total, ptp, p)[1])
            local = head - heads_of_rank(total, ptp, holder)[0]
            parts.append(read_slots(self.prefill[holder], request.prefill_slots[holder], (local, local + 1)))
        return [torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0]))]

    def assert_bytes_equal(self, request: Request) -> None:
        for rank in range(len(self.decode)):
            got = read_slots(self.decode[rank], request.decode_slots(self, rank))
            want = self.expected_decode_bytes(request, rank)
            assert len(got) == len(want)
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), f"decode rank {rank}, buffer {i}: KV bytes differ"


def env(**values):
    """Set SGLang environment variables for the block (managers read them when built)."""
    @contextlib.contextmanager
    def scope():
        old = {k: os.environ.get(k) for k in values}
        os.environ.update({k: str(v) for k, v in values.items()})
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return scope()


__all__ = ["DecodeRank", "KVPoll", "Pair", "PrefillRank", "Request", "aux_row", "drive", "env", "fill_slots",
           "is_aborted", "make_req", "read_slots", "server_args", "setup_process", "teardown_process", "twin"]
