"""SGLang disaggregation backend: ``KVLinkKVManager``, ``KVLinkKVSender``, ``KVLinkKVReceiver``,
``KVLinkKVBootstrapServer`` (selected with ``--disaggregation-transfer-backend kvlink``; the
plug-in in :mod:`kvlink.integrations.sglang_plugin` makes SGLang accept the name).

SGLang's own backends push: the decode side names its pages and the prefill writes into them.
kvlink pulls, so the decode side moves the bytes, with SGLang's call sequences unchanged::

    prefill rank (KVLinkKVSender)                 decode rank (KVLinkKVReceiver)
    manager: endpoint + control socket,           manager: control socket; its kvlink endpoint
      registers at the bootstrap server (async)     once the prefill's geometry is known
                                                  init(dp_rank): links to the prefill ranks it
                                                    reads (Endpoint.connect_async)  -> WaitingForInput
    poll(): Bootstrapping until a META arrives <- send_metadata(): META {decode TP, prefix length,
    pop_decode_prefix_len(), init(num_pages)         page count, aux/state layout}  -> Transferring
      -> WaitingForInput
    send(pages, state, num_kv_tokens) per chunk;
      the last one (state_indices given) sends  -> PAGES {pages, tokens, aux rows, state rows}
                                                  poll(): pull_resharded() of the room's pages; once
                                                    done, the aux rows (first token, metadata, the
                                                    bootstrap_room the metadata gate reads) and state
                                                    rows land in the decode buffers -> Success
    poll(): Success once every decode rank that  <- kvlink NOTIFY (pulled) / RELEASE (read elsewhere)
      reads this rank confirmed

Control messages (META, PAGES, ABORT) are typed (:class:`RoomMetadata`, :class:`RoomPages`,
:class:`RoomAbort`), msgpack over a ZeroMQ PUSH/PULL pair per manager; the bootstrap server is
a small HTTP registry (``PUT/GET /route``, ``POST /query_dp_ranks``, ``GET /health``).

Nothing here blocks an engine step: HTTP and link set-up run on the manager's threads, sends
are queued to its I/O thread, and a pull is queued on the kvlink endpoint. Nothing a peer or a
caller does raises out of SGLang's call sites: a bad message is dropped and logged, a bad call
fails its request (``KVPoll.Failed``; ``failure_exception()`` raises :class:`KVTransferError`
naming the room and the reason). An abort on either side sends ABORT to the other, which fails
the request there at its next poll; the prefill's lease (``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``)
is the last resort when a decode rank vanishes without a word.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

import kvlink
from kvlink import presets
from kvlink.progress import Wakeup
from kvlink.resharding import heads_of_rank, plan_resharding, pull_resharded

log = logging.getLogger("kvlink.sglang")

BACKEND_NAME = "kvlink"
PROTOCOL_VERSION = 1

try:  # the real base classes when SGLang is installed
    from sglang.srt.disaggregation.base.conn import (  # type: ignore
        BaseKVBootstrapServer,
        BaseKVManager,
        BaseKVReceiver,
        BaseKVSender,
        KVArgs,
        KVPoll,
        KVTransferMetric,
    )

    HAVE_SGLANG = True
except Exception:  # noqa: BLE001 - any import failure means "no usable SGLang"
    HAVE_SGLANG = False

    class KVPoll:  # type: ignore[no-redef]
        Failed = 0
        Bootstrapping = 1
        WaitingForInput = 2
        Transferring = 3
        Success = 4

    class KVArgs:  # type: ignore[no-redef]
        """Stand-in for SGLang's KVArgs (attributes set by the caller)."""

        num_draft_entries: int = 0

    @dataclasses.dataclass
    class KVTransferMetric:  # type: ignore[no-redef]
        transfer_latency_s: float | None = None
        alloc_latency_s: float | None = None
        transfer_total_bytes: int | None = None

    class BaseKVManager:  # type: ignore[no-redef]
        pass

    class BaseKVSender:  # type: ignore[no-redef]
        pass

    class BaseKVReceiver:  # type: ignore[no-redef]
        pass

    class BaseKVBootstrapServer:  # type: ignore[no-redef]
        pass


class KVTransferError(RuntimeError):
    """A transfer of one bootstrap room failed; the message names the room and the reason.

    ``bootstrap_room``, ``failure_reason`` and ``is_from_another_rank`` are the attributes
    SGLang's schedulers read from a backend's exception.
    """

    def __init__(self, message: str, bootstrap_room: int | None = None, failure_reason: str | None = None):
        super().__init__(message)
        self.bootstrap_room = bootstrap_room
        self.failure_reason = failure_reason or message
        self.is_from_another_rank = False


class ProtocolError(ValueError):
    """A malformed control message or registration (dropped; never raised into SGLang)."""


# ---------------------------------------------------------------------------------- configuration
def _sglang_env(name: str, default: float) -> float:
    """One of SGLang's own settings (``sglang.srt.environ.envs``), else the variable, else ``default``."""
    try:
        from sglang.srt.environ import envs  # type: ignore

        return float(getattr(envs, name).get())
    except Exception:  # noqa: BLE001 - SGLang absent or the setting unknown to this version
        try:
            return float(os.environ.get(name, default))
        except ValueError:
            return float(default)


def _sglang_env_bool(name: str, default: bool) -> bool:
    try:
        from sglang.srt.environ import envs  # type: ignore

        return bool(getattr(envs, name).get())
    except Exception:  # noqa: BLE001
        value = os.environ.get(name)
        return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """SGLang's own disaggregation timeouts (the same variables its built-in backends read).

    ``bootstrap``: ``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``, how long a prefill request waits
    for its decode peer's metadata, and a decode request for its links. ``waiting``:
    ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``, how long a decode request waits for its KV once it
    named its pages, and the prefill's lease on published pages nobody confirmed.
    """

    bootstrap: float
    waiting: float

    @classmethod
    def from_env(cls) -> "Timeouts":
        return cls(bootstrap=_sglang_env("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300),
                   waiting=_sglang_env("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300))


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this scheduler rank sits, read once from SGLang's published runtime context."""

    tp_rank: int  # attention TP rank: the KV heads this rank holds follow it
    tp_size: int
    dp_rank: int
    dp_size: int
    pp_size: int
    cp_size: int
    host: str  # --host
    dist_init_addr: str | None
    bootstrap_port: int | None
    load_balance_method: str | None

    @classmethod
    def current(cls, args, server_args) -> "Topology":
        engine_rank = int(getattr(args, "engine_rank", 0) or 0)
        try:
            from sglang.srt.runtime_context import get_disagg, get_parallel, get_serving  # type: ignore

            parallel = get_parallel()
            return cls(tp_rank=int(parallel.attn_tp_rank), tp_size=int(parallel.attn_tp_size),
                       dp_rank=int(parallel.attn_dp_rank or 0), dp_size=int(parallel.attn_dp_size or 1),
                       pp_size=int(parallel.pp_size or 1), cp_size=int(parallel.attn_cp_size or 1),
                       host=str(get_serving().host or ""), dist_init_addr=parallel.dist_init_addr or None,
                       bootstrap_port=get_disagg().disaggregation_bootstrap_port,
                       load_balance_method=getattr(parallel, "load_balance_method", None))
        except Exception:  # noqa: BLE001 - SGLang absent or nothing published (tests, tools)
            tp = int(getattr(server_args, "tp_size", 1) or 1)
            dp = int(getattr(server_args, "dp_size", 1) or 1) if getattr(server_args, "enable_dp_attention", False) \
                else 1
            attn_tp = max(1, tp // dp)
            return cls(tp_rank=engine_rank % attn_tp, tp_size=attn_tp, dp_rank=engine_rank // attn_tp, dp_size=dp,
                       pp_size=int(getattr(server_args, "pp_size", 1) or 1), cp_size=1,
                       host=str(getattr(server_args, "host", "") or ""),
                       dist_init_addr=getattr(server_args, "dist_init_addr", None) or None,
                       bootstrap_port=getattr(server_args, "disaggregation_bootstrap_port", None),
                       load_balance_method=getattr(server_args, "load_balance_method", None))


def routable_ip(host: str | None) -> str:
    """The address peers can reach this process at: ``host`` unless it is a wildcard or empty,
    then SGLang's own ``get_local_ip_auto()`` (``SGLANG_HOST_IP`` wins there), else the
    interface of the default route."""
    if host and host not in ("0.0.0.0", "::", "[::]", "*"):
        return host
    try:
        from sglang.srt.utils.network import get_local_ip_auto  # type: ignore

        return get_local_ip_auto()
    except Exception:  # noqa: BLE001 - SGLang absent or no address found
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def _zmq_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


def _bootstrap_registry_host(topology: Topology) -> str:
    """Where the prefill ranks find the bootstrap server (as SGLang's CommonKVManager does):
    the first node under multi-node prefill, else this node (a wildcard --host as loopback)."""
    if topology.dist_init_addr:
        return topology.dist_init_addr.rsplit(":", 1)[0].strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(topology.host, topology.host)


# ---------------------------------------------------------------------------------- the pool
def _mode_name(mode) -> str:
    name = getattr(mode, "value", None) or getattr(mode, "name", None) or str(mode)
    name = str(name).lower()
    if name not in ("prefill", "decode"):
        raise ValueError(f"disaggregation_mode must be PREFILL or DECODE, got {mode!r}")
    return name


# KVArgs.kv_cache_dtype_str as SGLang spells it -> the element type of the pool's buffers.
# "auto" (the model's dtype, which KVArgs does not carry) and packed formats (fp4) are moved
# as raw bytes: the transfer is byte-exact either way, and both sides agree on the string.
KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn, "mxfp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
}


def kv_dtype_of(kv_cache_dtype_str: str | None) -> torch.dtype:
    """The element type kvlink describes SGLang's KV buffers with (raw bytes for "auto")."""
    return KV_CACHE_DTYPES.get(str(kv_cache_dtype_str or "auto").lower(), torch.uint8)


def _bytes_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of existing memory at ``address`` (no copy, not owned)."""
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
    import cupy

    memory = cupy.cuda.UnownedMemory(address, nbytes, owner=None, device_id=device.index)
    array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    return torch.from_dlpack(array)


def _pointer_device(address: int, gpu_id: int | None) -> torch.device:
    """cuda:<n> for device memory, cpu for host memory (SGLang's metadata buffers live on the host).

    Asked of the CUDA runtime (``cudaPointerGetAttributes``; pageable host memory answers
    "unregistered"), never guessed: reading a device address as host memory would crash.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import cupy

        with cupy.cuda.Device(int(gpu_id or 0)):
            attributes = cupy.cuda.runtime.pointerGetAttributes(address)
        kind = getattr(attributes, "type", getattr(attributes, "memoryType", None))  # CuPy spells it both ways
        if kind is None:
            kind = 2 if attributes.devicePointer and not attributes.hostPointer else 0
        if kind in (2, 3):  # cudaMemoryTypeDevice, cudaMemoryTypeManaged
            return torch.device("cuda", int(attributes.device))
        return torch.device("cpu")  # unregistered (pageable) or pinned host memory
    except ImportError:
        pass
    from kvlink import cuda_driver

    with torch.cuda.device(int(gpu_id or 0)):
        try:
            cuda_driver.address_range(address)
        except cuda_driver.CudaDriverError:
            return torch.device("cpu")
    return torch.device("cuda", int(gpu_id or 0))


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """SGLang's KV pool as KVArgs describes it: which buffer is which layer's K or V.

    ``kv_data_ptrs`` holds the target model's buffers (MHA: every layer's K, then every
    layer's V; MLA: one per layer), then ``num_draft_entries`` buffers of the draft model in the
    same order. ``kv_item_lens`` is one page's bytes of each buffer.
    """

    dtype: torch.dtype
    page_size: int
    is_mla: bool
    k_entries: tuple[int, ...]  # buffer index of each layer's K (MLA: the latent)
    v_entries: tuple[int, ...]  # buffer index of each layer's V (MLA: empty)
    page_bytes: int  # bytes of one page of one buffer (all buffers alike)

    @property
    def num_layers(self) -> int:
        return len(self.k_entries)

    def token_bytes(self) -> int:
        """Bytes of one token of one buffer (every head)."""
        return self.page_bytes // self.page_size

    @classmethod
    def from_kvargs(cls, args, is_mla: bool) -> "PoolGeometry":
        ptrs, lens, items = list(args.kv_data_ptrs), list(args.kv_data_lens), list(args.kv_item_lens)
        if not ptrs or not len(ptrs) == len(lens) == len(items):
            raise ValueError(f"KVArgs: {len(ptrs)} data pointers, {len(lens)} lengths, {len(items)} item lengths")
        page_size = int(args.page_size)
        if page_size < 1:
            raise ValueError(f"KVArgs: page_size must be positive, got {page_size}")
        num_draft = int(getattr(args, "num_draft_entries", 0) or 0)
        target = len(ptrs) - num_draft
        if not 0 <= num_draft < len(ptrs):
            raise ValueError(f"KVArgs: num_draft_entries={num_draft} of {len(ptrs)} buffers")
        groups = [range(0, target), range(target, len(ptrs))]
        k_entries: list[int] = []
        v_entries: list[int] = []
        for group in groups:
            if not len(group):
                continue
            if is_mla:
                k_entries += list(group)
                continue
            if len(group) % 2:
                raise ValueError(f"KVArgs: an MHA pool registers K and V per layer; a group of {len(group)} buffers "
                                 f"({'draft' if group.start else 'target'} model) has no even split")
            half = len(group) // 2
            k_entries += list(group[:half])
            v_entries += list(group[half:])
        if len(set(items)) != 1:
            where = sorted({(i, n) for i, n in enumerate(items) if n != items[0]})[:3]
            raise ValueError(f"KVArgs: kvlink needs one page geometry for every layer, but page bytes differ "
                             f"(buffer 0: {items[0]}, others e.g. {where}); a draft model of another KV "
                             "geometry is not supported")
        page_bytes = int(items[0])
        if page_bytes % page_size:
            raise ValueError(f"KVArgs: a page of {page_bytes} bytes is not {page_size} slots")
        for i, n in enumerate(lens):
            if n < page_bytes:
                raise ValueError(f"KVArgs: buffer {i} holds {n} bytes, less than one {page_bytes}-byte page")
        return cls(dtype=kv_dtype_of(getattr(args, "kv_cache_dtype_str", None)), page_size=page_size,
                   is_mla=bool(is_mla), k_entries=tuple(k_entries), v_entries=tuple(v_entries),
                   page_bytes=page_bytes)

    def layout(self, args, heads: int, device: torch.device) -> kvlink.CacheLayout:
        """The kvlink layout over these buffers, ``heads`` KV heads a token (1 for MLA)."""
        esize = torch.empty(0, dtype=self.dtype).element_size()
        token = self.token_bytes()
        if heads < 1 or token % (heads * esize):
            raise ValueError(f"KVArgs: a token of {token} bytes is not {heads} heads of "
                             f"{str(self.dtype).removeprefix('torch.')}")
        head_dim = token // (heads * esize)

        def buffer(i: int) -> torch.Tensor:
            nbytes = int(args.kv_data_lens[i]) // token * token
            return _bytes_at(int(args.kv_data_ptrs[i]), nbytes, device).view(self.dtype).view(-1, heads, head_dim)

        keys = [buffer(i) for i in self.k_entries]
        if self.is_mla:
            return presets.sglang_mla(keys, page_size=self.page_size)
        return presets.sglang_mha(keys, [buffer(i) for i in self.v_entries], page_size=self.page_size)


def layout_from_kvargs(args, is_mla_backend: bool = False, heads: int | None = None,
                       device: torch.device | str | None = None) -> kvlink.CacheLayout:
    """A kvlink layout over SGLang's KV pool, from KVArgs' buffers (target layers, then draft)."""
    geometry = PoolGeometry.from_kvargs(args, is_mla_backend)
    if heads is None:
        heads = 1 if is_mla_backend else int(args.kv_head_num)
    if device is None:
        device = _pointer_device(int(args.kv_data_ptrs[0]), getattr(args, "gpu_id", 0))
    return geometry.layout(args, heads, torch.device(device))


# ---------------------------------------------------------------------------------- typed metadata
def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ProtocolError(what)


def _int(value, name: str, low: int = 0, high: int = 2**64) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value < high,
           f"{name} must be an int in [{low}, {high}), got {value!r:.60}")
    return value


def _str(value, name: str, limit: int = 512) -> str:
    _check(isinstance(value, str) and len(value) <= limit, f"{name} must be a str of at most {limit} characters")
    return value


def _int_list(value, name: str, limit: int = 1 << 22) -> list[int]:
    _check(isinstance(value, (list, tuple)) and len(value) <= limit, f"{name} must be a list of ints")
    return [_int(v, f"{name}[]", -1, 2**63) for v in value]


@dataclasses.dataclass(frozen=True)
class PrefillRegistration:
    """One prefill rank, as it registers with the bootstrap server (``PUT /route``)."""

    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    address: str  # the kvlink endpoint (tcp://ip:port)
    control: str  # the manager's control socket
    page_size: int
    kv_cache_dtype: str
    num_kv_heads: int  # the model's KV heads (1 for MLA)
    local_heads: int  # heads this rank holds
    token_bytes: int  # bytes of one token of one buffer on this rank
    num_layers: int
    is_mla: bool
    follow_bootstrap_room: bool
    protocol: int = PROTOCOL_VERSION

    @property
    def key(self) -> str:
        return f"{self.dp_rank}/{self.tp_rank}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> "PrefillRegistration":
        _check(isinstance(data, dict), "a registration must be a JSON object")
        try:
            reg = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data or
                         f.default is dataclasses.MISSING})
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"registration is missing a field: {exc}") from None
        for name in ("tp_size", "dp_size", "page_size", "num_kv_heads", "local_heads", "token_bytes", "num_layers"):
            _int(getattr(reg, name), name, 1, 2**40)
        _int(reg.tp_rank, "tp_rank", 0, reg.tp_size)
        _int(reg.dp_rank, "dp_rank", 0, reg.dp_size)
        for name in ("address", "control", "kv_cache_dtype"):
            _str(getattr(reg, name), name)
        _check(reg.address.startswith("tcp://") and reg.control.startswith("tcp://"), "addresses must be tcp://")
        _check(isinstance(reg.is_mla, bool) and isinstance(reg.follow_bootstrap_room, bool), "flags must be bools")
        _check(reg.protocol == PROTOCOL_VERSION, f"protocol {reg.protocol!r}, expected {PROTOCOL_VERSION}")
        return reg


@dataclasses.dataclass
class KVLinkPrefillInfo:
    """A prefill instance as the decode side sees it (``kv_manager.prefill_info_table[addr]``).

    SGLang's decode preallocation queue reads ``dp_size`` and ``follow_bootstrap_room``.
    ``error`` is set when the instance is incompatible with this decode rank; its requests fail
    at ``init()`` with that message.
    """

    dp_size: int
    follow_bootstrap_room: bool
    tp_size: int
    page_size: int
    kv_cache_dtype: str
    num_kv_heads: int
    token_bytes: int
    num_layers: int
    is_mla: bool
    ranks: dict[str, PrefillRegistration]
    error: str | None = None
    fetched_at: float = dataclasses.field(default_factory=time.monotonic)

    def rank(self, dp_rank: int, tp_rank: int) -> PrefillRegistration | None:
        return self.ranks.get(f"{dp_rank}/{tp_rank}")


@dataclasses.dataclass(frozen=True)
class RoomMetadata:
    """Decode rank -> prefill rank (META): this request's decode side, once its pages exist."""

    room: int
    nonce: str
    decode_rank: int
    decode_tp: int
    decode_prefix_len: int
    num_pages: int
    page_size: int
    pulls: bool  # False: this decode rank only releases the prefill rank (resharding)
    reply_to: str  # the decode manager's control socket
    endpoint: str  # the decode rank's kvlink endpoint name
    aux_item_lens: tuple[int, ...]
    state_types: tuple[str, ...]
    state_item_lens: tuple[tuple[int, ...], ...]
    state_counts: tuple[int, ...]  # rows per state type (-1: none sent)

    @classmethod
    def from_wire(cls, m: dict) -> "RoomMetadata":
        state_item_lens = m.get("state_item_lens")
        _check(isinstance(state_item_lens, list), "state_item_lens must be a list")
        types = m.get("state_types")
        _check(isinstance(types, list) and all(isinstance(t, str) and len(t) < 64 for t in types),
               "state_types must be a list of str")
        return cls(room=_int(m.get("room"), "room"), nonce=_str(m.get("nonce"), "nonce", 64),
                   decode_rank=_int(m.get("decode_rank"), "decode_rank", 0, 1 << 16),
                   decode_tp=_int(m.get("decode_tp"), "decode_tp", 1, 1 << 16),
                   decode_prefix_len=_int(m.get("decode_prefix_len"), "decode_prefix_len", 0, 2**40),
                   num_pages=_int(m.get("num_pages"), "num_pages", 0, 2**40),
                   page_size=_int(m.get("page_size"), "page_size", 1, 2**20),
                   pulls=bool(m.get("pulls")) if isinstance(m.get("pulls"), bool) else _check(False, "pulls"),
                   reply_to=_str(m.get("reply_to"), "reply_to", 256), endpoint=_str(m.get("endpoint"), "endpoint"),
                   aux_item_lens=tuple(_int_list(m.get("aux_item_lens"), "aux_item_lens", 64)),
                   state_types=tuple(types),
                   state_item_lens=tuple(tuple(_int_list(x, "state_item_lens", 4096)) for x in state_item_lens),
                   state_counts=tuple(_int_list(m.get("state_counts"), "state_counts", 64)))


@dataclasses.dataclass(frozen=True)
class RoomPages:
    """Prefill rank -> decode rank (PAGES): the room's pages are complete, with its aux and state rows."""

    room: int
    nonce: str
    prefill_rank: int
    pages: tuple[int, ...]
    num_tokens: int
    aux: tuple[bytes, ...]  # one row per aux buffer (SGLang's MetadataBuffers at the request's index)
    state: tuple[tuple[bytes, ...] | None, ...]  # per state type: per buffer, the request's rows

    @classmethod
    def from_wire(cls, m: dict) -> "RoomPages":
        aux, state = m.get("aux"), m.get("state")
        _check(isinstance(aux, list) and all(isinstance(a, bytes) for a in aux), "aux must be a list of bytes")
        _check(isinstance(state, list) and all(s is None or (isinstance(s, list) and all(isinstance(b, bytes)
                                                                                           for b in s))
                                               for s in state), "state must be a list of (list of bytes | None)")
        return cls(room=_int(m.get("room"), "room"), nonce=_str(m.get("nonce"), "nonce", 64),
                   prefill_rank=_int(m.get("prefill_rank"), "prefill_rank", 0, 1 << 16),
                   pages=tuple(_int_list(m.get("pages"), "pages")),
                   num_tokens=_int(m.get("num_tokens"), "num_tokens", 0, 2**40), aux=tuple(aux),
                   state=tuple(None if s is None else tuple(s) for s in state))


@dataclasses.dataclass(frozen=True)
class RoomAbort:
    """Either side -> the other (ABORT): this room is given up; free its pages."""

    room: int
    nonce: str  # the decode receiver's (empty: every receiver of the room)
    side: str  # who gave up: "prefill" or "decode"
    rank: int
    reason: str

    @classmethod
    def from_wire(cls, m: dict) -> "RoomAbort":
        side = _str(m.get("side"), "side", 16)
        _check(side in ("prefill", "decode"), "side must be prefill or decode")
        return cls(room=_int(m.get("room"), "room"), nonce=_str(m.get("nonce"), "nonce", 64), side=side,
                   rank=_int(m.get("rank"), "rank", 0, 1 << 16), reason=_str(m.get("reason"), "reason", 2048))


_MESSAGES = {"META": RoomMetadata, "PAGES": RoomPages, "ABORT": RoomAbort}
_MESSAGE_TYPES = {cls: name for name, cls in _MESSAGES.items()}


def encode_message(message) -> bytes:
    body = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(message).items()}
    if isinstance(message, RoomPages):
        body["state"] = [None if s is None else list(s) for s in message.state]
    if isinstance(message, RoomMetadata):
        body["state_item_lens"] = [list(x) for x in message.state_item_lens]
    return msgpack.packb({"t": _MESSAGE_TYPES[type(message)], "v": PROTOCOL_VERSION, **body}, use_bin_type=True)


def decode_message(data: bytes):
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a protocol error
        raise ProtocolError(f"not a msgpack message: {exc}") from None
    _check(isinstance(message, dict), "a message must be a map")
    _check(message.get("v") == PROTOCOL_VERSION, f"protocol version {message.get('v')!r}, expected {PROTOCOL_VERSION}")
    cls = _MESSAGES.get(message.get("t"))
    _check(cls is not None, f"unknown message type {message.get('t')!r:.40}")
    return cls.from_wire(message)


# ---------------------------------------------------------------------------------- bootstrap
class KVLinkKVBootstrapServer(BaseKVBootstrapServer):
    """The prefill instance's registry of ranks (HTTP on ``--disaggregation-bootstrap-port``, a daemon thread).

    ``PUT /route`` (a rank registers), ``GET /route`` (every rank), ``POST /query_dp_ranks``
    (SGLang's dp-rank query: ``room % dp_size``, as kvlink prefill follows the bootstrap room),
    ``GET /health``.
    """

    def __init__(self, host: str, port: int):
        routes: dict[str, dict] = {}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: kvlink logs what matters
                pass

            def _reply(self, code: int, body: Any = None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    return None
                if not 0 < length <= 1 << 20:
                    return None
                try:
                    return json.loads(self.rfile.read(length))
                except ValueError:
                    return None

            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0].strip("/")
                if path == "health":
                    return self._reply(200, {"ok": True})
                if path == "route":
                    with lock:
                        return self._reply(200, {"ranks": dict(routes)})
                self._reply(404)

            def do_PUT(self):  # noqa: N802
                if self.path.split("?", 1)[0].strip("/") != "route":
                    return self._reply(404)
                try:
                    reg = PrefillRegistration.from_dict(self._body())
                except ProtocolError as exc:
                    return self._reply(400, {"error": str(exc)})
                with lock:
                    routes[reg.key] = reg.to_dict()
                self._reply(200)

            def do_POST(self):  # noqa: N802
                if self.path.split("?", 1)[0].strip("/") != "query_dp_ranks":
                    return self._reply(404)
                body = self._body()
                rooms = body.get("bootstrap_rooms") if isinstance(body, dict) else None
                if not isinstance(rooms, list) or len(rooms) > 1 << 16:
                    return self._reply(400, {"error": "expected {bootstrap_rooms: [...]}"})
                with lock:
                    dp_size = max((int(r.get("dp_size", 1)) for r in routes.values()), default=1)
                result = {str(int(r)): int(r) % dp_size for r in rooms if isinstance(r, int) and r >= 0}
                self._reply(200, result)

        self._server = ThreadingHTTPServer((host or "0.0.0.0", port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvlink-bootstrap", daemon=True)
        self._thread.start()
        log.info("kvlink bootstrap server on http://%s:%d", host or "0.0.0.0", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> dict | None:
    """JSON over HTTP; None for a 404."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def prefill_info_from_route(route: dict) -> KVLinkPrefillInfo | None:
    """The instance behind a ``GET /route`` answer; None until every rank has registered."""
    ranks: dict[str, PrefillRegistration] = {}
    for key, entry in (route.get("ranks") or {}).items():
        try:
            reg = PrefillRegistration.from_dict(entry)
        except ProtocolError as exc:
            log.warning("kvlink: ignoring a bad registration %r at the bootstrap server: %s", key, exc)
            continue
        ranks[reg.key] = reg
    if not ranks:
        return None
    first = next(iter(ranks.values()))
    if len(ranks) < first.tp_size * first.dp_size:
        return None  # not every rank has registered yet
    info = KVLinkPrefillInfo(dp_size=first.dp_size, follow_bootstrap_room=first.follow_bootstrap_room,
                             tp_size=first.tp_size, page_size=first.page_size, kv_cache_dtype=first.kv_cache_dtype,
                             num_kv_heads=first.num_kv_heads, token_bytes=first.token_bytes,
                             num_layers=first.num_layers, is_mla=first.is_mla, ranks=ranks)
    odd = [r.key for r in ranks.values()
           if (r.tp_size, r.dp_size, r.page_size, r.kv_cache_dtype, r.num_kv_heads, r.num_layers, r.is_mla) !=
           (first.tp_size, first.dp_size, first.page_size, first.kv_cache_dtype, first.num_kv_heads,
            first.num_layers, first.is_mla)]
    if odd:
        info.error = f"prefill ranks {odd} registered another configuration than rank {first.key}"
    return info


# ---------------------------------------------------------------------------------- control channel
class _Channel:
    """The manager's control socket: a ZeroMQ PULL it binds, PUSH sockets to peers, one I/O thread.

    ``send()`` only queues (callable from any thread, never blocks); ``handler`` runs on the I/O
    thread for each message received, ``tick`` about every ``tick_s`` seconds.
    """

    def __init__(self, ip: str, name: str, handler, tick, max_bytes: int, tick_s: float = 0.25):
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if ":" in ip:
            self._pull.setsockopt(zmq.IPV6, 1)
        port = self._pull.bind_to_random_port(f"tcp://{_zmq_host(ip)}")
        self.address = f"tcp://{_zmq_host(ip)}:{port}"
        self._wakeup = Wakeup()
        self._wake_lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pushes: dict[str, zmq.Socket] = {}
        self._handler, self._tick, self._tick_s = handler, tick, tick_s
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvlink-sglang-{name}", daemon=True)
        self._thread.start()

    def send(self, address: str, data: bytes) -> None:
        if self._closed:
            return
        self._outbox.put((address, data))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:  # never a write to a descriptor closed (and its number reused) meanwhile
            if not self._wakeup.closed:
                self._wakeup.set()

    def close(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        self._wake()
        self._thread.join(timeout)

    def _push(self, address: str) -> zmq.Socket:
        sock = self._pushes.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            if address.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(address)
            if len(self._pushes) > 4096:  # peers come and go: bound the cache
                old = next(iter(self._pushes))
                self._pushes.pop(old).close(0)
            self._pushes[address] = sock
        return sock

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        next_tick = time.monotonic() + self._tick_s
        try:
            while True:
                events = dict(poller.poll(max(1, int((next_tick - time.monotonic()) * 1000))))
                if self._wakeup.fd in events:
                    self._wakeup.clear()
                    while True:
                        try:
                            item = self._outbox.get_nowait()
                        except queue.Empty:
                            break
                        if item is None:
                            return
                        address, data = item
                        try:
                            self._push(address).send(data, zmq.NOBLOCK)
                        except zmq.ZMQError as exc:
                            log.warning("kvlink: control message to %s dropped: %s", address, exc)
                if self._pull in events:
                    while self._pull.poll(0):
                        data = self._pull.recv()
                        try:
                            self._handler(data)
                        except ProtocolError as exc:
                            log.warning("kvlink: dropped a bad control message: %s", exc)
                        except Exception:  # noqa: BLE001 - keep serving every other room
                            log.exception("kvlink: handling a control message failed")
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    try:
                        self._tick()
                    except Exception:  # noqa: BLE001
                        log.exception("kvlink: housekeeping failed")
        finally:
            for sock in self._pushes.values():
                sock.close(0)
            with self._wake_lock:
                self._ctx.destroy(linger=0)
                self._wakeup.close()


# ---------------------------------------------------------------------------------- rooms
def request_id(room: int) -> str:
    """The kvlink request id of a bootstrap room (what NOTIFY/RELEASE/cancel name)."""
    return f"sglang-room-{room}"


@dataclasses.dataclass
class _PrefillRoom:
    contacts: dict[int, RoomMetadata] = dataclasses.field(default_factory=dict)  # decode rank -> META
    publication: RoomPages | None = None
    aborted: str | None = None  # why the room was given up (by either side)
    has_sender: bool = False
    concluded_at: float | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _DecodeRoom:
    nonce: str
    pages: dict[int, RoomPages] = dataclasses.field(default_factory=dict)  # prefill rank -> PAGES
    aborted: str | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)


def _rows(ptr: int, data_len: int, item_len: int, indices, device: torch.device):
    """The buffer at ``ptr`` as a ``[rows, item_len]`` byte table, and ``indices`` checked against it."""
    count = data_len // item_len
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= count):
        raise ValueError(f"row index out of range [0, {count})")
    table = _bytes_at(ptr, count * item_len, device).view(count, item_len)
    return table, idx.to(device)


def read_rows(ptr: int, data_len: int, item_len: int, indices, device: torch.device) -> bytes:
    table, idx = _rows(ptr, data_len, item_len, indices, device)
    return table.index_select(0, idx).cpu().numpy().tobytes()


def write_rows(ptr: int, data_len: int, item_len: int, indices, data: bytes, device: torch.device) -> None:
    table, idx = _rows(ptr, data_len, item_len, indices, device)
    if len(data) != idx.numel() * item_len:
        raise ValueError(f"{len(data)} bytes for {idx.numel()} rows of {item_len}")
    if idx.numel():
        rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, item_len).to(device)
        table.index_copy_(0, idx, rows)


def _state_names(args) -> tuple[str, ...]:
    return tuple(str(getattr(t, "value", t)) for t in (getattr(args, "state_types", None) or []))


# ---------------------------------------------------------------------------------- the manager
class KVLinkKVManager(BaseKVManager):
    """One per scheduler rank: the pool's kvlink endpoint, its links, the control socket, the rooms."""

    supports_role_switch = False
    supports_deferred_decode_kv_release = True
    supports_host_destination = False

    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend: bool | None = False):
        self.kv_args = args
        self.disaggregation_mode = disaggregation_mode
        self.mode = _mode_name(disaggregation_mode)
        self.server_args = server_args
        self.is_mla_backend = bool(is_mla_backend)
        self.kv_cache_dtype_str = str(getattr(args, "kv_cache_dtype_str", None) or "auto")
        self.topology = Topology.current(args, server_args)
        self.engine_rank = self.topology.tp_rank
        self.timeouts = Timeouts.from_env()
        self.enable_deferred_decode_kv_release = _sglang_env_bool(
            "SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE", True) and self.supports_deferred_decode_kv_release
        if self.topology.pp_size > 1 or self.topology.cp_size > 1:
            raise ValueError(f"kvlink's SGLang backend does not support pipeline or context parallelism "
                             f"(pp_size={self.topology.pp_size}, attn_cp_size={self.topology.cp_size})")
        if self.mode == "prefill" and self.topology.dp_size > 1 and \
                self.topology.load_balance_method not in (None, "follow_bootstrap_room"):
            raise ValueError("kvlink's SGLang backend needs --load-balance-method follow_bootstrap_room with DP "
                             f"attention on the prefill, got {self.topology.load_balance_method!r}")
        if _sglang_env_bool("SGLANG_DISAGG_STAGING_BUFFER", False):
            raise ValueError("kvlink moves KV heads between different TP sizes itself and does not use SGLang's "
                             "staging buffer: unset SGLANG_DISAGG_STAGING_BUFFER")
        self.geometry = PoolGeometry.from_kvargs(args, self.is_mla_backend)
        self.device = _pointer_device(int(args.kv_data_ptrs[0]), getattr(args, "gpu_id", 0))
        self.aux_device = _pointer_device(int(args.aux_data_ptrs[0]), getattr(args, "gpu_id", 0)) \
            if getattr(args, "aux_data_ptrs", None) else torch.device("cpu")
        self.local_ip = routable_ip(self.topology.host)
        self.transport = os.environ.get("KVLINK_TRANSPORT", "auto")
        self.max_message_bytes = int(float(os.environ.get("KVLINK_SGLANG_MAX_MESSAGE_MB", "256")) * (1 << 20))
        self._lock = threading.RLock()
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvlink-sglang-io")
        self._prefill_rooms: dict[int, _PrefillRoom] = {}
        self._decode_rooms: dict[int, _DecodeRoom] = {}
        self._notes: dict[str, list[bool]] = {}  # prefill: kvlink request id -> NOTIFY/RELEASE oks
        self._note_times: dict[str, float] = {}
        self._pulls: dict[int, Any] = {}  # decode: room -> the pull (deferred release asks whether it is done)
        self._links: dict[str, concurrent.futures.Future] = {}  # decode: prefill endpoint address -> peer name
        self._link_state: tuple[float, dict[str, str | None]] = (0.0, {})
        self._routes: dict[str, concurrent.futures.Future] = {}
        self.prefill_info_table: dict[str, KVLinkPrefillInfo] = {}
        self.registered: concurrent.futures.Future = concurrent.futures.Future()
        self.endpoint: kvlink.Endpoint | None = None
        self.layout: kvlink.CacheLayout | None = None
        self._endpoint_lock = threading.Lock()
        self.local_heads = 1 if self.is_mla_backend else getattr(args, "kv_head_num", None)
        if self.mode == "prefill":
            self.total_kv_heads = 1 if self.is_mla_backend else \
                int(getattr(args, "total_kv_head_num", None) or args.kv_head_num)
            self._make_endpoint(int(self.local_heads), listen=True)
        else:
            self.total_kv_heads = None  # learnt from the prefill instances' registrations
            if self.local_heads is not None:
                self._make_endpoint(int(self.local_heads), listen=False)
        self.channel = _Channel(self.local_ip, f"{self.mode}-{self.engine_rank}", self._on_message,
                                self._housekeep, self.max_message_bytes)
        if self.mode == "prefill":
            self.register_to_bootstrap()
        log.info("kvlink SGLang %s manager, rank %d of %d: %s; control %s", self.mode, self.engine_rank,
                 self.topology.tp_size, self.layout.describe() if self.layout else "endpoint on first contact",
                 self.channel.address)

    # -- endpoint ---------------------------------------------------------------------------
    def _make_endpoint(self, heads: int, listen: bool) -> kvlink.Endpoint:
        with self._endpoint_lock:
            if self.endpoint is not None:
                return self.endpoint
            on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with on_device:  # the decode side makes its endpoint on an I/O thread
                layout = self.geometry.layout(self.kv_args, heads, self.device)
            name = f"sglang-{self.mode}-{socket.gethostname()}-{os.getpid()}-r{self.engine_rank}-{uuid.uuid4().hex[:6]}"
            listen_on = f"tcp://{_zmq_host(self.local_ip)}:0" if listen else None
            with on_device:
                self.endpoint = kvlink.Endpoint(layout, name=name, listen=listen_on, transport=self.transport,
                                                max_links=int(os.environ.get("KVLINK_MAX_LINKS", "64")))
            self.layout, self.local_heads = layout, heads
            return self.endpoint

    @property
    def kv_item_lens_sum(self) -> int:
        return int(sum(self.kv_args.kv_item_lens))

    def registration(self) -> PrefillRegistration:
        return PrefillRegistration(
            tp_rank=self.topology.tp_rank, tp_size=self.topology.tp_size, dp_rank=self.topology.dp_rank,
            dp_size=self.topology.dp_size, address=self.endpoint.address, control=self.channel.address,
            page_size=self.geometry.page_size, kv_cache_dtype=self.kv_cache_dtype_str,
            num_kv_heads=int(self.total_kv_heads), local_heads=int(self.local_heads),
            token_bytes=self.geometry.token_bytes(), num_layers=self.geometry.num_layers, is_mla=self.is_mla_backend,
            follow_bootstrap_room=True)

    def register_to_bootstrap(self) -> concurrent.futures.Future:
        """Prefill: register this rank with the bootstrap server, on a background thread (retried with
        back-off until it answers); returns a Future of the registration. Called by the constructor,
        as SGLang's own managers do; calling it again is harmless."""
        if self.mode != "prefill":
            return self.registered
        if self.registered.done() or getattr(self, "_registering", False):
            return self.registered
        self._registering = True
        port = self.topology.bootstrap_port
        if not port:
            self.registered.set_exception(ValueError("disaggregation_bootstrap_port is not set"))
            return self.registered
        url = f"http://{_bootstrap_registry_host(self.topology)}:{port}/route"
        body = self.registration().to_dict()

        def register():
            delay, attempt = 0.05, 0
            while not self._closed:
                attempt += 1
                try:
                    _http("PUT", url, body, timeout=5)
                    log.info("kvlink: prefill rank %s registered at %s", body["tp_rank"], url)
                    self.registered.set_result(url)
                    return
                except (OSError, ValueError) as exc:
                    if attempt in (1, 20) or attempt % 100 == 0:
                        log.warning("kvlink: registering with the bootstrap server %s failed (attempt %d): %s; "
                                    "retrying", url, attempt, exc)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
            self.registered.cancel()

        self._executor.submit(register)
        return self.registered

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.channel.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.endpoint is not None:
            self.endpoint.close()

    # -- decode: the prefill instances -------------------------------------------------------
    def _fetch_route(self, bootstrap_addr: str) -> KVLinkPrefillInfo | None:
        route = _http("GET", f"http://{bootstrap_addr}/route", timeout=5)
        info = prefill_info_from_route(route or {})
        if info is not None and info.error is None:
            info.error = self._incompatibility(info)
        return info

    def _incompatibility(self, info: KVLinkPrefillInfo) -> str | None:
        """Why this decode rank cannot read the prefill instance ``info`` (None: it can); also makes
        this rank's endpoint once the instance tells the geometry KVArgs leaves out on decode."""
        mine = self.geometry
        if info.is_mla != self.is_mla_backend:
            return f"the prefill is {'MLA' if info.is_mla else 'MHA'} and this decode rank is not"
        if info.page_size != mine.page_size:
            return f"page size differs: prefill {info.page_size}, decode {mine.page_size} (use one --page-size)"
        if info.kv_cache_dtype != self.kv_cache_dtype_str:
            return (f"KV cache dtype differs: prefill {info.kv_cache_dtype}, decode {self.kv_cache_dtype_str} "
                    "(use one --kv-cache-dtype)")
        if info.num_layers != mine.num_layers:
            return f"layer count differs: prefill {info.num_layers}, decode {mine.num_layers} (draft layers included)"
        token = mine.token_bytes()
        if info.is_mla:
            heads = 1
            if info.token_bytes != token:
                return f"latent bytes differ: prefill {info.token_bytes}, decode {token}"
        else:
            prefill_heads = heads_of_rank(info.num_kv_heads, info.tp_size, 0)
            head_bytes = info.token_bytes // (prefill_heads[1] - prefill_heads[0])
            try:
                local = heads_of_rank(info.num_kv_heads, self.topology.tp_size, self.topology.tp_rank)
            except ValueError as exc:
                return f"decode TP {self.topology.tp_size} cannot hold the model's {info.num_kv_heads} KV heads: {exc}"
            heads = local[1] - local[0]
            if heads * head_bytes != token:
                return (f"KV geometry differs: the prefill's heads have {head_bytes} bytes a token, so this rank's "
                        f"{heads} heads of {info.num_kv_heads} should take {heads * head_bytes} bytes, but its pool "
                        f"has {token}")
        if self.local_heads is not None and int(self.local_heads) != heads:
            return f"this decode rank holds {self.local_heads} KV heads, the prefill's layout implies {heads}"
        with self._lock:
            if self.total_kv_heads is None:
                self.total_kv_heads = info.num_kv_heads
            elif self.total_kv_heads != info.num_kv_heads:
                return f"the prefill's model has {info.num_kv_heads} KV heads, earlier prefills {self.total_kv_heads}"
        try:
            self._make_endpoint(heads, listen=False)
        except (ValueError, TypeError, RuntimeError) as exc:
            return f"cannot describe this rank's pool: {exc}"
        return None

    def prefetch_route(self, bootstrap_addr: str) -> None:
        """Start fetching a prefill instance's registration (returns at once)."""
        with self._lock:
            future = self._routes.get(bootstrap_addr)
            if future is None or (future.done() and (future.exception() is not None or future.result() is None)):
                if self._closed:
                    return
                self._routes[bootstrap_addr] = self._executor.submit(self._fetch_route, bootstrap_addr)

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Decode: True once the prefill instance at ``bootstrap_addr`` is known (SGLang retries a
        False, about once a second). Never blocks: the lookup runs in the background."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        with self._lock:
            future = self._routes.get(bootstrap_addr)
        if future is None or not future.done():
            self.prefetch_route(bootstrap_addr)
            return False
        try:
            info = future.result()
        except Exception as exc:  # noqa: BLE001 - unreachable bootstrap server: ask again next time
            log.warning("kvlink: bootstrap server %s: %s", bootstrap_addr, exc)
            info = None
        if info is None:
            self.prefetch_route(bootstrap_addr)
            return False
        if info.error:
            log.error("kvlink: prefill instance at %s is unusable from this decode rank: %s", bootstrap_addr,
                      info.error)
        self.prefill_info_table[bootstrap_addr] = info
        return True

    def forget_prefill(self, bootstrap_addr: str) -> None:
        """Drop what we know of a prefill instance (its links failed): the next request looks it up again."""
        self.prefill_info_table.pop(bootstrap_addr, None)
        with self._lock:
            self._routes.pop(bootstrap_addr, None)

    def submit_prefill_recompute(self, kv_receiver, payload=None) -> None:
        """SGLang's PD retraction re-bootstrap (re-prefill of a retracted request): not supported;
        the request fails with that reason instead of raising in the scheduler."""
        kv_receiver._fail("re-prefilling a retracted request (PD retraction re-bootstrap) is not supported by "
                          "kvlink's SGLang backend")

    def _ensure_prefill_recompute_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return self._executor  # SGLang's dp-rank query runs here (never needed: kvlink prefill follows the room)

    def link(self, address: str) -> concurrent.futures.Future:
        """Decode: a Future of the peer name of the prefill endpoint at ``address`` (one link per address)."""
        with self._lock:
            future = self._links.get(address)
            if future is not None and future.done():
                failed = future.exception() is not None or self._link_failed(future.result())
                if failed:
                    future = None
            if future is None:
                future = self.endpoint.connect_async(address)
                self._links[address] = future
            return future

    def _link_failed(self, peer: str) -> str | None:
        """The failure of our link to ``peer`` (None while it is up), from a view refreshed every 0.2 s."""
        now = time.monotonic()
        stamp, states = self._link_state
        if now - stamp > 0.2 or peer not in states:
            states = {link["peer"]: link["failed"] for link in self.endpoint.links()}
            self._link_state = (now, states)
        return states.get(peer, "no such link")

    def is_abort_release_safe(self, bootstrap_room: int, required_acks: int = 0) -> bool:
        """Decode (SGLang's deferred release): True once no pull can still write this room's pages."""
        with self._lock:
            pull = self._pulls.get(bootstrap_room)
        return pull is None or pull.done()

    def clear_deferred_abort_state(self, bootstrap_room: int) -> None:
        with self._lock:
            pull = self._pulls.get(bootstrap_room)
            if pull is None or pull.done():
                self._pulls.pop(bootstrap_room, None)

    # -- rooms -------------------------------------------------------------------------------
    def open_prefill_room(self, room: int) -> _PrefillRoom:
        """The room of a new sender; METAs or an ABORT that arrived before the request are kept."""
        with self._lock:
            state = self._prefill_rooms.get(room)
            if state is None or state.has_sender or state.concluded_at is not None:
                state = self._prefill_rooms[room] = _PrefillRoom()
            state.has_sender = True
            return state

    def open_decode_room(self, room: int, nonce: str) -> _DecodeRoom:
        with self._lock:
            state = self._decode_rooms[room] = _DecodeRoom(nonce=nonce)
            return state

    def close_room(self, room: int, concluded_ok: bool | None = None) -> None:
        with self._lock:
            if self.mode == "prefill":
                state = self._prefill_rooms.get(room)
                if state is None:
                    return
                if concluded_ok or not state.aborted:
                    self._prefill_rooms.pop(room, None)
                    self._notes.pop(request_id(room), None)
                else:  # keep the reason a while: a late META learns the request is gone
                    state.has_sender, state.concluded_at = False, time.monotonic()
            else:
                self._decode_rooms.pop(room, None)

    def publish(self, room: int, pages: RoomPages) -> None:
        """Prefill: the room's pages are complete; tell every decode rank that asked (and later ones)."""
        with self._lock:
            state = self._prefill_rooms.get(room)
            if state is None:
                return
            state.publication = pages
            contacts = list(state.contacts.values())
        for meta in contacts:
            self._send_pages(meta, pages)

    def _send_pages(self, meta: RoomMetadata, pages: RoomPages) -> None:
        if not meta.pulls:
            return  # a release-only decode rank reads these heads elsewhere
        data = encode_message(dataclasses.replace(pages, nonce=meta.nonce))
        self.channel.send(meta.reply_to, data)

    def send_abort(self, address: str, room: int, nonce: str, reason: str) -> None:
        self.channel.send(address, encode_message(RoomAbort(room=room, nonce=nonce, side=self.mode,
                                                            rank=self.engine_rank, reason=reason[:2000])))

    def cancel_serves(self, room: int) -> None:
        """Prefill: stop serving every pull of the room (on the I/O pool; the endpoint call waits)."""
        if self.endpoint is None or self._closed:
            return
        try:
            self._executor.submit(self.endpoint.cancel_serving, request_id(room))
        except RuntimeError:  # shut down
            pass

    def confirmations(self, room: int) -> list[bool]:
        """Prefill: the oks of every NOTIFY/RELEASE for the room so far."""
        finished = self.endpoint.finished_sends()
        with self._lock:
            now = time.monotonic()
            for request, ok in finished:
                self._notes.setdefault(request, []).append(bool(ok))
                self._note_times[request] = now
            return list(self._notes.get(request_id(room), ()))

    def _on_message(self, data: bytes) -> None:
        message = decode_message(data)
        with self._lock:
            if isinstance(message, RoomMetadata) and self.mode == "prefill":
                state = self._prefill_rooms.setdefault(message.room, _PrefillRoom())
                state.contacts[message.decode_rank] = message
                publication, aborted = state.publication, state.aborted
                if aborted:
                    self.send_abort(message.reply_to, message.room, message.nonce, aborted)
                elif publication is not None:
                    self._send_pages(message, publication)
            elif isinstance(message, RoomPages) and self.mode == "decode":
                state = self._decode_rooms.get(message.room)
                if state is not None and state.nonce == message.nonce:
                    state.pages[message.prefill_rank] = message
            elif isinstance(message, RoomAbort):
                if self.mode == "prefill" and message.side == "decode":
                    state = self._prefill_rooms.setdefault(message.room, _PrefillRoom())
                    if not state.aborted:
                        state.aborted = f"decode rank {message.rank} gave up: {message.reason}"
                    self.cancel_serves(message.room)
                elif self.mode == "decode" and message.side == "prefill":
                    state = self._decode_rooms.get(message.room)
                    if state is not None and message.nonce in ("", state.nonce) and not state.aborted:
                        state.aborted = f"prefill rank {message.rank} gave up: {message.reason}"
            else:
                raise ProtocolError(f"{type(message).__name__} is not for a {self.mode} manager")

    def _housekeep(self) -> None:
        """Forget rooms nobody will ask about again (orphan METAs, tombstones, stray notifications)."""
        now = time.monotonic()
        horizon = max(self.timeouts.bootstrap, self.timeouts.waiting, 60.0)
        with self._lock:
            for room, state in list(self._prefill_rooms.items()):
                since = state.concluded_at if state.concluded_at is not None else state.created
                if not state.has_sender and now - since > horizon:
                    del self._prefill_rooms[room]
            for room, state in list(self._decode_rooms.items()):
                if now - state.created > 2 * horizon + self.timeouts.bootstrap:
                    del self._decode_rooms[room]
            live = {request_id(r) for r, s in self._prefill_rooms.items() if s.has_sender}
            for request in list(self._notes):
                if request not in live and now - self._note_times.get(request, now) > horizon:
                    self._notes.pop(request, None)
                    self._note_times.pop(request, None)
            for room, pull in list(self._pulls.items()):
                if pull.done() and room not in self._decode_rooms:
                    del self._pulls[room]


# ---------------------------------------------------------------------------------- sender / receiver
def _guarded(method):
    """A call SGLang makes: a failure fails the request (never raises into the scheduler)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - by design: the request fails, the scheduler goes on
            log.exception("kvlink: room %s: %s failed", getattr(self, "bootstrap_room", "?"), method.__name__)
            self._fail(f"{method.__name__}() failed: {type(exc).__name__}: {exc}")
            return self.conclude_state if method.__name__ == "poll" else None

    return wrapper


class KVLinkKVSender(BaseKVSender):
    """Prefill side, one per request: collects its pages, publishes them with the aux and state rows,
    and reaches Success once every decode rank that reads this rank confirmed."""

    def __init__(self, mgr: KVLinkKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False):
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = int(bootstrap_room) if bootstrap_room is not None else 0
        self.conclude_state: int | None = None
        self.error: str | None = None
        self.num_pages: int | None = None
        self.aux_index: int | None = None
        self.pages: list[int] = []
        self.num_tokens = 0
        self.published_at: float | None = None
        self._created = time.monotonic()
        self._expected: int | None = None
        self._state_bytes = 0
        self._latency: float | None = None
        self._room = mgr.open_prefill_room(self.bootstrap_room)

    # -- state -------------------------------------------------------------------------------
    def _contacts(self) -> dict[int, RoomMetadata]:
        with self.kv_mgr._lock:
            return dict(self._room.contacts)

    def _fail(self, reason: str, tell_decode: bool = True) -> None:
        if self.conclude_state is not None:
            return
        self.error = f"room {self.bootstrap_room} (prefill rank {self.kv_mgr.engine_rank}): {reason}"
        self.conclude_state = KVPoll.Failed
        log.error("kvlink: %s", self.error)
        with self.kv_mgr._lock:
            if not self._room.aborted:
                self._room.aborted = reason
            contacts = list(self._room.contacts.values())
        if tell_decode:
            for meta in contacts:
                self.kv_mgr.send_abort(meta.reply_to, self.bootstrap_room, meta.nonce, reason)
        if self.published_at is not None:
            self.kv_mgr.cancel_serves(self.bootstrap_room)

    @_guarded
    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        mgr = self.kv_mgr
        aborted = self._room.aborted
        if aborted:
            self._fail(aborted, tell_decode=False)
            return self.conclude_state
        contacts = self._contacts()
        if self.published_at is None:
            if not contacts:
                if time.monotonic() - self._created > mgr.timeouts.bootstrap:
                    self._fail(f"no decode rank sent its metadata within SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT="
                               f"{mgr.timeouts.bootstrap:.0f} s")
                    return self.conclude_state
                return KVPoll.Bootstrapping
            if self._expected is None and not self._check_contacts(contacts):
                return self.conclude_state
            return KVPoll.WaitingForInput
        if self._expected is None:  # published before any poll saw a decode rank (init() called directly)
            if not contacts or not self._check_contacts(contacts):
                return self.conclude_state if self.conclude_state is not None else KVPoll.Transferring
        oks = mgr.confirmations(self.bootstrap_room)
        if not all(oks):
            self._fail("a decode rank reported its pull failed")
        elif len(oks) >= self._expected:
            self._latency = time.monotonic() - self.published_at
            self.conclude_state = KVPoll.Success
            mgr.close_room(self.bootstrap_room, concluded_ok=True)
        else:
            for meta in contacts.values():
                failed = mgr._link_failed(meta.endpoint) if meta.pulls and meta.endpoint else None
                if failed and failed != "no such link":
                    self._fail(f"the link to decode rank {meta.decode_rank} ({meta.endpoint}) is down: {failed}",
                               tell_decode=False)
                    return self.conclude_state
            if time.monotonic() - self.published_at > mgr.timeouts.waiting:
                self._fail(f"{len(oks)} of {self._expected} decode ranks confirmed within the lease "
                           f"(SGLANG_DISAGGREGATION_WAITING_TIMEOUT={mgr.timeouts.waiting:.0f} s)")
        return self.conclude_state if self.conclude_state is not None else KVPoll.Transferring

    def poll_pp_consensus(self) -> int:
        return self.poll()

    def _check_contacts(self, contacts: dict[int, RoomMetadata]) -> bool:
        """First metadata: the decode TP gives the confirmations to expect; refuse what cannot work."""
        mgr = self.kv_mgr
        meta = next(iter(contacts.values()))
        try:
            plan = plan_resharding(int(mgr.total_kv_heads), mgr.topology.tp_size, meta.decode_tp,
                                   mla=mgr.is_mla_backend)
        except ValueError as exc:
            self._fail(f"cannot split the KV heads between prefill TP {mgr.topology.tp_size} and decode TP "
                       f"{meta.decode_tp}: {exc}")
            return False
        self._expected = plan.contacts_of(mgr.topology.tp_rank)
        if meta.page_size != mgr.geometry.page_size:
            self._fail(f"decode page size {meta.page_size}, prefill {mgr.geometry.page_size}")
        elif meta.decode_prefix_len % mgr.geometry.page_size:
            self._fail(f"decode_prefix_len {meta.decode_prefix_len} is not a multiple of the page size "
                       f"{mgr.geometry.page_size}")
        elif list(meta.aux_item_lens) != [int(n) for n in (mgr.kv_args.aux_item_lens or [])]:
            self._fail(f"the metadata buffers differ: decode rows {list(meta.aux_item_lens)}, prefill "
                       f"{list(mgr.kv_args.aux_item_lens)} (same model, spec and logprob settings on both sides?)")
        elif meta.state_types and meta.decode_tp != mgr.topology.tp_size:
            self._fail(f"kvlink moves state buffers ({', '.join(meta.state_types)}) only between equal TP sizes; "
                       f"prefill TP {mgr.topology.tp_size}, decode TP {meta.decode_tp}")
        elif meta.state_types != _state_names(mgr.kv_args) or \
                [list(x) for x in meta.state_item_lens] != [list(map(int, x)) for x in
                                                            (getattr(mgr.kv_args, "state_item_lens", None) or [])]:
            self._fail(f"the state buffers differ: decode {list(meta.state_types)} {meta.state_item_lens}, prefill "
                       f"{list(_state_names(mgr.kv_args))} {getattr(mgr.kv_args, 'state_item_lens', None)}")
        return self.conclude_state is None

    def pop_decode_prefix_len(self) -> int:
        contacts = self._contacts()
        return next(iter(contacts.values())).decode_prefix_len if contacts else 0

    @_guarded
    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        if self.conclude_state is not None:
            return
        self.num_pages = int(num_kv_indices)
        self.aux_index = None if aux_index is None else int(aux_index)
        if self.num_pages < 0:
            self._fail(f"init() with {num_kv_indices} pages")
        for meta in self._contacts().values():
            if meta.num_pages != self.num_pages:
                self._fail(f"decode rank {meta.decode_rank} prepared {meta.num_pages} pages, this prefill sends "
                           f"{self.num_pages} (same --page-size and prompt on both sides?)")
                return

    def mark_prefill_complete(self) -> None:
        """The prefill_complete allocation policy: kvlink's decode allocates as under "early"."""

    def get_max_transfer_tokens(self) -> int | None:
        return None

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk  # the last send carries the aux rows, pages or not

    @_guarded
    def send(self, kv_indices, state_indices=None, num_kv_tokens: int | None = None, **_ignored) -> None:
        """One chunk of pages (SGLang's ``_send_kv_chunk``); the last one (``state_indices`` given,
        a list even when empty) publishes the request."""
        if self.conclude_state is not None:
            return
        if self.num_pages is None:
            self._fail("send() before init()")
            return
        new = [int(p) for p in np.asarray(kv_indices).reshape(-1)]
        self.pages += new
        page_size = self.kv_mgr.geometry.page_size
        self.num_tokens += int(num_kv_tokens) if num_kv_tokens is not None else len(new) * page_size
        if len(self.pages) > self.num_pages:
            self._fail(f"{len(self.pages)} pages sent, init() announced {self.num_pages}")
            return
        if state_indices is None:
            return  # not the last chunk
        if len(self.pages) != self.num_pages:
            self._fail(f"the last chunk ends at {len(self.pages)} of {self.num_pages} pages")
            return
        if not (len(self.pages) - 1) * page_size < self.num_tokens <= len(self.pages) * page_size and self.pages:
            self._fail(f"{self.num_tokens} tokens do not fill {len(self.pages)} pages of {page_size}")
            return
        pages = RoomPages(room=self.bootstrap_room, nonce="", prefill_rank=self.kv_mgr.engine_rank,
                          pages=tuple(self.pages), num_tokens=self.num_tokens, aux=self._aux_rows(),
                          state=self._state_rows(state_indices))
        size = sum(map(len, pages.aux)) + self._state_bytes + 8 * len(self.pages)
        if size > self.kv_mgr.max_message_bytes - 4096:
            self._fail(f"the request's aux and state rows take {size} bytes, more than KVLINK_SGLANG_MAX_MESSAGE_MB")
            return
        self.published_at = time.monotonic()
        self.kv_mgr.publish(self.bootstrap_room, pages)

    def _aux_rows(self) -> tuple[bytes, ...]:
        args, mgr = self.kv_mgr.kv_args, self.kv_mgr
        ptrs = list(getattr(args, "aux_data_ptrs", None) or [])
        if not ptrs:
            return ()
        if self.aux_index is None:
            raise ValueError("the last chunk came without a metadata buffer index (init(aux_index=None))")
        return tuple(read_rows(int(p), int(n), int(item), [self.aux_index], mgr.aux_device)
                     for p, n, item in zip(ptrs, args.aux_data_lens, args.aux_item_lens))

    def _state_rows(self, state_indices) -> tuple:
        args = self.kv_mgr.kv_args
        types = _state_names(args)
        if not types:
            return ()
        if len(state_indices) != len(types):
            raise ValueError(f"{len(state_indices)} state index lists for {len(types)} state types")
        rows = []
        for i, indices in enumerate(state_indices):
            if indices is None:
                rows.append(None)
                continue
            flat = _flatten_indices(indices)
            tensors = []
            for p, n, item in zip(args.state_data_ptrs[i], args.state_data_lens[i], args.state_item_lens[i]):
                data = read_rows(int(p), int(n), int(item), flat, self.kv_mgr.device)
                self._state_bytes += len(data)
                tensors.append(data)
            rows.append(tuple(tensors))
        return tuple(rows)

    def get_transfer_metric(self) -> KVTransferMetric:
        total = len(self.pages) * self.kv_mgr.kv_item_lens_sum + self._state_bytes
        return KVTransferMetric(transfer_latency_s=self._latency, transfer_total_bytes=total)

    def failure_exception(self):
        self.clear()
        raise KVTransferError(self.error or f"room {self.bootstrap_room}: failed", self.bootstrap_room,
                              self.error)

    def clear(self) -> None:
        self.kv_mgr.close_room(self.bootstrap_room, concluded_ok=self.conclude_state == KVPoll.Success)

    def abort(self) -> None:
        try:
            self._fail("aborted by the prefill side")
        except Exception:  # noqa: BLE001 - an abort never raises
            log.exception("kvlink: room %s: abort failed", self.bootstrap_room)
            self.conclude_state = KVPoll.Failed


def _flatten_indices(indices) -> list[int]:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    if isinstance(indices, (list, tuple)) and indices and not np.isscalar(indices[0]):
        return [int(v) for part in indices for v in np.asarray(part).reshape(-1)]
    return [int(v) for v in np.asarray(indices).reshape(-1)]


class KVLinkKVReceiver(BaseKVReceiver):
    """Decode side, one per request: links to the prefill ranks it reads, names its pages, pulls
    them once published, then writes the aux and state rows (which opens SGLang's metadata gate)."""

    def __init__(self, mgr: KVLinkKVManager, bootstrap_addr: str, bootstrap_room: int | None = None):
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = int(bootstrap_room) if bootstrap_room is not None else 0
        self.conclude_state: int | None = None
        self.require_staging = False  # SGLang's staging buffer is not used
        self.abort_notified = False
        self.bootstrap_infos: list[PrefillRegistration] = []  # the prefill ranks this rank contacts
        self.error: str | None = None
        self.nonce = uuid.uuid4().hex[:16]
        self.plan = None
        self.peers: list[str] = []
        self.pull = None
        self._state = KVPoll.Bootstrapping
        self._links: dict[int, concurrent.futures.Future] = {}
        self._targets: list[int] = []
        self._sources: list[int] = []
        self._init_at: float | None = None
        self._metadata_at: float | None = None
        self._dst_pages: list[int] = []
        self._aux_index: int | None = None
        self._state_indices = None
        self._cancelling = False
        self._room = mgr.open_decode_room(self.bootstrap_room, self.nonce)
        mgr.prefetch_route(bootstrap_addr)

    def _fail(self, reason: str, tell_prefill: bool = True) -> None:
        if self.conclude_state is not None:
            return
        self.error = f"room {self.bootstrap_room} (decode rank {self.kv_mgr.engine_rank}, bootstrap " \
                     f"{self.bootstrap_addr}): {reason}"
        log.error("kvlink: %s", self.error)
        if self.pull is not None and not self.pull.done():
            _cancel_quietly(self.pull)
            if not self.kv_mgr.enable_deferred_decode_kv_release:
                self._cancelling = True  # report Failed once no write can land (SGLang frees the pages then)
        if tell_prefill:
            self.ensure_abort_notified(reason=reason)
        self.conclude_state = KVPoll.Failed

    def ensure_abort_notified(self, *, force_arm: bool = False, reason: str | None = None) -> None:
        """Tell every prefill rank this request contacts that it is given up (once)."""
        if self.abort_notified:
            return
        self.abort_notified = True
        reason = reason or self.error or "aborted by the decode side"
        targets = list(self.bootstrap_infos)
        info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        if not targets and info is not None:
            # not linked yet: the prefill ranks of the room's dp rank (kvlink prefill follows the room)
            dp_rank = self.bootstrap_room % max(1, info.dp_size)
            targets = [reg for reg in info.ranks.values() if reg.dp_rank == dp_rank]
        for reg in targets:
            self.kv_mgr.send_abort(reg.control, self.bootstrap_room, self.nonce, reason)

    @_guarded
    def init(self, prefill_dp_rank: int = 0) -> None:
        if self.conclude_state is not None:
            return
        mgr = self.kv_mgr
        info = mgr.prefill_info_table.get(self.bootstrap_addr)
        if info is None:
            self._fail("the prefill instance is not known (try_ensure_parallel_info never succeeded)")
            return
        if info.error:
            self._fail(f"incompatible prefill instance: {info.error}")
            return
        dp_rank = int(prefill_dp_rank or 0)
        try:
            self.plan = plan_resharding(info.num_kv_heads, info.tp_size, mgr.topology.tp_size, mla=info.is_mla)
        except ValueError as exc:
            self._fail(f"cannot split the KV heads between prefill TP {info.tp_size} and decode TP "
                       f"{mgr.topology.tp_size}: {exc}")
            return
        rank = mgr.topology.tp_rank
        self._sources = sorted({s.prefill_rank for s in self.plan.pulls_of(rank)})
        self._targets = sorted(set(self._sources) | set(self.plan.releases_of(rank)))
        self.peers = [""] * info.tp_size
        for target in self._targets:
            reg = info.rank(dp_rank, target)
            if reg is None:
                self._fail(f"prefill dp rank {dp_rank} tp rank {target} is not registered")
                return
            self.bootstrap_infos.append(reg)
            self._links[target] = mgr.link(reg.address)
        self._init_at = time.monotonic()

    @_guarded
    def send_metadata(self, kv_indices, aux_index=None, state_indices=None, decode_prefix_len=None,
                      destination=None, **_ignored) -> None:
        if self.conclude_state is not None:
            return
        if destination is not None and str(getattr(destination, "value", destination)) != "device":
            self._fail(f"KV destination {destination!r} is not supported (device pages only)")
            return
        if not self.bootstrap_infos:
            self._fail("send_metadata() before a successful init()", False)
            return
        mgr = self.kv_mgr
        self._dst_pages = [int(p) for p in np.asarray(kv_indices).reshape(-1)]
        self._aux_index = None if aux_index is None else int(aux_index)
        self._state_indices = state_indices
        args = mgr.kv_args
        types = _state_names(args)
        state_list = list(state_indices) if state_indices is not None else [None] * len(types)
        if len(state_list) != len(types):
            self._fail(f"{len(state_list)} state index lists for {len(types)} state types")
            return
        counts = tuple(-1 if s is None else len(_flatten_indices(s)) for s in state_list)
        pulls = set(self._sources)
        for reg in self.bootstrap_infos:
            meta = RoomMetadata(
                room=self.bootstrap_room, nonce=self.nonce, decode_rank=mgr.topology.tp_rank,
                decode_tp=mgr.topology.tp_size, decode_prefix_len=int(decode_prefix_len or 0),
                num_pages=len(self._dst_pages), page_size=mgr.geometry.page_size, pulls=reg.tp_rank in pulls,
                reply_to=mgr.channel.address, endpoint=mgr.endpoint.name,
                aux_item_lens=tuple(int(n) for n in (getattr(args, "aux_item_lens", None) or [])),
                state_types=types,
                state_item_lens=tuple(tuple(int(n) for n in x) for x in (getattr(args, "state_item_lens", None) or [])),
                state_counts=counts)
            mgr.channel.send(reg.control, encode_message(meta))
        self._metadata_at = time.monotonic()
        self._state = KVPoll.Transferring

    @_guarded
    def poll(self) -> int:
        if self.conclude_state is not None:
            if self._cancelling:
                if self.pull is not None and not self.pull.done():
                    return KVPoll.Transferring
                self._cancelling = False
            return self.conclude_state
        mgr = self.kv_mgr
        if self._room.aborted:
            self._fail(self._room.aborted, tell_prefill=False)
            return self.poll()
        now = time.monotonic()
        if self._state == KVPoll.Bootstrapping:
            if self._init_at is None:
                return KVPoll.Bootstrapping
            for target, future in self._links.items():
                if not future.done():
                    if now - self._init_at > mgr.timeouts.bootstrap:
                        self._fail(f"no link to prefill rank {target} within "
                                   f"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT={mgr.timeouts.bootstrap:.0f} s")
                        return KVPoll.Failed
                    return KVPoll.Bootstrapping
                if future.exception() is not None:
                    mgr.forget_prefill(self.bootstrap_addr)
                    self._fail(f"cannot link to prefill rank {target}: {future.exception()}", tell_prefill=False)
                    return KVPoll.Failed
                self.peers[target] = future.result()
            self._state = KVPoll.WaitingForInput
            return self._state
        if self._state != KVPoll.Transferring:
            return self._state
        if self.pull is None:
            if not self._try_start():
                if self.conclude_state is None and now - self._metadata_at > mgr.timeouts.waiting:
                    self._fail(f"the prefill did not publish the pages within SGLANG_DISAGGREGATION_WAITING_TIMEOUT="
                               f"{mgr.timeouts.waiting:.0f} s")
                return self.conclude_state if self.conclude_state is not None else KVPoll.Transferring
        if not self.pull.done():
            if now - self._metadata_at > mgr.timeouts.waiting:
                self._fail(f"the pull did not finish within SGLANG_DISAGGREGATION_WAITING_TIMEOUT="
                           f"{mgr.timeouts.waiting:.0f} s")
                return self.poll()
            return KVPoll.Transferring
        if self.pull.error is not None:
            self._fail(f"pull failed: {self.pull.error}", tell_prefill=True)
            return self.poll()
        self._land_rows()
        self.conclude_state = KVPoll.Success
        return KVPoll.Success

    def _try_start(self) -> bool:
        """Start the pull once every prefill rank we read has published; False while waiting."""
        with self.kv_mgr._lock:
            published = dict(self._room.pages)
        if any(rank not in published for rank in self._sources):
            return False
        first = published[self._sources[0]]
        for rank in self._sources[1:]:
            if published[rank].pages != first.pages or published[rank].num_tokens != first.num_tokens:
                self._fail(f"prefill ranks {self._sources[0]} and {rank} published different pages")
                return False
        self._pages = first
        mgr = self.kv_mgr
        num_tokens = first.num_tokens
        if -(-num_tokens // mgr.geometry.page_size) > len(self._dst_pages):
            self._fail(f"the prefill published {num_tokens} tokens, send_metadata named {len(self._dst_pages)} "
                       f"pages of {mgr.geometry.page_size}")
            return False
        if num_tokens == 0:  # the decode prefix covers every page: nothing to pull, release every rank
            for target in self._targets:
                mgr.endpoint.release(self.peers[target], request_id(self.bootstrap_room))
            self.pull = _Done()
            return True
        dst = self._dst_pages[:-(-num_tokens // mgr.geometry.page_size)]
        try:
            self.pull = pull_resharded(mgr.endpoint, self.plan, mgr.topology.tp_rank, self.peers,
                                       request_id(self.bootstrap_room), list(first.pages), dst, num_tokens)
        except (ValueError, TypeError, kvlink.TransferError) as exc:
            self._fail(f"pull refused: {exc}")
            return False
        with mgr._lock:
            mgr._pulls[self.bootstrap_room] = self.pull
        return True

    def _land_rows(self) -> None:
        """The KV is in place: write the aux rows (the metadata gate opens) and the state rows."""
        mgr, args, pages = self.kv_mgr, self.kv_mgr.kv_args, self._pages
        ptrs = list(getattr(args, "aux_data_ptrs", None) or [])
        if ptrs:
            if self._aux_index is None:
                raise ValueError("send_metadata() named no metadata buffer index")
            if len(pages.aux) != len(ptrs):
                raise ValueError(f"the prefill sent {len(pages.aux)} aux rows for {len(ptrs)} buffers")
            for p, n, item, row in zip(ptrs, args.aux_data_lens, args.aux_item_lens, pages.aux):
                write_rows(int(p), int(n), int(item), [self._aux_index], row, mgr.aux_device)
        types = _state_names(args)
        if types:
            for i, indices in enumerate(self._state_indices or [None] * len(types)):
                sent = pages.state[i] if i < len(pages.state) else None
                if indices is None or sent is None:
                    if (indices is None) != (sent is None):
                        raise ValueError(f"state {types[i]}: one side sent rows, the other none")
                    continue
                flat = _flatten_indices(indices)
                for p, n, item, data in zip(args.state_data_ptrs[i], args.state_data_lens[i],
                                            args.state_item_lens[i], sent):
                    write_rows(int(p), int(n), int(item), flat, data, mgr.device)
        with mgr._lock:
            mgr._pulls.pop(self.bootstrap_room, None)

    def failure_exception(self):
        raise KVTransferError(self.error or f"room {self.bootstrap_room}: failed", self.bootstrap_room, self.error)

    def clear(self) -> None:
        self.kv_mgr.close_room(self.bootstrap_room)

    def abort(self) -> None:
        try:
            self._fail("aborted by the decode side")
        except Exception:  # noqa: BLE001 - an abort never raises
            log.exception("kvlink: room %s: abort failed", self.bootstrap_room)
            self.conclude_state = KVPoll.Failed


class _Done:
    """A pull that moved nothing (the decode side held every page already)."""

    error = None

    def done(self) -> bool:
        return True


def _cancel_quietly(pull) -> None:
    """Ask the endpoint to cancel every pull of ``pull`` without waiting for it."""
    for handle in getattr(pull, "handles", ()):
        try:
            handle.cancel(timeout=0)
        except TimeoutError:
            pass  # the cancel is queued; the handle finishes once the endpoint takes it
        except Exception:  # noqa: BLE001
            log.exception("kvlink: cancelling a pull failed")


__all__ = ["BACKEND_NAME", "HAVE_SGLANG", "KVLinkKVBootstrapServer", "KVLinkKVManager", "KVLinkKVReceiver",
           "KVLinkKVSender", "KVLinkPrefillInfo", "KVPoll", "KVTransferError", "PoolGeometry", "PrefillRegistration",
           "ProtocolError", "RoomAbort", "RoomMetadata", "RoomPages", "Timeouts", "Topology", "decode_message",
           "encode_message", "kv_dtype_of", "layout_from_kvargs", "request_id", "routable_ip"]
