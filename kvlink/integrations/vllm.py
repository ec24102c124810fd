"""vLLM v1 KV connector: ``KVLinkConnector``.

Load it with::

    --kv-transfer-config '{"kv_connector": "KVLinkConnector",
                           "kv_connector_module_path": "kvlink.integrations.vllm",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_connector_extra_config": {"host": "10.0.0.5", "port": 7700}}'

Flow (the proxy flow of vLLM's disaggregated examples): the proxy sends a request to prefill
with ``kv_transfer_params={"do_remote_decode": True}`` (optionally a ``"transfer_id"``);
prefill's ``request_finished`` holds the blocks and returns the parameters decode needs
(``do_remote_prefill``, ``transfer_id``, ``remote_block_ids``, ``remote_addresses`` of every
prefill TP rank, ``remote_tp_size``, ``remote_num_kv_heads``, ``num_tokens``); the proxy forwards
them to decode, whose scheduler reports the prompt as remotely computed and loads it
asynchronously (``load_async=True``); each decode worker pulls from the prefill ranks
:mod:`kvlink.resharding` assigns it. Prefill frees the blocks when every decode rank that reads
them has confirmed, or when the lease (``lease_seconds``, default 120) runs out. Transfers are
keyed on ``transfer_id``, never on vLLM's request ids (which differ between the two engines).

Worker side, prefill: ``save_kv_layer`` marks each layer of the step's requests ready
(``Endpoint.layer_ready``), so a decode that pulls layer-wise overlaps the transfer with prefill.
Decode: a failed pull becomes ``get_block_ids_with_load_errors()`` and its request is still
reported finished through ``get_finished``.

extra_config keys: ``host`` (prefill listen address, default 127.0.0.1), ``port`` (base port:
rank r listens on port + r; 0 = any free port, then the scheduler learns the addresses through
vLLM's handshake metadata), ``timeout`` (seconds, default KVLINK_TIMEOUT), ``lease_seconds``,
``transport`` ("auto", "ipc", "nccl", "host"), ``secret``, ``wire_dtype`` ("fp8"),
``kv_layout`` ("NHD"/"HND"), ``preset`` (force a kvlink preset), ``decode_tp_size`` (prefill
side: how many decode ranks read each request; default this engine's TP size), ``tp_rank``
(where vLLM's parallel state is not importable).
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

import kvlink
from kvlink import presets
from kvlink.config import default_timeout
from kvlink.resharding import ReleaseTracker, plan_resharding, pull_resharded

log = logging.getLogger("kvlink.vllm")

try:  # the real base classes when vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
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


@dataclass
class KVLinkHandshakeMetadata(KVConnectorHandshakeMetadata):
    """A prefill worker's listen address, for the scheduler's kv_transfer_params."""

    tp_rank: int
    address: str
    num_kv_heads: int  # the model's, all ranks together


@dataclass
class KVLinkConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, one step: plain types only (vLLM serialises it)."""

    # engine request id -> {transfer_id, remote_block_ids, remote_addresses, remote_tp_size,
    #                       remote_num_kv_heads, num_tokens, local_block_ids}
    reqs_to_load: dict[str, dict] = field(default_factory=dict)
    # engine request id -> {transfer_id, block_ids, deadline} (blocks held for a decode)
    reqs_to_send: dict[str, dict] = field(default_factory=dict)
    # engine request id -> transfer_id, for requests prefilled this step (layer-wise saving)
    reqs_to_save: dict[str, str] = field(default_factory=dict)


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


def layout_from_vllm(kv_caches: dict[str, torch.Tensor], kv_layout: str = "NHD", preset: str | None = None):
    """A kvlink layout over vLLM's registered per-layer tensors (strided views included).

    ``[2, B, N, H, D]`` -> FlashAttention, ``[B, 2, N, H, D]`` -> FlashInfer/Triton, ``[B, N, C]``
    -> MLA, ``[B, H, N, 2*D]`` views -> vLLM 2026; ``preset`` forces one.
    """
    if not isinstance(kv_caches, dict) or not kv_caches:
        raise ValueError("kv_caches must be a non-empty {layer_name: tensor} dict")
    first = next(iter(kv_caches.values()))
    if preset is None:
        if first.dim() == 5 and first.shape[0] == 2:
            preset = "vllm_flash_attn"
        elif first.dim() == 5 and first.shape[1] == 2:
            preset = "vllm_flashinfer"
        elif first.dim() == 3:
            preset = "vllm_mla"
        elif first.dim() == 4:
            preset = "vllm_2026"
        else:
            raise ValueError(f"unrecognised vLLM KV cache shape {tuple(first.shape)}; set extra_config 'preset'")
    builders = {"vllm_flash_attn": lambda: presets.vllm_flash_attn(kv_caches, kv_layout),
                "vllm_flashinfer": lambda: presets.vllm_flashinfer(kv_caches, kv_layout),
                "vllm_mla": lambda: presets.vllm_mla(kv_caches), "vllm_2026": lambda: presets.vllm_2026(kv_caches)}
    if preset not in builders:
        raise ValueError(f"preset must be one of {sorted(builders)}, got {preset!r}")
    return builders[preset]()


def _vllm_kv_layout() -> str:
    """vLLM's own choice of NHD/HND for the attention backend in use (NHD where vLLM is absent)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.utils import get_kv_cache_layout  # type: ignore

        return str(get_kv_cache_layout())
    except Exception:  # noqa: BLE001 - older or absent vLLM
        return "NHD"


def _block_ids(blocks) -> list[int]:
    """Local block ids from vLLM's KVCacheBlocks (one KV-cache group) or a plain list."""
    if hasattr(blocks, "get_unhashed_block_ids"):
        return list(blocks.get_unhashed_block_ids())
    if hasattr(blocks, "get_block_ids"):
        ids = blocks.get_block_ids()
        return list(ids[0] if ids and isinstance(ids[0], (list, tuple)) else ids)
    return list(blocks)


class KVLinkConnector(KVConnectorBase_V1):
    """kvlink as a vLLM v1 KV connector (scheduler and worker sides, producer/consumer/both)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._extra = _extra(vllm_config)
        kv_role = getattr(vllm_config.kv_transfer_config, "kv_role", "kv_both")
        if kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {kv_role!r}")
        self.is_producer = kv_role in ("kv_producer", "kv_both")
        self.is_consumer = kv_role in ("kv_consumer", "kv_both")
        self.tp_size = _tp_size(vllm_config)
        self.timeout = float(self._extra["timeout"] if "timeout" in self._extra else default_timeout())
        self.lease_seconds = float(self._extra.get("lease_seconds", 120.0))
        self.block_size = int(getattr(getattr(vllm_config, "cache_config", None), "block_size", 16) or 16)
        # scheduler side
        self._transfer_ids: dict[str, str] = {}        # engine request id -> transfer id
        self._pending_load: dict[str, dict] = {}
        self._pending_send: dict[str, dict] = {}
        self._pending_save: dict[str, str] = {}
        self._prefill_addresses: dict[int, str] = {}
        self._num_kv_heads: int | None = None
        # worker side
        self.endpoint: kvlink.Endpoint | None = None
        self.tp_rank = _tp_rank(self._extra)
        self._peers: dict[str, str] = {}              # address -> linked peer name
        self._loading: dict[str, tuple[Any, list[int]]] = {}  # engine request id -> (pull, local blocks)
        self._load_errors: set[int] = set()
        self._sending: dict[str, dict] = {}           # transfer id -> {request_id, deadline}
        self._sent_transfers: set[str] = set()
        self._finished_seen: set[str] = set()
        self._tracker: ReleaseTracker | None = None
        self._layer_index: dict[str, int] = {}
        log.info("kvlink vLLM connector: role %s, kv_role %s, tp %d", getattr(role, "name", role), kv_role,
                 self.tp_size)

    # ================================================================== scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = getattr(request, "kv_transfer_params", None) or {}
        if params.get("do_remote_decode") and request.request_id not in self._transfer_ids:
            self._transfer_ids[request.request_id] = str(params.get("transfer_id") or uuid.uuid4().hex)
        if self.is_consumer and params.get("do_remote_prefill"):
            count = int(params.get("num_tokens", len(request.prompt_token_ids))) - int(num_computed_tokens)
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = getattr(request, "kv_transfer_params", None) or {}
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        required = ("transfer_id", "remote_block_ids", "remote_addresses")
        missing = [key for key in required if key not in params]
        if missing:
            raise ValueError(f"request {request.request_id}: kv_transfer_params lack {missing} (from the prefill "
                             "engine's request_finished, forwarded by the proxy)")
        self._pending_load[request.request_id] = {
            "transfer_id": str(params["transfer_id"]), "remote_block_ids": list(params["remote_block_ids"]),
            "remote_addresses": list(params["remote_addresses"]),
            "remote_tp_size": int(params.get("remote_tp_size", len(params["remote_addresses"]))),
            "remote_num_kv_heads": params.get("remote_num_kv_heads"),
            "num_tokens": int(params.get("num_tokens", len(request.prompt_token_ids))),
            "local_block_ids": _block_ids(blocks)}
        params["do_remote_prefill"] = False  # loaded once, even if the scheduler asks again

    def build_connector_meta(self, scheduler_output) -> KVLinkConnectorMetadata:
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            transfer_id = self._transfer_ids.get(new.req_id)
            if transfer_id is not None:
                self._pending_save[new.req_id] = transfer_id
        meta = KVLinkConnectorMetadata(reqs_to_load=self._pending_load, reqs_to_send=self._pending_send,
                                       reqs_to_save=self._pending_save)
        self._pending_load, self._pending_send, self._pending_save = {}, {}, {}
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        params = getattr(request, "kv_transfer_params", None) or {}
        transfer_id = self._transfer_ids.pop(request.request_id, None)
        if not self.is_producer or not params.get("do_remote_decode"):
            return False, None
        if not block_ids:
            return False, None
        transfer_id = transfer_id or str(params.get("transfer_id") or uuid.uuid4().hex)
        addresses = self._addresses()
        self._pending_send[request.request_id] = {"transfer_id": transfer_id, "block_ids": list(block_ids),
                                                  "deadline": time.time() + self.lease_seconds}
        num_tokens = len(request.prompt_token_ids)
        return True, {"do_remote_prefill": True, "do_remote_decode": False, "transfer_id": transfer_id,
                      "remote_block_ids": list(block_ids), "remote_addresses": addresses,
                      "remote_tp_size": self.tp_size, "remote_num_kv_heads": self._num_kv_heads,
                      "num_tokens": num_tokens}

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        for rank, meta in metadata.items():
            self._prefill_addresses[int(rank)] = meta.address
            self._num_kv_heads = meta.num_kv_heads

    def _addresses(self) -> list[str]:
        if len(self._prefill_addresses) == self.tp_size:
            return [self._prefill_addresses[r] for r in range(self.tp_size)]
        port = int(self._extra.get("port", 0))
        if not port:
            raise RuntimeError("kvlink: no prefill worker addresses: set extra_config 'port' (rank r listens on "
                               "port + r) or let vLLM pass the workers' handshake metadata")
        host = self._extra.get("host", "127.0.0.1")
        return [f"tcp://{host}:{port + r}" for r in range(self.tp_size)]

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = layout_from_vllm(kv_caches, self._extra.get("kv_layout") or _vllm_kv_layout(),
                                  self._extra.get("preset"))
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        listen = None
        if self.is_producer:
            port = int(self._extra.get("port", 0))
            listen = f"tcp://{self._extra.get('host', '127.0.0.1')}:{port + self.tp_rank if port else 0}"
        self.endpoint = kvlink.Endpoint(layout, name=f"vllm-{self._extra.get('engine_id', uuid.uuid4().hex[:8])}-"
                                                     f"tp{self.tp_rank}", listen=listen,
                                        transport=self._extra.get("transport", "auto"), timeout=self.timeout,
                                        secret=self._extra.get("secret"), wire_dtype=self._extra.get("wire_dtype"),
                                        max_links=int(self._extra.get("max_links", 16)))
        self.num_kv_heads = self._model_kv_heads(layout.num_heads)
        if self.is_producer:
            decode_tp = int(self._extra.get("decode_tp_size", self.tp_size))
            plan = plan_resharding(self.num_kv_heads, self.tp_size, decode_tp, mla=layout.num_kv == 1)
            self._tracker = ReleaseTracker(plan.contacts_of(self.tp_rank))
        log.info("kvlink vLLM worker tp%d: %s, listening on %s", self.tp_rank, layout.describe(),
                 self.endpoint.address)

    def _model_kv_heads(self, local: int) -> int:
        configured = self._extra.get("num_kv_heads")
        if configured:
            return int(configured)
        return local * self.tp_size  # heads split evenly; set num_kv_heads where TP replicates them

    def get_handshake_metadata(self) -> KVLinkHandshakeMetadata | None:
        if self.endpoint is None or self.endpoint.address is None:
            return None
        return KVLinkHandshakeMetadata(tp_rank=self.tp_rank, address=self.endpoint.address,
                                       num_kv_heads=self.num_kv_heads)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        for request_id, info in meta.reqs_to_send.items():
            self._sending[info["transfer_id"]] = {"request_id": request_id, "deadline": info["deadline"]}
        for request_id, info in meta.reqs_to_load.items():
            self._start_pull(request_id, info)

    def _start_pull(self, request_id: str, info: dict) -> None:
        local = info["local_block_ids"]
        needed = -(-info["num_tokens"] // self.endpoint.layout.block_size)
        try:
            peers = [self._link(address) for address in info["remote_addresses"]]
            remote = self.endpoint.remote_layout(peers[0])
            total_heads = info.get("remote_num_kv_heads") or remote["num_heads"] * info["remote_tp_size"]
            plan = plan_resharding(int(total_heads), info["remote_tp_size"], self.tp_size,
                                   mla=remote["num_kv"] == 1)
            remote_needed = -(-info["num_tokens"] // remote["block_size"])
            pull = pull_resharded(self.endpoint, plan, self.tp_rank, peers, info["transfer_id"],
                                  info["remote_block_ids"][:remote_needed], local[:needed], info["num_tokens"])
        except Exception as exc:  # noqa: BLE001 - any failure is a load error for this request, not a crash
            log.error("kvlink: loading request %s (transfer %s) failed to start: %s", request_id,
                      info["transfer_id"], exc)
            pull = _FailedPull(f"{type(exc).__name__}: {exc}")
        self._loading[request_id] = (pull, list(local[:needed]))

    def _link(self, address: str) -> str:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = self.endpoint.connect(address)
        return peer

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: vLLM schedules a request once get_finished reports it

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        if self.endpoint is None or not self.has_connector_metadata():
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for transfer_id in self._get_connector_metadata().reqs_to_save.values():
            self.endpoint.layer_ready(transfer_id, layer)  # after this layer's KV writes on the current stream

    def wait_for_save(self) -> None:
        return None  # nothing is pushed: decode pulls, and the blocks stay held until it confirms

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done_recving: set[str] = set()
        for request_id, (pull, local) in list(self._loading.items()):
            if not pull.done():
                continue
            del self._loading[request_id]
            done_recving.add(request_id)
            if pull.error is not None:
                self._load_errors.update(local)
                log.error("kvlink: request %s failed to load (%s blocks marked as load errors): %s", request_id,
                          len(local), pull.error)
        done_sending: set[str] = set()
        if self.endpoint is not None and self._tracker is not None:
            self._finished_seen.update(finished_req_ids)
            for transfer_id, ok in self._tracker.update(self.endpoint.finished_sends()):
                self._sent_transfers.add(transfer_id)
                if not ok:
                    log.warning("kvlink: a decode rank reported transfer %s failed; freeing its blocks", transfer_id)
            now = time.time()
            for transfer_id, info in list(self._sending.items()):
                expired = now > info["deadline"]
                if transfer_id in self._sent_transfers or expired:
                    if info["request_id"] not in self._finished_seen:
                        continue  # vLLM wants only ids it has reported finished
                    if expired and transfer_id not in self._sent_transfers:
                        log.warning("kvlink: lease of transfer %s (request %s) ran out before decode confirmed; "
                                    "freeing its blocks", transfer_id, info["request_id"])
                    done_sending.add(info["request_id"])
                    self._finished_seen.discard(info["request_id"])
                    self._sent_transfers.discard(transfer_id)
                    del self._sending[transfer_id]
        return done_sending or None, done_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None  # any layout: kvlink converts between them


class _FailedPull:
    """A pull that could not start, seen like one that failed."""

    def __init__(self, reason: str):
        self.error = kvlink.TransferError(reason)

    def done(self) -> bool:
        return True
