"""Compile every csrc/*.cu for given GPU architectures without a GPU (CI's kernel check).

Uses NVRTC through ``cuda.bindings`` when installed (the same compiler the run-time path uses),
else ``nvcc -cubin``. Run as ``python -m kvlink.compile_check [sm_80 sm_90 ...]``.

pack_unpack.cu is compiled with every instantiation of kvlink.kernels.KERNEL_NAMES (the list the
launcher compiles and launches from), and each one's symbol must be in the compiled cubin: NVRTC's
lowered name (nvrtcGetLoweredName), or for nvcc, which instantiates them through a generated file
that takes each kernel's address, the Itanium-mangled ``_Z<len><template>I<args>E`` prefix.
By default the archs are sm_80 and sm_90, plus sm_100 where the compiler supports it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from kvlink.kernels import KERNEL_INSTANTIATIONS, KERNEL_NAMES, SOURCE_NAME, csrc_dir, name_expression

REQUIRED_ARCHS = ("sm_80", "sm_90")
OPTIONAL_ARCHS = ("sm_100",)  # checked where the installed NVRTC or nvcc can compile for them
DEFAULT_ARCHS = REQUIRED_ARCHS  # kept for callers; default_archs() adds the optional ones


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One source compiled for one arch.

    ``kernels``: name expression -> its symbol in the cubin; ``resources``: name expression ->
    ptxas's report for it (registers, spill_stores, spill_loads, stack); ``log``: the compiler's log.
    """

    log: str
    kernels: dict[str, str]
    resources: dict[str, dict[str, int]]


def ptxas_resources(log: str) -> dict[str, dict[str, int]]:
    """symbol -> {registers, stack, spill_stores, spill_loads} from a ``ptxas -v`` log, per entry function."""
    resources: dict[str, dict[str, int]] = {}
    entry = properties_of = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            entry = m.group(1)
            resources[entry] = {}
        elif m := re.search(r"Function properties for (\S+)", line):
            properties_of = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if properties_of is not None and properties_of in resources:
                resources[properties_of].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                                spill_loads=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and entry is not None:
            resources[entry]["registers"] = int(m.group(1))
    return resources


def compiler() -> str | None:
    """'nvrtc' or 'nvcc', whichever is here (NVRTC first), or None."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        nvrtc.nvrtcVersion()  # loads libnvrtc: the bindings alone are not a compiler
        return "nvrtc"
    except Exception:
        pass
    return "nvcc" if shutil.which("nvcc") else None


def supported_archs(using: str) -> tuple[str, ...]:
    """The sm_XX targets the compiler can build cubins for."""
    if using == "nvrtc":
        from cuda.bindings import nvrtc

        err, archs = nvrtc.nvrtcGetSupportedArchs()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"nvrtcGetSupportedArchs: {err}")
        return tuple(f"sm_{int(a)}" for a in archs)
    result = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc --list-gpu-code failed:\n{result.stderr}")
    return tuple(re.findall(r"\bsm_\d+[a-z]?\b", result.stdout))


def default_archs(using: str) -> tuple[str, ...]:
    """REQUIRED_ARCHS, plus each of OPTIONAL_ARCHS that ``using`` supports."""
    supported = supported_archs(using)
    return REQUIRED_ARCHS + tuple(a for a in OPTIONAL_ARCHS if a in supported)


def mangled_prefix(template: str, args: tuple[int, ...]) -> str:
    """The start of the Itanium-mangled name of ``template<args...>`` (a global function, int arguments)."""
    encoded = "".join(f"Li{a}E" if a >= 0 else f"Lin{-a}E" for a in args)
    return f"_Z{len(template)}{template}I{encoded}E"


def cubin_symbols(cubin: bytes) -> set[str]:
    """Names of the function symbols (STT_FUNC) in an ELF64 cubin's symbol tables."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise RuntimeError("compiler output is not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for sym in range(offset, offset + size, entsize or 24):
            st_name, st_info = struct.unpack_from("<IB", cubin, sym)
            if st_info & 0xF == 2:  # STT_FUNC
                end = cubin.index(b"\0", strtab + st_name)
                names.add(cubin[strtab + st_name:end].decode())
    return names


def _instantiations_for(source: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return KERNEL_INSTANTIATIONS if source.name == SOURCE_NAME else ()


def _match_symbols(source: Path, arch: str, instantiations, symbols: set[str],
                   lowered: dict[str, str] | None = None) -> dict[str, str]:
    """name expression -> its symbol in ``symbols``; RuntimeError naming every one that is missing."""
    found, missing = {}, []
    for template, args in instantiations:
        name = name_expression(template, args)
        prefix = mangled_prefix(template, args)
        if lowered is not None:
            symbol = lowered.get(name)
            ok = symbol in symbols and symbol.startswith(prefix)
        else:
            candidates = sorted(s for s in symbols if s.startswith(prefix))
            symbol = candidates[0] if candidates else None
            ok = len(candidates) == 1
        if ok:
            found[name] = symbol
        else:
            missing.append(name)
    if missing:
        raise RuntimeError(f"{source.name} for {arch}: {len(missing)} kernel(s) missing from the compiled cubin: "
                           f"{', '.join(missing)}")
    return found


def _compiled(source: Path, arch: str, instantiations, log: str, symbols: set[str],
              lowered: dict[str, str] | None = None) -> Compiled:
    kernels = _match_symbols(source, arch, instantiations, symbols, lowered)
    by_symbol = ptxas_resources(log)
    return Compiled(log, kernels, {name: by_symbol.get(symbol, {}) for name, symbol in kernels.items()})


def _compile_nvrtc(source: Path, arch: str, instantiations) -> Compiled:
    from cuda.bindings import nvrtc

    def check(result, what):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{source.name} for {arch}: {what} failed: {err}")
        return rest[0] if rest else None

    names = [name_expression(t, a) for t, a in instantiations]
    program = check(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []),
                    "nvrtcCreateProgram")
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(program, name.encode()), f"nvrtcAddNameExpression({name})")
        options = [b"--std=c++17", f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v"]
        err, = nvrtc.nvrtcCompileProgram(program, len(options), options)
        log_size = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
        log_text = log.decode(errors="replace").strip("\x00 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{source.name} for {arch}: NVRTC failed:\n{log_text}")
        lowered = {}
        for name in names:
            symbol = check(nvrtc.nvrtcGetLoweredName(program, name.encode()), f"nvrtcGetLoweredName({name})")
            lowered[name] = symbol.decode() if isinstance(symbol, bytes) else str(symbol)
        size = check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return _compiled(source, arch, instantiations, log_text, cubin_symbols(cubin), lowered)


def _compile_nvcc(source: Path, arch: str, instantiations) -> Compiled:
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / f"check_{source.stem}.cu"
        # Taking each kernel's address instantiates it (what NVRTC's name expressions do).
        refs = "".join(f"    (void*)&{name_expression(t, a)},\n" for t, a in instantiations)
        unit.write_text(f'#include "{source.name}"\n'
                        + (f"void* kvlink_compile_check_refs[] = {{\n{refs}}};\n" if refs else ""))
        out = Path(tmp) / "out.cubin"
        result = subprocess.run(
            ["nvcc", "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-I", str(source.parent),
             "-o", str(out), str(unit)],
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{source.name} for {arch}: nvcc failed:\n{result.stderr}")
        cubin = out.read_bytes()
    return _compiled(source, arch, instantiations, result.stderr.strip(), cubin_symbols(cubin))


def compile_all(archs=None, using: str | None = None) -> dict[tuple[str, str], Compiled]:
    """Compile each csrc/*.cu for each arch (default: default_archs()), in parallel; raise on any error.

    Returns the result per (file, arch). pack_unpack.cu is compiled with every KERNEL_NAMES entry,
    and each must be in the cubin.
    """
    using = using or compiler()
    if using is None:
        raise RuntimeError("neither cuda.bindings (NVRTC) nor nvcc is available to compile-check the kernels")
    archs = tuple(archs) if archs else default_archs(using)
    build = _compile_nvrtc if using == "nvrtc" else _compile_nvcc
    sources = sorted(csrc_dir().glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no .cu files in {csrc_dir()}")
    jobs = [(src, arch) for src in sources for arch in archs]
    # nvcc jobs are processes and NVRTC releases the GIL while compiling: threads run them side by side.
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {job: pool.submit(build, job[0], job[1], _instantiations_for(job[0])) for job in jobs}
        errors = []
        results = {}
        for (src, arch), future in futures.items():
            try:
                results[(src.name, arch)] = future.result()
            except RuntimeError as exc:
                errors.append(str(exc))
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    verbose = "-v" in args or "--verbose" in args
    archs = tuple(a for a in args if a not in ("-v", "--verbose"))
    using = compiler()
    if using is None:
        print("neither cuda.bindings (NVRTC) nor nvcc is available to compile-check the kernels", file=sys.stderr)
        return 1
    archs = archs or default_archs(using)
    skipped = [a for a in OPTIONAL_ARCHS if a not in archs]
    results = compile_all(archs, using)
    for (name, arch), result in results.items():
        regs = {k: r["registers"] for k, r in result.resources.items() if "registers" in r}
        spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in result.resources.values())
        most = max(regs, key=regs.get) if regs else None
        print(f"ok  {name}  {arch}  ({using}): {len(result.kernels)} kernels"
              + (f", at most {regs[most]} registers ({most}), {spills} bytes spilled" if most else ""))
        if verbose:
            for kernel, res in result.resources.items():
                print(f"    {kernel}: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    print(f"checked {len(KERNEL_NAMES)} kernel instantiations for {', '.join(archs)} with {using}"
          + (f"; not {', '.join(skipped)} (not requested or not supported by this {using})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
