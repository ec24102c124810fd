"""The CUDA kernels compile for sm_80 and sm_90 without a GPU (NVRTC via cuda.bindings, or nvcc)."""

import os

import pytest

from kvlink import compile_check

REQUIRED = os.environ.get("KVLINK_REQUIRE_COMPILE_CHECK") == "1"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_source_compiles(arch):
    using = compile_check.compiler()
    if using is None:
        if REQUIRED:
            pytest.fail("KVLINK_REQUIRE_COMPILE_CHECK=1 but neither cuda.bindings nor nvcc is available")
        pytest.skip("no CUDA compiler here (install cuda-bindings or nvcc)")
    logs = compile_check.compile_all([arch], using)
    assert logs and all(name.endswith(".cu") for name, _ in logs)
    if using == "nvcc":
        # the resource report must show no local-memory spills in the copy loops
        for log in logs.values():
            assert "spill" not in log or "0 bytes spill stores" in log


def test_compile_check_reports_errors(tmp_path, monkeypatch):
    using = compile_check.compiler()
    if using is None:
        pytest.skip("no CUDA compiler here")
    (tmp_path / "broken.cu").write_text("this is not CUDA;\n")
    monkeypatch.setenv("KVLINK_CSRC_DIR", str(tmp_path))
    (tmp_path / "pack_unpack.cu").write_text("__global__ void k() { undefined_symbol(); }\n")
    with pytest.raises(RuntimeError, match="failed"):
        compile_check.compile_all(["sm_90"], using)
