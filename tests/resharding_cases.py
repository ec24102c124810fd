"""One resharded transfer, end to end: p prefill ranks, d decode ranks, every byte checked.

Used by tests/test_resharding.py (CPU caches, host transport, every rank an endpoint in this
process) and tests/test_resharding_gpu.py (prefill ranks in their own processes on their own
GPUs, decode ranks here on others).
"""

from __future__ import annotations

import contextlib
import time

import torch

import kvlink
from kvlink.resharding import ReleaseTracker, heads_of_rank, plan_resharding, pull_resharded
from peer_process import PrefillProcess
from sharded_caches import (converted_truth_rows, make_truth, other_blocks, poisoned_cache, rank_cache, read_rows,
                            truth_rows)


class _LocalPrefill:
    """A prefill rank's endpoint in this process, with PrefillProcess's call() interface."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.address = endpoint.address

    def call(self, command, *args):
        if command == "layer_ready":
            request, layers, pulls = args
            for layer in layers:
                self.endpoint.layer_ready(request, layer, pulls=pulls)
            return True
        if command == "finished_sends":
            return self.endpoint.finished_sends()
        raise AssertionError(command)


def run_resharded(*, prefill_tp: int, decode_tp: int, num_kv_heads: int, seed: int,
                  src_preset: str = "vllm_flash_attn_nhd", dst_preset: str = "flashinfer_hnd",
                  src_block_size: int = 16, dst_block_size: int = 16, mla: bool = False, layerwise: bool = False,
                  num_layers: int = 3, head_dim: int = 16, num_blocks: int = 24, requests: int = 3,
                  prefill_devices=None, decode_devices=None, transport: str = "host", timeout: float = 10.0,
                  wire_dtype: str | None = None) -> dict:
    """Move ``requests`` random requests from every prefill rank to every decode rank and check them.

    Returns facts the caller may assert more on: the plan, and bytes pulled per decode rank.
    """
    plan = plan_resharding(num_kv_heads, prefill_tp, decode_tp, mla=mla)
    heads = 1 if mla else num_kv_heads
    latent = head_dim
    truth_shape = dict(num_layers=num_layers, num_kv=1 if mla else 2, num_blocks=num_blocks,
                       block_size=src_block_size, num_heads=heads, head_dim=latent, finite=wire_dtype is not None)
    truth = make_truth(seed, **truth_shape)
    generator = torch.Generator().manual_seed(seed + 1)
    facts = {"plan": plan, "pulled_bytes": [0] * decode_tp}
    with contextlib.ExitStack() as stack:
        prefills = []
        for rank in range(prefill_tp):
            rank_heads = heads_of_rank(heads, prefill_tp, rank)
            options = dict(name=f"prefill-{rank}", timeout=timeout, transport=transport, max_links=16)
            if prefill_devices is None:
                _, layout = rank_cache(src_preset, truth, rank_heads)
                prefills.append(_LocalPrefill(stack.enter_context(kvlink.Endpoint(layout, **options))))
            else:
                process = PrefillProcess(src_preset, seed, dict(truth_shape, rank_heads=rank_heads),
                                         prefill_devices[rank], **options)
                stack.callback(process.stop)
                prefills.append(process)
        decodes = []
        for rank in range(decode_tp):
            first, stop = heads_of_rank(heads, decode_tp, rank)
            device = decode_devices[rank] if decode_devices else "cpu"
            engine, layout = poisoned_cache(dst_preset, num_layers=num_layers,
                                            num_blocks=num_blocks * src_block_size // dst_block_size,
                                            block_size=dst_block_size, num_heads=stop - first, head_dim=latent,
                                            device=device, seed=seed + 10 + rank)
            endpoint = stack.enter_context(kvlink.Endpoint(layout, name=f"decode-{rank}", listen=None,
                                                           timeout=timeout, transport=transport, max_links=16,
                                                           wire_dtype=wire_dtype))
            peers = [endpoint.connect(p.address) for p in prefills]
            decodes.append((endpoint, peers, engine, layout, (first, stop)))

        capacity = num_blocks * src_block_size // requests
        src_free = torch.randperm(num_blocks, generator=generator).tolist()
        dst_free = torch.randperm(decodes[0][3].num_blocks, generator=generator).tolist()
        names = []
        for i in range(requests):
            num_tokens = int(torch.randint(1, capacity - src_block_size, (1,), generator=generator))
            src = [src_free.pop() for _ in range(-(-num_tokens // src_block_size))]
            dst = [dst_free.pop() for _ in range(-(-num_tokens // dst_block_size))]
            request = f"req-{seed}-{i}"
            names.append(request)
            before = [other_blocks(dst_preset, engine, layout, dst) for _, _, engine, layout, _ in decodes]
            pulls = [pull_resharded(endpoint, plan, rank, peers, request, src, dst, num_tokens, layerwise=layerwise)
                     for rank, (endpoint, peers, *_rest) in enumerate(decodes)]
            if layerwise:
                time.sleep(0.05)
                assert not any(p.done() for p in pulls), "a layer-wise pull finished before its layers were ready"
                for rank, prefill in enumerate(prefills):
                    if plan.pulls_from(rank):
                        prefill.call("layer_ready", request, list(range(num_layers)), plan.pulls_from(rank))
            for rank, ((endpoint, peers, engine, layout, dst_heads), pull) in enumerate(zip(decodes, pulls)):
                pull.wait(timeout)
                assert pull.dst_state == "complete"
                assert len(pull.handles) == len(plan.pulls_of(rank))
                got = read_rows(dst_preset, engine, layout, dst, num_tokens)
                want = truth_rows(truth, src, num_tokens, dst_heads) if wire_dtype is None else \
                    converted_truth_rows(truth, src, num_tokens, dst_heads, layout.dtype)
                assert torch.equal(got, want), f"decode rank {rank}: request {request} differs from the truth"
                assert torch.equal(other_blocks(dst_preset, engine, layout, dst), before[rank]), \
                    f"decode rank {rank}: bytes outside the request's blocks changed"
                # each head came once: no duplicate senders
                assert pull.payload_bytes == num_tokens * layout.bytes_per_token
                if wire_dtype is not None:
                    assert all(h.stats.wire_bytes < h.stats.payload_bytes for h in pull.handles)
                facts["pulled_bytes"][rank] += pull.payload_bytes

        # every prefill rank hears of every request from each decode rank the plan says contacts it
        trackers = [ReleaseTracker(plan.contacts_of(rank)) for rank in range(prefill_tp)]
        released = [[] for _ in range(prefill_tp)]
        deadline = time.time() + timeout
        while time.time() < deadline and any(len(r) < requests for r in released):
            for rank, prefill in enumerate(prefills):
                released[rank] += trackers[rank].update(prefill.call("finished_sends"))
            time.sleep(0.02)
        for rank in range(prefill_tp):
            assert sorted(released[rank]) == sorted((name, True) for name in names), \
                f"prefill rank {rank} released {released[rank]}"
    return facts
