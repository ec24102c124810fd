"""A thin NCCL binding over ``cupy.cuda.nccl``: one 2-rank communicator per prefill/decode GPU pair.

The unique id travels over kvlink's control plane (not the engine's process group), so
separately launched prefill and decode jobs can pair up. Nothing here runs at import.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import torch

log = logging.getLogger("kvlink.nccl")

# NCCL settings kvlink applies unless the user set them: a 2-rank send/recv communicator needs
# neither NVLink multicast nor the low-latency protocols' extra buffers, and with NCCL's defaults
# one communicator takes about 1 GiB of GPU memory (docs/design.md). Measured in benchmarks/RESULTS.md.
NCCL_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_PROTO": "Simple",
    "NCCL_MAX_NCHANNELS": "16",
    "NCCL_BUFFSIZE": str(2 << 20),
}


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when CuPy's NCCL binding loads and a GPU is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        from cupy.cuda import nccl
        nccl.get_version()
    except Exception:
        return False
    return True


def apply_defaults() -> dict[str, str]:
    """Set kvlink's NCCL defaults where the environment has none; return the settings in force."""
    if os.environ.get("KVLINK_NCCL_DEFAULTS", "1") != "0":
        for key, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}


def unique_id() -> bytes:
    from cupy.cuda import nccl

    uid = nccl.get_unique_id()  # bytes in CuPy 14, a tuple of signed chars before
    return bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(b & 0xFF for b in uid)


class Communicator:
    """A 2-rank NCCL communicator on one GPU, created with a timeout.

    ``ncclCommInitRank`` blocks until both ranks join; it runs on a helper thread so a peer that
    never joins becomes a TimeoutError (the helper is then abandoned) instead of a hang.
    """

    def __init__(self, nccl_id: bytes, rank: int, device_index: int, *, timeout: float, peer: str):
        from cupy.cuda import nccl

        apply_defaults()
        self.rank, self.peer_rank, self.device_index, self.peer = rank, 1 - rank, device_index, peer
        result: dict = {}
        # CuPy 14 takes the id as bytes; older CuPy as a tuple of signed chars
        id_tuple = tuple(b - 256 if b > 127 else b for b in nccl_id)

        def init():
            try:
                import cupy
                with cupy.cuda.Device(device_index):
                    try:
                        result["comm"] = nccl.NcclCommunicator(2, bytes(nccl_id), rank)
                    except TypeError:
                        result["comm"] = nccl.NcclCommunicator(2, id_tuple, rank)
            except Exception as exc:  # reported to the caller below
                result["error"] = exc

        free_before = torch.cuda.mem_get_info(device_index)[0]
        worker = threading.Thread(target=init, name=f"kvlink-nccl-init-{peer}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise TimeoutError(f"NCCL communicator with {peer} (rank {rank}) not formed within {timeout:.1f} s")
        if "error" in result:
            raise RuntimeError(f"NCCL communicator with {peer} failed: {result['error']}") from result["error"]
        self.comm = result["comm"]
        self.init_bytes = free_before - torch.cuda.mem_get_info(device_index)[0]
        self._nccl = nccl

    def send(self, ptr: int, nbytes: int, stream: torch.cuda.Stream) -> None:
        # C: ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, cudaStream_t stream)
        self.comm.send(ptr, nbytes, self._nccl.NCCL_UINT8, self.peer_rank, stream.cuda_stream)

    def recv(self, ptr: int, nbytes: int, stream: torch.cuda.Stream) -> None:
        # C: ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, cudaStream_t stream)
        self.comm.recv(ptr, nbytes, self._nccl.NCCL_UINT8, self.peer_rank, stream.cuda_stream)

    def abort(self) -> None:
        try:
            self.comm.abort()
        except Exception as exc:  # already destroyed or aborted
            log.debug("NCCL abort with %s: %s", self.peer, exc)

    def close(self) -> None:
        try:
            self.comm.destroy()
        except Exception as exc:
            log.debug("NCCL destroy with %s: %s", self.peer, exc)
