"""The CUDA kernels compile without a GPU (NVRTC via cuda.bindings, or nvcc): every instantiation
in kvlink.kernels.KERNEL_NAMES, fp8 included, for sm_80 and sm_90, and sm_100 where the compiler
supports it; and KERNEL_NAMES holds every kernel the launcher can pick (pure-Python choosers)."""

import os
import re
from pathlib import Path

import pytest
import torch

from kvlink import compile_check, kernels, presets
from kvlink.layout import DTYPE_CODES
from kvlink.selection import FP8_DESTINATION_DTYPES, FP8_SOURCE_DTYPES, select, with_wire

REQUIRED = os.environ.get("KVLINK_REQUIRE_COMPILE_CHECK") == "1"
ARCHS = compile_check.REQUIRED_ARCHS + compile_check.OPTIONAL_ARCHS


def _compiler_or_skip() -> str:
    using = compile_check.compiler()
    if using is None:
        if REQUIRED:
            pytest.fail("KVLINK_REQUIRE_COMPILE_CHECK=1 but neither cuda.bindings (with libnvrtc) nor nvcc is available")
        pytest.skip("no CUDA compiler here (install cuda-bindings and nvidia-cuda-nvrtc, or nvcc)")
    return using


@pytest.fixture(scope="module")
def compiled():
    """Every csrc/*.cu for the default archs, compiled once (in parallel) for the whole module."""
    using = _compiler_or_skip()
    archs = compile_check.default_archs(using)
    return using, archs, compile_check.compile_all(archs, using)


def test_the_default_archs_are_sm80_sm90_and_sm100_where_supported(compiled):
    using, archs, results = compiled
    assert archs[:2] == ("sm_80", "sm_90")
    assert ("sm_100" in archs) == ("sm_100" in compile_check.supported_archs(using))
    assert {arch for _, arch in results} == set(archs)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_listed_kernel_is_in_the_cubin(compiled, arch):
    using, archs, results = compiled
    if arch not in archs:
        assert arch in compile_check.OPTIONAL_ARCHS
        pytest.skip(f"this {using} cannot compile for {arch}")
    assert results and all(name.endswith(".cu") for name, _ in results)
    result = results[(kernels.SOURCE_NAME, arch)]
    assert list(result.kernels) == list(kernels.KERNEL_NAMES)
    for (template, args), (name, symbol) in zip(kernels.KERNEL_INSTANTIATIONS, result.kernels.items()):
        assert symbol.startswith(compile_check.mangled_prefix(template, args)), (name, symbol)
    # ptxas reported on each kernel, and the copy loops (plain pack, unpack, copy) do not spill to local memory
    # (some fp8 kernels spill a few bytes on sm_90: kvlink.compile_check -v lists them)
    for (template, _), name in zip(kernels.KERNEL_INSTANTIATIONS, kernels.KERNEL_NAMES):
        resources = result.resources[name]
        assert resources.get("registers"), (arch, name, resources)
        if template in ("kvlink_pack", "kvlink_unpack", "kvlink_copy", "kvlink_copy_inline"):
            assert resources.get("spill_stores") == 0 and resources.get("spill_loads") == 0, (arch, name, resources)


def test_the_list_covers_every_kernel_template_in_the_source_fp8_included():
    source = kernels.kernel_source()
    in_source = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", source))
    listed = {template for template, _ in kernels.KERNEL_INSTANTIATIONS}
    assert listed == in_source
    assert {"kvlink_pack_fp8", "kvlink_unpack_fp8", "kvlink_pack_fp8_vec", "kvlink_unpack_fp8_vec"} <= listed
    for dtype in FP8_SOURCE_DTYPES:
        assert f"kvlink_pack_fp8<{DTYPE_CODES[dtype]}>" in kernels.KERNEL_NAMES
        assert f"kvlink_pack_fp8_vec<{DTYPE_CODES[dtype]}, 16>" in kernels.KERNEL_NAMES
    for dtype in FP8_DESTINATION_DTYPES:
        assert f"kvlink_unpack_fp8<{DTYPE_CODES[dtype]}>" in kernels.KERNEL_NAMES
        assert f"kvlink_unpack_fp8_vec<{DTYPE_CODES[dtype]}, 8>" in kernels.KERNEL_NAMES


def _layout(dtype, head_dim, heads=1):
    _, layout = presets.allocate("vllm_flash_attn_nhd", num_layers=1, num_blocks=2, block_size=4, num_heads=heads,
                                 head_dim=head_dim, dtype=dtype)
    return layout


def _launcher_choices() -> set[str]:
    """The kernel names launch(), launch_copy() and launch_checksum() pick, over dtypes, wire dtypes, alignments and row shapes."""
    chosen = set()
    chunk_ptrs = [4096 + offset for offset in (0, 1, 2, 4, 8, 16)]  # chunk alignment bounds the vector width
    for dtype in DTYPE_CODES:
        for head_dim in (1, 2, 3, 8, 64, 128):
            layout = _layout(dtype, head_dim, heads=2)
            sel = select(layout, [0, 1], 8)
            for kind in ("pack", "unpack"):
                for chunk_ptr in chunk_ptrs:
                    for inline in (False, True):  # metadata uploaded, or the launch's parameter
                        chosen.add(kernels._launch_plan(kind, sel, chunk_ptr, kind == "unpack", inline=inline)[0])
            vec = kernels._copy_geometry(sel, sel)[2]
            chosen.update(kernels._copy_kernel(vec, inline) for inline in (True, False))
    for kind, role, dtypes in (("pack", "source", FP8_SOURCE_DTYPES), ("unpack", "destination", FP8_DESTINATION_DTYPES)):
        for dtype in dtypes:
            elems = 16 // torch.empty(0, dtype=dtype).element_size()
            for head_dim in [lanes * elems for lanes in kernels.FP8_VEC_LANES] + [12, 20]:
                sel = with_wire(select(_layout(dtype, head_dim), [0, 1], 8), "fp8", role=role)
                for chunk_ptr in (4096, 4100):  # 16-byte aligned (vectorized) or not (generic)
                    chosen.add(kernels._launch_plan(kind, sel, chunk_ptr, kind == "unpack")[0])
    chosen.update(kernels._checksum_kernel(verify) for verify in (False, True))
    return chosen


def test_every_kernel_the_launcher_picks_is_listed_and_every_listed_one_is_picked():
    chosen = _launcher_choices()
    assert chosen <= set(kernels.KERNEL_NAMES), sorted(chosen - set(kernels.KERNEL_NAMES))
    assert chosen == set(kernels.KERNEL_NAMES), sorted(set(kernels.KERNEL_NAMES) - chosen)


def test_the_launcher_fetches_kernels_only_by_listed_names():
    source = Path(kernels.__file__).read_text()
    assert source.count("get_function(") == 1  # in _kernel, which refuses names not in KERNEL_NAMES
    assert source.count("name_expressions=") == 1 and "name_expressions=list(KERNEL_NAMES)" in source
    with pytest.raises(LookupError, match="KERNEL_NAMES"):
        kernels.kernel_name("kvlink_pack", 3)
    with pytest.raises(LookupError, match="KERNEL_NAMES"):
        kernels._kernel(0, "kvlink_pack_fp8<4>")  # refused before CuPy or a GPU is touched


def test_compile_check_fails_when_a_listed_kernel_is_missing_from_the_cubin(tmp_path, monkeypatch):
    using = _compiler_or_skip()
    (tmp_path / "pack_unpack.cu").write_text("template <int V> __global__ void kvlink_pack(int* p) { p[0] = V; }\n")
    monkeypatch.setenv("KVLINK_CSRC_DIR", str(tmp_path))
    monkeypatch.setattr(compile_check, "KERNEL_INSTANTIATIONS", (("kvlink_pack", (16,)),))
    result = compile_check.compile_all(["sm_80"], using)[("pack_unpack.cu", "sm_80")]
    assert result.kernels == {"kvlink_pack<16>": "_Z11kvlink_packILi16EEvPi"}
    symbols = set(result.kernels.values())
    with pytest.raises(RuntimeError, match=r"missing from the compiled cubin: kvlink_pack<8>$"):
        compile_check._match_symbols(tmp_path / "pack_unpack.cu", "sm_80",
                                     (("kvlink_pack", (16,)), ("kvlink_pack", (8,))), symbols)


def test_compile_check_reports_errors(tmp_path, monkeypatch):
    using = _compiler_or_skip()
    (tmp_path / "broken.cu").write_text("this is not CUDA;\n")
    monkeypatch.setenv("KVLINK_CSRC_DIR", str(tmp_path))
    (tmp_path / "pack_unpack.cu").write_text("__global__ void k() { undefined_symbol(); }\n")
    with pytest.raises(RuntimeError, match="failed"):
        compile_check.compile_all(["sm_90"], using)
