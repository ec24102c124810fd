"""kvlink's main job, measured: move KV caches between two processes and compare with baselines.

    python -m kvlink.bench                       # NCCL across two GPUs, or the host path on a CPU-only machine
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
- ``naive``: gather with torch (index_select per layer) -> one send -> scatter with torch.

Every received byte is checked against the sender's cache, rebuilt on the decode side from the
seed (nothing is copied across for checking); the exit code is 1 on any wrong byte. It prints
an nccl-tests-style table, and writes ``--json`` records and a ``--plot`` PNG.
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

MiB = 1 << 20


# ------------------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvlink-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=("auto", "nccl", "host"), default="auto",
                   help="the baselines' wire: auto = NCCL when two GPUs are visible, else the host (TCP) path")
    p.add_argument("--transport", choices=("auto", "ipc", "nccl", "host"), default="auto",
                   help="kvlink's link between the two GPUs: auto = CUDA IPC on one host, else NCCL")
    p.add_argument("--layers", type=int, default=None, help="default 32 (GPU) / 4 (host path)")
    p.add_argument("--kv-heads", type=int, default=None, help="default 8 (GPU) / 4 (host path)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (GPU) / 64 (host path)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="blocks in each side's cache (default 2048 / 512)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="request sizes (default 16 128 512 1024 4096 / 16 256 2048)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--layout", default="vllm_flash_attn_nhd", help="preset of both caches (kvlink.presets.PRESETS)")
    p.add_argument("--src-layout", default=None, help="the prefill cache's preset (default --layout)")
    p.add_argument("--dst-layout", default=None, help="the decode cache's preset (default --layout)")
    p.add_argument("--dst-block-size", type=int, default=None, help="the decode cache's tokens per block (default --block-size)")
    p.add_argument("--wire-dtype", choices=("none", "fp8"), default="none",
                   help="fp8: kvlink pulls quantize to e4m3 with a scale per token and head (lossy; checked "
                        "against the reference conversion); needs --transport nccl on GPUs")
    p.add_argument("--prefill-tp", type=int, default=1, help="prefill ranks (one process and GPU each)")
    p.add_argument("--decode-tp", type=int, default=1, help="decode ranks (one process and GPU each)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", default="kvlink,raw,naive", help="comma-separated subset of kvlink,raw,naive")
    p.add_argument("--concurrent", type=int, default=None,
                   help="requests in flight in the concurrency case, 0 skips it (default 64 / 8)")
    p.add_argument("--concurrent-tokens", type=int, default=None, help="tokens per concurrent request (default 512 / 256)")
    p.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the layer-wise case (layers submitted one by one)")
    p.add_argument("--chunk-mb", type=int, default=None, help="staging chunk size (default: kvlink's)")
    p.add_argument("--max-ctas", type=int, default=None, help="thread blocks for pack/unpack during transfers")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", default=None, help="write one record per (method, size) here")
    p.add_argument("--plot", default=None, help="write a bandwidth plot (PNG) here")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--profile", default=None,
                   help="directory for torch.profiler traces (prefill.json, decode.json) of one pull of the largest size")
    args = p.parse_args(argv)
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
    # The W1 shape (DESIGN.md) on GPUs; a shape a small CPU-only machine moves in seconds on the host path.
    args.backend = pick_backend(args.backend)
    if args.backend == "host" and args.transport not in ("auto", "host"):
        p.error(f"--transport {args.transport} needs GPUs; the host path links over TCP")
    args.kvlink_transport = "host" if args.backend == "host" else args.transport
    w1 = args.backend == "nccl"
    for name, gpu_default, host_default in (("layers", 32, 4), ("kv_heads", 8, 4), ("head_dim", 128, 64),
                                            ("num_blocks", 2048, 512), ("tokens", [16, 128, 512, 1024, 4096],
                                                                        [16, 256, 2048]),
                                            ("concurrent", 64, 8), ("concurrent_tokens", 512, 256)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if w1 else host_default)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(args.methods) - {"kvlink", "raw", "naive"}
    if bad:
        p.error(f"unknown methods {sorted(bad)}")
    for value, name in ((args.layers, "--layers"), (args.kv_heads, "--kv-heads"), (args.head_dim, "--head-dim"),
                        (args.block_size, "--block-size"), (args.num_blocks, "--num-blocks"), (args.iters, "--iters")):
        if value <= 0:
            p.error(f"{name} must be positive, got {value}")
    if args.src_layout in presets.MLA_PRESETS:
        args.kv_heads = 1  # MLA's latent: --head-dim is its width
    if args.wire_dtype and args.backend == "nccl" and args.transport in ("auto", "ipc"):
        if args.transport == "ipc":
            p.error("--wire-dtype fp8 needs a wire: --transport nccl (an ipc pull copies the cache's own bytes)")
        args.kvlink_transport = "nccl"
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


def pick_backend(requested: str) -> str:
    from kvlink import nccl
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 and nccl.available() else "host"


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
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if backend == "nccl" else [])
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
    device = "cuda:0" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(0)
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
class Recorder:
    def __init__(self, results):
        self.results = results

    def add(self, **record) -> None:
        self.results.put(("record", record))
        extra = "".join(f" {k}={v:.0f}" for k, v in record.items() if k.endswith("_us") and k != "time_us")
        print(f"  {record['method']:<16} {record['tokens']:>7} tokens {record['bytes'] / MiB:>9.2f} MiB "
              f"{record['time_us']:>10.1f} us {record['GBps']:>8.2f} GB/s  wrong={record['wrong_bytes']}{extra}",
              file=sys.stderr, flush=True)


def decode_main(args, backend: str, conn, results) -> None:
    faulthandler.dump_traceback_later(120, repeat=True)
    logging.basicConfig(level=logging.INFO, format="[decode]  %(message)s", stream=sys.stderr)
    import kvlink
    device = "cuda:1" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(1)
    recorder = Recorder(results)
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
            sizes = [(num_tokens, num_tokens * token_bytes) for num_tokens in args.tokens]
            concurrent_tokens = args.concurrent * args.concurrent_tokens
            if args.concurrent and concurrent_tokens not in args.tokens:
                sizes.append((concurrent_tokens, concurrent_tokens * token_bytes))
            for num_tokens, nbytes in sizes:
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
                t = statistics.median(times)
                recorder.add(method="raw", tokens=num_tokens, bytes=nbytes, time_us=t * 1e6, GBps=nbytes / t / 1e9,
                             verified=wrong == 0, wrong_bytes=wrong)
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
                t = statistics.median(times)
                recorder.add(method="naive", tokens=num_tokens, bytes=num_tokens * token_bytes, time_us=t * 1e6,
                             GBps=num_tokens * token_bytes / t / 1e9, verified=wrong == 0, wrong_bytes=wrong)
        print("phase: kvlink", file=sys.stderr, flush=True)
        free_before = torch.cuda.mem_get_info(1)[0] if backend == "nccl" else 0
        reserved_before = torch.cuda.memory_reserved(1) if backend == "nccl" else 0
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
                t = statistics.median(times)
                recorder.add(method="kvlink", tokens=num_tokens, bytes=num_tokens * token_bytes, time_us=t * 1e6,
                             GBps=num_tokens * token_bytes / t / 1e9, verified=wrong == 0, wrong_bytes=wrong,
                             transport=transport, wire_bytes=handle.stats.wire_bytes, wire_dtype=args.wire_dtype,
                             chunks=handle.stats.chunks, decode_enqueue_us=statistics.median(enqueue) * 1e6,
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
                for rep in range(max(2, args.iters // 4) + 1):
                    perm_src = torch.randperm(args.num_blocks, generator=rng)
                    perm_dst = torch.randperm(args.dst_num_blocks, generator=rng)
                    per_src, per_dst = -(-num_tokens // args.block_size), -(-num_tokens // args.dst_block_size)
                    reqs = [(perm_src[k * per_src:(k + 1) * per_src], perm_dst[k * per_dst:(k + 1) * per_dst])
                            for k in range(n)]
                    t0 = time.perf_counter()
                    handles = [endpoint.pull(peer, f"c{rep}-{k}", s, d, num_tokens) for k, (s, d) in enumerate(reqs)]
                    for h in handles:
                        h.wait(args.timeout)
                    if rep > 0:
                        times.append(time.perf_counter() - t0)
                    wrong += sum(wrong_bytes(s, d, num_tokens, args.wire_dtype) for s, d in reqs)
                t = statistics.median(times)
                total = n * num_tokens * token_bytes
                recorder.add(method=f"kvlink x{n}", tokens=num_tokens, bytes=total, time_us=t * 1e6,
                             GBps=total / t / 1e9, verified=wrong == 0, wrong_bytes=wrong, concurrent=n,
                             transport=transport)

            # ---- layer-wise: prefill submits the layers one by one
            if args.layerwise:
                num_tokens = max(args.tokens)
                tails, wrong = [], 0
                for rep in range(3):
                    src, dst = blocks(num_tokens)
                    handle = endpoint.pull(peer, f"lw{rep}", src, dst, num_tokens, layerwise=True)
                    conn.send(("layerwise", f"lw{rep}", 0.002))
                    handle.wait(args.timeout)
                    done = time.perf_counter()
                    _, submitted = conn.recv()
                    tails.append(done - submitted[-1])
                    wrong += wrong_bytes(src, dst, num_tokens, args.wire_dtype)
                t = statistics.median(tails)
                recorder.add(method="kvlink layerwise", tokens=num_tokens, bytes=num_tokens * token_bytes,
                             time_us=t * 1e6, GBps=0.0, verified=wrong == 0, wrong_bytes=wrong,
                             note="time from the last layer_ready() to completion", transport=transport,
                             layer_bytes=num_tokens * token_bytes // args.layers)

            if backend == "nccl":
                link = endpoint.links()[0]
                conn.send(("memory",))
                _, prefill_links = conn.recv()
                outside_torch = (free_before - torch.cuda.mem_get_info(1)[0]) - (
                    torch.cuda.memory_reserved(1) - reserved_before)
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
def table(records: list[dict], memory: dict | None) -> str:
    raw = {r["tokens"]: r for r in records if r["method"] == "raw"}
    transports = sorted({r["transport"] for r in records if r.get("transport")})
    lines = [f"{'method':<18} {'tokens':>7} {'size(B)':>12} {'time(us)':>10} {'GB/s':>8} {'vs raw':>7} {'#wrong':>7}"]
    for r in records:
        base = raw.get(r["tokens"]) if r["method"] != "kvlink layerwise" else None
        if r["method"].startswith("kvlink x"):
            base = raw.get(r.get("concurrent", 0) * r["tokens"])
        ratio = f"{r['GBps'] / base['GBps']:.3f}" if base and base["GBps"] and r["method"] != "raw" else "-"
        lines.append(f"{r['method']:<18} {r['tokens']:>7} {r['bytes']:>12} {r['time_us']:>10.1f} {r['GBps']:>8.2f} "
                     f"{ratio:>7} {r['wrong_bytes']:>7}")
    wrong = sum(r["wrong_bytes"] for r in records)
    lines.append(f"# {len(records)} cases, {wrong} wrong bytes" +
                 (f"; kvlink's link: transport {', '.join(transports)}" if transports else ""))
    if memory:
        per_side = max(memory["decode_nccl_bytes_now"], memory["decode_nccl_bytes_at_init"]) + memory["decode_staging_bytes"]
        lines.append(f"# GPU memory per link ({memory.get('transport', 'nccl')}), decode side: NCCL {memory['decode_nccl_bytes_at_init'] / MiB:.0f} MiB at init, "
                     f"{memory['decode_nccl_bytes_now'] / MiB:.0f} MiB after the transfers, staging "
                     f"{memory['decode_staging_bytes'] / MiB:.0f} MiB: {per_side / MiB:.0f} MiB in all; prefill side: NCCL "
                     f"{memory['prefill_nccl_bytes_at_init'] / MiB:.0f} MiB at init, staging {memory['prefill_staging_bytes'] / MiB:.0f} MiB")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'kvlink[plot]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("raw", "kvlink", "naive"):
        pts = sorted((r["bytes"], r["GBps"]) for r in records if r["method"] == method)
        if pts:
            ax.plot([b / MiB for b, _ in pts], [g for _, g in pts], marker="o", label=method)
    conc = [r for r in records if r["method"].startswith("kvlink x")]
    for r in conc:
        ax.scatter([r["bytes"] / MiB], [r["GBps"]], marker="*", s=120, label=f"{r['method']} x {r['tokens']} tokens")
    ax.set_xscale("log")
    ax.set_xlabel("request size (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = args.backend
    if backend == "nccl" and torch.cuda.device_count() < 2:
        print("--backend nccl needs two visible GPUs", file=sys.stderr)
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
    device_desc = torch.cuda.get_device_name(0) if backend == "nccl" else "CPU"
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
    print(table(records, memory))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": backend, "device": device_desc, "args": {k: v for k, v in vars(args).items()},
                       "memory": memory, "records": records}, f, indent=2)
    if args.plot and records:
        plot(records, args.plot, f"kvlink-bench, {backend} on {device_desc}, {args.layers}L x {args.kv_heads}H x {args.head_dim}D")
    if errors or not finished:
        print("FAILED: " + ("; ".join(errors) or "timed out"), file=sys.stderr)
        return 1
    if any(r["wrong_bytes"] for r in records):
        print("FAILED: wrong bytes received", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
