"""An endpoint's settings in one object, and the environment variables that set their defaults.

Nothing here reads the environment at import: :meth:`EndpointConfig.from_env` reads it when an
endpoint is built (``Endpoint(layout)`` without ``config=``), so a process may set ``KVLINK_*``
variables after importing kvlink. An explicit ``config`` is taken as given.

    KVLINK_TIMEOUT           timeout (seconds)                    KVLINK_CHECKSUM=1      checksum
    KVLINK_CHUNK_MB          chunk_bytes (MiB)                    KVLINK_SECRET          secret
    KVLINK_MAX_CTAS          max_ctas                             KVLINK_DISABLE_IPC=1   disable_ipc
    KVLINK_IPC_MAX_CTAS      ipc_max_ctas (0: one per tile)       KVLINK_PROFILE_PROGRESS  profile_dir
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from kvlink import auth
from kvlink.errors import InvalidArgument
from kvlink.selection import WIRE_DTYPES


class Transport(str, enum.Enum):
    """How a link moves bytes. ``str``-valued: ``Transport.HOST == "host"``."""

    AUTO = "auto"  # the best both sides can do: ipc on one host, else nccl between GPUs, else host
    IPC = "ipc"    # CUDA IPC: the decode GPU copies the prefill's blocks itself (one host)
    NCCL = "nccl"  # a pipelined pack -> NCCL send/recv -> unpack between GPUs
    HOST = "host"  # chunks as ZeroMQ messages over TCP (CPU caches; the slow path for GPU ones)

    def __str__(self) -> str:
        return self.value


NCCL_WIRES = ("nccl", "loopback")


# An ipc copy reading another GPU's memory over NVLink or PCIe is latency-bound: a grid of this
# many thread blocks, each looping over tiles, keeps enough reads in flight (tuned on 2 x H100).
# On one GPU, one block per tile reads local memory faster (measured on an H200: 0.62 x a
# device copy against 0.52-0.56 x at 264).
IPC_CROSS_GPU_CTAS = 264


@dataclass
class EndpointConfig:
    """Every setting of an :class:`~kvlink.Endpoint` (see its docstring for what each does).

    ``nccl_wire="loopback"`` is for tests and benchmarks only: the NCCL transport's own pipeline
    with its send/recv replaced by a copy between two endpoints of one process on one GPU
    (kvlink.transports.loopback_wire); it is used only when asked for, never picked by "auto".
    """

    transport: Transport | str = Transport.AUTO
    chunk_bytes: int = 64 << 20
    num_slots: int = 3
    timeout: float = 30.0
    heartbeat: float = 1.0
    max_ctas: int = 64
    # thread blocks of an ipc pull's copy: None picks by where the source lies (IPC_CROSS_GPU_CTAS
    # when it is another GPU's memory, one block per tile on our own GPU); 0: one per tile
    ipc_max_ctas: int | None = None
    # layer copies of layer-wise ipc pulls a link keeps queued on the GPU, waiting for the prefill's
    # layer counters; later pulls wait on the host until earlier ones finish (see transports/ipc.py)
    ipc_queued_layers: int = 128
    max_links: int = 8
    secret: bytes | str | None = None
    checksum: bool = False
    wire_dtype: str | None = None
    cache_scale: float = 1.0
    outbox_limit: int = 1024  # messages a link may queue behind a peer that does not read
    turn_budget: int = 256  # commands, and messages per socket, one progress turn handles
    disable_ipc: bool = False
    profile_dir: str | None = None  # cProfile the progress thread into this directory
    nccl_wire: str = "nccl"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **settings) -> EndpointConfig:
        """The defaults, with ``KVLINK_*`` variables of ``environ`` (default: os.environ) applied,
        then ``settings`` (those given as None keep the environment's or the default)."""
        env = os.environ if environ is None else environ
        values: dict = {}
        readers = {"KVLINK_TIMEOUT": ("timeout", float), "KVLINK_MAX_CTAS": ("max_ctas", int),
                   "KVLINK_IPC_MAX_CTAS": ("ipc_max_ctas", int),
                   "KVLINK_CHUNK_MB": ("chunk_bytes", lambda v: int(v) << 20)}
        for variable, (name, parse) in readers.items():
            if env.get(variable):
                try:
                    values[name] = parse(env[variable])
                except ValueError:
                    raise InvalidArgument(f"{variable}={env[variable]!r} is not a number") from None
        if env.get("KVLINK_SECRET"):
            values["secret"] = env["KVLINK_SECRET"]
        values["checksum"] = env.get("KVLINK_CHECKSUM") == "1"
        values["disable_ipc"] = env.get("KVLINK_DISABLE_IPC") == "1"
        values["profile_dir"] = env.get("KVLINK_PROFILE_PROGRESS") or None
        values.update({name: value for name, value in settings.items() if value is not None})
        return cls(**values).checked()

    def replace(self, **settings) -> EndpointConfig:
        """A copy with ``settings`` changed (None values are ignored), checked."""
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None}).checked()

    def checked(self) -> EndpointConfig:
        """Normalized (transport an enum, secret bytes) and validated:
        InvalidArgument names the first bad setting."""
        try:
            self.transport = Transport(self.transport)
        except ValueError:
            raise InvalidArgument(f"transport must be one of {[t.value for t in Transport]}, "
                                  f"got {self.transport!r}") from None
        self.secret = auth.normalize_secret(self.secret)
        if self.ipc_max_ctas is not None and (isinstance(self.ipc_max_ctas, bool) or not isinstance(self.ipc_max_ctas, int)
                                              or self.ipc_max_ctas < 0):
            raise InvalidArgument(f"ipc_max_ctas must be None (by topology), 0 (one per tile) or a block count, "
                                  f"got {self.ipc_max_ctas!r}")
        for name in ("num_slots", "max_links", "outbox_limit", "turn_budget", "chunk_bytes", "max_ctas",
                     "ipc_queued_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value!r}")
        for name in ("timeout", "heartbeat", "cache_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidArgument(f"{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.wire_dtype not in WIRE_DTYPES:
            raise InvalidArgument(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if self.nccl_wire not in NCCL_WIRES:
            raise InvalidArgument(f"nccl_wire must be one of {NCCL_WIRES}, got {self.nccl_wire!r}")
        self.checksum = bool(self.checksum)
        return self


def default_timeout() -> float:
    """The timeout an endpoint built now gets by default (``KVLINK_TIMEOUT``, else 30 s)."""
    return EndpointConfig.from_env().timeout
