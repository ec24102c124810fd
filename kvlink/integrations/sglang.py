"""SGLang disaggregation backend: ``KVLinkKVManager``, ``KVLinkKVSender``, ``KVLinkKVReceiver``,
``KVLinkKVBootstrapServer``.

SGLang's own backends push: the decode side's receiver sends its page indices to the prefill,
which writes into them. kvlink pulls, so the roles of the messages turn around, with SGLang's
call sequence unchanged:

- the prefill's ``KVLinkKVManager`` serves its KV pool through a :class:`kvlink.Endpoint` and
  registers the endpoint's address with the bootstrap server (``register_to_bootstrap``);
- ``KVLinkKVSender.send(page_indices)`` (once per prefill chunk) collects the request's pages;
  with the last one it publishes them under the request's bootstrap room;
- ``KVLinkKVReceiver.init`` links the decode rank to the prefill ranks that feed it
  (:mod:`kvlink.resharding`), ``send_metadata(kv_indices)`` names the decode pages, and
  ``poll()`` starts the pull as soon as the room's pages are published, then reports its end;
- the sender reaches ``Success`` once every decode rank that reads its pages has confirmed
  (kvlink's NOTIFY / RELEASE), or ``Failed`` if that takes longer than the lease.

Transfers are keyed on the bootstrap room (``room-<n>``). Each wait is bounded: a receiver whose
room is never published, or whose pull fails, reports ``KVPoll.Failed`` and
``failure_exception()`` raises an error naming the room and the peer.

The bootstrap server is a small HTTP registry (stdlib, one thread): ``PUT/GET /route``
(prefill ranks' endpoint addresses), ``PUT/GET/DELETE /room/<room>`` (a request's pages per
prefill rank) and ``GET /health``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch

import kvlink
from kvlink import presets
from kvlink.config import default_timeout
from kvlink.resharding import ReleaseTracker, plan_resharding, pull_resharded

log = logging.getLogger("kvlink.sglang")

try:  # the real base classes when SGLang is installed
    from sglang.srt.disaggregation.base.conn import (  # type: ignore
        BaseKVBootstrapServer,
        BaseKVManager,
        BaseKVReceiver,
        BaseKVSender,
        KVArgs,
        KVPoll,
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

    class BaseKVManager:  # type: ignore[no-redef]
        pass

    class BaseKVSender:  # type: ignore[no-redef]
        pass

    class BaseKVReceiver:  # type: ignore[no-redef]
        pass

    class BaseKVBootstrapServer:  # type: ignore[no-redef]
        pass


class KVTransferError(RuntimeError):
    """A transfer of one bootstrap room failed; the message names the room and the peer."""


# ---------------------------------------------------------------------------------- bootstrap
class KVLinkKVBootstrapServer(BaseKVBootstrapServer):
    """Rendezvous for prefill ranks' addresses and requests' pages (HTTP, a daemon thread)."""

    def __init__(self, host: str, port: int):
        routes: dict[str, dict] = {}
        rooms: dict[str, dict[str, Any]] = {}
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

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= 16 << 20:
                    return None
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    return None
                return body if isinstance(body, dict) else None

            def do_GET(self):  # noqa: N802 - http.server's name
                parts = self.path.strip("/").split("/")
                with lock:
                    if parts == ["health"]:
                        return self._reply(200, {"ok": True})
                    if parts == ["route"]:
                        return self._reply(200, {"ranks": routes})
                    if len(parts) == 2 and parts[0] == "room":
                        room = rooms.get(parts[1])
                        return self._reply(200, room) if room is not None else self._reply(404)
                self._reply(404)

            def do_PUT(self):  # noqa: N802
                parts = self.path.strip("/").split("/")
                body = self._body()
                if body is None:
                    return self._reply(400, {"error": "expected a JSON object"})
                with lock:
                    if parts == ["route"] and isinstance(body.get("engine_rank"), int):
                        routes[str(body["engine_rank"])] = body
                        return self._reply(200)
                    if len(parts) == 3 and parts[0] == "room":
                        rooms.setdefault(parts[1], {})[parts[2]] = body
                        return self._reply(200)
                self._reply(400, {"error": f"bad PUT {self.path}"})

            def do_DELETE(self):  # noqa: N802
                parts = self.path.strip("/").split("/")
                with lock:
                    if len(parts) == 2 and parts[0] == "room":
                        rooms.pop(parts[1], None)
                        return self._reply(200)
                self._reply(404)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvlink-bootstrap", daemon=True)
        self._thread.start()
        log.info("kvlink bootstrap server on http://%s:%d", self.host, self.port)

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


# ---------------------------------------------------------------------------------- the pool
def _mode_name(mode) -> str:
    name = getattr(mode, "name", None) or getattr(mode, "value", None) or str(mode)
    name = str(name).lower()
    if name not in ("prefill", "decode"):
        raise ValueError(f"disaggregation_mode must be PREFILL or DECODE, got {mode!r}")
    return name


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp8_e4m3": torch.float8_e4m3fn,
           "float8_e4m3fn": torch.float8_e4m3fn}


def _pool_dtype(args, server_args) -> torch.dtype:
    dtype = getattr(args, "kv_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(getattr(server_args, "kv_cache_dtype", "auto"))
    if name in _DTYPES:
        return _DTYPES[name]
    name = str(getattr(server_args, "dtype", "bfloat16"))
    return _DTYPES.get(name, torch.bfloat16)


def _bytes_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of existing memory at ``address`` (no copy, not owned)."""
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
    import cupy

    memory = cupy.cuda.UnownedMemory(address, nbytes, owner=None, device_id=device.index)
    array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    return torch.from_dlpack(array)


def layout_from_kvargs(args, server_args, is_mla_backend: bool) -> kvlink.CacheLayout:
    """A kvlink layout over SGLang's KV pool, from KVArgs' per-buffer pointers and sizes.

    MHA: ``kv_data_ptrs`` holds every layer's K buffer, then every layer's V buffer, each
    ``[num_slots, kv_head_num, head_dim]``; MLA: one ``[num_slots, 1, latent]`` buffer per layer.
    ``kv_item_lens`` is one page's bytes. The element type comes from ``args.kv_dtype`` or
    ``server_args.kv_cache_dtype`` (bf16 when neither names one).
    """
    device = torch.device(getattr(args, "device", None) or
                          (f"cuda:{args.gpu_id}" if torch.cuda.is_available() else "cpu"))
    dtype = _pool_dtype(args, server_args)
    esize = torch.empty(0, dtype=dtype).element_size()
    ptrs, lens, items = list(args.kv_data_ptrs), list(args.kv_data_lens), list(args.kv_item_lens)
    if not ptrs or len(ptrs) != len(lens) or len(items) not in (1, len(ptrs)):
        raise ValueError(f"KVArgs: {len(ptrs)} data pointers, {len(lens)} lengths, {len(items)} item lengths")
    page_size = int(args.page_size)
    heads = 1 if is_mla_backend else int(args.kv_head_num)
    row = items[0] // (page_size * heads * esize)
    if row * page_size * heads * esize != items[0]:
        raise ValueError(f"KVArgs: a page of {items[0]} bytes is not {page_size} slots x {heads} heads of "
                         f"{str(dtype).removeprefix('torch.')}")
    buffers = [_bytes_at(p, n, device).view(dtype).view(-1, heads, row) for p, n in zip(ptrs, lens)]
    if is_mla_backend:
        return presets.sglang_mla(buffers, page_size=page_size)
    if len(buffers) % 2:
        raise ValueError(f"KVArgs: an MHA pool needs K and V buffers per layer, got {len(buffers)} buffers")
    half = len(buffers) // 2
    return presets.sglang_mha(buffers[:half], buffers[half:], page_size=page_size)


class KVLinkKVManager(BaseKVManager):
    """One per rank: the pool's kvlink endpoint, its links and the bootstrap address."""

    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend: bool | None = False):
        self.args, self.server_args = args, server_args
        self.mode = _mode_name(disaggregation_mode)
        self.is_mla = bool(is_mla_backend)
        self.engine_rank = int(getattr(args, "engine_rank", 0))
        self.timeout = float(getattr(server_args, "disaggregation_transfer_timeout", None) or default_timeout())
        self.lease_seconds = float(getattr(server_args, "kvlink_lease_seconds", None) or 4 * self.timeout)
        self.layout = layout_from_kvargs(args, server_args, self.is_mla)
        heads = 1 if self.is_mla else int(getattr(args, "total_kv_head_num", 0) or args.kv_head_num)
        self.total_kv_heads = heads
        self.tp_size = int(getattr(server_args, "tp_size", 1) or 1)
        host = getattr(server_args, "host", "127.0.0.1") or "127.0.0.1"
        listen = f"tcp://{host}:0" if self.mode == "prefill" else None
        self.endpoint = kvlink.Endpoint(self.layout, name=f"sglang-{self.mode}-{self.engine_rank}", listen=listen,
                                        timeout=self.timeout,
                                        transport=getattr(server_args, "kvlink_transport", None) or "auto",
                                        max_links=16)
        self._links: dict[str, str] = {}
        self._lock = threading.Lock()
        self._confirmed: dict[str, bool] = {}
        decode_tp = int(getattr(server_args, "disaggregation_decode_tp", None) or self.tp_size)
        self._tracker = None
        if self.mode == "prefill":
            plan = plan_resharding(heads, self.tp_size, decode_tp)
            self._tracker = ReleaseTracker(plan.contacts_of(self.engine_rank))
        port = getattr(server_args, "disaggregation_bootstrap_port", None)
        self.bootstrap_url = f"http://{host}:{port}" if port else None
        log.info("kvlink SGLang %s manager rank %d: %s", self.mode, self.engine_rank, self.layout.describe())

    def register_to_bootstrap(self) -> None:
        if self.mode != "prefill":
            return
        if self.bootstrap_url is None:
            raise ValueError("server_args.disaggregation_bootstrap_port is not set: no bootstrap server to register with")
        _http("PUT", f"{self.bootstrap_url}/route", {
            "engine_rank": self.engine_rank, "address": self.endpoint.address, "tp_size": self.tp_size,
            "num_kv_heads": self.total_kv_heads, "page_size": int(self.args.page_size)}, timeout=self.timeout)

    def link(self, address: str) -> str:
        with self._lock:
            peer = self._links.get(address)
            if peer is None:
                peer = self._links[address] = self.endpoint.connect(address)
            return peer

    def confirmed(self, transfer_id: str) -> bool | None:
        """Prefill: True/False once every decode rank reading ``transfer_id`` confirmed (ok or not), else None."""
        with self._lock:
            for request, ok in self._tracker.update(self.endpoint.finished_sends()):
                self._confirmed[request] = ok
            return self._confirmed.pop(transfer_id, None)

    def close(self) -> None:
        self.endpoint.close()


def _room_key(room) -> str:
    return f"room-{room}"


# ---------------------------------------------------------------------------------- sender / receiver
class KVLinkKVSender(BaseKVSender):
    """Prefill side, one per request: collects its pages and publishes them for the decode side to pull."""

    def __init__(self, mgr: KVLinkKVManager, bootstrap_addr: str, bootstrap_room: int, dest_tp_ranks=None,
                 pp_rank: int = 0, req_has_disagg_prefill_dp_rank: bool = False):
        self.mgr, self.room = mgr, bootstrap_room
        self.url = f"http://{bootstrap_addr}"
        self.num_pages: int | None = None
        self.pages: list[int] = []
        self.state = KVPoll.Bootstrapping
        self.error: str | None = None
        self.published_at: float | None = None
        self._started = time.time()

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        if num_kv_indices <= 0:
            raise ValueError(f"room {self.room}: num_kv_indices must be positive, got {num_kv_indices}")
        self.num_pages = int(num_kv_indices)
        self.state = KVPoll.WaitingForInput

    def send(self, kv_indices, state_indices=None, token_position_offset: int = 0) -> None:
        if self.num_pages is None:
            raise RuntimeError(f"room {self.room}: send() before init()")
        self.pages += [int(p) for p in np.asarray(kv_indices).reshape(-1)]
        if len(self.pages) > self.num_pages:
            self._fail(f"{len(self.pages)} pages sent, init() announced {self.num_pages}")
            return
        if len(self.pages) == self.num_pages:
            try:
                _http("PUT", f"{self.url}/room/{self.room}/{self.mgr.engine_rank}",
                      {"pages": self.pages, "address": self.mgr.endpoint.address,
                       "page_size": int(self.mgr.args.page_size)}, timeout=self.mgr.timeout)
            except OSError as exc:
                self._fail(f"cannot publish the pages to the bootstrap server {self.url}: {exc}")
                return
            self.published_at = time.time()
            self.state = KVPoll.Transferring

    def poll(self) -> int:
        if self.state == KVPoll.Transferring:
            ok = self.mgr.confirmed(_room_key(self.room))
            if ok is True:
                self.state = KVPoll.Success
            elif ok is False:
                self._fail("a decode rank reported the transfer failed")
            elif time.time() - self.published_at > self.mgr.lease_seconds:
                self._fail(f"no decode rank confirmed within the {self.mgr.lease_seconds:.0f} s lease")
        return self.state

    def _fail(self, reason: str) -> None:
        self.error = f"room {self.room} (prefill rank {self.mgr.engine_rank}): {reason}"
        self.state = KVPoll.Failed
        log.error("kvlink: %s", self.error)

    def failure_exception(self):
        raise KVTransferError(self.error or f"room {self.room}: failed")

    def get_transfer_metric(self):
        total = len(self.pages) * int(self.mgr.args.kv_item_lens[0]) * len(self.mgr.args.kv_data_ptrs)
        try:
            from sglang.srt.disaggregation.base.conn import KVTransferMetric  # type: ignore

            return KVTransferMetric(transfer_total_bytes=total)
        except Exception:  # noqa: BLE001 - SGLang absent or older
            return {"transfer_total_bytes": total}

    def clear(self) -> None:
        pass

    def abort(self) -> None:
        self.mgr.endpoint.cancel_serving(_room_key(self.room))
        self._fail("aborted")


class KVLinkKVReceiver(BaseKVReceiver):
    """Decode side, one per request: pulls the room's pages into its own once they are published."""

    def __init__(self, mgr: KVLinkKVManager, bootstrap_addr: str, bootstrap_room: int | None = None):
        self.mgr, self.room = mgr, bootstrap_room
        self.url = f"http://{bootstrap_addr}"
        self.state = KVPoll.Bootstrapping
        self.error: str | None = None
        self.pages: list[int] | None = None
        self.pull = None
        self.plan = None
        self.peers: list[str] = []
        self._waiting_since: float | None = None

    def init(self, prefill_dp_rank: int = 0) -> None:
        try:
            routes = (_http("GET", f"{self.url}/route", timeout=self.mgr.timeout) or {}).get("ranks", {})
            if not routes:
                raise KVTransferError("no prefill rank registered with the bootstrap server")
            prefill_tp = int(next(iter(routes.values()))["tp_size"])
            heads = int(next(iter(routes.values()))["num_kv_heads"])
            self.plan = plan_resharding(heads, prefill_tp, self.mgr.tp_size, mla=self.mgr.is_mla)
            needed = {s.prefill_rank for s in self.plan.pulls_of(self.mgr.engine_rank)}
            needed |= set(self.plan.releases_of(self.mgr.engine_rank))
            self.peers = [""] * prefill_tp
            for rank in sorted(needed):
                self.peers[rank] = self.mgr.link(routes[str(rank)]["address"])
            self.state = KVPoll.WaitingForInput
        except (OSError, KeyError, ValueError, TimeoutError, ConnectionError, KVTransferError) as exc:
            self._fail(f"bootstrap failed: {exc}")

    def send_metadata(self, kv_indices, aux_index=None, state_indices=None, decode_prefix_len=None) -> None:
        if self.state == KVPoll.Failed:
            return
        self.pages = [int(p) for p in np.asarray(kv_indices).reshape(-1)]
        self._waiting_since = time.time()
        self.state = KVPoll.Transferring

    def poll(self) -> int:
        if self.state != KVPoll.Transferring:
            return self.state
        if self.pull is None:
            self._try_start()
        elif self.pull.done():
            if self.pull.error is not None:
                self._fail(str(self.pull.error))
            else:
                self.state = KVPoll.Success
        if self.state == KVPoll.Transferring and self.pull is None and \
                time.time() - self._waiting_since > self.mgr.timeout:
            self._fail(f"the prefill side did not publish its pages within {self.mgr.timeout:.1f} s")
        return self.state

    def _try_start(self) -> None:
        try:
            room = _http("GET", f"{self.url}/room/{self.room}", timeout=self.mgr.timeout)
        except OSError as exc:
            self._fail(f"bootstrap server unreachable: {exc}")
            return
        sources = {s.prefill_rank for s in self.plan.pulls_of(self.mgr.engine_rank)}
        if room is None or any(str(rank) not in room for rank in sources):
            return  # not published yet (every prefill rank we read must have published)
        first = room[str(min(sources))]
        src_pages = [int(p) for p in first["pages"]]
        num_tokens = len(src_pages) * int(first["page_size"])
        dst_needed = -(-num_tokens // self.mgr.layout.block_size)
        if dst_needed > len(self.pages):
            self._fail(f"the prefill published {num_tokens} tokens but send_metadata named {len(self.pages)} pages "
                       f"of {self.mgr.layout.block_size}")
            return
        try:
            self.pull = pull_resharded(self.mgr.endpoint, self.plan, self.mgr.engine_rank, self.peers,
                                       _room_key(self.room), src_pages, self.pages[:dst_needed], num_tokens)
        except (ValueError, TypeError, kvlink.TransferError) as exc:
            self._fail(f"pull refused: {exc}")

    def _fail(self, reason: str) -> None:
        self.error = f"room {self.room} (decode rank {self.mgr.engine_rank}, bootstrap {self.url}): {reason}"
        self.state = KVPoll.Failed
        log.error("kvlink: %s", self.error)

    def failure_exception(self):
        raise KVTransferError(self.error or f"room {self.room}: failed")

    def clear(self) -> None:
        pass

    def abort(self) -> None:
        if self.pull is not None:
            self.pull.cancel()
        self._fail("aborted")
