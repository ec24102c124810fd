"""kvlink's main job, measured: move KV caches between two processes and compare with baselines.

    python -m kvlink.bench                       # NCCL across two GPUs, ipc on one GPU, or the host path on a CPU
    kvlink-bench --backend host --layers 4 --tokens 16 256 --iters 5

With ``--prefill-tp``/``--decode-tp`` above 1 it runs that topology instead, one process per
rank, against the homogeneous transfer of one link's share (:mod:`kvlink.bench_tp`).
``--src-layout``, ``--dst-layout``, ``--dst-block-size`` and ``--wire-dtype fp8`` convert on
the way.

It starts the prefill and decode sides itself (one process each), sweeps request sizes, and
for each size measures, in the same run:

- ``kvlink``: a decode-side pull through :class:`kvlink.Endpoint`, timed from ``pull()`` to
  completion seen by the host, on the transport the endpoints pick (``--transport``): on two
  GPUs of one host CUDA IPC (one copy kernel reading across NVLink), else NCCL (pack -> send ->
  unpack, pipelined), or the host path;
- ``raw``: one send/recv of the same number of contiguous bytes, the sender already waiting
  (NCCL on GPUs, ZeroMQ on the host path): the wire's own time;
- ``copy`` (one GPU, where both processes share it and NCCL cannot link them): a device-to-device
  copy of the same number of contiguous bytes on that GPU (torch ``copy_``), timed like kvlink's
  pulls, from the call to its completion seen by the host: what any transfer on one GPU costs;
- ``naive``: gather with torch (index_select per layer) -> one send -> scatter with torch;
- ``kvlink xN``: N kvlink pulls in flight at once (``--concurrent``), timed until the last is done;
- ``kvlink layerwise``: a layer-wise pull whose prefill side calls ``layer_ready()`` layer by
  layer; reported as the time from the last ``layer_ready()`` to completion (no GB/s).

Every case runs ``--warmup`` untimed and ``--iters`` timed iterations; it is reported as the
median with the min, p10, p90 and max (:func:`kvlink.timing.spread`). Every received byte is
checked against the sender's cache, rebuilt on the decode side from the seed (nothing is copied
across for checking); the exit code is 1 on any wrong byte. One progress line per case goes to
stderr as it finishes; at the end an nccl-tests-style table with a legend (what each method
measures, what the columns are) goes to stdout, ``--json`` gets one record per case
(:func:`make_record`) and ``--plot`` a PNG of bandwidth and time against size (it needs
matplotlib, ``pip install 'kvlink[plot]'``, and the run stops at once without it).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from kvlink.timing import spread

MiB = 1 << 20
LAYER_GAP_S = 0.002  # layer-wise case: the prefill side's pause between two layer_ready() calls


# ------------------------------------------------------------------------------------- setup
PLOT_HINT = "pip install 'kvlink[plot]'"


def build_parser() -> argparse.ArgumentParser:
    """The command line. Defaults that differ between two GPUs (W1) and the host path are stated once, in the help."""
    p = argparse.ArgumentParser(
        prog="kvlink-bench", description=__doc__.split("\n\n")[0],
        epilog="Where two defaults are given, the first is for GPUs (the W1 shape of docs/design.md, on two GPUs or "
               "one) and the second for the host path (CPU only, TCP on loopback).")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="the baselines' wire and the machine: nccl = two GPUs; gpu = one GPU shared by both "
                        "processes (kvlink over CUDA IPC, baseline a device copy); host = CPU processes over TCP; "
                        "auto (default) = nccl with two GPUs and NCCL, gpu with one GPU, else host")
    p.add_argument("--transport", choices=("auto", "ipc", "nccl", "host"), default="auto",
                   help="kvlink's own link. On two GPUs: auto (default) = CUDA IPC when both are on one host, "
                        "else NCCL; ipc and nccl force one. On one GPU only auto or ipc, on the host path only "
                        "auto or host (TCP) is allowed")
    p.add_argument("--layers", type=int, default=None, help="layers in each cache (default 32 / 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads in each cache (default 8 / 4)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="head dimension, or the latent width of an MLA layout (default 128 / 64)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per block of the prefill cache, and of the decode cache unless "
                        "--dst-block-size (default 16)")
    p.add_argument("--num-blocks", type=int, default=None, help="blocks in each side's cache (default 2048 / 512)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="request sizes in tokens, one case each (default 16 128 512 1024 4096 / 16 256 2048)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="element type of both caches (default bfloat16)")
    p.add_argument("--layout", default="vllm_flash_attn_nhd",
                   help="preset of both caches, one of kvlink.presets.PRESETS (default vllm_flash_attn_nhd)")
    p.add_argument("--src-layout", default=None, help="the prefill cache's preset (default --layout)")
    p.add_argument("--dst-layout", default=None, help="the decode cache's preset (default --layout)")
    p.add_argument("--dst-block-size", type=int, default=None,
                   help="the decode cache's tokens per block (default --block-size)")
    p.add_argument("--wire-dtype", choices=("none", "fp8"), default="none",
                   help="fp8: kvlink pulls quantize to e4m3 with a scale per token and head (lossy; checked "
                        "against the reference conversion); needs --transport nccl on GPUs (default none)")
    p.add_argument("--prefill-tp", type=int, default=1, help="prefill ranks, one process (and GPU) each (default 1)")
    p.add_argument("--decode-tp", type=int, default=1, help="decode ranks, one process (and GPU) each (default 1)")
    p.add_argument("--iters", type=int, default=20,
                   help="timed iterations of every case; the table reports their median, min and max (default 20)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed iterations before the timed ones of every case (default 3)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of kvlink,raw,naive (two GPUs, host path) or kvlink,copy (one GPU); "
                        "default all of them")
    p.add_argument("--concurrent", type=int, default=None,
                   help="requests in flight in the concurrency case, 0 skips it (default 64 / 8)")
    p.add_argument("--concurrent-tokens", type=int, default=None,
                   help="tokens per concurrent request (default 512 / 256)")
    layerwise = p.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True)
    # set after construction: some Pythons' BooleanOptionalAction append their own "(default: True)"
    layerwise.help = ("measure the layer-wise case: the prefill side submits the layers one by one, and the time "
                      "from the last layer_ready() to completion is reported (default on; --no-layerwise skips it)")
    p.add_argument("--chunk-mb", type=int, default=None, help="staging chunk size in MiB (default kvlink's own)")
    p.add_argument("--max-ctas", type=int, default=None,
                   help="thread blocks for pack/unpack during transfers (default kvlink's own)")
    p.add_argument("--seed", type=int, default=2026,
                   help="seed of the caches' contents and of the block choices (default 2026)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the run's settings and one record per case (method, size) here")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG here: bandwidth and time against request size, every case, min-max bars; "
                        f"needs matplotlib: {PLOT_HINT}")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds any one transfer or handshake may take before the run fails (default 60)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="directory for torch.profiler traces (prefill.json, decode.json) of one pull of the "
                        "largest size")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot:  # asked for a file: fail now, before minutes of benchmark, if it cannot be written
        if not plotting_available():
            p.error(f"--plot needs matplotlib, which is not installed: {PLOT_HINT} (or pip install matplotlib)")
    from kvlink import presets
    args.src_layout = args.src_layout or args.layout
    args.dst_layout = args.dst_layout or args.layout
    args.dst_block_size = args.dst_block_size or args.block_size
    for name in (args.src_layout, args.dst_layout):
        if name not in presets.PRESETS:
            p.error(f"unknown layout {name!r}; choose from {', '.join(presets.PRESETS)}")
    if (args.src_layout in presets.MLA_PRESETS) != (args.dst_layout in presets.MLA_PRESETS):
        p.error(f"--src-layout {args.src_layout} and --dst-layout {args.dst_layout}: MLA meets only MLA")
    args.wire_dtype = None if args.wire_dtype == "none" else args.wire_dtype
    for value, name in ((args.prefill_tp, "--prefill-tp"), (args.decode_tp, "--decode-tp"),
                        (args.dst_block_size, "--dst-block-size")):
        if value <= 0:
            p.error(f"{name} must be positive, got {value}")
    # The W1 shape (docs/design.md) on GPUs; a shape a small CPU-only machine moves in seconds on the host path.
    args.backend = pick_backend(args.backend)
    if args.backend == "host" and args.transport not in ("auto", "host"):
        p.error(f"--transport {args.transport} needs GPUs; the host path links over TCP")
    if args.backend == "gpu" and args.transport not in ("auto", "ipc"):
        p.error(f"--transport {args.transport} needs two GPUs; on one GPU both processes link over ipc")
    args.kvlink_transport = {"host": "host", "gpu": "ipc"}.get(args.backend, args.transport)
    w1 = args.backend in ("nccl", "gpu")
    for name, gpu_default, host_default in (("layers", 32, 4), ("kv_heads", 8, 4), ("head_dim", 128, 64),
                                            ("num_blocks", 2048, 512), ("tokens", [16, 128, 512, 1024, 4096],
                                                                        [16, 256, 2048]),
                                            ("concurrent", 64, 8), ("concurrent_tokens", 512, 256)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if w1 else host_default)
    allowed = METHODS[args.backend]
    args.methods = [m.strip() for m in (args.methods or ",".join(allowed)).split(",") if m.strip()]
    bad = set(args.methods) - set(allowed)
    if bad:
        p.error(f"methods {sorted(bad)} are not measured with --backend {args.backend} (it has {', '.join(allowed)})")
    for value, name in ((args.layers, "--layers"), (args.kv_heads, "--kv-heads"), (args.head_dim, "--head-dim"),
                        (args.block_size, "--block-size"), (args.num_blocks, "--num-blocks"), (args.iters, "--iters")):
        if value <= 0:
            p.error(f"{name} must be positive, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must not be negative, got {args.warmup}")
    if args.src_layout in presets.MLA_PRESETS:
        args.kv_heads = 1  # MLA's latent: --head-dim is its width
    if args.wire_dtype and args.backend == "gpu":
        p.error("--wire-dtype fp8 needs a wire: two GPUs and --transport nccl (one GPU links over ipc)")
    if args.wire_dtype and args.backend == "nccl" and args.transport in ("auto", "ipc"):
        if args.transport == "ipc":
            p.error("--wire-dtype fp8 needs a wire: --transport nccl (an ipc pull copies the cache's own bytes)")
        args.kvlink_transport = "nccl"
    if (args.prefill_tp > 1 or args.decode_tp > 1) and args.backend == "gpu":
        p.error("--prefill-tp/--decode-tp need a GPU per rank (or the host path: --backend host)")
    if args.prefill_tp > 1 or args.decode_tp > 1:
        from kvlink.resharding import plan_resharding
        try:
            plan_resharding(args.kv_heads, args.prefill_tp, args.decode_tp,
                            mla=args.src_layout in presets.MLA_PRESETS)
        except ValueError as exc:
            p.error(str(exc))
        if args.backend == "nccl" and torch.cuda.device_count() < args.prefill_tp + args.decode_tp:
            p.error(f"--prefill-tp {args.prefill_tp} --decode-tp {args.decode_tp} needs "
                    f"{args.prefill_tp + args.decode_tp} GPUs, {torch.cuda.device_count()} visible")
    args.dst_num_blocks = args.num_blocks * args.block_size // args.dst_block_size
    if -(-max(args.tokens) // args.block_size) > args.num_blocks or \
            -(-max(args.tokens) // args.dst_block_size) > args.dst_num_blocks:
        p.error(f"--tokens {max(args.tokens)} needs more than --num-blocks {args.num_blocks} blocks")
    if args.concurrent and (-(-args.concurrent_tokens // args.block_size) * args.concurrent > args.num_blocks or
                            -(-args.concurrent_tokens // args.dst_block_size) * args.concurrent > args.dst_num_blocks):
        p.error(f"{args.concurrent} x {args.concurrent_tokens} tokens need more than --num-blocks {args.num_blocks}")
    return args


BACKENDS = ("auto", "nccl", "gpu", "host")
METHODS = {"nccl": ("kvlink", "raw", "naive"), "host": ("kvlink", "raw", "naive"), "gpu": ("kvlink", "copy")}


def choose_backend(requested: str, gpus: int, nccl_available: bool, kernels_available: bool) -> str:
    """The machine the benchmark runs on, for ``--backend requested`` (pure: the facts are arguments).

    auto: two GPUs with NCCL -> "nccl"; exactly one GPU with kvlink's kernels (CuPy) -> "gpu" (both
    processes on it, kvlink over ipc, against a device copy); else "host" (CPU processes, TCP).
    """
    if requested != "auto":
        return requested
    if gpus >= 2 and nccl_available:
        return "nccl"
    if gpus == 1 and kernels_available:
        return "gpu"
    return "host"


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    from kvlink import kernels, nccl
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_backend(requested, gpus, gpus >= 2 and nccl.available(), gpus == 1 and kernels.cuda_available())


def side_device(backend: str, side: str) -> str:
    """The device of the prefill or decode process: two GPUs, one shared GPU, or the CPU."""
    if backend == "nccl":
        return "cuda:0" if side == "prefill" else "cuda:1"
    return "cuda:0" if backend == "gpu" else "cpu"


def shape_of(args, side: str = "src", num_heads: int | None = None) -> dict:
    """One side's cache shape: the source's block size and block count, or the destination's."""
    return dict(num_layers=args.layers, num_blocks=args.num_blocks if side == "src" else args.dst_num_blocks,
                block_size=args.block_size if side == "src" else args.dst_block_size,
                num_heads=args.kv_heads if num_heads is None else num_heads, head_dim=args.head_dim,
                dtype=getattr(torch, args.dtype))


def build_cache(args, seed: int, device: str, side: str = "src", num_heads: int | None = None):
    """The cache of one side, filled from ``seed`` so the other side can rebuild it for checking.

    With fp8 on the wire the bytes are finite values (normal, per-row magnitudes spread over
    2**-4..2**4), since e4m3 has no encoding for the NaN patterns random bytes hold.
    """
    from kvlink import presets
    gen = torch.Generator(device=device).manual_seed(seed)

    def fill(t: torch.Tensor) -> None:
        if args.wire_dtype and t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=gen, device=device).to(t.dtype) *
                    torch.exp2(torch.randint(-4, 5, t.shape[:-1], generator=gen, device=device)).to(t.dtype)[..., None])
        else:
            t.view(torch.uint8).random_(0, 256, generator=gen)

    preset = args.src_layout if side == "src" else args.dst_layout
    return presets.allocate(preset, device=device, fill=fill, **shape_of(args, side, num_heads))


def pattern(nbytes: int, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256, generator=gen)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_device_copy(nbytes: int, iters: int, warmup: int, seed: int, device: str,
                     timeout: float) -> tuple[list[float], list[float], int]:
    """The ``copy`` baseline: ``dst.copy_(src)`` of ``nbytes`` contiguous bytes on the GPU, timed as
    kvlink's pulls are, from the call until the host sees it complete (an event polled with
    sleep(0), as ``TransferHandle.wait`` polls an ipc pull). Returns the wall times, the GPU times
    (CUDA events around the copy) and the bytes that differ at the end."""
    src = pattern(nbytes, seed, device)
    dst = torch.empty_like(src)
    walls, gpu = [], []
    for i in range(warmup + iters):
        dst.zero_()
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        dst.copy_(src)
        end.record()
        while not end.query():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"a device copy of {nbytes} bytes not done after {timeout:.0f} s")
            time.sleep(0)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            walls.append(elapsed)
            gpu.append(start.elapsed_time(end) * 1e-3)
    wrong = int((dst != src).sum().item())
    del src, dst
    torch.cuda.empty_cache()
    return walls, gpu, wrong


def share_cpus(processes: int) -> None:
    """On the host path every side is a process of one machine: give each its share of the cores.

    Left alone, each process's torch starts a thread per core, and on a small machine their
    spinning threads contend for the cores (the naive baseline's gathers went 50x slower on two
    cores); separate machines would each have their own.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // processes))


# ------------------------------------------------------------------------------------- records
def make_record(method: str, tokens: int, nbytes: int, seconds: list[float], wrong_bytes: int, *, warmup: int,
                completed: bool = True, rate: bool = True, **extra) -> dict:
    """One case's JSON record, built the same way by kvlink.bench and kvlink.bench_tp.

    ``seconds`` are the timed iterations (after ``warmup`` untimed ones). ``time_us`` is their
    median, ``time_min_us``/``time_p10_us``/``time_p90_us``/``time_max_us`` their spread and
    ``samples_us`` all of them; ``GBps`` is ``bytes`` over the median time (``GBps_min`` and
    ``GBps_max`` over the slowest and the fastest iteration), or None for a case that is no
    transfer rate (``rate=False``: the layer-wise tail). ``verified`` is True iff the transfer
    completed and no received byte was wrong.
    """
    s = spread(seconds)
    record = dict(method=method, tokens=tokens, bytes=nbytes, iters=s.n, warmup=warmup,
                  time_us=s.median_us, time_min_us=s.min_us, time_p10_us=s.p10_us, time_p90_us=s.p90_us,
                  time_max_us=s.max_us,
                  GBps=nbytes / s.median_us / 1e3 if rate else None,
                  GBps_min=nbytes / s.max_us / 1e3 if rate else None,
                  GBps_max=nbytes / s.min_us / 1e3 if rate else None,
                  verified=bool(completed and wrong_bytes == 0), wrong_bytes=int(wrong_bytes))
    record.update(extra)
    record["samples_us"] = s.samples_us
    return record


def progress_line(record: dict, done: int | None = None, total: int | None = None) -> str:
    """One line per finished case, for stderr while the run goes on."""
    count = f"[{done:>{len(str(total))}}/{total}] " if done is not None and total else ""
    rate = f"{fmt_rate(record['GBps']):>8} GB/s" if record.get("GBps") is not None else f"{'':>8} (after last layer)"
    extra = "".join(f" {k}={v:.0f}" for k, v in record.items()
                    if k.endswith("_us") and not k.startswith("time_") and isinstance(v, (int, float)))
    return (f"  {count}{record['method']:<16} {record['tokens']:>7} tokens {record['bytes'] / MiB:>9.2f} MiB "
            f"{record['time_us']:>10.1f} us (min {record['time_min_us']:.1f}, max {record['time_max_us']:.1f}) "
            f"{rate}  wrong={record['wrong_bytes']}{extra}")


def fmt_rate(gbps: float | None) -> str:
    """GB/s for the table: two decimals, or three significant digits below 1 (no "0.00" for a slow case)."""
    if gbps is None:
        return "-"
    return f"{gbps:.2f}" if gbps >= 1 else f"{gbps:.3g}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------- the raw link
class RawLink:
    """A plain point-to-point channel for the baselines: NCCL on GPUs, a ZeroMQ PAIR socket on the host."""

    def __init__(self, backend: str, device: str, rank: int, setup, timeout: float):
        self.backend, self.device = backend, device
        if backend == "nccl":
            from kvlink import nccl
            self.comm = nccl.Communicator(setup, rank, torch.device(device).index, timeout=timeout, peer="bench-peer")
            self.stream = torch.cuda.Stream(device)
        else:
            import zmq
            self.zmq = zmq
            self.socket = zmq.Context.instance().socket(zmq.PAIR)
            self.socket.setsockopt(zmq.LINGER, 0)
            if rank == 1:
                self.socket.bind(setup)
            else:
                self.socket.connect(setup)

    def send(self, buffer: torch.Tensor) -> None:
        if self.backend == "nccl":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.comm.send(buffer.data_ptr(), buffer.numel(), self.stream)
        else:
            self.socket.send(buffer.numpy(), copy=False)

    def recv(self, buffer: torch.Tensor) -> None:
        if self.backend == "nccl":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.comm.recv(buffer.data_ptr(), buffer.numel(), self.stream)
        else:
            frame = self.socket.recv(copy=False)
            buffer.copy_(torch.frombuffer(bytearray(frame.buffer), dtype=torch.uint8))

    def finish(self) -> None:
        """Wait for what this side queued (GPU) to complete."""
        if self.backend == "nccl":
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.stream.synchronize()


def gather_torch(layout, engine_layers, block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """The naive path's gather: one index_select per layer plane into a contiguous buffer."""
    per_plane = out.numel() // layout.num_planes
    for p, plane in enumerate(layout.planes):
        dst = out[p * per_plane:(p + 1) * per_plane].view(torch.uint8)
        torch.index_select(plane.view(torch.uint8) if plane.dtype != torch.uint8 else plane, 0, block_ids,
                           out=dst.view(block_ids.numel(), *plane.shape[1:-1], plane.shape[-1] * plane.element_size()))


def scatter_torch(layout, block_ids: torch.Tensor, data: torch.Tensor) -> None:
    """The naive path's scatter: one index_copy per layer plane out of a contiguous buffer."""
    per_plane = data.numel() // layout.num_planes
    for p, plane in enumerate(layout.planes):
        raw = plane.view(torch.uint8) if plane.dtype != torch.uint8 else plane
        src = data[p * per_plane:(p + 1) * per_plane].view(block_ids.numel(), *raw.shape[1:])
        raw.index_copy_(0, block_ids, src)


def start_profiler(backend: str):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if backend in ("nccl", "gpu") else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def stop_profiler(profiler, path: str) -> None:
    profiler.__exit__(None, None, None)
    profiler.export_chrome_trace(path)


# ------------------------------------------------------------------------------------- prefill
def prefill_main(args, backend: str, conn, results) -> None:
    faulthandler.dump_traceback_later(120, repeat=True)  # a stuck run shows where
    logging.basicConfig(level=logging.INFO, format="[prefill] %(message)s", stream=sys.stderr)
    import kvlink
    device = side_device(backend, "prefill")
    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    else:
        share_cpus(2)
    try:
        engine, layout = build_cache(args, args.seed, device)
        chunk_bytes = args.chunk_mb * MiB if args.chunk_mb else None
        endpoint = kvlink.Endpoint(layout, name="prefill", transport=args.kvlink_transport, chunk_bytes=chunk_bytes,
                                   timeout=args.timeout, max_ctas=args.max_ctas)
        conn.send(("address", endpoint.address))
        raw = None
        while True:
            if not conn.poll(args.timeout * 4):
                raise TimeoutError("prefill: decode side went quiet")
            command, *rest = conn.recv()
            if command == "stop":
                break
            if command == "raw_setup":
                raw = RawLink(backend, device, 0, rest[0], args.timeout)
                conn.send(("ok",))
                # NOTE: NCCL connects a peer pair lazily inside the first send/recv, and that call
                # blocks until the other side posts its match: warm up before "posted first" timing.
                raw.send(torch.zeros(1, dtype=torch.uint8, device=device))
                raw.finish()
            elif command == "raw":
                nbytes, iters, seed = rest
                buffer = pattern(nbytes, seed, device)
                for _ in range(iters):
                    raw.send(buffer)      # posted first: the receiver times the wire alone
                    conn.send(("posted",))
                    raw.finish()
                    if conn.recv()[0] != "next":
                        raise RuntimeError("raw: protocol out of step")
            elif command == "naive":
                block_lists, num_tokens = rest
                buffer = None
                for ids in block_lists:
                    if conn.recv()[0] != "go":
                        raise RuntimeError("naive: protocol out of step")
                    ids_t = torch.tensor(ids, dtype=torch.int64, device=device)
                    nbytes = layout.num_planes * len(ids) * layout.block_size * layout.num_heads * layout.row_bytes
                    if buffer is None or buffer.numel() != nbytes:
                        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
                    gather_torch(layout, engine, ids_t, buffer)
                    raw.send(buffer)
                    raw.finish()
            elif command == "layerwise":
                request, gap = rest
                submitted = []
                for layer in range(layout.num_layers):
                    time.sleep(gap)
                    endpoint.layer_ready(request, layer)
                    submitted.append(time.perf_counter())
                conn.send(("submitted", submitted))
            elif command == "profile":
                profiler = start_profiler(backend)
                conn.send(("profiling",))
                conn.recv()  # ("profile_stop",)
                stop_profiler(profiler, os.path.join(rest[0], "prefill.json"))
                conn.send(("profiled",))
            elif command == "memory":
                conn.send(("memory", endpoint.links()))
        endpoint.close()
    except Exception as exc:  # reported to the parent, which exits non-zero
        results.put(("error", "prefill", f"{type(exc).__name__}: {exc}"))
        raise


# ------------------------------------------------------------------------------------- decode
def planned_cases(args) -> int:
    """How many records a run of the main benchmark makes (for its progress lines)."""
    same_layout = args.src_layout == args.dst_layout and args.block_size == args.dst_block_size
    count = 0
    concurrent_total = args.concurrent * args.concurrent_tokens  # the baselines also move the concurrency case's total
    for baseline in ("raw", "copy"):
        if baseline in args.methods:
            count += len(args.tokens) + bool(args.concurrent and concurrent_total not in args.tokens)
    if "naive" in args.methods and same_layout:
        count += len(args.tokens)
    if "kvlink" in args.methods:
        count += len(args.tokens) + bool(args.concurrent) + bool(args.layerwise)
    return count


def baseline_sizes(args, token_bytes: int) -> list[tuple[int, int]]:
    """(tokens, bytes) the baselines move: each request size, and the concurrency case's total."""
    sizes = [(num_tokens, num_tokens * token_bytes) for num_tokens in args.tokens]
    concurrent_tokens = args.concurrent * args.concurrent_tokens
    if args.concurrent and concurrent_tokens not in args.tokens:
        sizes.append((concurrent_tokens, concurrent_tokens * token_bytes))
    return sizes


class Recorder:
    """Sends each case's record to the parent and prints a progress line as it finishes."""

    def __init__(self, results, warmup: int, total: int):
        self.results, self.warmup, self.total, self.done = results, warmup, total, 0

    def add(self, method: str, tokens: int, nbytes: int, seconds: list[float], wrong_bytes: int, **extra) -> None:
        record = make_record(method, tokens, nbytes, seconds, wrong_bytes, warmup=self.warmup, **extra)
        self.done += 1
        self.results.put(("record", record))
        print(progress_line(record, self.done, self.total), file=sys.stderr, flush=True)


def decode_main(args, backend: str, conn, results) -> None:
    faulthandler.dump_traceback_later(120, repeat=True)
    logging.basicConfig(level=logging.INFO, format="[decode]  %(message)s", stream=sys.stderr)
    import kvlink
    device = side_device(backend, "decode")
    if device != "cpu":
        torch.cuda.set_device(torch.device(device))
    else:
        share_cpus(2)
    recorder = Recorder(results, args.warmup, planned_cases(args))
    try:
        _, mirror = build_cache(args, args.seed, device)           # the prefill cache's bytes, for checking
        dst_engine, layout = build_cache(args, args.seed + 1, device, side="dst")
        converted = None  # fp8 on the wire: what the reference conversion writes, to check kvlink against
        if args.wire_dtype:
            _, converted = build_cache(args, args.seed + 1, device, side="dst")
        rng = torch.Generator().manual_seed(args.seed + 2)
        kind, address = conn.recv()
        token_bytes = layout.bytes_per_token

        def blocks(num_tokens):
            return (torch.randperm(args.num_blocks, generator=rng)[:-(-num_tokens // args.block_size)],
                    torch.randperm(args.dst_num_blocks, generator=rng)[:-(-num_tokens // args.dst_block_size)])

        def packed(cache_layout, ids, num_tokens):
            chunk = torch.empty(kvlink.packed_nbytes(cache_layout, num_tokens), dtype=torch.uint8, device=device)
            kvlink.pack(cache_layout, ids, num_tokens, chunk)
            return chunk[kvlink.HEADER_BYTES:]

        corrupt = [os.environ.get("KVLINK_BENCH_INJECT_CORRUPTION") == "1"]  # test hook: proves the check fails

        def wrong_bytes(src_ids, dst_ids, num_tokens, wire=None) -> int:
            if corrupt[0]:
                corrupt[0] = False
                layout.planes[0][int(dst_ids[0]), 0, 0].view(torch.uint8)[0] ^= 0xFF
            if wire:  # lossy: the reference conversion of the same blocks is what must have landed
                chunk = torch.empty(kvlink.packed_nbytes(mirror, num_tokens, wire_dtype=wire), dtype=torch.uint8,
                                    device=device)
                kvlink.pack(mirror, src_ids, num_tokens, chunk, wire_dtype=wire)
                kvlink.unpack(converted, dst_ids, num_tokens, chunk, wire_dtype=wire)
                got, want = packed(layout, dst_ids, num_tokens), packed(converted, dst_ids, num_tokens)
            else:
                got, want = packed(layout, dst_ids, num_tokens), packed(mirror, src_ids, num_tokens)
            sync(device)
            return int((got != want).sum().item())

        # ---- baselines first: their communicator exists before kvlink memory is measured
        print("phase: baselines", file=sys.stderr, flush=True)
        if {"raw", "naive"} & set(args.methods):
            if backend == "nccl":
                from kvlink import nccl as nccl_module
                setup = nccl_module.unique_id()
            else:
                import socket as pysocket
                s = pysocket.socket()
                s.bind(("127.0.0.1", 0))
                setup = f"tcp://127.0.0.1:{s.getsockname()[1]}"
                s.close()
            conn.send(("raw_setup", setup))
            raw = RawLink(backend, device, 1, setup, args.timeout)
            conn.recv()
            raw.recv(torch.empty(1, dtype=torch.uint8, device=device))  # the connection warm-up
            raw.finish()
        if "raw" in args.methods:
            for num_tokens, nbytes in baseline_sizes(args, token_bytes):
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
                expected = pattern(nbytes, args.seed + num_tokens, device)
                conn.send(("raw", nbytes, args.warmup + args.iters, args.seed + num_tokens))
                times, wrong = [], 0
                for i in range(args.warmup + args.iters):
                    buffer.fill_(0)
                    sync(device)
                    conn.recv()  # the sender has posted
                    t0 = time.perf_counter()
                    raw.recv(buffer)
                    raw.finish()
                    elapsed = time.perf_counter() - t0
                    conn.send(("next",))
                    if i >= args.warmup:
                        times.append(elapsed)
                    wrong += int((buffer != expected).sum().item())
                recorder.add("raw", num_tokens, nbytes, times, wrong)
        if "copy" in args.methods:
            for num_tokens, nbytes in baseline_sizes(args, token_bytes):
                times, gpu_times, wrong = time_device_copy(nbytes, args.iters, args.warmup, args.seed + num_tokens,
                                                           device, args.timeout)
                recorder.add("copy", num_tokens, nbytes, times, wrong,
                             gpu_us=statistics.median(gpu_times) * 1e6)
        same_layout = args.src_layout == args.dst_layout and args.block_size == args.dst_block_size
        if "naive" in args.methods and not same_layout:
            print("naive baseline skipped: it copies whole blocks, so it needs one layout and block size on both sides",
                  file=sys.stderr, flush=True)
        if "naive" in args.methods and same_layout:
            for num_tokens in args.tokens:
                whole = -(-num_tokens // layout.block_size) * layout.block_size  # torch gathers whole blocks
                lists = [blocks(num_tokens) for _ in range(args.warmup + args.iters)]
                conn.send(("naive", [s.tolist() for s, _ in lists], num_tokens))
                nbytes = whole * token_bytes
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
                times, wrong = [], 0
                for i, (src, dst) in enumerate(lists):
                    dst_t = dst.to(device)
                    sync(device)
                    t0 = time.perf_counter()
                    conn.send(("go",))
                    raw.recv(buffer)
                    raw.finish()
                    scatter_torch(layout, dst_t, buffer)
                    sync(device)
                    elapsed = time.perf_counter() - t0
                    if i >= args.warmup:
                        times.append(elapsed)
                    wrong += wrong_bytes(src, dst, num_tokens)
                recorder.add("naive", num_tokens, num_tokens * token_bytes, times, wrong)
        print("phase: kvlink", file=sys.stderr, flush=True)
        free_before = torch.cuda.mem_get_info(device)[0] if backend == "nccl" else 0
        reserved_before = torch.cuda.memory_reserved(device) if backend == "nccl" else 0
        chunk_bytes = args.chunk_mb * MiB if args.chunk_mb else None
        endpoint = kvlink.Endpoint(layout, name="decode", listen=None, transport=args.kvlink_transport,
                                   chunk_bytes=chunk_bytes, timeout=args.timeout, max_ctas=args.max_ctas,
                                   wire_dtype=args.wire_dtype)
        peer = endpoint.connect(address)
        transport = endpoint.links()[0]["transport"]
        print(f"kvlink link: transport {transport}", file=sys.stderr, flush=True)

        # ---- kvlink, one request at a time
        if "kvlink" in args.methods:
            for num_tokens in args.tokens:
                times, enqueue, sender_enqueue, stages, wrong = [], [], [], [], 0
                for i in range(args.warmup + args.iters):
                    src, dst = blocks(num_tokens)
                    t0 = time.perf_counter()
                    handle = endpoint.pull(peer, f"r{num_tokens}-{i}", src, dst, num_tokens)
                    handle.wait(args.timeout)
                    elapsed = time.perf_counter() - t0
                    if i >= args.warmup:
                        times.append(elapsed)
                        enqueue.append(handle.stats.enqueue_seconds)
                        sender_enqueue.append(handle.stats.sender_enqueue_seconds)
                        stamps = handle.stats.host_stamps
                        if stamps:  # ipc pulls: where the host time of one pull goes, step by step
                            order = sorted(stamps, key=stamps.get)
                            stages.append({f"host_{b}_us": (stamps[b] - stamps[a]) * 1e6 for a, b in zip(order, order[1:])})
                            stages[-1]["pull_wall_us"] = (stamps["recorded"] - stamps["called"]) * 1e6
                            stages[-1]["pull_cpu_us"] = handle.stats.pull_cpu_seconds * 1e6
                    wrong += wrong_bytes(src, dst, num_tokens, args.wire_dtype)
                recorder.add("kvlink", num_tokens, num_tokens * token_bytes, times, wrong, transport=transport,
                             wire_bytes=handle.stats.wire_bytes, wire_dtype=args.wire_dtype, chunks=handle.stats.chunks,
                             decode_enqueue_us=statistics.median(enqueue) * 1e6,
                             prefill_enqueue_us=statistics.median(sender_enqueue) * 1e6,
                             **{key: statistics.median(s.get(key, 0.0) for s in stages) for key in stages[0]} if stages else {})

            # ---- one pull of the largest size under torch.profiler, both sides (a timeline to read)
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                num_tokens = max(args.tokens)
                conn.send(("profile", args.profile))
                conn.recv()  # ("profiling",)
                profiler = start_profiler(backend)
                src, dst = blocks(num_tokens)
                endpoint.pull(peer, "profiled", src, dst, num_tokens).wait(args.timeout)
                sync(device)
                stop_profiler(profiler, os.path.join(args.profile, "decode.json"))
                conn.send(("profile_stop",))
                conn.recv()  # ("profiled",)
                print(f"profile: {args.profile}/decode.json and prefill.json (chrome://tracing)", file=sys.stderr)

            # ---- kvlink, many requests in flight
            if args.concurrent:
                n, num_tokens = args.concurrent, args.concurrent_tokens
                times, wrong = [], 0
                for rep in range(args.warmup + args.iters):
                    perm_src = torch.randperm(args.num_blocks, generator=rng)
                    perm_dst = torch.randperm(args.dst_num_blocks, generator=rng)
                    per_src, per_dst = -(-num_tokens // args.block_size), -(-num_tokens // args.dst_block_size)
                    reqs = [(perm_src[k * per_src:(k + 1) * per_src], perm_dst[k * per_dst:(k + 1) * per_dst])
                            for k in range(n)]
                    t0 = time.perf_counter()
                    handles = [endpoint.pull(peer, f"c{rep}-{k}", s, d, num_tokens) for k, (s, d) in enumerate(reqs)]
                    for h in handles:
                        h.wait(args.timeout)
                    if rep >= args.warmup:
                        times.append(time.perf_counter() - t0)
                    wrong += sum(wrong_bytes(s, d, num_tokens, args.wire_dtype) for s, d in reqs)
                recorder.add(f"kvlink x{n}", num_tokens, n * num_tokens * token_bytes, times, wrong, concurrent=n,
                             transport=transport)

            # ---- layer-wise: prefill submits the layers one by one
            if args.layerwise:
                num_tokens = max(args.tokens)
                tails, wrong = [], 0
                for rep in range(args.warmup + args.iters):
                    src, dst = blocks(num_tokens)
                    handle = endpoint.pull(peer, f"lw{rep}", src, dst, num_tokens, layerwise=True)
                    conn.send(("layerwise", f"lw{rep}", LAYER_GAP_S))
                    handle.wait(args.timeout)
                    done = time.perf_counter()
                    _, submitted = conn.recv()  # perf_counter is one clock for every process of the machine
                    if rep >= args.warmup:
                        tails.append(done - submitted[-1])
                    wrong += wrong_bytes(src, dst, num_tokens, args.wire_dtype)
                recorder.add("kvlink layerwise", num_tokens, num_tokens * token_bytes, tails, wrong, rate=False,
                             note="time_us: from the prefill's last layer_ready() to the pull's completion; "
                                  "no GB/s", transport=transport, layer_gap_us=LAYER_GAP_S * 1e6,
                             layer_bytes=num_tokens * token_bytes // args.layers)

            if backend == "nccl":
                link = endpoint.links()[0]
                conn.send(("memory",))
                _, prefill_links = conn.recv()
                outside_torch = (free_before - torch.cuda.mem_get_info(device)[0]) - (
                    torch.cuda.memory_reserved(device) - reserved_before)
                results.put(("memory", {
                    "transport": transport,
                    "decode_nccl_bytes_at_init": link["nccl_bytes"], "decode_nccl_bytes_now": outside_torch,
                    "decode_staging_bytes": link["staging_bytes"],
                    "prefill_nccl_bytes_at_init": prefill_links[0]["nccl_bytes"],
                    "prefill_staging_bytes": prefill_links[0]["staging_bytes"],
                    "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
                }))

        conn.send(("stop",))
        endpoint.close()
        results.put(("done", "decode"))
    except Exception as exc:
        results.put(("error", "decode", f"{type(exc).__name__}: {exc}"))
        raise


# ------------------------------------------------------------------------------------- report
def describe_methods(records: list[dict], args) -> dict[str, str]:
    """What each method in ``records`` measures, in the words the table's legend and the JSON use."""
    wire = {"nccl": "NCCL send/recv between the two GPUs", "gpu": "none: both processes share one GPU"}.get(
        args.backend, "a ZeroMQ socket over TCP on loopback")
    transports = ", ".join(sorted({r["transport"] for r in records if r.get("transport")})) or "-"
    fp8 = "; fp8 (e4m3) on the wire" if args.wire_dtype else ""
    out = {}
    for r in records:
        method = r["method"]
        if method in out:
            continue
        if method == "raw":
            out[method] = (f"the same number of bytes as one contiguous send/recv over the same wire ({wire}), "
                           f"the sender already posted: the wire's own time, no gather or scatter")
        elif method == "copy":
            out[method] = ("a device-to-device copy of the same number of contiguous bytes on the one GPU both "
                           "processes share (torch copy_), from the call until the host sees it complete (an event "
                           "polled as an ipc pull's wait polls): any transfer's floor there, no gather or scatter")
        elif method == "naive":
            out[method] = ("gather the blocks with torch (index_select per layer plane) -> one send over raw's wire "
                           "-> scatter with torch (index_copy_), timed from the request to the last scatter")
        elif method == "kvlink":
            out[method] = (f"kvlink.Endpoint.pull() on the decode side until the pull completes, one request at a "
                           f"time (transport {transports}{fp8})")
        elif method.startswith("kvlink x"):
            base = baseline_method(records)
            out[method] = (f"{r.get('concurrent')} pulls of {r['tokens']} tokens in flight at once, timed until the "
                           f"last completes; size and GB/s count all of them, vs {base} is against one {base} of "
                           f"that total")
        elif method == "kvlink layerwise":
            out[method] = (f"a layer-wise pull: the prefill side calls layer_ready() for each of its {args.layers} "
                           f"layers, {LAYER_GAP_S * 1e3:g} ms apart; time(us) runs from the last layer_ready() to "
                           f"the pull's completion (the tail left after the forward pass), so no GB/s")
    return out


def timing_note(records: list[dict]) -> str:
    """The statement of what the time columns are: medians of how many iterations after how many warm-ups."""
    counts = sorted({(r["iters"], r["warmup"]) for r in records})
    if len(counts) == 1:
        (iters, warmup), = counts
        how = (f"the median of {plural(iters, 'timed iteration')} after {plural(warmup, 'untimed warm-up')}, "
               f"in every case")
    else:  # not the main benchmark's own: its cases all run --warmup + --iters
        how = "the median of each case's timed iterations after its warm-ups (JSON: iters, warmup)"
    return (f"time(us) = {how}; min/max = the fastest and the slowest of those iterations; "
            f"GB/s = size / median time")


def legend_lines(descriptions: dict[str, str], records: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    """The table's legend: one line per method, then what the columns mean."""
    width = max([len(m) for m in descriptions] + [6])
    lines = [f"# {method:<{width}} = {text}" for method, text in descriptions.items()]
    if records:
        lines.append("# " + timing_note(records))
    lines += [f"# {line}" for line in extra]
    return lines


def baseline_method(records: list[dict]) -> str:
    """The method the table's ratio column divides by: "copy" on one GPU, else "raw"."""
    return "copy" if any(r["method"] == "copy" for r in records) else "raw"


def table(records: list[dict], memory: dict | None, legend: list[str] = ()) -> str:
    base_method = baseline_method(records)
    raw = {r["tokens"]: r for r in records if r["method"] == base_method}
    transports = sorted({r["transport"] for r in records if r.get("transport")})
    width = max([len(r["method"]) for r in records] + [16])
    lines = [f"{'method':<{width}} {'tokens':>7} {'size(B)':>12} {'time(us)':>10} {'min(us)':>10} {'max(us)':>10} "
             f"{'GB/s':>8} {'vs ' + base_method:>7} {'#wrong':>7}"]
    for r in records:
        base = raw.get(r["tokens"] * r.get("concurrent", 1))
        ratio = (f"{r['GBps'] / base['GBps']:.3f}" if base and base["GBps"] and r["GBps"] is not None
                 and r["method"] != base_method else "-")
        rate = fmt_rate(r["GBps"])
        lines.append(f"{r['method']:<{width}} {r['tokens']:>7} {r['bytes']:>12} {r['time_us']:>10.1f} "
                     f"{r['time_min_us']:>10.1f} {r['time_max_us']:>10.1f} {rate:>8} {ratio:>7} {r['wrong_bytes']:>7}")
    wrong = sum(r["wrong_bytes"] for r in records)
    verified = sum(bool(r["verified"]) for r in records)
    lines.append(f"# {len(records)} cases, {verified} verified, {wrong} wrong bytes" +
                 (f"; kvlink's link: transport {', '.join(transports)}" if transports else ""))
    lines += list(legend)
    if memory:
        per_side = max(memory["decode_nccl_bytes_now"], memory["decode_nccl_bytes_at_init"]) + memory["decode_staging_bytes"]
        lines.append(f"# GPU memory per link ({memory.get('transport', 'nccl')}), decode side: NCCL {memory['decode_nccl_bytes_at_init'] / MiB:.0f} MiB at init, "
                     f"{memory['decode_nccl_bytes_now'] / MiB:.0f} MiB after the transfers, staging "
                     f"{memory['decode_staging_bytes'] / MiB:.0f} MiB: {per_side / MiB:.0f} MiB in all; prefill side: NCCL "
                     f"{memory['prefill_nccl_bytes_at_init'] / MiB:.0f} MiB at init, staging {memory['prefill_staging_bytes'] / MiB:.0f} MiB")
    return "\n".join(lines)


# One colour and marker per method; methods not named here take the next unused pair.
PLOT_STYLES = {"raw": ("tab:gray", "s"), "copy": ("tab:gray", "s"), "naive": ("tab:red", "v"),
               "kvlink": ("tab:blue", "o"), "homogeneous": ("tab:gray", "s")}
PLOT_SPARE_STYLES = [("tab:green", "*"), ("tab:purple", "D"), ("tab:orange", "^"), ("tab:brown", "P"),
                     ("tab:pink", "X"), ("tab:olive", "h"), ("tab:cyan", "<")]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def plot(records: list[dict], path: str, title: str) -> None:
    """Two panels against request size, log axes: GB/s of every rate case, and time of every case (layer-wise too).

    Each method has its own colour and marker; the bars span the fastest to the slowest timed iteration.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    methods = list(dict.fromkeys(r["method"] for r in records))
    styles, spare = {}, iter(PLOT_SPARE_STYLES)
    for method in methods:
        styles[method] = PLOT_STYLES.get(method) or next(spare, ("black", "o"))
    fig, (ax_rate, ax_time) = plt.subplots(1, 2, figsize=(13, 5.2))
    sizes = sorted({r["bytes"] for r in records})

    def label_of(method: str) -> str:
        r = next(r for r in records if r["method"] == method)
        if r.get("concurrent"):
            return f"{method} ({r['concurrent']} x {r['tokens']} tokens at once)"
        if r.get("GBps") is None:
            return f"{method} (from the last layer_ready)"
        return method

    def draw(ax, key, lo_key, hi_key):
        values = []
        for i, method in enumerate(methods):
            pts = sorted((r for r in records if r["method"] == method and r.get(key) is not None),
                         key=lambda r: r["bytes"])
            if not pts:
                continue
            colour, marker = styles[method]
            dodge = 1.05 ** (i - (len(methods) - 1) / 2)  # methods at one size side by side, not on top
            x = [r["bytes"] * dodge for r in pts]
            y = [r[key] for r in pts]
            lo = [r[key] - r[lo_key] for r in pts]
            hi = [r[hi_key] - r[key] for r in pts]
            ax.errorbar(x, y, yerr=[lo, hi], color=colour, marker=marker, markersize=11 if marker == "*" else 7,
                        linestyle="-" if len(pts) > 1 else "none", linewidth=1.5, capsize=4, label=label_of(method))
            values += [r[lo_key] for r in pts] + [r[hi_key] for r in pts]
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) >= 10:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([human_bytes(b) for b in sizes], rotation=30 if len(sizes) > 4 else 0)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(sizes) > 1:
            ax.set_xlim(sizes[0] / 1.6, sizes[-1] * 1.6)
        else:
            ax.set_xlim(sizes[0] / 2, sizes[0] * 2)
        ax.set_xlabel("request size (all requests of a case together)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    draw(ax_rate, "GBps", "GBps_min", "GBps_max")
    ax_rate.set_ylabel("GB/s (size / time)")
    ax_rate.set_title("bandwidth: higher is better")
    draw(ax_time, "time_us", "time_min_us", "time_max_us")
    ax_time.set_ylabel("time (µs)")
    ax_time.set_title("time: lower is better")
    counts = sorted({(r["iters"], r["warmup"]) for r in records})
    how = (f"median of {plural(counts[0][0], 'timed iteration')} after {plural(counts[0][1], 'warm-up')}"
           if len(counts) == 1
           else "median of each case's timed iterations")
    fig.suptitle(f"{title}\n{how}; bars: min to max", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str, args, device_desc: str, records: list[dict], descriptions: dict[str, str],
               **extra) -> None:
    """The run's JSON: its settings, what each method measures, and one record per case (see make_record)."""
    report = {"backend": args.backend, "device": device_desc, "args": dict(vars(args)),
              "timing": timing_note(records) if records else None, "methods": descriptions,
              "verified": bool(records) and all(r["verified"] for r in records), **extra, "records": records}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend
    if backend == "nccl" and torch.cuda.device_count() < 2:
        print("--backend nccl needs two visible GPUs", file=sys.stderr)
        return 2
    if backend == "gpu" and not torch.cuda.is_available():
        print("--backend gpu needs a visible GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.prefill_tp > 1 or args.decode_tp > 1:
        from kvlink import bench_tp
        return bench_tp.main(args)
    import importlib.util
    if importlib.util.find_spec("nixl") is not None:
        print("note: NIXL is installed, but kvlink-bench has no NIXL baseline yet (open work)", file=sys.stderr)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    prefill_conn, decode_conn = ctx.Pipe()
    device_desc = torch.cuda.get_device_name(0) if backend in ("nccl", "gpu") else "CPU"
    print(f"kvlink-bench: backend {backend} ({device_desc}), layout {args.layout}, {args.layers} layers x "
          f"{args.kv_heads} heads x {args.head_dim} {args.dtype}, {args.block_size}-token blocks", file=sys.stderr)
    procs = [ctx.Process(target=prefill_main, args=(args, backend, prefill_conn, results), name="prefill"),
             ctx.Process(target=decode_main, args=(args, backend, decode_conn, results), name="decode")]
    for proc in procs:
        proc.start()
    records, memory, errors, finished = [], None, [], False
    deadline = time.time() + max(600.0, args.timeout * 10)
    while not finished and time.time() < deadline:
        try:
            kind, *payload = results.get(timeout=1.0)
        except Exception:
            if not all(p.is_alive() for p in procs) and results.empty():
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode]
                if dead:
                    errors.append(f"{dead} exited with {[p.exitcode for p in procs]}")
                    break
            continue
        if kind == "record":
            records.append(payload[0])
        elif kind == "memory":
            memory = payload[0]
        elif kind == "error":
            errors.append(f"{payload[0]}: {payload[1]}")
            break
        elif kind == "done":
            finished = True
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    descriptions = describe_methods(records, args)
    base = baseline_method(records)
    print(table(records, memory, legend_lines(descriptions, records, (
        f"vs {base} = GB/s over {base}'s GB/s for the same number of bytes; #wrong = received bytes that differ from "
        "the sender's (every byte of every iteration is checked)",))), flush=True)
    if args.json:
        write_json(args.json, args, device_desc, records, descriptions, memory=memory)
    if args.plot and records:
        plot(records, args.plot, f"kvlink-bench, {backend} on {device_desc}, {args.layers} layers x {args.kv_heads} "
                                 f"KV heads x head dim {args.head_dim}, {args.dtype}")
        print(f"wrote {args.plot}", file=sys.stderr)
    if errors or not finished:
        print("FAILED: " + ("; ".join(errors) or "timed out"), file=sys.stderr)
        return 1
    if any(r["wrong_bytes"] for r in records):
        print("FAILED: wrong bytes received", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
