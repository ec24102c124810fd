"""Compile every csrc/*.cu for given GPU architectures without a GPU (CI's kernel check).

Uses NVRTC through ``cuda.bindings`` when installed (the same compiler the run-time path uses),
else ``nvcc -cubin``. Run as ``python -m kvlink.compile_check [sm_80 sm_90 ...]``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvlink.kernels import KERNEL_KINDS, VEC_WIDTHS, csrc_dir

DEFAULT_ARCHS = ("sm_80", "sm_90")


def compiler() -> str | None:
    """'nvrtc' or 'nvcc', whichever is here (NVRTC first), or None."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        return "nvrtc"
    except Exception:
        pass
    return "nvcc" if shutil.which("nvcc") else None


def _compile_nvrtc(source: Path, arch: str) -> str:
    from cuda.bindings import nvrtc

    def check(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC error {err}")
        return rest[0] if rest else None

    program = check(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []))
    for kind in KERNEL_KINDS:
        for vec in VEC_WIDTHS:
            check(nvrtc.nvrtcAddNameExpression(program, f"kvlink_{kind}<{vec}>".encode()))
    options = [b"--std=c++17", f"--gpu-architecture={arch}".encode()]
    err, = nvrtc.nvrtcCompileProgram(program, len(options), options)
    log_size = check(nvrtc.nvrtcGetProgramLogSize(program))
    log = b" " * log_size
    check(nvrtc.nvrtcGetProgramLog(program, log))
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{source.name} for {arch}: NVRTC failed:\n{log.decode(errors='replace')}")
    return log.decode(errors="replace").strip("\x00 \n")


def _compile_nvcc(source: Path, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["nvcc", "-cubin", f"-arch={arch}", "-std=c++17", "-DKVLINK_INSTANTIATE_ALL", "-Xptxas", "-v",
             "-o", str(Path(tmp) / "out.cubin"), str(source)],
            capture_output=True, text=True, timeout=300,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{source.name} for {arch}: nvcc failed:\n{result.stderr}")
    return result.stderr.strip()


def compile_all(archs=DEFAULT_ARCHS, using: str | None = None) -> dict[tuple[str, str], str]:
    """Compile each csrc/*.cu for each arch; return the compiler's log per (file, arch); raise on error."""
    using = using or compiler()
    if using is None:
        raise RuntimeError("neither cuda.bindings (NVRTC) nor nvcc is available to compile-check the kernels")
    build = _compile_nvrtc if using == "nvrtc" else _compile_nvcc
    sources = sorted(csrc_dir().glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no .cu files in {csrc_dir()}")
    return {(src.name, arch): build(src, arch) for src in sources for arch in archs}


def main(argv=None) -> int:
    archs = tuple(argv if argv else sys.argv[1:]) or DEFAULT_ARCHS
    using = compiler()
    logs = compile_all(archs, using)
    for (name, arch), log in logs.items():
        print(f"ok  {name}  {arch}  ({using})")
        for line in log.splitlines():
            if "Used" in line:
                print("    " + line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
