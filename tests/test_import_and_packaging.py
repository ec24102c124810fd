"""`import kvlink` touches no GPU, NCCL or compiler; the wheel carries the CUDA sources."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_touches_no_gpu_nccl_or_compiler():
    code = (
        "import sys, kvlink, torch\n"
        "bad = [m for m in ('cupy', 'cupy_backends', 'cuda', 'cuda.bindings', 'nvidia.nccl') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('clean')\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_wheel_ships_the_cuda_sources(tmp_path):
    pytest.importorskip("setuptools")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("kvlink-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvlink/csrc/pack_unpack.cu" in names, names


def test_sources_found_in_installed_layout(tmp_path, monkeypatch):
    """kernels.csrc_dir() looks in the package (wheel) before the checkout."""
    from kvlink import kernels
    assert (kernels.csrc_dir() / "pack_unpack.cu").is_file()
    monkeypatch.setenv("KVLINK_CSRC_DIR", str(tmp_path))
    (tmp_path / "pack_unpack.cu").write_text("// test\n")
    assert kernels.kernel_source() == "// test\n"
