"""A stand-in for NCCL's send/recv: the NCCL transport's pipeline with its wire replaced by a copy.

For tests and benchmarks where one GPU is lent: two endpoints of one process on one GPU, both
built with ``EndpointConfig(transport="nccl", nccl_wire="loopback")``, run the NCCL transport's
own pipeline (staging slots, streams, events, refused chunks, checksums) and only the bytes'
crossing differs. Never picked by ``transport="auto"``.

A pair of NCCL send/recv calls completes for both sides at once: the receiver's stream moves
past its recv only when the bytes have arrived, and the sender's past its send only when they
have left. Either side may post first (kvlink's decode side posts its receives before the
prefill side sends). The stand-in keeps exactly that ordering with three int32 flags on the GPU
and stream memory operations (cuStreamWaitValue32 / cuStreamWriteValue32), so a call costs two
or three driver calls and no event. The k-th send and the k-th recv are matched (NCCL matches a
peer's sends and receives in order):

    first of the pair, on its stream:   write posted[its side] = k    (its prior work is done:
                                                                       data packed / slot free)
                                        wait  done >= k
    second of the pair, on its stream:  wait  posted[other side] >= k
                                        copy the bytes (its own prior work is done: stream order)
                                        write done = k

``done`` only grows: the copy of pair k+1 comes after both streams passed pair k. ``abort()``
writes every flag to its last posted number, so no stream waits forever on a side that is gone.

What must not happen here: both sides live in one process, so a GPU wait of one side is
released only by work that a host thread of this same process queues later. A host call that
waits for the GPU meanwhile never returns: a CUDA allocation that synchronizes, or the first
launch of a kernel under lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default),
which may synchronize the context to load it (seen on one H200: the concurrent, checksummed and
cancelled pulls deadlocked when the pipeline still made a torch allocation and ran torch's
kernels per pull). So the pipeline makes no allocation and launches only kvlink's own kernels,
all loaded when the endpoint prepares its layout; the zeroing here is a driver memset; and a
test warms the torch kernels it runs itself before it queues pulls. Real NCCL between two GPUs
releases a wait from the peer's own threads.
"""

from __future__ import annotations

import collections
import os
import threading

import torch

from kvlink import cuda_driver, kernels

_PAIRS: dict[bytes, "LoopbackPair"] = {}  # id (sent in the WELCOME as the "nccl_id") -> pair
_PAIRS_LOCK = threading.Lock()
# this process's totals, for tests: bytes the stand-in copied, and send/recv pairs of different
# sizes (NCCL would fail those; the stand-in copies the smaller size and counts it: a kvlink bug)
STATS = {"copied_bytes": 0, "size_mismatches": 0}


def unavailable() -> str | None:
    """Why this process cannot run the stand-in wire, or None."""
    if not kernels.cuda_available():
        return "the loopback wire needs a GPU and CuPy"
    try:
        cuda_driver.libcuda()
    except cuda_driver.CudaDriverError as exc:
        return str(exc)
    return None


def new_pair(device_index: int) -> bytes:
    """Prefill side, at the handshake: a new pair on ``device_index``; its id."""
    wire_id = os.urandom(16)
    with _PAIRS_LOCK:
        _PAIRS[wire_id] = LoopbackPair(device_index)
    return wire_id


def end(wire_id: bytes, rank: int) -> "LoopbackEnd":
    """Rank 0's (the sender's) or rank 1's (the receiver's) end of the pair ``wire_id``."""
    with _PAIRS_LOCK:
        pair = _PAIRS.get(wire_id)
        if pair is None:
            raise RuntimeError("no loopback wire with this id in this process: both endpoints must be in one "
                               "process and use nccl_wire='loopback'")
        pair.ends_taken += 1
        if pair.ends_taken == 2:
            del _PAIRS[wire_id]  # both ends hold it now
    return LoopbackEnd(pair, rank)


SENDS, RECVS, DONE = 0, 1, 2  # the flags: sends posted, receives posted, pairs copied


class LoopbackPair:
    """Both ends' state: posted, unmatched calls per direction, and the flags the streams wait on."""

    def __init__(self, device_index: int):
        device = torch.device("cuda", device_index)
        self.device_index = device_index
        self.ends_taken = 0
        self.lock = threading.Lock()
        side = torch.cuda.Stream(device)
        self.flags = torch.empty(3, dtype=torch.int32, device=device)
        cuda_driver.ensure_context(device_index)
        cuda_driver.memset32_async(self.flags.data_ptr(), 0, 3, side.cuda_stream)  # a driver memset: no kernel
        side.synchronize()  # zeroed before any stream waits on it
        self.addresses = [self.flags.data_ptr() + 4 * which for which in (SENDS, RECVS, DONE)]
        self.posted = [0, 0]  # calls posted per direction (0: send, 1: recv)
        self.waiting = (collections.deque(), collections.deque())  # (ptr, nbytes, number) per direction
        self.aborted = False

    def post(self, direction: int, ptr: int, nbytes: int, stream: torch.cuda.Stream) -> None:
        with self.lock:
            if self.aborted:
                raise RuntimeError("loopback wire aborted")
            self.posted[direction] += 1
            number = self.posted[direction]
            other = self.waiting[1 - direction]
            handle = stream.cuda_stream
            cuda_driver.ensure_context(self.device_index)
            if not other:  # first of its pair: say our prior work is done, wait for the copy
                self.waiting[direction].append((ptr, nbytes, number))
                cuda_driver.stream_write_value(handle, self.addresses[direction], number)
                cuda_driver.stream_wait_value(handle, self.addresses[DONE], number)
                return
            other_ptr, other_bytes, other_number = other.popleft()
            assert other_number == number  # matched in order
            if nbytes != other_bytes:
                STATS["size_mismatches"] += 1
            src, dst = (ptr, other_ptr) if direction == SENDS else (other_ptr, ptr)
            copied = min(nbytes, other_bytes)
            cuda_driver.stream_wait_value(handle, self.addresses[1 - direction], number)  # the other side's prior work
            cuda_driver.memcpy_async(dst, src, copied, handle)
            cuda_driver.stream_write_value(handle, self.addresses[DONE], number)  # releases the other side
            STATS["copied_bytes"] += copied

    def abort(self) -> None:
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
            release = torch.cuda.Stream(torch.device("cuda", self.device_index))
            # every stream still waiting on a call moves on (its data is lost)
            cuda_driver.ensure_context(self.device_index)
            for which, value in ((SENDS, self.posted[0]), (RECVS, self.posted[1]), (DONE, max(self.posted))):
                cuda_driver.stream_write_value(release.cuda_stream, self.addresses[which], value)
            for waiting in self.waiting:
                waiting.clear()


class LoopbackEnd:
    """One side's wire: the interface of kvlink.nccl.Communicator that the NCCL transport uses."""

    init_bytes = 0  # no communicator

    def __init__(self, pair: LoopbackPair, rank: int):
        self.pair, self.rank = pair, rank

    def send(self, ptr: int, nbytes: int, stream: torch.cuda.Stream) -> None:
        self.pair.post(0, ptr, nbytes, stream)

    def recv(self, ptr: int, nbytes: int, stream: torch.cuda.Stream) -> None:
        self.pair.post(1, ptr, nbytes, stream)

    def abort(self) -> None:
        self.pair.abort()  # as with NCCL, aborting one rank ends the pair for both
