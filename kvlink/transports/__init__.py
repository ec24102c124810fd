"""The transports, one module each, behind one interface (kvlink.transports.base.Transport).

    ipc.py            CUDA IPC: the decode GPU copies the prefill's blocks itself (one host)
    nccl.py           the pipelined pack -> NCCL send/recv -> unpack between GPUs
    loopback_wire.py  a stand-in for NCCL's send/recv on one GPU (tests, benchmarks)
    host.py           chunks as ZeroMQ messages over TCP (CPU caches)

``TRANSPORTS`` lists them best first: the order the handshake tries them in.
"""

from kvlink.transports.base import Transport
from kvlink.transports.host import HostTransport
from kvlink.transports.ipc import IpcTransport
from kvlink.transports.nccl import NcclTransport

TRANSPORTS: dict[str, type[Transport]] = {"ipc": IpcTransport, "nccl": NcclTransport, "host": HostTransport}

__all__ = ["TRANSPORTS", "Transport", "HostTransport", "IpcTransport", "NcclTransport"]
