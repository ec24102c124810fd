"""`import kvlink` touches no GPU, NCCL or compiler; the wheel carries the CUDA sources."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_touches_no_gpu_nccl_or_compiler():
    """What ``import kvlink`` adds beyond ``import torch``: PyPI's CUDA build of torch loads
    ``cuda.bindings`` itself, which is torch's business, not kvlink's."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import kvlink, kvlink.integrations.vllm, kvlink.integrations.sglang\n"
        "gpu_roots = ('cupy', 'cupy_backends', 'cuda', 'nvidia', 'nvrtc', 'pynvml')\n"
        "added = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in gpu_roots)\n"
        "assert not added, added\n"
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


def test_every_document_the_repository_cites_is_in_it():
    """Code, tests and docs cite only documents a user of the repository can open."""
    import re
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    names = {Path(p).name for p in tracked}
    cited = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b")
    missing = []
    for path in tracked:
        if not path.endswith((".py", ".md", ".cu", ".cuh", ".sh", ".toml")) and not path.startswith(".ci/"):
            continue
        text = (ROOT / path).read_text(errors="replace")
        for match in cited.finditer(text):
            target = match.group(1)
            if "/" in target:
                found = (ROOT / target).exists() or (ROOT / path).parent.joinpath(target).exists()
            else:
                found = target in names
            if not found:
                missing.append(f"{path}: {target}")
    assert not missing, missing
