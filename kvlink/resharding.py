"""Tensor-parallel resharding: which prefill ranks feed each decode rank, and with which heads.

Prefill runs with tensor parallelism ``prefill_tp`` and decode with ``decode_tp``; each rank's
cache holds a slice of the model's KV heads, split the way vLLM and SGLang split them:

- ``tp <= num_kv_heads``: rank r holds heads ``[r * H / tp, (r + 1) * H / tp)`` (H divisible by tp);
- ``tp > num_kv_heads``: every rank holds one head, ``r // (tp / H)``, replicated on ``tp / H``
  consecutive ranks (tp divisible by H).

MLA's latent is the same on every rank: it is the case ``num_kv_heads = 1`` (every rank holds
the one "head").

For each global head h and the decode ranks that hold it, one prefill rank holding h sends it,
chosen round-robin among h's replicas, so replicated senders are deduplicated and the load is
spread over them. A decode rank makes one pull per prefill rank that feeds it, each naming a
head range in both caches (kvlink moves only those heads, into the decode rank's own head
positions); a decode rank fed by several prefill ranks assembles their heads in its blocks. A
prefill rank that sends to nobody (a replica left over) is told by a RELEASE from one decode
rank instead, so every prefill rank hears of every request and can free its blocks:
:meth:`ReshardPlan.contacts_of` says how many decode ranks contact each prefill rank per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlink.errors import KVLinkTimeout
from kvlink.handle import DstState, TransferStats
from kvlink.selection import select


@dataclass(frozen=True)
class HeadSlice:
    """One pull of a decode rank: heads ``src_heads`` of ``prefill_rank``'s cache into ``dst_heads`` of ours."""

    prefill_rank: int
    src_heads: tuple[int, int]
    dst_heads: tuple[int, int]


def heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """The global head range ``[start, stop)`` rank ``rank`` of ``tp`` holds."""
    _check_split(num_kv_heads, tp, "tp")
    if not isinstance(rank, int) or not 0 <= rank < tp:
        raise ValueError(f"rank must be in [0, {tp}), got {rank!r}")
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return rank * per_rank, (rank + 1) * per_rank
    head = rank // (tp // num_kv_heads)
    return head, head + 1


def _check_split(num_kv_heads: int, tp: int, name: str) -> None:
    for value, what in ((num_kv_heads, "num_kv_heads"), (tp, name)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if tp <= num_kv_heads and num_kv_heads % tp:
        raise ValueError(f"{name}={tp} does not split {num_kv_heads} KV heads evenly")
    if tp > num_kv_heads and tp % num_kv_heads:
        raise ValueError(f"{name}={tp} is not a multiple of {num_kv_heads} KV heads (needed to replicate them)")


@dataclass(frozen=True)
class ReshardPlan:
    """Who sends what to whom for one (prefill_tp, decode_tp, num_kv_heads); build with :func:`plan_resharding`."""

    num_kv_heads: int
    prefill_tp: int
    decode_tp: int
    pulls: tuple[tuple[HeadSlice, ...], ...]  # per decode rank: its pulls, in head order
    releases: tuple[tuple[int, ...], ...]     # per decode rank: prefill ranks it only notifies

    def pulls_of(self, decode_rank: int) -> tuple[HeadSlice, ...]:
        return self.pulls[self._decode_rank(decode_rank)]

    def releases_of(self, decode_rank: int) -> tuple[int, ...]:
        return self.releases[self._decode_rank(decode_rank)]

    def contacts_of(self, prefill_rank: int) -> int:
        """Decode ranks that pull from or release ``prefill_rank``, per request (its notifications to expect)."""
        if not isinstance(prefill_rank, int) or not 0 <= prefill_rank < self.prefill_tp:
            raise ValueError(f"prefill_rank must be in [0, {self.prefill_tp}), got {prefill_rank!r}")
        return sum(any(s.prefill_rank == prefill_rank for s in self.pulls[d]) + self.releases[d].count(prefill_rank)
                   for d in range(self.decode_tp))

    def pulls_from(self, prefill_rank: int) -> int:
        """Pulls that read ``prefill_rank``'s cache per request (``layer_ready(..., pulls=)`` in layer-wise mode)."""
        return sum(s.prefill_rank == prefill_rank for d in range(self.decode_tp) for s in self.pulls[d])

    def _decode_rank(self, decode_rank: int) -> int:
        if not isinstance(decode_rank, int) or not 0 <= decode_rank < self.decode_tp:
            raise ValueError(f"decode_rank must be in [0, {self.decode_tp}), got {decode_rank!r}")
        return decode_rank

    def describe(self) -> str:
        lines = [f"kvlink resharding: {self.num_kv_heads} KV heads, prefill tp {self.prefill_tp} -> decode tp "
                 f"{self.decode_tp}"]
        for d in range(self.decode_tp):
            parts = [f"p{s.prefill_rank}{list(s.src_heads)}->{list(s.dst_heads)}" for s in self.pulls[d]]
            parts += [f"release p{p}" for p in self.releases[d]]
            lines.append(f"  decode {d}: " + ", ".join(parts))
        return "\n".join(lines)


def plan_resharding(num_kv_heads: int, prefill_tp: int, decode_tp: int, *, mla: bool = False) -> ReshardPlan:
    """Plan a transfer between a prefill of ``prefill_tp`` ranks and a decode of ``decode_tp`` ranks.

    ``num_kv_heads`` counts the model's KV heads (all ranks together); with ``mla=True`` it is
    ignored: the latent is one head every rank holds. ValueError when a side's tp does not split
    the heads evenly.
    """
    if mla:
        num_kv_heads = 1
    _check_split(num_kv_heads, prefill_tp, "prefill_tp")
    _check_split(num_kv_heads, decode_tp, "decode_tp")
    prefill_ranges = [heads_of_rank(num_kv_heads, prefill_tp, r) for r in range(prefill_tp)]
    decode_ranges = [heads_of_rank(num_kv_heads, decode_tp, r) for r in range(decode_tp)]
    sources: dict[tuple[int, int], int] = {}  # (decode rank, head) -> prefill rank
    releases: list[list[int]] = [[] for _ in range(decode_tp)]
    for head in range(num_kv_heads):
        holders = [r for r, (a, b) in enumerate(prefill_ranges) if a <= head < b]
        readers = [r for r, (a, b) in enumerate(decode_ranges) if a <= head < b]
        for i, decode_rank in enumerate(readers):
            sources[decode_rank, head] = holders[i % len(holders)]
        for j, prefill_rank in enumerate(holders[len(readers):]):  # replicas nobody reads from
            releases[readers[j % len(readers)]].append(prefill_rank)
    pulls = []
    for decode_rank, (first, stop) in enumerate(decode_ranges):
        slices: list[HeadSlice] = []
        for head in range(first, stop):
            prefill_rank = sources[decode_rank, head]
            src = head - prefill_ranges[prefill_rank][0]
            dst = head - first
            last = slices[-1] if slices else None
            if last and last.prefill_rank == prefill_rank and last.src_heads[1] == src and last.dst_heads[1] == dst:
                slices[-1] = HeadSlice(prefill_rank, (last.src_heads[0], src + 1), (last.dst_heads[0], dst + 1))
            else:
                slices.append(HeadSlice(prefill_rank, (src, src + 1), (dst, dst + 1)))
        pulls.append(tuple(slices))
    return ReshardPlan(num_kv_heads, prefill_tp, decode_tp, tuple(pulls), tuple(tuple(r) for r in releases))


class ReshardedPull:
    """The pulls of one request into one decode rank, with the interface of one TransferHandle.

    ``done()`` and ``wait(timeout)`` cover every pull; ``error`` is the first failure;
    ``dst_state`` is ``"complete"``, ``"untouched"`` (no pull wrote anything) or ``"invalid"``;
    ``event`` / ``layer_event(l)`` / ``current_stream_wait()`` order a stream after all of them;
    ``stats`` adds them up (bytes, chunks; ``seconds`` is the slowest's); ``cancel()`` cancels
    every pull.
    """

    def __init__(self, request: str, handles: list):
        self.request = request
        self.handles = handles
        self.layerwise = any(h.layerwise for h in handles)
        self.peer = ", ".join(h.peer for h in handles)
        self._joined: dict = {}  # event key -> (CUDA event after every pull's, its stream)

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def wait(self, timeout: float | None = None) -> ReshardedPull:
        deadline = None if timeout is None else time.perf_counter() + timeout
        first_error = None
        for handle in self.handles:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                handle.wait(left)
            except TimeoutError:
                raise KVLinkTimeout(f"request {self.request!r}: pull from {handle.peer} not done after "
                                    f"{timeout:.1f} s") from None
            except Exception as exc:  # noqa: BLE001 - wait for the others before reporting it
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return self

    def cancel(self, timeout: float | None = None) -> bool:
        return any([h.cancel(timeout) for h in self.handles])  # noqa: C419 - cancel every pull, not just the first

    def gpu_idle(self) -> bool:
        """True when no GPU work of any of the pulls can still write the destination blocks."""
        return all(h.gpu_idle() for h in self.handles)

    def current_stream_wait(self, stream=None) -> None:
        """Make ``stream`` (default: the current one) wait on the GPU for every pull (see
        TransferHandle.current_stream_wait)."""
        for handle in self.handles:
            handle.current_stream_wait(stream)

    @property
    def event(self):
        """One CUDA event after every pull's last write (None on the host transport)."""
        return self._join("all", [h.event for h in self.handles])

    def layer_event(self, layer: int):
        """One CUDA event after ``layer`` of every pull is in place (layer-wise pulls on GPU)."""
        return self._join(layer, [h.layer_event(layer) for h in self.handles])

    def _join(self, key, events):
        if any(e is None for e in events):
            return None
        if len(events) == 1:
            return events[0]
        if key not in self._joined:  # recorded once, on a stream of its own that waits for them all
            stream = torch.cuda.Stream(self.handles[0].device)
            for event in events:
                stream.wait_event(event)
            joined = torch.cuda.Event()
            joined.record(stream)
            self._joined[key] = (joined, stream)
        return self._joined[key][0]

    @property
    def error(self):
        return next((h.error for h in self.handles if h.error is not None), None)

    @property
    def cancelled(self) -> bool:
        return any(h.cancelled for h in self.handles)

    @property
    def dst_state(self) -> DstState:
        states = [h.dst_state for h in self.handles]
        if DstState.PENDING in states:
            return DstState.PENDING
        if all(s == DstState.COMPLETE for s in states):
            return DstState.COMPLETE
        if all(s == DstState.UNTOUCHED for s in states):
            return DstState.UNTOUCHED
        return DstState.INVALID  # some heads landed, others did not: the blocks hold a mix

    @property
    def stats(self) -> TransferStats:
        """The pulls' stats added up (``seconds``: the slowest pull's, so GBps is the whole's)."""
        parts = [h.stats for h in self.handles]
        return TransferStats(payload_bytes=sum(p.payload_bytes for p in parts),
                             wire_bytes=sum(p.wire_bytes for p in parts), chunks=sum(p.chunks for p in parts),
                             seconds=max((p.seconds for p in parts), default=0.0),
                             enqueue_seconds=sum(p.enqueue_seconds for p in parts),
                             pull_cpu_seconds=sum(p.pull_cpu_seconds for p in parts),
                             sender_enqueue_seconds=sum(p.sender_enqueue_seconds for p in parts))

    @property
    def payload_bytes(self) -> int:
        return sum(h.stats.payload_bytes for h in self.handles)

    def __repr__(self) -> str:
        return f"<ReshardedPull request={self.request!r} pulls={len(self.handles)} {self.dst_state}>"


def pull_resharded(endpoint, plan: ReshardPlan, decode_rank: int, peers: Sequence[str], request: str, src_blocks,
                   dst_blocks, num_tokens: int, *, layers: tuple[int, int] | None = None, layerwise: bool = False,
                   **pull_options) -> ReshardedPull:
    """Decode rank ``decode_rank``: pull ``request`` from every prefill rank the plan names.

    ``peers[r]`` is the linked peer name of prefill rank r (``endpoint.connect()``'s result).
    Prefill and decode ranks share a block table within their TP group, so one ``src_blocks``
    and one ``dst_blocks`` serve every rank. Everything is checked before the first pull
    starts; prefill ranks the plan only releases get a RELEASE.
    """
    slices = plan.pulls_of(decode_rank)
    if isinstance(peers, str) or len(peers) != plan.prefill_tp:
        raise ValueError(f"peers must name {plan.prefill_tp} prefill ranks, got {peers!r}")
    local = heads_of_rank(plan.num_kv_heads, plan.decode_tp, decode_rank)
    if endpoint.layout.num_heads != local[1] - local[0]:
        raise ValueError(f"decode rank {decode_rank} of {plan.decode_tp} holds {local[1] - local[0]} of "
                         f"{plan.num_kv_heads} KV heads, but {endpoint.layout.name} has {endpoint.layout.num_heads}")
    for rank in {s.prefill_rank for s in slices} | set(plan.releases_of(decode_rank)):
        held = heads_of_rank(plan.num_kv_heads, plan.prefill_tp, rank)
        remote = endpoint.remote_layout(peers[rank])
        if remote["num_heads"] != held[1] - held[0]:
            raise ValueError(f"prefill rank {rank} ({peers[rank]}) should hold {held[1] - held[0]} of "
                             f"{plan.num_kv_heads} KV heads but its cache has {remote['num_heads']}")
    select(endpoint.layout, dst_blocks, num_tokens, layers=layers, destination=True, ids_name="dst_blocks")
    handles = []
    try:
        for s in slices:
            handles.append(endpoint.pull(peers[s.prefill_rank], request, src_blocks, dst_blocks, num_tokens,
                                         layers=layers, src_heads=s.src_heads, dst_heads=s.dst_heads,
                                         layerwise=layerwise, **pull_options))
    except Exception:
        for handle in handles:
            handle.cancel()
        raise
    for rank in plan.releases_of(decode_rank):
        endpoint.release(peers[rank], request)
    return ReshardedPull(request, handles)


class ReleaseTracker:
    """Prefill side: turns ``finished_sends()`` into requests every contacting decode rank has confirmed.

    ``expected`` is :meth:`ReshardPlan.contacts_of` for this prefill rank. A request is reported
    once, with ``ok`` False if any decode rank reported a failure.
    """

    def __init__(self, expected: int):
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
            raise ValueError(f"expected must be a positive int, got {expected!r}")
        self.expected = expected
        self._seen: dict[str, list[bool]] = {}
        self._lock = threading.Lock()

    def update(self, finished: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        complete = []
        with self._lock:
            for request, ok in finished:
                seen = self._seen.setdefault(request, [])
                seen.append(bool(ok))
                if len(seen) == self.expected:
                    complete.append((request, all(seen)))
                    del self._seen[request]
        return complete
