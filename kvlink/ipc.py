"""CUDA IPC between two processes on one host: shared cache memory and GPU-side signals.

The ``ipc`` transport lets the decode GPU read the prefill GPU's blocks itself, over NVLink
(or PCIe peer-to-peer), with one copy kernel and no staging buffer, communicator or host in
the data path. What it needs from CUDA:

- ``export_memory`` / ``import_memory``: legacy CUDA IPC handles (``cudaIpcGetMemHandle``) of
  the allocations that hold a list of addresses, and the same addresses mapped in the peer's
  process. Two endpoints in one process skip IPC and share the addresses directly.
- stream memory operations (kvlink.cuda_driver.stream_wait_value / stream_write_value). In layer-wise
  mode the prefill's stream writes a counter into the decode GPU's memory after each layer's
  forward pass, and the decode's copy for that layer waits on the counter on its own stream:
  neither host is in the loop.

Driver entry points come from ``libcuda`` through ctypes (kvlink.cuda_driver); CuPy's runtime API
covers the IPC handles.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading

import torch

from kvlink import cuda_driver
from kvlink.errors import IPCError  # noqa: F401  (kvlink.ipc.IPCError, as before)

# cudaIpcMemLazyEnablePeerAccess: map a peer GPU's memory and enable peer access on first use.
IPC_LAZY_ENABLE_PEER_ACCESS = 1


def disabled_reason(check_env: bool = True) -> str | None:
    """Why this process cannot use the ipc transport, or None when it can (``check_env``: honour
    KVLINK_DISABLE_IPC here; an endpoint reads it into its EndpointConfig instead)."""
    if check_env and os.environ.get("KVLINK_DISABLE_IPC") == "1":
        return "KVLINK_DISABLE_IPC=1"
    if not torch.cuda.is_available():
        return "no GPU"
    try:
        import cupy  # noqa: F401
        cuda_driver.libcuda()
    except Exception as exc:  # ImportError, CudaDriverError
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def host_identity() -> str:
    """Names this operating-system instance: processes with equal identities may share GPU memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


@contextlib.contextmanager
def _current_context(device_index: int):
    """``device_index``'s primary context current on this thread while the block runs (driver
    calls need one); the caller's current device is restored afterwards."""
    with torch.cuda.device(device_index):
        torch.cuda.current_stream(device_index)  # initializes the device's context if nothing has yet
        if not cuda_driver.has_current_context():
            raise IPCError(f"no CUDA context current for GPU {device_index}")
        yield


def export_memory(addresses: list[int], device_index: int) -> dict:
    """IPC handles of the allocations holding ``addresses`` (device memory of ``device_index``).

    Returns a msgpack-able description a peer passes to :func:`import_memory`. Raises IPCError
    for memory that legacy CUDA IPC cannot share (for example torch's expandable segments).
    """
    import cupy

    with _current_context(device_index):
        bases: dict[int, int] = {}
        allocations, where = [], []
        for address in addresses:
            try:
                base, size = cuda_driver.address_range(address)
            except cuda_driver.CudaDriverError as exc:
                raise IPCError(str(exc)) from exc
            index = bases.get(base)
            if index is None:
                try:
                    with cupy.cuda.Device(device_index):
                        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
                except cupy.cuda.runtime.CUDARuntimeError as exc:
                    raise IPCError(f"cudaIpcGetMemHandle of the allocation at {base:#x} ({size} bytes): "
                                   f"{exc} (torch's expandable_segments cannot be shared through legacy IPC)") from exc
                index = bases[base] = len(allocations)
                allocations.append([handle, int(size)])
            where.append([index, address - base])
    return {"pid": os.getpid(), "host": host_identity(), "device": device_index,
            "device_uuid": str(torch.cuda.get_device_properties(device_index).uuid),
            "allocations": allocations, "where": where, "addresses": list(addresses)}


# A process may open a given handle only once per device: links that map the same peer allocation
# share the mapping. (handle, device) -> [pointer, users]
_OPENED: dict[tuple[bytes, int], list[int]] = {}
_OPENED_LOCK = threading.Lock()


def _open_handle(handle: bytes, device_index: int) -> int:
    import cupy

    with _OPENED_LOCK:
        entry = _OPENED.get((handle, device_index))
        if entry is None:
            with cupy.cuda.Device(device_index):
                pointer = int(cupy.cuda.runtime.ipcOpenMemHandle(handle, IPC_LAZY_ENABLE_PEER_ACCESS))
            entry = _OPENED[(handle, device_index)] = [pointer, 0]
        entry[1] += 1
        return entry[0]


def _close_handle(handle: bytes, device_index: int) -> None:
    import cupy

    with _OPENED_LOCK:
        entry = _OPENED.get((handle, device_index))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _OPENED[(handle, device_index)]
            try:
                with cupy.cuda.Device(device_index):
                    cupy.cuda.runtime.ipcCloseMemHandle(entry[0])
            except Exception:  # already torn down with the context
                pass


class PeerMemory:
    """The peer's addresses mapped into this process; ``close()`` unmaps them (once no link uses them)."""

    def __init__(self, addresses: list[int], handles: list[bytes], device_index: int):
        self.addresses = addresses
        self._handles = handles
        self._device_index = device_index

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            _close_handle(handle, self._device_index)


def import_memory(export: dict, device_index: int) -> PeerMemory:
    """Map a peer's :func:`export_memory` into this process, for kernels on ``device_index``."""
    import cupy

    if export.get("host") != host_identity():
        raise IPCError(f"peer memory is on {export.get('host')}, this process on {host_identity()}")
    peer_device = int(export["device"])
    if export.get("pid") == os.getpid():
        # the same process: the addresses are ours already; only peer access may be missing
        if peer_device != device_index:
            with cupy.cuda.Device(device_index):
                if not cupy.cuda.runtime.deviceCanAccessPeer(device_index, peer_device):
                    raise IPCError(f"GPU {device_index} cannot access GPU {peer_device} (no P2P path)")
                try:
                    cupy.cuda.runtime.deviceEnablePeerAccess(peer_device)
                except cupy.cuda.runtime.CUDARuntimeError as exc:
                    if "AlreadyEnabled" not in str(exc):
                        raise IPCError(f"enabling peer access {device_index} -> {peer_device}: {exc}") from exc
        return PeerMemory(list(export["addresses"]), [], device_index)
    opened, handles = [], []
    try:
        for handle, size in export["allocations"]:
            opened.append(_open_handle(bytes(handle), device_index))
            handles.append(bytes(handle))
        addresses = [opened[index] + offset for index, offset in export["where"]]
    except Exception as exc:
        PeerMemory([], handles, device_index).close()
        raise IPCError(f"cudaIpcOpenMemHandle of {len(export['allocations'])} allocations of pid {export.get('pid')} "
                       f"(GPU {export.get('device_uuid')}) on GPU {device_index}: {exc}") from exc
    return PeerMemory(addresses, handles, device_index)
