"""vLLM v1 KV connector: ``KVLinkConnector`` (tested against vLLM 0.33.0).

Load it with::

    --kv-transfer-config '{"kv_connector": "KVLinkConnector",
                           "kv_connector_module_path": "kvlink.integrations.vllm",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_connector_extra_config": {"host": "10.0.0.5", "port": 7700}}'

Flow (the proxy flow of vLLM's disaggregated examples): the proxy sends a request to prefill
with ``kv_transfer_params={"do_remote_decode": true}`` (optionally a ``"transfer_id"``); when the
request finishes normally, prefill's ``request_finished`` holds the blocks and returns the
parameters decode needs (:class:`RemotePrefillParams`); the proxy forwards them to decode, whose
scheduler reports the prompt tokens past its own prefix-cache hit as remotely computed and loads
them asynchronously: the request waits in ``WAITING_FOR_REMOTE_KVS`` while each decode worker links
to the prefill ranks :mod:`kvlink.resharding` assigns it (``Endpoint.connect_async``: no engine step
ever waits for a handshake) and pulls. Prefill frees the blocks when every decode rank that reads
them has confirmed (a pull's NOTIFY or a RELEASE), or when the lease (``lease_seconds``, default
120) runs out. Transfers are keyed on ``transfer_id``, never on vLLM's request ids (which differ
between the two engines).

Structure (as vLLM's NixlConnector): :class:`KVLinkConnector` is a thin class that delegates to a
scheduler-side half (:class:`KVLinkScheduler`) and a worker-side half (:class:`KVLinkWorker`); they
talk through typed metadata (:class:`KVLinkConnectorMetadata` scheduler -> workers each step,
:class:`KVLinkWorkerMetadata` workers -> scheduler).

Failure rules: nothing a client sends raises out of the scheduler (bad ``kv_transfer_params`` are
parsed into :class:`RemotePrefillParams` and a request with bad ones is computed locally, with a
warning naming the request and the field); a load that cannot run is a load error of that request
alone (``failed_recving``: vLLM's ``kv_load_failure_policy`` then fails or recomputes it); aborts on
either side free the other side's blocks promptly (prefill: an aborted request is never offered;
decode: a request that reads nothing, is rejected or is aborted RELEASEs every prefill rank, and an
in-flight pull is cancelled).

extra_config keys: ``host`` (prefill listen address, default 127.0.0.1), ``advertise_host`` (the
address decode engines reach prefill at, when ``host`` is a wildcard or not reachable), ``port``
(base port: TP rank r of data-parallel rank d listens on port + d * TP + r; 0 = any free port, then
the scheduler learns the addresses through vLLM's handshake metadata), ``timeout`` (seconds for a
handshake, default KVLINK_TIMEOUT),
``lease_seconds``, ``transport`` ("auto", "ipc", "nccl", "host"), ``secret``, ``wire_dtype``
("fp8"), ``cache_scale`` (an e4m3 decode cache's scale when prefill's cache is not fp8),
``kv_layout`` ("NHD"/"HND", for 5-D caches of older vLLMs), ``preset`` (force a kvlink preset),
``decode_tp_size`` (prefill side: the TP size of the decode engines; default this engine's),
``num_kv_heads`` (the model's KV heads, where the model config does not say), ``layerwise``
(prefill: mark each layer ready in ``save_kv_layer`` for layer-wise pulls; default off),
``max_links``, ``tp_rank`` (where vLLM's parallel state is not importable).

Hybrid KV-cache manager: the connector is ``SupportsHMA``, so vLLM keeps the hybrid manager on. It
moves one KV-cache group of full attention (``FullAttentionSpec`` or ``MLAAttentionSpec``, draft
layers of the same spec included, since vLLM puts them in that group). A model vLLM splits into
several groups (sliding window, Mamba, a draft of another spec) is not moved: prefill offers
nothing and decode computes locally, with a warning at start-up; run such models with
``--disable-hybrid-kv-cache-manager`` (vLLM then allocates full-attention blocks for every layer
and kvlink moves them all) where vLLM allows it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import logging
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import kvlink
from kvlink import presets
from kvlink.config import default_timeout
from kvlink.resharding import ReleaseTracker, heads_of_rank, plan_resharding

log = logging.getLogger("kvlink.vllm")

try:  # the real base classes when vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorTransferResults,
        KVConnectorWorkerMetadata,
        SupportsHMA,
    )

    HAVE_VLLM = True
except Exception:  # noqa: BLE001 - any import failure means "no usable vLLM"
    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's base (scheduler -> worker payload)."""

    class KVConnectorHandshakeMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's base (worker -> scheduler handshake)."""

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's base (worker -> scheduler payload, aggregated over workers)."""

        def aggregate(self, other):
            raise NotImplementedError

    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in for vLLM's marker of connectors that work with the hybrid KV-cache manager."""

    @dataclass
    class KVConnectorTransferResults:  # type: ignore[no-redef]
        finished_sending: set = field(default_factory=set)
        finished_recving: set = field(default_factory=set)
        failed_recving: set = field(default_factory=set)

    class KVConnectorBase_V1:  # type: ignore[no-redef]
        """Stand-in with the base's constructor and metadata plumbing (vLLM not installed)."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            if getattr(vllm_config, "kv_transfer_config", None) is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource  # type: ignore

    _P2P_SOURCE = CacheHitSource.P2P
except Exception:  # noqa: BLE001
    _P2P_SOURCE = None

# statuses of a request that finished with its whole prompt computed (vLLM's RequestStatus names)
NORMAL_FINISHES = frozenset({"FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED", "FINISHED_REPETITION"})
MAX_ID_CHARS = 1024        # kvlink's bound on request (transfer) ids
MAX_LIST = 1 << 22         # sanity bound on client-sent lists (block ids, addresses)


# ====================================================================== request parameters
class ParamsError(ValueError):
    """Bad ``kv_transfer_params``; ``field`` names the offending key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"kv_transfer_params[{key!r}] {problem}")
        self.field = key


def _flag(params, key: str) -> bool:
    value = params.get(key) if isinstance(params, Mapping) else None
    return isinstance(value, (bool, int)) and bool(value)


def _get_int(params: Mapping, key: str, *, minimum: int, default=None, optional: bool = False) -> int | None:
    if key not in params or params[key] is None:
        if optional or default is not None:
            return default
        raise ParamsError(key, "is missing")
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamsError(key, f"must be an int, got {type(value).__name__}")
    if not minimum <= value < 2**62:
        raise ParamsError(key, f"must be >= {minimum}, got {value}")
    return value


def _get_str(params: Mapping, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ParamsError(key, f"must be a non-empty str of at most {MAX_ID_CHARS} characters")
    return value


def _get_list(params: Mapping, key: str, kind: type) -> tuple:
    if key not in params:
        raise ParamsError(key, "is missing")
    value = params[key]
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_LIST:
        raise ParamsError(key, f"must be a non-empty list, got {type(value).__name__}")
    for item in value:
        if kind is int and (isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 2**31):
            raise ParamsError(key, f"must hold block ids (ints in [0, 2**31)), got {item!r:.40}")
        if kind is str and (not isinstance(item, str) or "://" not in item or len(item) > MAX_ID_CHARS):
            raise ParamsError(key, f"must hold addresses like tcp://host:port, got {item!r:.40}")
    return tuple(value)


@dataclass(frozen=True)
class RemotePrefillParams:
    """A decode request's ``kv_transfer_params``: where its prompt's KV lies on the prefill engine.

    Built by prefill's ``request_finished``, forwarded by the proxy. :meth:`parse` validates the
    client-sent dict and raises :class:`ParamsError` (a ValueError) naming the field.
    """

    transfer_id: str
    remote_addresses: tuple[str, ...]  # one per prefill TP rank
    remote_block_ids: tuple[int, ...]  # prefill's blocks of the prompt, in token order
    num_tokens: int                    # prompt tokens the blocks hold
    remote_tp_size: int
    remote_num_kv_heads: int | None = None    # the model's, all ranks together
    remote_block_size: int | None = None      # prefill's (scheduler) block size
    remote_decode_tp_size: int | None = None  # the decode TP size prefill counts confirmations for
    remote_engine_id: str | None = None

    @classmethod
    def parse(cls, params) -> RemotePrefillParams:
        if not isinstance(params, Mapping):
            raise ParamsError("do_remote_prefill", f"kv_transfer_params must be a dict, got {type(params).__name__}")
        addresses = _get_list(params, "remote_addresses", str)
        tp = _get_int(params, "remote_tp_size", minimum=1, default=len(addresses))
        if tp != len(addresses):
            raise ParamsError("remote_tp_size", f"is {tp} but {len(addresses)} remote_addresses were given")
        num_tokens = _get_int(params, "num_tokens", minimum=1)
        block_size = _get_int(params, "remote_block_size", minimum=1, optional=True)
        block_ids = _get_list(params, "remote_block_ids", int)
        if block_size is not None and len(block_ids) < -(-num_tokens // block_size):
            raise ParamsError("remote_block_ids", f"holds {len(block_ids)} blocks, fewer than num_tokens={num_tokens} "
                                                  f"needs at {block_size} tokens a block")
        engine = params.get("remote_engine_id")
        return cls(transfer_id=_get_str(params, "transfer_id"), remote_addresses=addresses, remote_block_ids=block_ids,
                   num_tokens=num_tokens, remote_tp_size=tp,
                   remote_num_kv_heads=_get_int(params, "remote_num_kv_heads", minimum=1, optional=True),
                   remote_block_size=block_size,
                   remote_decode_tp_size=_get_int(params, "remote_decode_tp_size", minimum=1, optional=True),
                   remote_engine_id=engine if isinstance(engine, str) and len(engine) <= MAX_ID_CHARS else None)

    @classmethod
    def release_target(cls, params) -> tuple[str, tuple[str, ...]] | None:
        """(transfer_id, addresses) of a request whose other fields are bad, to free prefill's blocks; or None."""
        try:
            return _get_str(params, "transfer_id"), _get_list(params, "remote_addresses", str)
        except (ParamsError, TypeError, AttributeError):
            return None


def _parse_decode_transfer_id(params) -> str | None:
    """Prefill side: a client-chosen ``transfer_id`` (or None: the connector names the transfer)."""
    if not isinstance(params, Mapping) or params.get("transfer_id") is None:
        return None
    value = params["transfer_id"]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ParamsError("transfer_id", "must be a non-empty str of at most 256 characters")
    return value


# ====================================================================== typed metadata
@dataclass
class LoadSpec:
    """Decode: pull ``num_tokens`` tokens of a request into ``local_block_ids`` (plain types only)."""

    request_id: str
    transfer_id: str
    remote_addresses: list[str]
    remote_block_ids: list[int]  # prefill's blocks from the first one to load (its block size: remote_block_size)
    remote_block_size: int
    local_block_ids: list[int]   # our (scheduler) blocks to write, in token order; never prefix-cached ones
    num_tokens: int              # tokens to move, from the first token of remote_block_ids[0]
    remote_tp_size: int
    num_kv_heads: int
    error: str | None = None     # a load the scheduler knows cannot run: reported failed at once


@dataclass
class ReleaseSpec:
    """Decode: tell every prefill rank we read nothing of ``transfer_id`` (frees its blocks there)."""

    request_id: str
    transfer_id: str
    remote_addresses: list[str]
    num_kv_heads: int
    remote_decode_tp_size: int   # the decode TP prefill counts confirmations for


@dataclass
class SendSpec:
    """Prefill: a finished request's blocks, held for a decode until ``deadline`` (time.time())."""

    request_id: str
    transfer_id: str
    deadline: float


@dataclass
class KVLinkConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, one step (vLLM serialises it: plain types and these dataclasses)."""

    loads: dict[str, LoadSpec] = field(default_factory=dict)
    releases: dict[str, ReleaseSpec] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)   # decode requests finished while their load runs
    sends: dict[str, SendSpec] = field(default_factory=dict)
    saves: dict[str, str] = field(default_factory=dict)  # request id -> transfer id: prefill completes this step


@dataclass
class KVLinkWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler: requests whose RELEASEs this worker has sent (or given up on)."""

    released: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVLinkWorkerMetadata) -> KVLinkWorkerMetadata:
        merged = dict(self.released)
        for request_id, count in getattr(other, "released", {}).items():
            merged[request_id] = merged.get(request_id, 0) + count
        return KVLinkWorkerMetadata(merged)


@dataclass
class KVLinkHandshakeMetadata(KVConnectorHandshakeMetadata):
    """A prefill worker's listen address, for the scheduler's kv_transfer_params."""

    tp_rank: int
    address: str
    num_kv_heads: int  # the model's, all ranks together


# ====================================================================== config helpers
def _extra(vllm_config) -> dict:
    return dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {})


def _tp_size(vllm_config) -> int:
    return int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)


def _tp_rank(extra: dict) -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # type: ignore

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - vLLM absent or not initialised: the config says
        return int(extra.get("tp_rank", 0))


def _dp_index(vllm_config) -> int:
    value = getattr(getattr(vllm_config, "parallel_config", None), "data_parallel_index", 0)
    return value if isinstance(value, int) and value >= 0 else 0


def _advertised_host(extra: dict) -> str:
    """The host decode engines reach this prefill at: ``advertise_host``, else ``host`` (a wildcard
    listen address is advertised as this machine's address)."""
    host = str(extra.get("advertise_host") or extra.get("host", "127.0.0.1"))
    if host in ("0.0.0.0", "*", "::", "[::]"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = socket.gethostname()
    return host


def _listen_port(extra: dict, vllm_config, tp_rank: int) -> int:
    """Rank ``tp_rank`` of data-parallel rank d listens on ``port + d * tp + tp_rank`` (0: any free port)."""
    port = int(extra.get("port", 0) or 0)
    return port + _dp_index(vllm_config) * _tp_size(vllm_config) + tp_rank if port else 0


def _model_kv_heads(vllm_config, extra: dict) -> int | None:
    """The model's KV heads, all TP ranks together (extra_config ``num_kv_heads`` wins)."""
    if extra.get("num_kv_heads"):
        return int(extra["num_kv_heads"])
    model_config = getattr(vllm_config, "model_config", None)
    try:
        return int(model_config.get_total_num_kv_heads())
    except Exception:  # noqa: BLE001 - no model config (stand-ins)
        return None


def _transfer_group(kv_cache_config) -> tuple[Any, str | None]:
    """(the one KV-cache group kvlink moves, None) or (None, why this engine's cache cannot be moved)."""
    if kv_cache_config is None:
        return None, None  # stand-ins: whatever the worker registers
    groups = list(getattr(kv_cache_config, "kv_cache_groups", ()) or ())
    if len(groups) != 1:
        kinds = ", ".join(f"{type(g.kv_cache_spec).__name__}[{len(g.layer_names)} layers]" for g in groups)
        return None, (f"vLLM split the KV cache into {len(groups)} groups ({kinds}); kvlink moves one group of full "
                      "attention: run with --disable-hybrid-kv-cache-manager where the model allows it")
    spec = groups[0].kv_cache_spec
    if type(spec).__name__ not in ("FullAttentionSpec", "MLAAttentionSpec"):
        return None, f"the KV cache is {type(spec).__name__}; kvlink moves full attention (FullAttentionSpec, MLA)"
    return groups[0], None


def _is_mla(kv_cache_config, vllm_config) -> bool | None:
    group, _ = _transfer_group(kv_cache_config)
    if group is not None:
        return type(group.kv_cache_spec).__name__ == "MLAAttentionSpec"
    model_config = getattr(vllm_config, "model_config", None)
    use_mla = getattr(model_config, "use_mla", None)
    return bool(use_mla) if isinstance(use_mla, bool) else None


def _status_name(request) -> str:
    status = getattr(request, "status", None)
    return str(getattr(status, "name", status))


def _num_prompt_tokens(request) -> int:
    count = getattr(request, "num_prompt_tokens", None)
    if isinstance(count, int):
        return count
    return len(getattr(request, "prompt_token_ids", None) or ())


def layout_from_vllm(kv_caches: dict[str, torch.Tensor], kv_layout: str = "NHD", preset: str | None = None, *,
                     mla: bool | None = None):
    """A kvlink layout over vLLM's registered per-layer tensors (strided views included).

    ``[B, H, N, C]`` views (vLLM 2026, ``allocate_kv_cache``) -> ``vllm_2026`` (C = K then V) or,
    with ``mla=True``, ``vllm_mla`` over ``[B, 1, N, latent]``; older shapes: ``[2, B, N, H, D]`` ->
    FlashAttention, ``[B, 2, N, H, D]`` -> FlashInfer/Triton, ``[B, N, C]`` -> MLA. ``preset`` forces one.
    Layers that alias an earlier one (vLLM's cross-layer KV sharing) are left out.
    """
    if not isinstance(kv_caches, dict) or not kv_caches:
        raise ValueError("kv_caches must be a non-empty {layer_name: tensor} dict")
    seen: set[tuple] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in kv_caches.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    kv_caches = unique
    first = next(iter(kv_caches.values()))
    if preset is None:
        if first.dim() == 5 and first.shape[0] == 2:
            preset = "vllm_flash_attn"
        elif first.dim() == 5 and first.shape[1] == 2:
            preset = "vllm_flashinfer"
        elif first.dim() == 3 or (first.dim() == 4 and mla):
            preset = "vllm_mla"
        elif first.dim() == 4:
            preset = "vllm_2026"
        else:
            raise ValueError(f"unrecognised vLLM KV cache shape {tuple(first.shape)}; set extra_config 'preset'")

    def mla_views():
        views = []
        for name, t in kv_caches.items():
            if t.dim() == 4:
                if t.shape[1] != 1:
                    raise ValueError(f"{name}: an MLA cache view [B, 1, N, latent] has one head, got {tuple(t.shape)}")
                t = t[:, 0]
            views.append(t)
        return views

    builders = {"vllm_flash_attn": lambda: presets.vllm_flash_attn(kv_caches, kv_layout),
                "vllm_flashinfer": lambda: presets.vllm_flashinfer(kv_caches, kv_layout),
                "vllm_mla": lambda: presets.vllm_mla(mla_views()), "vllm_2026": lambda: presets.vllm_2026(kv_caches)}
    if preset not in builders:
        raise ValueError(f"preset must be one of {sorted(builders)}, got {preset!r}")
    return builders[preset]()


def _vllm_kv_layout(vllm_config=None) -> str:
    """NHD/HND for 5-D caches of older vLLMs (vLLM 0.33's 4-D views carry their order in their strides).

    vLLM 0.33 names the connector's required layout with ``get_kv_connector_cache_layout`` (kvlink
    requires none); older vLLMs had ``get_kv_cache_layout``.
    """
    try:
        from vllm.distributed.kv_transfer.kv_connector import utils  # type: ignore
    except Exception:  # noqa: BLE001 - vLLM absent
        return "NHD"
    for name, args in (("get_kv_connector_cache_layout", (vllm_config,)), ("get_kv_cache_layout", ())):
        getter = getattr(utils, name, None)
        if getter is None:
            continue
        try:
            value = getter(*args)
        except Exception:  # noqa: BLE001 - no current config
            continue
        if str(value).upper() in presets.KV_LAYOUTS:
            return str(value).upper()
    return "NHD"


def _expand(block_ids, ratio: int) -> list[int]:
    """Scheduler blocks -> kernel blocks when vLLM splits each block into ``ratio`` kernel blocks."""
    if ratio == 1:
        return list(block_ids)
    return [b * ratio + i for b in block_ids for i in range(ratio)]


# ====================================================================== scheduler side
@dataclass
class _Req:
    """Scheduler-side state of one request that kvlink moves (either side)."""

    request: Any
    remote: RemotePrefillParams | None = None  # decode: where the prompt lies
    error: str | None = None                   # decode: why its params are unusable
    transfer_id: str | None = None             # prefill: the transfer it is offered under
    consumed: bool = False                     # decode: update_state_after_alloc decided (load or release)
    loading: bool = False                      # decode: a load was sent to the workers, not yet reported done
    notes: list = field(default_factory=list)  # warnings for when the state is registered


class KVLinkScheduler:
    """The scheduler-side half: turns vLLM's scheduler calls into per-step worker metadata."""

    def __init__(self, vllm_config, kv_cache_config, extra: dict, is_producer: bool, is_consumer: bool):
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.extra, self.vllm_config = extra, vllm_config
        self.tp_size = _tp_size(vllm_config)
        self.block_size = int(getattr(getattr(vllm_config, "cache_config", None), "block_size", 16) or 16)
        self.timeout = float(extra["timeout"] if "timeout" in extra else default_timeout())
        self.lease_seconds = float(extra.get("lease_seconds", 120.0))
        self.layerwise = bool(extra.get("layerwise", False))
        self.decode_tp_size = int(extra.get("decode_tp_size", self.tp_size))
        self.engine_id = str(getattr(vllm_config.kv_transfer_config, "engine_id", None) or uuid.uuid4().hex[:12])
        self.num_kv_heads = _model_kv_heads(vllm_config, extra)
        self.group, self.unsupported = _transfer_group(kv_cache_config)
        if self.unsupported:
            log.warning("kvlink vLLM connector: %s; this engine %s", self.unsupported,
                        "offers no KV to decode engines" if is_producer and not is_consumer else
                        "computes remote-prefill requests locally" if is_consumer and not is_producer else
                        "neither offers nor loads KV")
        self._reqs: dict[str, _Req] = {}
        self._meta = KVLinkConnectorMetadata()
        self._offered: set[str] = set()  # prefill: transfer ids of requests in flight or held
        self._release_waits: dict[str, list] = {}  # decode: request id -> [deadline, workers done]
        self._prefill_addresses: dict[int, str] = {}
        self._handshake_heads: int | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ request parameters
    def _parse(self, request) -> _Req | None:
        """This request's kvlink state from its params (not stored), or None for a plain request."""
        params = getattr(request, "kv_transfer_params", None)
        if not isinstance(params, Mapping):
            return None
        state = None
        if self.is_consumer and _flag(params, "do_remote_prefill"):
            state = _Req(request)
            try:
                state.remote = RemotePrefillParams.parse(params)
                if state.remote.num_tokens > _num_prompt_tokens(request):
                    raise ParamsError("num_tokens", f"is {state.remote.num_tokens}, more than the request's "
                                                    f"{_num_prompt_tokens(request)} prompt tokens")
            except ParamsError as exc:
                state.remote, state.error = None, str(exc)
        if self.is_producer and _flag(params, "do_remote_decode") and not _flag(params, "do_remote_prefill"):
            state = state or _Req(request)
            try:
                chosen = _parse_decode_transfer_id(params)
            except ParamsError as exc:
                state.notes.append(f"{exc}; kvlink names the transfer itself")
                chosen = None
            state.transfer_id = chosen or f"{self.engine_id}:{request.request_id}"
        return state

    def _state(self, request) -> _Req | None:
        state = self._reqs.get(request.request_id)
        if state is None:
            state = self._parse(request)
            if state is not None:
                self._register(request, state)
        return state

    def _register(self, request, state: _Req) -> None:
        if state.transfer_id is not None:
            if state.transfer_id in self._offered:
                fresh = f"{self.engine_id}:{request.request_id}"
                self._warn(request, f"transfer_id {state.transfer_id!r} is in use by another request; using {fresh!r}")
                state.transfer_id = fresh
            self._offered.add(state.transfer_id)
        if state.error is not None and not getattr(request, "abort_immediately", False):
            self._warn(request, f"{state.error}: computing it locally")
        for note in state.notes:
            self._warn(request, note)
        self._reqs[request.request_id] = state

    def _warn(self, request, message: str) -> None:
        key = f"{request.request_id}|{message}"
        if key not in self._warned:
            if len(self._warned) > 4096:
                self._warned.clear()
            self._warned.add(key)
            log.warning("kvlink: request %s: %s", request.request_id, message)

    # ------------------------------------------------------------------ vLLM's scheduler hooks
    def on_new_request(self, request) -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Remote tokens past the local (block-aligned) prefix hit; no side effects."""
        if not self.is_consumer:
            return 0, False
        state = self._reqs.get(request.request_id) or self._parse(request)
        if state is None or state.consumed or state.remote is None:
            return 0, False
        count, _ = self._load_range(request, state.remote, int(num_computed_tokens))
        return (count, True) if count > 0 else (0, False)

    def _load_range(self, request, remote: RemotePrefillParams, computed: int) -> tuple[int, str | None]:
        """(tokens to load after ``computed`` local ones, why none): pure."""
        if self.unsupported:
            return 0, self.unsupported
        if remote.remote_decode_tp_size not in (None, self.tp_size):
            return 0, (f"prefill counts confirmations from {remote.remote_decode_tp_size} decode ranks but this engine "
                       f"has {self.tp_size}: set extra_config decode_tp_size={self.tp_size} on the prefill engine")
        if remote.remote_num_kv_heads is not None and self.num_kv_heads is not None and \
                remote.remote_num_kv_heads != self.num_kv_heads:
            return 0, f"prefill's model has {remote.remote_num_kv_heads} KV heads, ours {self.num_kv_heads}"
        remote_block = remote.remote_block_size or self.block_size
        if len(remote.remote_block_ids) < -(-remote.num_tokens // remote_block):
            return 0, f"{len(remote.remote_block_ids)} remote blocks cannot hold {remote.num_tokens} tokens"
        if computed >= remote.num_tokens:
            return 0, None  # the local prefix cache holds all of it
        if computed % remote_block:
            return 0, (f"the local prefix hit ({computed} tokens) does not end on a boundary of prefill's "
                       f"{remote_block}-token blocks, and a pull starts at a block's first token")
        return remote.num_tokens - computed, None

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if not self.is_consumer:
            return
        state = self._state(request)
        if state is None or (state.remote is None and state.error is None) or state.consumed:
            return
        state.consumed = True  # one load (or release) per request, whatever the scheduler asks later
        if state.remote is None:
            self._release(request, state, state.error)
            return
        remote = state.remote
        if num_external_tokens <= 0:
            _, reason = self._load_range(request, remote, self._computed_tokens(blocks))
            self._release(request, state, reason or "the local prefix cache holds the prompt")
            return
        spec = LoadSpec(request_id=request.request_id, transfer_id=remote.transfer_id,
                        remote_addresses=list(remote.remote_addresses), remote_block_ids=[],
                        remote_block_size=remote.remote_block_size or self.block_size, local_block_ids=[],
                        num_tokens=int(num_external_tokens), remote_tp_size=remote.remote_tp_size,
                        num_kv_heads=int(self.num_kv_heads or remote.remote_num_kv_heads or 1))
        try:
            ids, computed = self._block_ids(blocks), self._computed_tokens(blocks)
            stop = computed + int(num_external_tokens)
            rbs = spec.remote_block_size
            if computed % rbs or stop > remote.num_tokens:
                raise ValueError(f"cannot load tokens [{computed}, {stop}) of {remote.num_tokens} from prefill's "
                                 f"{rbs}-token blocks")
            first = computed // self.block_size
            spec.local_block_ids = ids[first:first + -(-int(num_external_tokens) // self.block_size)]
            spec.remote_block_ids = list(remote.remote_block_ids[computed // rbs:-(-stop // rbs)])
            if len(spec.local_block_ids) * self.block_size < num_external_tokens:
                raise ValueError(f"{len(spec.local_block_ids)} local blocks cannot hold {num_external_tokens} tokens")
        except Exception as exc:  # noqa: BLE001 - the request fails alone (vLLM waits for its load to end)
            spec.error = f"{type(exc).__name__}: {exc}"
        self._meta.loads[request.request_id] = spec
        state.loading = True
        self._expect_done(request.request_id)

    def fail_load(self, request, num_external_tokens: int, reason: str) -> None:
        """A load vLLM now waits for (the request is in WAITING_FOR_REMOTE_KVS) that cannot run: the
        workers report it failed, so the request alone is failed or recomputed."""
        if num_external_tokens <= 0 or request.request_id in self._meta.loads:
            return
        state = self._reqs.get(request.request_id)
        if state is not None:
            state.consumed = state.loading = True
        self._meta.loads[request.request_id] = LoadSpec(
            request_id=request.request_id, transfer_id="", remote_addresses=[], remote_block_ids=[],
            remote_block_size=self.block_size, local_block_ids=[], num_tokens=int(num_external_tokens),
            remote_tp_size=1, num_kv_heads=1, error=reason)
        self._expect_done(request.request_id)

    @staticmethod
    def _block_ids(blocks) -> list[int]:
        if hasattr(blocks, "blocks"):
            return [b.block_id for b in blocks.blocks[0]]
        if hasattr(blocks, "get_block_ids"):
            ids = blocks.get_block_ids()
            return list(ids[0] if ids and isinstance(ids[0], (list, tuple)) else ids)
        return list(blocks)

    def _computed_tokens(self, blocks) -> int:
        """Tokens of the local prefix-cache hit: the leading blocks that carry a hash."""
        if not hasattr(blocks, "blocks"):
            return 0
        hit = 0
        for block in blocks.blocks[0]:
            if getattr(block, "is_null", False) or getattr(block, "block_hash", None) is None:
                break
            hit += 1
        return hit * self.block_size

    def _release(self, request, state: _Req, reason: str | None) -> None:
        """Tell every prefill rank we read nothing (asynchronously, through the workers)."""
        if state.remote is not None:
            transfer_id, addresses = state.remote.transfer_id, state.remote.remote_addresses
            decode_tp = state.remote.remote_decode_tp_size or self.tp_size
            heads = state.remote.remote_num_kv_heads or self.num_kv_heads
        else:
            target = RemotePrefillParams.release_target(getattr(request, "kv_transfer_params", None))
            if target is None:
                return  # not even where to send a RELEASE: prefill's lease frees the blocks
            (transfer_id, addresses), decode_tp, heads = target, self.tp_size, self.num_kv_heads
            params = request.kv_transfer_params
            if isinstance(params.get("remote_decode_tp_size"), int) and params["remote_decode_tp_size"] > 0:
                decode_tp = params["remote_decode_tp_size"]
        if reason and state.error is None:
            log.info("kvlink: request %s reads nothing from prefill (%s); releasing transfer %s", request.request_id,
                     reason, transfer_id)
        self._meta.releases[request.request_id] = ReleaseSpec(
            request_id=request.request_id, transfer_id=transfer_id, remote_addresses=list(addresses),
            num_kv_heads=int(heads or 1), remote_decode_tp_size=int(decode_tp))
        self._expect_done(request.request_id)

    def _expect_done(self, request_id: str) -> None:
        """Keep vLLM stepping until every worker reports kvlink done with the request (its load over and
        every prefill rank told), or a deadline passes: a RELEASE may wait for a link after vLLM freed
        the request, and an idle engine calls no worker."""
        self._release_waits[request_id] = [time.monotonic() + self.timeout + 10.0, 0]

    def build_connector_meta(self, scheduler_output) -> KVLinkConnectorMetadata:
        meta, self._meta = self._meta, KVLinkConnectorMetadata()
        if self.layerwise:
            for request_id, count in (getattr(scheduler_output, "num_scheduled_tokens", None) or {}).items():
                state = self._reqs.get(request_id)
                if state is None or state.transfer_id is None:
                    continue
                done = int(getattr(state.request, "num_computed_tokens", 0) or 0)
                if done < _num_prompt_tokens(state.request) <= done + count:  # the step finishes its prompt
                    meta.saves[request_id] = state.transfer_id
        return meta

    def update_connector_output(self, connector_output) -> None:
        for request_id in getattr(connector_output, "finished_recving", None) or ():
            state = self._reqs.get(request_id)
            if state is not None:
                state.loading = False
            wait = self._release_waits.get(request_id)
            if wait is not None:  # the load is over: its RELEASEs, if any, need at most a handshake now
                wait[0] = max(wait[0], time.monotonic() + self.timeout + 10.0)
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        for request_id, count in getattr(worker_meta, "released", {}).items():
            wait = self._release_waits.get(request_id)
            if wait is not None:
                wait[1] += count
                if wait[1] >= self.tp_size:
                    del self._release_waits[request_id]

    def has_pending_push_work(self) -> bool:
        """True while workers may still owe prefill a RELEASE (keeps vLLM stepping so they can send it)."""
        now = time.monotonic()
        for request_id, (deadline, _) in list(self._release_waits.items()):
            if now > deadline:
                del self._release_waits[request_id]
        return bool(self._release_waits)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        """Decode: end a pending load or release prefill; prefill: hold and offer a normally finished prompt."""
        state = self._reqs.pop(request.request_id, None) or self._parse(request)
        if state is None:
            return False, None
        if state.remote is not None or state.error is not None:  # a decode request
            if state.loading:
                self._meta.cancels.append(request.request_id)  # the workers end it and report it received
            elif not state.consumed:  # rejected, aborted before it was scheduled, or ignored
                self._release(request, state, f"it finished ({_status_name(request)}) before loading")
            return False, None
        if state.transfer_id is None:
            return False, None
        self._offered.discard(state.transfer_id)
        return self._offer(request, state, block_ids)

    def _offer(self, request, state: _Req, block_ids) -> tuple[bool, dict | None]:
        if self.unsupported:
            return False, None
        status = _status_name(request)
        if status not in NORMAL_FINISHES:
            log.info("kvlink: request %s finished %s: its blocks are freed, nothing is offered", request.request_id,
                     status)
            return False, None
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            if len(block_ids) != 1:
                return False, None
            block_ids = block_ids[0]
        computed = getattr(request, "num_computed_tokens", None)
        prompt = _num_prompt_tokens(request)
        num_tokens = min(prompt, prompt if computed is None else int(computed))
        needed = -(-num_tokens // self.block_size)
        if num_tokens <= 0 or len(block_ids) < needed:
            return False, None
        addresses = self._addresses()
        if addresses is None:
            self._warn(request, "no prefill worker addresses (set extra_config 'port', or let vLLM pass the "
                                "workers' handshake metadata): nothing is offered")
            return False, None
        self._meta.sends[request.request_id] = SendSpec(request.request_id, state.transfer_id,
                                                        time.time() + self.lease_seconds)
        return True, {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": state.transfer_id,
                      "remote_block_ids": [int(b) for b in block_ids[:needed]], "remote_addresses": addresses,
                      "remote_tp_size": self.tp_size, "remote_num_kv_heads": self.num_kv_heads or self._handshake_heads,
                      "remote_block_size": self.block_size, "remote_decode_tp_size": self.decode_tp_size,
                      "remote_engine_id": self.engine_id, "num_tokens": num_tokens}

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        for rank, meta in (metadata or {}).items():
            address = getattr(meta, "address", None)
            if isinstance(address, str):
                self._prefill_addresses[int(getattr(meta, "tp_rank", rank))] = address
                self._handshake_heads = getattr(meta, "num_kv_heads", None) or self._handshake_heads

    def _addresses(self) -> list[str] | None:
        if all(r in self._prefill_addresses for r in range(self.tp_size)):
            return [self._prefill_addresses[r] for r in range(self.tp_size)]
        if not int(self.extra.get("port", 0) or 0):
            return None
        host = _advertised_host(self.extra)
        return [f"tcp://{host}:{_listen_port(self.extra, self.vllm_config, r)}" for r in range(self.tp_size)]


# ====================================================================== worker side
class _Link:
    """One prefill address: a handshake in flight (never waited on), then a peer name or an error."""

    def __init__(self, future, deadline: float):
        self.future, self.deadline = future, deadline
        self.peer: str | None = None
        self.error: str | None = None


@dataclass(eq=False)
class _Contact:
    """One prefill rank a load (or release) must tell: by a pull's NOTIFY or by a RELEASE."""

    rank: int
    address: str
    src_heads: tuple[int, int] | None = None  # a pull's heads; None: release only
    dst_heads: tuple[int, int] | None = None
    handle: Any = None
    told: bool = False                        # its NOTIFY or RELEASE is on its way (or cannot be sent)


@dataclass
class _Load:
    spec: LoadSpec
    contacts: list[_Contact]
    started: bool = False
    aborted: bool = False
    error: str | None = None


class KVLinkWorker:
    """The worker-side half: one kvlink Endpoint per worker; every call returns without waiting."""

    def __init__(self, vllm_config, kv_cache_config, extra: dict, is_producer: bool, is_consumer: bool):
        self.vllm_config, self.kv_cache_config, self.extra = vllm_config, kv_cache_config, extra
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.tp_size = _tp_size(vllm_config)
        self.tp_rank = _tp_rank(extra)
        self.timeout = float(extra["timeout"] if "timeout" in extra else default_timeout())
        self.layerwise = bool(extra.get("layerwise", False))
        self.engine_id = str(getattr(vllm_config.kv_transfer_config, "engine_id", None) or uuid.uuid4().hex[:12])
        self.group, self.unsupported = _transfer_group(kv_cache_config)
        self.endpoint: kvlink.Endpoint | None = None
        self.num_kv_heads: int | None = None
        self._ratio = 1
        self._layer_index: dict[str, int] = {}
        self._last_meta = None
        # decode
        self._links: dict[str, _Link] = {}
        self._loads: dict[str, _Load] = {}
        self._releases: list[tuple[str | None, str, list[_Contact]]] = []  # (request id, transfer id, contacts)
        self._recved: set[str] = set()
        self._failed: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._reported_errors: set[int] = set()
        self._released: dict[str, int] = {}
        # prefill
        self._tracker: ReleaseTracker | None = None
        self._pulls_per_request = 1
        self._sending: dict[str, SendSpec] = {}        # transfer id -> spec
        self._confirmed: dict[str, float] = {}         # transfer id -> when every decode rank confirmed
        self._finished_ids: collections.OrderedDict = collections.OrderedDict()  # vLLM's finished ids, recent

    # ------------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.unsupported:
            log.warning("kvlink vLLM worker tp%d: not registering the KV cache: %s", self.tp_rank, self.unsupported)
            return
        if self.group is not None:
            missing = [n for n in self.group.layer_names if n not in kv_caches]
            if missing:
                raise ValueError(f"kvlink: vLLM registered no cache for layers {missing[:4]} of the KV-cache group")
            kv_caches = {name: kv_caches[name] for name in self.group.layer_names}  # the group's order, both sides
        layout = layout_from_vllm(kv_caches, self.extra.get("kv_layout") or _vllm_kv_layout(self.vllm_config),
                                  self.extra.get("preset"), mla=_is_mla(self.kv_cache_config, self.vllm_config))
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        num_blocks = getattr(self.kv_cache_config, "num_blocks", None)
        if isinstance(num_blocks, int) and num_blocks > 0 and layout.num_blocks % num_blocks == 0:
            self._ratio = layout.num_blocks // num_blocks  # vLLM's kernel blocks per scheduler block
        listen = None
        if self.is_producer:
            port = _listen_port(self.extra, self.vllm_config, self.tp_rank)
            listen = f"tcp://{self.extra.get('host', '127.0.0.1')}:{port}"
        self.endpoint = kvlink.Endpoint(
            layout, name=f"vllm-{self.engine_id}-tp{self.tp_rank}", listen=listen,
            transport=self.extra.get("transport", "auto"), timeout=self.timeout, secret=self.extra.get("secret"),
            wire_dtype=self.extra.get("wire_dtype"), max_links=int(self.extra.get("max_links", 16)),
            cache_scale=float(self.extra.get("cache_scale", 1.0)))
        self.num_kv_heads = int(_model_kv_heads(self.vllm_config, self.extra) or layout.num_heads * self.tp_size)
        if self.is_producer:
            decode_tp = int(self.extra.get("decode_tp_size", self.tp_size))
            plan = plan_resharding(self.num_kv_heads, self.tp_size, decode_tp, mla=layout.num_kv == 1)
            self._tracker = ReleaseTracker(plan.contacts_of(self.tp_rank))
            self._pulls_per_request = max(1, plan.pulls_from(self.tp_rank))
        log.info("kvlink vLLM worker tp%d/%d: %s, %d kernel blocks per block, listening on %s", self.tp_rank,
                 self.tp_size, layout.describe(), self._ratio, self.endpoint.address)

    def handshake_metadata(self) -> KVLinkHandshakeMetadata | None:
        if self.endpoint is None or self.endpoint.address is None:
            return None
        port = self.endpoint.address.rsplit(":", 1)[1]
        return KVLinkHandshakeMetadata(tp_rank=self.tp_rank, address=f"tcp://{_advertised_host(self.extra)}:{port}",
                                       num_kv_heads=int(self.num_kv_heads or 0))

    # ------------------------------------------------------------------ metadata
    def take_metadata(self, meta) -> None:
        """Apply a step's metadata once (start_load_kv, save_kv_layer and the results may each see it)."""
        if meta is None or meta is self._last_meta:
            return
        self._last_meta = meta
        for spec in getattr(meta, "sends", {}).values():
            self._sending[spec.transfer_id] = spec
        for spec in getattr(meta, "loads", {}).values():
            self._start_load(spec)
        for spec in getattr(meta, "releases", {}).values():
            self._release_all(spec)
        for request_id in getattr(meta, "cancels", ()):
            load = self._loads.get(request_id)
            if load is not None:
                load.aborted = True

    def _start_load(self, spec: LoadSpec) -> None:
        if spec.request_id in self._loads:
            log.error("kvlink: request %s is already loading; a second load of it is refused", spec.request_id)
            return
        contacts: list[_Contact] = []
        reason = spec.error
        try:
            if self.endpoint is None:
                raise RuntimeError("no kvlink endpoint on this worker "
                                   f"({self.unsupported or 'no KV cache registered'})")
            if spec.remote_addresses:
                plan = plan_resharding(spec.num_kv_heads, spec.remote_tp_size, self.tp_size,
                                       mla=self.endpoint.layout.num_kv == 1)
                contacts = [_Contact(s.prefill_rank, spec.remote_addresses[s.prefill_rank], s.src_heads, s.dst_heads)
                            for s in plan.pulls_of(self.tp_rank)]
                contacts += [_Contact(r, spec.remote_addresses[r]) for r in plan.releases_of(self.tp_rank)]
        except Exception as exc:  # noqa: BLE001 - a load error of this request alone
            reason, contacts = reason or f"{type(exc).__name__}: {exc}", []
        load = self._loads[spec.request_id] = _Load(spec, contacts)
        if reason is not None:
            self._fail(load, reason)  # its contacts are RELEASEd when it is handed over
        for contact in contacts:
            self._link(contact.address)

    def _release_all(self, spec: ReleaseSpec) -> None:
        """RELEASE every prefill rank this rank speaks for (all of them together: what prefill expects)."""
        contacts: list[_Contact] = []
        try:
            tp = len(spec.remote_addresses)
            mla = self.endpoint is not None and self.endpoint.layout.num_kv == 1
            plan = plan_resharding(spec.num_kv_heads, tp, spec.remote_decode_tp_size, mla=mla)
            for decode_rank in range(self.tp_rank, spec.remote_decode_tp_size, self.tp_size):
                pulled = sorted({s.prefill_rank for s in plan.pulls_of(decode_rank)})
                for rank in pulled + list(plan.releases_of(decode_rank)):
                    contacts.append(_Contact(rank, spec.remote_addresses[rank]))
        except Exception as exc:  # noqa: BLE001 - cannot tell prefill; its lease frees the blocks
            log.warning("kvlink: cannot release transfer %s (request %s): %s", spec.transfer_id, spec.request_id, exc)
        if self.endpoint is None:
            contacts = []
        self._releases.append((spec.request_id, spec.transfer_id, contacts))
        for contact in contacts:
            self._link(contact.address)

    # ------------------------------------------------------------------ links
    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            try:
                future = self.endpoint.connect_async(address, self.timeout)
            except Exception as exc:  # noqa: BLE001 - a closed endpoint, a bad address
                future = concurrent.futures.Future()
                future.set_exception(exc)
            link = self._links[address] = _Link(future, time.monotonic() + self.timeout)
        return link

    def _poll_links(self) -> None:
        now = time.monotonic()
        down = {info["peer"] for info in self._endpoint_links() if info["failed"]}
        for address, link in list(self._links.items()):
            if link.peer is None and link.error is None:
                if link.future.done():
                    try:
                        link.peer = link.future.result()
                    except Exception as exc:  # noqa: BLE001
                        link.error = f"linking to {address} failed: {type(exc).__name__}: {exc}"
                elif now > link.deadline:
                    link.error = f"no handshake with {address} within {self.timeout:.1f} s"
            elif link.peer is not None and link.peer in down:
                link.error = f"the link to {address} ({link.peer}) is down"

    def _endpoint_links(self) -> list[dict]:
        for _ in range(8):  # the progress thread may add a link while we read them
            try:
                return self.endpoint.links() if self.endpoint is not None else []
            except RuntimeError:
                continue
        return []

    def _drop_failed_links(self) -> None:
        for address, link in list(self._links.items()):
            if link.error is not None:
                del self._links[address]  # the next request links again (a restarted prefill)

    # ------------------------------------------------------------------ progress (never waits)
    def advance(self) -> None:
        if not self._loads and not self._releases:
            return
        self._poll_links()
        for load in list(self._loads.values()):
            self._advance_load(load)
        for job in list(self._releases):
            request_id, transfer_id, contacts = job
            self._tell(transfer_id, contacts)
            if all(c.told for c in contacts):
                self._releases.remove(job)
                if request_id is not None:
                    self._released[request_id] = self._released.get(request_id, 0) + 1
        self._drop_failed_links()

    def _advance_load(self, load: _Load) -> None:
        spec = load.spec
        if not load.started and load.error is None and not load.aborted:
            links = [self._links.get(c.address) for c in load.contacts]
            bad = next((l.error or "link lost" for l in links if l is None or l.error is not None), None)
            if bad is not None:
                self._fail(load, bad)
            elif any(l.peer is None for l in links):
                return  # still linking: the request waits in WAITING_FOR_REMOTE_KVS
            else:
                self._pull(load)
        if load.aborted and not load.started:
            log.info("kvlink: request %s finished before its load started; releasing transfer %s",
                     spec.request_id, spec.transfer_id)
        handles = [c.handle for c in load.contacts if c.handle is not None]
        if load.aborted or load.error is not None:
            for handle in handles:
                if not handle.done():
                    try:
                        handle.cancel(timeout=0)  # posts the cancel; never waits for it to be taken
                    except TimeoutError:
                        pass
                    except Exception:  # noqa: BLE001
                        log.debug("kvlink: cancel of request %s failed", spec.request_id, exc_info=True)
        if not all(h.done() and h.gpu_idle() for h in handles):
            return  # a pull still writes our blocks
        errors = [h.error for h in handles if h.error is not None]
        if errors and not load.aborted:
            self._fail(load, str(errors[0]))
        self._hand_over(load)

    def _pull(self, load: _Load) -> None:
        """Start this rank's pulls of a load (every check first), and the RELEASEs of its plan."""
        spec, endpoint = load.spec, self.endpoint
        load.started = True
        try:
            layout = endpoint.layout
            local = heads_of_rank(1 if layout.num_kv == 1 else spec.num_kv_heads, self.tp_size, self.tp_rank)
            if layout.num_heads != local[1] - local[0]:
                raise ValueError(f"this rank holds {layout.num_heads} KV heads, but the model's {spec.num_kv_heads} "
                                 f"over {self.tp_size} ranks give it {local[1] - local[0]}")
            remote = endpoint.remote_layout(self._links[load.contacts[0].address].peer)
            if spec.remote_block_size % remote["block_size"]:
                raise ValueError(f"prefill's {spec.remote_block_size}-token blocks do not split into its cache's "
                                 f"{remote['block_size']}-token blocks")
            src = _expand(spec.remote_block_ids, spec.remote_block_size // remote["block_size"])
            src = src[:-(-spec.num_tokens // remote["block_size"])]
            dst = _expand(spec.local_block_ids, self._ratio)[:-(-spec.num_tokens // layout.block_size)]
            for contact in load.contacts:
                if contact.src_heads is not None:
                    peer = self._links[contact.address].peer
                    contact.handle = endpoint.pull(peer, spec.transfer_id, src, dst, spec.num_tokens,
                                                   src_heads=contact.src_heads, dst_heads=contact.dst_heads)
        except Exception as exc:  # noqa: BLE001 - a load error of this request alone (started pulls are cancelled)
            self._fail(load, f"{type(exc).__name__}: {exc}")
            return
        self._tell(spec.transfer_id, [c for c in load.contacts if c.src_heads is None])

    def _fail(self, load: _Load, reason: str) -> None:
        if load.error is None:
            load.error = reason
            log.error("kvlink: loading request %s (transfer %s) failed: %s", load.spec.request_id,
                      load.spec.transfer_id, reason)

    def _hand_over(self, load: _Load) -> None:
        """The load is over (done, failed or aborted): report it and make sure every prefill rank hears."""
        spec = load.spec
        if any(c.handle is not None and not (c.handle.done() and c.handle.gpu_idle()) for c in load.contacts):
            return  # a pull still writes our blocks: not before it ends
        del self._loads[spec.request_id]
        self._recved.add(spec.request_id)
        if load.error is not None and not load.aborted:
            self._failed.add(spec.request_id)
            self._failed_blocks.update(spec.local_block_ids)
        owed = [c for c in load.contacts if not c.told and self._owes_release(c)]
        for contact in load.contacts:
            if contact not in owed:
                contact.told = True
        self._tell(spec.transfer_id, owed)
        if all(c.told for c in owed):
            self._released[spec.request_id] = self._released.get(spec.request_id, 0) + 1
        else:  # a link still comes up: reported done once its RELEASE is sent
            self._releases.append((spec.request_id, spec.transfer_id, owed))

    def _owes_release(self, contact: _Contact) -> bool:
        """Whether prefill hears of this contact only through a RELEASE from us.

        A pull that ended well sends its NOTIFY. One that failed sends a NOTIFY (ok=False) on the
        GPU transports; on the host transport a cancelled or refused pull sends none. A contact
        without a pull (release-only, or a pull never started) owes its RELEASE.
        """
        handle = contact.handle
        if handle is None:
            return True
        if handle.error is None:
            return False
        link = next((l for l in self._endpoint_links() if l["peer"] == handle.peer), None)
        return link is not None and not link["failed"] and link["transport"] == "host"

    def _tell(self, transfer_id: str, contacts: list[_Contact]) -> None:
        """Send the RELEASEs contacts owe whose link is up; give up on those whose link failed."""
        for contact in contacts:
            if contact.told:
                continue
            link = self._link(contact.address) if self.endpoint is not None else None
            if link is None or link.error is not None:
                contact.told = True  # unreachable: prefill's lease frees its blocks
                continue
            if link.peer is None:
                continue
            try:
                self.endpoint.release(link.peer, transfer_id)
            except Exception as exc:  # noqa: BLE001
                log.warning("kvlink: RELEASE of transfer %s to %s failed: %s", transfer_id, contact.address, exc)
            contact.told = True

    # ------------------------------------------------------------------ prefill: layers, sends
    def save_kv_layer(self, layer_name: str) -> None:
        meta = self._last_meta
        if not self.layerwise or self.endpoint is None or meta is None or not meta.saves:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for transfer_id in meta.saves.values():  # after this layer's KV writes on the current stream
            self.endpoint.layer_ready(transfer_id, layer, pulls=self._pulls_per_request)

    def _finished_sends(self, finished_req_ids) -> set[str]:
        for request_id in finished_req_ids or ():
            self._finished_ids[request_id] = None
        while len(self._finished_ids) > 65536:
            self._finished_ids.popitem(last=False)
        if self.endpoint is None or self._tracker is None:
            return set()
        now = time.time()
        for transfer_id, ok in self._tracker.update(self.endpoint.finished_sends()):
            self._confirmed[transfer_id] = now
            if not ok:
                log.warning("kvlink: a decode rank reported transfer %s failed; freeing its blocks", transfer_id)
        done: set[str] = set()
        for transfer_id, spec in list(self._sending.items()):
            confirmed = transfer_id in self._confirmed
            expired = now > spec.deadline
            if not (confirmed or expired) or spec.request_id not in self._finished_ids:
                continue  # vLLM wants only ids it has reported finished
            if expired and not confirmed:
                log.warning("kvlink: lease of transfer %s (request %s) ran out before decode confirmed; freeing its "
                            "blocks", transfer_id, spec.request_id)
            done.add(spec.request_id)
            del self._finished_ids[spec.request_id]
            self._confirmed.pop(transfer_id, None)
            del self._sending[transfer_id]
        stale = now - 2 * float(self.extra.get("lease_seconds", 120.0)) - 60.0
        for transfer_id, when in list(self._confirmed.items()):
            if when < stale:  # a confirmation for a transfer never held here
                del self._confirmed[transfer_id]
        return done

    # ------------------------------------------------------------------ results
    def transfer_results(self, finished_req_ids) -> tuple[set[str], set[str], set[str]]:
        self.advance()
        sending = self._finished_sends(finished_req_ids)
        recving, failed, self._recved, self._failed = self._recved, self._failed, set(), set()
        self._reported_errors, self._failed_blocks = self._failed_blocks, set()
        return sending, recving, failed

    def load_errors(self) -> set[int]:
        errors, self._reported_errors = self._reported_errors, set()
        return errors

    def worker_meta(self) -> KVLinkWorkerMetadata | None:
        if not self._released:
            return None
        released, self._released = self._released, {}
        return KVLinkWorkerMetadata(released)

    def shutdown(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


# ====================================================================== the connector
def _role_name(role) -> str:
    return str(getattr(role, "name", role))


class KVLinkConnector(KVConnectorBase_V1, SupportsHMA):
    """kvlink as a vLLM v1 KV connector: delegates to :class:`KVLinkScheduler` or :class:`KVLinkWorker`."""

    _cache_hit_source = _P2P_SOURCE if _P2P_SOURCE is not None else getattr(KVConnectorBase_V1, "_cache_hit_source",
                                                                             None)

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = _extra(vllm_config)
        kv_role = getattr(vllm_config.kv_transfer_config, "kv_role", "kv_both")
        if kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {kv_role!r}")
        self.is_producer = kv_role in ("kv_producer", "kv_both")
        self.is_consumer = kv_role in ("kv_consumer", "kv_both")
        self.scheduler: KVLinkScheduler | None = None
        self.worker: KVLinkWorker | None = None
        if _role_name(role) == "SCHEDULER":
            self.scheduler = KVLinkScheduler(vllm_config, kv_cache_config, extra, self.is_producer, self.is_consumer)
        else:
            self.worker = KVLinkWorker(vllm_config, kv_cache_config, extra, self.is_producer, self.is_consumer)
        log.info("kvlink vLLM connector: role %s, kv_role %s, tp %d", _role_name(role), kv_role, _tp_size(vllm_config))

    # conveniences for callers and tests
    @property
    def endpoint(self) -> kvlink.Endpoint | None:
        return self.worker.endpoint if self.worker is not None else None

    @property
    def tp_rank(self) -> int:
        return self.worker.tp_rank if self.worker is not None else 0

    # ================================================================== scheduler side
    # Nothing raises out of these: vLLM calls them inside schedule() and update_from_output(), where
    # an exception would stop the engine for every request.
    def on_new_request(self, request) -> None:
        try:
            self.scheduler.on_new_request(request)
        except Exception:  # noqa: BLE001
            log.exception("kvlink: on_new_request(%s) failed", getattr(request, "request_id", "?"))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:  # noqa: BLE001 - computed locally
            log.exception("kvlink: get_num_new_matched_tokens(%s) failed; computing it locally", request.request_id)
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        try:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception as exc:  # noqa: BLE001 - the request's load fails alone
            log.exception("kvlink: update_state_after_alloc(%s) failed", request.request_id)
            self.scheduler.fail_load(request, num_external_tokens, f"{type(exc).__name__}: {exc}")

    def build_connector_meta(self, scheduler_output) -> KVLinkConnectorMetadata:
        try:
            return self.scheduler.build_connector_meta(scheduler_output)
        except Exception:  # noqa: BLE001
            log.exception("kvlink: build_connector_meta failed")
            meta, self.scheduler._meta = self.scheduler._meta, KVLinkConnectorMetadata()
            return meta

    def update_connector_output(self, connector_output) -> None:
        try:
            self.scheduler.update_connector_output(connector_output)
        except Exception:  # noqa: BLE001
            log.exception("kvlink: update_connector_output failed")

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        try:
            return self.scheduler.request_finished(request, block_ids)
        except Exception:  # noqa: BLE001 - blocks freed now, nothing offered
            log.exception("kvlink: request_finished(%s) failed; freeing its blocks", request.request_id)
            return False, None

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict | None]:
        return self.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        try:
            return self.scheduler is not None and self.scheduler.has_pending_push_work()
        except Exception:  # noqa: BLE001
            return False

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        return (0,)  # a transfer of the request's own blocks restores the one group kvlink moves

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.set_xfer_handshake_metadata(metadata)

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVLinkHandshakeMetadata | None:
        return self.worker.handshake_metadata() if self.worker is not None else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Take the step's loads, releases and sends; start what can start. Never waits (vLLM calls it
        after the forward pass for asynchronous loads; a load whose link is not up yet waits for a
        later call)."""
        self.worker.take_metadata(self._connector_metadata)
        self.worker.advance()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: vLLM schedules a request once it is reported received

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        if self.worker is not None and self.worker.layerwise and self.has_connector_metadata():
            self.worker.take_metadata(self._connector_metadata)
            self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        return None  # nothing is pushed: decode pulls, and the blocks stay held until it confirms

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        self.worker.take_metadata(self._connector_metadata)
        sending, recving, failed = self.worker.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The older interface: failed loads are among the received ones (and in the load errors)."""
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> KVLinkWorkerMetadata | None:
        return self.worker.worker_meta() if self.worker is not None else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None  # any layout: kvlink converts between them

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return bool((extra_config or {}).get("layerwise", False))  # save_kv_layer runs Python per layer
