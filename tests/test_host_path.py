"""The per-request host path on the CPU: exact validation, launch parameters as the CUDA structs lay
them out, launch plans, the handle's completion flags, the benchmark's machine choice.

The GPU calls themselves are replaced by a recorder here (a launch's parameter bytes are what
the kernel reads); tests/test_gpu_kernels.py and the transfer tests run them on a GPU.
"""

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvlink
from kvlink import cuda_driver, kernels
from kvlink.handle import _Flag
from kvlink.selection import checked_block_ids, select
from kvlink.wire import ChunkHeader, header_bytes
from roundtrip import make_cache

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("ids", [
    [0, 3, 9], (9,), np.array([4, 2], dtype=np.int32), np.array([1, 8], dtype=">i8"), np.array([7], dtype=np.uint16),
    torch.tensor([5, 6, 0]), torch.tensor([3, 1, 2, 0])[::2], [np.int64(2), 3],
])
def test_valid_block_ids_come_back_as_a_private_int32_copy(ids):
    got = checked_block_ids(ids, 10)
    want = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids).astype(np.int64)
    assert got.dtype == np.int32 and got.tolist() == want.tolist()
    if isinstance(ids, np.ndarray):
        assert not np.shares_memory(got, ids)


@pytest.mark.parametrize("ids,index,value", [
    ([0, 10, 1], 1, 10), ([-1, 2], 0, -1), (np.array([3, -4], dtype=">i4"), 1, -4), (np.array([2**40]), 0, 2**40),
    (torch.tensor([1, -7]), 1, -7), (np.array([2**64 - 1], dtype=np.uint64), 0, 2**64 - 1), ([12], 0, 12),
])
def test_an_id_out_of_range_is_named_with_its_position(ids, index, value):
    with pytest.raises(ValueError, match=rf"block_ids\[{index}\]={value} is out of range \[0, 10\) for x"):
        checked_block_ids(ids, 10, where="for x")
    with pytest.raises(ValueError, match=rf"\[{index}\]={value} is out of range"):
        checked_block_ids(ids, 10, distinct=True)


@pytest.mark.parametrize("ids,kind,match", [
    ([1.0, 2.0], TypeError, "must hold integers"), ([True, False], TypeError, "must hold integers"),
    (["1"], TypeError, "must hold integers"), ([2**70], TypeError, "must hold integers"),
    (torch.tensor([1.5]), TypeError, "must hold integers"), ([[1, 2]], ValueError, "must be 1-D"),
    ([], ValueError, "is empty"),
])
def test_what_is_not_a_list_of_block_ids_is_refused_by_name(ids, kind, match):
    with pytest.raises(kind, match=match):
        checked_block_ids(ids, 10, name="block_ids")


def test_repeated_destination_blocks_are_refused_and_sources_may_repeat():
    with pytest.raises(ValueError, match="destination dst repeat block 4"):
        checked_block_ids([4, 5, 4], 10, name="dst", distinct=True)
    with pytest.raises(ValueError, match="repeat block 0"):
        checked_block_ids(torch.tensor([0, 3, 0, 3]), 10, distinct=True)
    assert checked_block_ids([4, 5, 4], 10).tolist() == [4, 5, 4]


def test_a_box_and_the_fp8_form_keep_every_other_field(generator):
    cache = make_cache("vllm_flash_attn_nhd", generator, num_blocks=10, block_size=4)
    sel = select(cache.layout, [1, 2, 3], 10, heads=(1, 3), destination=True)
    box = sel.box((1, 2), (3, 7))
    assert (box.layer_start, box.layer_stop, box.token_start, box.token_stop) == (1, 2, 3, 7)
    assert (box.head_start, box.head_stop, box.num_tokens, box.layout) == (1, 3, 10, cache.layout)
    assert box.block_ids is sel.block_ids and (sel.layer_start, sel.token_stop) == (0, 10)  # the original is untouched
    assert box.payload_bytes == 1 * 2 * 4 * 2 * cache.layout.row_bytes
    header = ChunkHeader.for_selection(box)
    assert header == ChunkHeader.from_bytes(header.to_bytes()) and header_bytes(box) == header.to_bytes()


# ---------------------------------------------------------------------------------- launch parameters
class Launches:
    """Stands in for the driver: records each launch's function, grid, stream and parameter bytes."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(kernels, "_function_handle", lambda device, name: hash(name) & 0xFFFF)
        monkeypatch.setattr(cuda_driver, "ensure_context", lambda device: None)
        monkeypatch.setattr(cuda_driver, "launch_with_params", self._launch)
        monkeypatch.setattr(kernels, "_INLINE_LAUNCH", [True])

    def _launch(self, function, grid, threads, params, stream):
        self.calls.append((function, grid, stream, bytes(params.view)))


def with_plane_table(layout, address=0x10000):
    kernels._layout_facts(layout)["table"] = address
    return layout


def test_the_chunk_parameter_struct_matches_the_cuda_source():
    source = kernels.kernel_source()
    struct = re.search(r"struct __align__\(16\) ChunkParams \{(.*?)\};", source, re.S).group(1)
    fields = re.findall(r"^\s*(u64|u32|unsigned char) (\w+)(\[\w+\])?;", struct, re.M)
    assert [f[1] for f in fields] == ["plane_ptrs", "chunk", "status", "pad", "meta"]
    assert kernels.CHUNK_PARAMS_HEADER.size == 3 * 8 + 2 * 4 and kernels.CHUNK_PARAMS_BYTES % 16 == 0
    assert kernels.CHUNK_PARAMS_BYTES == kernels.CHUNK_PARAMS_HEADER.size + kernels.INLINE_META_BYTES <= 4096
    assert kernels.INLINE_MAX_IDS == (kernels.INLINE_META_BYTES - kernels.META_BLOCK_IDS_OFFSET) // 4


@pytest.mark.parametrize("kind", ["pack", "unpack"])
def test_an_inline_launch_passes_the_metadata_record_the_uploaded_kernels_read(kind, generator, monkeypatch):
    launches = Launches(monkeypatch)
    cache = make_cache("vllm_flash_attn_nhd", generator, num_blocks=40, block_size=16, head_dim=64)
    layout = with_plane_table(cache.layout)
    sel = select(layout, [7, 3, 31, 2], 60, layers=(1, 3), tokens=(5, 50), heads=(1, 3))
    params = cuda_driver.ParamBuffer(kernels.CHUNK_PARAMS_BYTES)
    assert kernels._launch_record(kind, params, sel, 0x2000, None, 0x3000, kind == "unpack", None, 99, sel.block_ids)
    (function, grid, stream, raw), = launches.calls
    geometry, vec, num_tiles = kernels._geometry(sel, 0x2000, kind == "unpack")
    assert function == hash(kernels._INLINE_KERNELS[kind, vec]) & 0xFFFF and stream == 99 and grid == num_tiles
    planes, chunk, status = kernels.CHUNK_PARAMS_HEADER.unpack_from(raw)
    assert (planes, chunk, status) == (0x10000 + 8 * 2 * 1, 0x2000, 0x3000)  # layer 1's K plane: 2 planes a layer
    meta = raw[kernels.CHUNK_PARAMS_HEADER.size:]
    want = kernels._metadata(geometry, header_bytes(sel), sel.block_ids)
    assert meta[:kernels.GEOMETRY_STRUCT.size] == want[:kernels.GEOMETRY_STRUCT.size]
    assert meta[kernels.META_HEADER_OFFSET:len(want)] == want[kernels.META_HEADER_OFFSET:]


def test_a_box_launcher_writes_the_request_ids_once_and_each_box_its_own_record(generator, monkeypatch):
    launches = Launches(monkeypatch)
    cache = make_cache("vllm_flash_attn_nhd", generator, num_blocks=40, block_size=16, head_dim=64)
    layout = with_plane_table(cache.layout)
    sel = select(layout, list(range(10, 30, 2)), 150, destination=True)
    launcher = kernels.BoxLauncher("unpack", sel, status_ptr=0x4000)
    assert launcher.usable
    for box in ((0, 1, 0, 150), (1, 3, 0, 64), (3, 4, 100, 150)):
        part = sel.box(box[:2], box[2:])
        assert launcher.launch(box, 0x8000, 5)
        raw = launches.calls[-1][3]
        assert kernels.CHUNK_PARAMS_HEADER.unpack_from(raw)[2] == 0x4000  # the request's shared status word
        meta = raw[kernels.CHUNK_PARAMS_HEADER.size:]
        want = kernels._metadata(kernels._geometry(part, 0x8000, False)[0], header_bytes(part), sel.block_ids)
        assert meta[:kernels.GEOMETRY_STRUCT.size] == want[:kernels.GEOMETRY_STRUCT.size]
        assert meta[kernels.META_HEADER_OFFSET:len(want)] == want[kernels.META_HEADER_OFFSET:]
    fp8 = kvlink.selection.with_wire(sel, "fp8", role="destination")
    assert not kernels.BoxLauncher("unpack", fp8).usable  # fp8 kernels take uploaded metadata
    many = select(make_cache("vllm_flash_attn_nhd", generator, num_blocks=1000, block_size=1, num_layers=1,
                             num_heads=1, head_dim=8).layout, list(range(kernels.INLINE_MAX_IDS + 1)),
                  kernels.INLINE_MAX_IDS + 1)
    assert not kernels.BoxLauncher("pack", many).usable


def test_the_in_place_copy_parameters_equal_the_built_ones(generator):
    src = make_cache("vllm_flash_attn_nhd", generator, head_dim=64)
    dst = make_cache("flashinfer_hnd", generator, head_dim=64, block_size=8, num_blocks=90)
    a = select(src.layout, [3, 1, 4], 40)
    b = select(dst.layout, [9, 2, 6, 5, 3], 40, destination=True)
    src_geometry, dst_geometry, _, _ = kernels._copy_geometry(a, b)
    built = kernels._inline_copy_params(kernels._metadata(src_geometry, b"", a.block_ids),
                                        kernels._metadata(dst_geometry, b"", b.block_ids), 0x1111, 0x2222)
    params = cuda_driver.ParamBuffer(kernels.INLINE_PARAMS_BYTES)  # zeroed, as _metadata's padding is
    kernels.write_copy_params(params.view, a, b, src_geometry, dst_geometry, 0x1111, 0x2222)
    assert bytes(params.view) == built
    assert kernels._copy_plan(a, b) == kernels._copy_geometry(a, b) and kernels._copy_plan(a, b) is \
        kernels._copy_plan(a, b)


def test_launch_plans_are_kept_per_shape_and_chunk_alignment(generator):
    cache = make_cache("vllm_flash_attn_nhd", generator, num_blocks=40, block_size=16, head_dim=64)
    sel = select(cache.layout, [1, 2, 3], 40)
    other_blocks = select(cache.layout, [9, 8, 7], 40)
    plan = kernels._chunk_plan(sel, 4096, False)
    assert kernels._chunk_plan(other_blocks, 4096 + 16, False) is plan  # the ids and a 16-byte shift change nothing
    assert kernels._chunk_plan(sel, 4096 + 4, False)[2] == 4 and plan[2] == 16  # the vector width follows alignment
    assert kernels._chunk_plan(sel, 4096, True) != plan  # an own status word is in the record
    geometry, vec, num_tiles = kernels._geometry(sel, 4096, False)
    assert plan == (geometry, header_bytes(sel), vec, num_tiles)


# ---------------------------------------------------------------------------------- handles
def test_a_completion_flag_behaves_as_an_event():
    flag = _Flag()
    assert not flag.is_set() and flag.wait(0) is False and flag.wait(0.01) is False
    woken = []
    waiters = [threading.Thread(target=lambda: woken.append(flag.wait(60))) for _ in range(4)]
    for t in waiters:
        t.start()
    time.sleep(0.05)  # most waiters block first (one that starts late finds the flag set: True as well)
    flag.set()
    flag.set()  # a second set is a no-op
    for t in waiters:
        t.join(60)
    assert woken == [True] * 4 and flag.is_set() and flag.wait() and flag.wait(-1)


# ---------------------------------------------------------------------------------- the benchmark
def test_the_benchmark_picks_its_machine():
    from kvlink.bench import choose_backend, parse_args

    assert choose_backend("auto", 2, True, True) == "nccl"
    assert choose_backend("auto", 1, False, True) == "gpu"  # one GPU: both processes on it, over ipc
    assert choose_backend("auto", 1, False, False) == "host" and choose_backend("auto", 0, False, False) == "host"
    assert choose_backend("host", 2, True, True) == "host"
    args = parse_args(["--backend", "gpu"])
    assert (args.kvlink_transport, args.methods, args.layers, args.num_blocks) == ("ipc", ["kvlink", "copy"], 32, 2048)
    assert (args.concurrent, args.concurrent_tokens) == (64, 512) and 16 in args.tokens and 4096 in args.tokens
    for bad in (["--methods", "raw"], ["--transport", "nccl"], ["--wire-dtype", "fp8"]):
        with pytest.raises(SystemExit):
            parse_args(["--backend", "gpu", *bad])


def test_host_costs_runs_its_cpu_part(tmp_path):
    import json

    out = tmp_path / "costs.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_costs.py"), "--parts", "D", "--calls", "16",
                             "--warmup", "4", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    names = {f["name"] for f in report["figures"]}
    assert {"host pull() wall, CPU caches, 16 tokens", "host pull() CPU, CPU caches, 16 tokens"} <= names
    assert report["wrong_bytes"] == 0 and not report["failed"]
    assert {t["status"] for t in report["targets"]} == {"not measured"}  # the GPU figures need a GPU
    assert "verified host pulls" in result.stdout and "targets" in result.stdout
