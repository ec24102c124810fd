"""The few CUDA driver calls kvlink makes directly, through ctypes on ``libcuda``.

CuPy's API covers compilation and IPC handles but not kernel launches without its own
device/stream bookkeeping (tens of microseconds a launch from Python), address ranges or stream
memory operations. Each wrapper raises :class:`CudaDriverError` naming the call and the error.
Nothing here loads at import: ``libcuda`` is opened on first use.
"""

from __future__ import annotations

import ctypes
import functools

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
    u64, u32, void_p, uint = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint
    # CUresult cuMemGetAddressRange_v2(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr)
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t), u64]
    # CUresult cuStreamWaitValue32_v2(CUstream stream, CUdeviceptr addr, cuuint32_t value, unsigned int flags)
    lib.cuStreamWaitValue32_v2.argtypes = [void_p, u64, u32, uint]
    # CUresult cuStreamWriteValue32_v2(CUstream stream, CUdeviceptr addr, cuuint32_t value, unsigned int flags)
    lib.cuStreamWriteValue32_v2.argtypes = [void_p, u64, u32, uint]
    # CUresult cuCtxGetCurrent(CUcontext* pctx)
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(void_p)]
    # CUresult cuGetErrorName(CUresult error, const char** pStr)
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    # CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
    #                         blockDimZ, unsigned int sharedMemBytes, CUstream hStream, void** kernelParams,
    #                         void** extra)
    lib.cuLaunchKernel.argtypes = [void_p, uint, uint, uint, uint, uint, uint, uint, void_p, void_p, void_p]
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
    check(libcuda().cuLaunchKernel(function, grid, 1, 1, threads, 1, 1, 0, stream, pointers, None), "cuLaunchKernel")


def launch_kernel_with_struct(function: int, grid: int, threads: int, param: bytes, stream: int) -> None:
    """cuLaunchKernel of a kernel whose one parameter is a struct passed by value (``param``'s bytes).

    The driver copies the parameter at the call, so ``param`` may be dropped right after.
    """
    buffer = ctypes.create_string_buffer(param, len(param))
    pointers = (ctypes.c_void_p * 1)(ctypes.addressof(buffer))
    check(libcuda().cuLaunchKernel(function, grid, 1, 1, threads, 1, 1, 0, stream, pointers, None), "cuLaunchKernel")


def stream_wait_value(stream: int, address: int, value: int) -> None:
    """Queue on ``stream``: wait until the int32 at ``address`` reaches ``value`` (cyclic >=)."""
    check(libcuda().cuStreamWaitValue32_v2(stream, address, value & 0xFFFFFFFF, WAIT_VALUE_GEQ),
          "cuStreamWaitValue32")


def stream_write_value(stream: int, address: int, value: int) -> None:
    """Queue on ``stream``: write ``value`` to the int32 at ``address`` after the stream's prior work."""
    check(libcuda().cuStreamWriteValue32_v2(stream, address, value & 0xFFFFFFFF, WRITE_VALUE_DEFAULT),
          "cuStreamWriteValue32")
