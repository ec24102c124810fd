"""The few CUDA driver calls kvlink makes directly, through ctypes on ``libcuda``.

CuPy's API covers compilation and IPC handles but not kernel launches without its own
device/stream bookkeeping (tens of microseconds a launch from Python), address ranges or stream
memory operations. Each wrapper raises :class:`CudaDriverError` naming the call and the error.
Nothing here loads at import: ``libcuda`` is opened on first use.
"""

from __future__ import annotations

import ctypes
import functools
import threading

# CUstreamWaitValue_flags: CU_STREAM_WAIT_VALUE_GEQ waits until (int32)(*addr - value) >= 0, a
# cyclic comparison, so counters may wrap.
WAIT_VALUE_GEQ = 0x0
WRITE_VALUE_DEFAULT = 0x0  # with a memory barrier: earlier writes of the stream are visible first


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


@functools.lru_cache(maxsize=None)
def libcuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise CudaDriverError(f"libcuda.so.1 not loadable: {exc}") from exc
    u64, void_p, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint
    # CUresult cuMemGetAddressRange_v2(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr)
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t), u64]
    # CUresult cuCtxGetCurrent(CUcontext* pctx)
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(void_p)]
    # CUresult cuGetErrorName(CUresult error, const char** pStr)
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    # CUresult cuEventCreate(CUevent* phEvent, unsigned int Flags)
    lib.cuEventCreate.argtypes = [ctypes.POINTER(void_p), uint]
    # CUresult cuCtxGetDevice(CUdevice* device); cuDeviceGet(CUdevice* device, int ordinal)
    lib.cuCtxGetDevice.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    # CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev); cuCtxSetCurrent(CUcontext ctx)
    lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(void_p), ctypes.c_int]
    lib.cuCtxSetCurrent.argtypes = [void_p]
    # CUresult cuFuncGetAttribute(int* pi, CUfunction_attribute attrib, CUfunction hfunc)
    lib.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, void_p]
    if hasattr(lib, "cuFuncLoad"):  # CUDA 12.4+: CUresult cuFuncLoad(CUfunction function)
        lib.cuFuncLoad.argtypes = [void_p]
    return lib


@functools.lru_cache(maxsize=None)
def queueing():
    """libcuda again, for the calls that only queue work on a stream (records, waits, launches,
    memsets, copies, stream memory operations): called with the GIL held.

    NOTE: a ctypes CDLL call releases the GIL and takes it back after. With another Python thread
    busy (the peer's progress thread, on the stand-in wire; an engine's scheduler) each call of a
    pipeline's dozen a chunk then hands the GIL over and waits to get it back: tens of
    microseconds each, measured on an H200 host. These calls return at once; torch makes its own
    launches and records with the GIL held too.
    """
    libcuda()  # the error message of a missing driver
    lib = ctypes.PyDLL("libcuda.so.1")
    u64, u32, void_p, uint, size_t = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t
    # CUresult cuStreamWaitValue32_v2 / cuStreamWriteValue32_v2(CUstream, CUdeviceptr addr, cuuint32_t value,
    #                                                          unsigned int flags)
    lib.cuStreamWaitValue32_v2.argtypes = lib.cuStreamWriteValue32_v2.argtypes = [void_p, u64, u32, uint]
    # CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
    #                         blockDimZ, unsigned int sharedMemBytes, CUstream hStream, void** kernelParams,
    #                         void** extra)
    lib.cuLaunchKernel.argtypes = [void_p, uint, uint, uint, uint, uint, uint, uint, void_p, void_p, void_p]
    lib.cuEventRecord.argtypes = [void_p, void_p]  # (CUevent, CUstream)
    lib.cuStreamWaitEvent.argtypes = [void_p, void_p, uint]  # (CUstream, CUevent, unsigned int flags)
    lib.cuEventQuery.argtypes = [void_p]  # (CUevent)
    lib.cuMemcpyDtoDAsync_v2.argtypes = [u64, u64, size_t, void_p]  # (dst, src, bytes, CUstream)
    lib.cuMemsetD32Async.argtypes = [u64, uint, size_t, void_p]  # (dst, value, count, CUstream)
    lib.cuMemcpyDtoHAsync_v2.argtypes = [void_p, u64, size_t, void_p]  # (host dst, device src, bytes, CUstream)
    return lib


def check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        libcuda().cuGetErrorName(result, ctypes.byref(name))
        raise CudaDriverError(f"{what} failed: {(name.value or b'?').decode()} ({result})")


def has_current_context() -> bool:
    ctx = ctypes.c_void_p()
    check(libcuda().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    return bool(ctx.value)


def address_range(address: int) -> tuple[int, int]:
    """(base, size) of the allocation holding device ``address``."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    check(libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address),
          f"cuMemGetAddressRange({address:#x})")
    return base.value, size.value


def launch_kernel(function: int, grid: int, threads: int, args: tuple[int, ...], stream: int) -> None:
    """cuLaunchKernel of ``function`` (a CUfunction) with 64-bit arguments, on ``stream``.

    The function's context must be current on this thread.
    """
    values = [ctypes.c_uint64(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    check(queueing().cuLaunchKernel(function, grid, 1, 1, threads, 1, 1, 0, stream, pointers, None), "cuLaunchKernel")


class ParamBuffer:
    """A kernel's one by-value struct parameter, written in place (struct.pack_into, slice
    assignment) and handed to cuLaunchKernel, which copies it at the call: so one buffer serves
    every launch of its thread (:func:`param_buffer`), with no allocation per launch."""

    def __init__(self, size: int):
        self.size = size
        self.buffer = ctypes.create_string_buffer(size)
        self.view = memoryview(self.buffer).cast("B")
        self.pointers = (ctypes.c_void_p * 1)(ctypes.addressof(self.buffer))  # kernelParams: one parameter


_local = threading.local()


def param_buffer(size: int) -> ParamBuffer:
    """This thread's parameter buffer of ``size`` bytes (made on first use)."""
    buffers = getattr(_local, "params", None)
    if buffers is None:
        buffers = _local.params = {}
    buffer = buffers.get(size)
    if buffer is None:
        buffer = buffers[size] = ParamBuffer(size)
    return buffer


def launch_with_params(function: int, grid: int, threads: int, params: ParamBuffer, stream: int) -> None:
    """cuLaunchKernel of a kernel whose one parameter is the struct in ``params`` (passed by value)."""
    result = queueing().cuLaunchKernel(function, grid, 1, 1, threads, 1, 1, 0, stream, params.pointers, None)
    if result:
        check(result, "cuLaunchKernel")


def launch_kernel_with_struct(function: int, grid: int, threads: int, param: bytes, stream: int) -> None:
    """cuLaunchKernel of a kernel whose one parameter is a struct passed by value (``param``'s bytes).

    The driver copies the parameter at the call, so ``param`` may be dropped right after.
    """
    params = param_buffer(len(param))
    params.view[:] = param
    launch_with_params(function, grid, threads, params, stream)


def ensure_context(device_index: int) -> None:
    """Make sure a context of ``device_index`` is current on this thread, for the driver calls here.

    A thread that has run no CUDA runtime call yet has none (torch's device guard skips
    cudaSetDevice for the device it believes current): make the device's primary context (the
    one torch and CuPy use) current. Checked once per thread and device.
    """
    checked = getattr(_local, "contexts", None)
    if checked is None:
        checked = _local.contexts = set()
    if device_index in checked:
        return
    lib = libcuda()
    ctx = ctypes.c_void_p()
    check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        device = ctypes.c_int()
        check(lib.cuDeviceGet(ctypes.byref(device), device_index), f"cuDeviceGet({device_index})")
        check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device.value), "cuDevicePrimaryCtxRetain")
        check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    current = ctypes.c_int()
    check(lib.cuCtxGetDevice(ctypes.byref(current)), "cuCtxGetDevice")
    if current.value != device_index:
        raise CudaDriverError(f"the context current on this thread is GPU {current.value}'s, not GPU {device_index}'s")
    checked.add(device_index)


EVENT_DISABLE_TIMING = 0x2


class RawEvent:
    """A CUDA event made through the driver, for orderings between kvlink's own streams (staging
    slots): record and wait are one driver call each, without torch's event wrapper. Made in the
    context current on this thread (see :func:`ensure_context`); lives as long as the process."""

    __slots__ = ("handle", "_record", "_wait")

    def __init__(self):
        event = ctypes.c_void_p()
        check(libcuda().cuEventCreate(ctypes.byref(event), EVENT_DISABLE_TIMING), "cuEventCreate")
        self.handle = event.value
        queue = queueing()
        self._record, self._wait = queue.cuEventRecord, queue.cuStreamWaitEvent  # looked up once: called per chunk

    def record(self, stream: int) -> None:
        """Queue the event on ``stream`` (a CUstream handle): it fires after the stream's prior work."""
        result = self._record(self.handle, stream)
        if result:
            check(result, "cuEventRecord")

    def wait(self, stream: int) -> None:
        """Make ``stream`` wait, on the GPU, for the event's last record queued so far."""
        result = self._wait(stream, self.handle, 0)
        if result:
            check(result, "cuStreamWaitEvent")


CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_NOT_READY = 201, 600


class CompletionEvent(RawEvent):
    """A pull's completion: a driver event from a per-GPU pool. Recording, querying and waiting
    on it are one driver call each (torch's ``Event.record`` costs ~10 us of host time on the lent
    H200 host, a driver record about one). ``take()`` one while the GPU's context is current on
    this thread; ``give_back()`` it once nobody will query or wait on it."""

    __slots__ = ("device_index",)
    _pools: dict[int, list] = {}

    @classmethod
    def take(cls, device_index: int) -> "CompletionEvent":
        pool = cls._pools.get(device_index)
        if pool:
            try:
                return pool.pop()
            except IndexError:  # another thread took the last one
                pass
        event = cls()
        event.device_index = device_index
        return event

    def give_back(self) -> None:
        self._pools.setdefault(self.device_index, []).append(self)

    def query(self) -> bool:
        """True once the GPU passed the record (or if it was never recorded)."""
        result = queueing().cuEventQuery(self.handle)
        if result == CUDA_ERROR_INVALID_CONTEXT:  # a thread that never used CUDA: give it the GPU's context
            ensure_context(self.device_index)
            result = queueing().cuEventQuery(self.handle)
        if result == CUDA_ERROR_NOT_READY:
            return False
        if result:
            check(result, "cuEventQuery")
        return True


def memcpy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Queue a device-to-device copy of ``nbytes`` on ``stream`` (any two device addresses)."""
    result = queueing().cuMemcpyDtoDAsync_v2(dst, src, nbytes, stream)
    if result:
        check(result, "cuMemcpyDtoDAsync")


def memset32_async(address: int, value: int, count: int, stream: int) -> None:
    """Queue on ``stream``: set ``count`` int32 words at device ``address`` to ``value`` (a driver
    memset: no kernel of torch's or ours, so nothing is loaded on first use)."""
    result = queueing().cuMemsetD32Async(address, value & 0xFFFFFFFF, count, stream)
    if result:
        check(result, "cuMemsetD32Async")


def copy_to_host_async(host_address: int, device_address: int, nbytes: int, stream: int) -> None:
    """Queue on ``stream``: copy ``nbytes`` from the device to (pinned) host memory."""
    result = queueing().cuMemcpyDtoHAsync_v2(host_address, device_address, nbytes, stream)
    if result:
        check(result, "cuMemcpyDtoHAsync")


CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0


def load_function(function: int) -> None:
    """Finish loading a kernel now rather than at its first launch.

    NOTE: under lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default) the first launch
    of a kernel loads it, and loading may synchronize the context. A first launch from a thread
    that must still queue the work some stream is waiting for (a receive's send, on the stand-in
    wire) then never returns: kvlink loads every kernel it launches when it prepares a layout.
    """
    lib = libcuda()
    if hasattr(lib, "cuFuncLoad"):
        check(lib.cuFuncLoad(function), "cuFuncLoad")
    else:  # older drivers: querying an attribute loads the function
        value = ctypes.c_int()
        check(lib.cuFuncGetAttribute(ctypes.byref(value), CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, function),
              "cuFuncGetAttribute")


def stream_wait_value(stream: int, address: int, value: int) -> None:
    """Queue on ``stream``: wait until the int32 at ``address`` reaches ``value`` (cyclic >=)."""
    result = queueing().cuStreamWaitValue32_v2(stream, address, value & 0xFFFFFFFF, WAIT_VALUE_GEQ)
    if result:
        check(result, "cuStreamWaitValue32")


def stream_write_value(stream: int, address: int, value: int) -> None:
    """Queue on ``stream``: write ``value`` to the int32 at ``address`` after the stream's prior work."""
    result = queueing().cuStreamWriteValue32_v2(stream, address, value & 0xFFFFFFFF, WRITE_VALUE_DEFAULT)
    if result:
        check(result, "cuStreamWriteValue32")
