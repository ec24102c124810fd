"""Host time per call of kvlink's per-request paths, beside their baselines, in one run on one GPU.

    python benchmarks/host_costs.py --json host_costs.json          # ~1-2 minutes on an H200
    python benchmarks/host_costs.py --calls 200 --json quick.json    # a quick look

Every figure is host (CPU) microseconds per call unless it says otherwise, as the median over
``--calls`` calls after ``--warmup`` untimed ones, with p10 and p90. The GPU is drained every
``SYNC_EVERY`` calls outside the timed region, so no call waits for a full launch queue. Parts:

A  torch copy_ of the same bytes (the baseline), Event.record, and kvlink.pack / kvlink.unpack on
   the W1 shape (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks): one block (16 tokens,
   2 MiB) and 256 blocks (4096 tokens, 512 MiB), block ids as a CPU tensor and as a list.
B  a raw CuPy NCCL send's host time: a 1-rank communicator, ncclGroupStart; send to self; recv
   from self; ncclGroupEnd (NCCL pairs a rank's self send/recv only inside a group), in a child
   process with a time limit.
C  ipc pull() between two processes on this GPU (a prefill child serving): the wall and the
   thread CPU time inside pull() (time.thread_time), and a 16-token pull's time from the call
   until the host sees it done, two ways: handle.wait() returning, and a helper thread blocked
   in the completion event's synchronize() (no polling slack).
D  host-transport pull() on CPU caches (a prefill child over TCP): the same in-call times.
E  the NCCL transport's pipeline on the stand-in wire (both endpoints here, on this GPU,
   EndpointConfig(transport="nccl", nccl_wire="loopback")): host us per chunk on each side from
   the transport's own counters (with and without the wire calls), and a W1 512 MiB pull's time
   (call until its completion event fires) against the summed GPU time of its own kernels: the
   pack, wire-copy and unpack of the pull's chunk plan, timed separately with CUDA events on
   the same data.

Every moved byte that is checked is compared with its source; the exit code is 1 on any wrong
byte, 3 if a part failed (the line says why), else 0. ``--json`` gets every figure, the targets
and the run's settings. Every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
import traceback

import torch

SHAPE = dict(num_layers=32, num_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
NUM_BLOCKS = 600  # per cache: room for a 256-block request and disjoint random choices
PRESET = "vllm_flash_attn_nhd"
SEED = 2026
SYNC_EVERY = 32
MiB = 1 << 20

# (figure, limit, "<=" or ">="): the targets for the lent H200 host
TARGETS = {
    "pack 1 block (ids tensor)": (30.0, "<="),
    "pack 256 blocks (ids tensor)": (30.0, "<="),
    "unpack 1 block (ids tensor)": (30.0, "<="),
    "unpack 256 blocks (ids tensor)": (30.0, "<="),
    "ipc pull() CPU, 16 tokens": (40.0, "<="),
    "ipc pull() CPU, 4096 tokens": (40.0, "<="),
    "ipc pull 16 tokens: call -> done (wait())": (60.0, "<="),
    "nccl stand-in: decode host us per chunk": (30.0, "<="),
    "nccl stand-in: prefill host us per chunk": (30.0, "<="),
    "nccl stand-in: decode host CPU us per chunk": (30.0, "<="),
    "nccl stand-in: prefill host CPU us per chunk": (30.0, "<="),
    "nccl stand-in: 512 MiB pull / summed kernel GPU time": (1.10, "<="),
}


# ------------------------------------------------------------------------------------- figures
class Report:
    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.failed: list[str] = []
        self.wrong_bytes = 0

    def add(self, name: str, samples_s: list[float] | None = None, *, value: float | None = None,
            unit: str = "us", note: str = "") -> None:
        row = {"name": name, "unit": unit, "note": note}
        if samples_s is not None:
            ordered = sorted(samples_s)
            n = len(ordered)
            row.update(median=statistics.median(ordered) * 1e6, p10=ordered[n // 10] * 1e6,
                       p90=ordered[min(n - 1, (9 * n) // 10)] * 1e6, n=n)
        else:
            row.update(median=value, p10=None, p90=None, n=None)
        self.rows[name] = row
        spread = f"  p10 {row['p10']:9.1f}  p90 {row['p90']:9.1f}  n={row['n']}" if row["p10"] is not None else ""
        print(f"  {name:<58} {row['median']:10.2f} {unit}{spread}{'  ' + note if note else ''}", flush=True)

    def fail(self, part: str, exc: BaseException) -> None:
        self.failed.append(f"{part}: {type(exc).__name__}: {exc}")
        print(f"  PART FAILED {part}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=6)

    def wrong(self, what: str, count: int) -> None:
        self.wrong_bytes += count
        print(f"  verified {what}: {'OK' if count == 0 else f'{count} WRONG BYTES'}", flush=True)

    def targets(self) -> list[dict]:
        out = []
        for name, (limit, op) in TARGETS.items():
            row = self.rows.get(name)
            value = None if row is None else row["median"]
            ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
            out.append({"figure": name, "value": value, "target": f"{op} {limit:g}",
                        "status": "not measured" if ok is None else ("ok" if ok else "MISSED")})
        return out


def host_times(fn, calls: int, warmup: int, sync=None) -> list[float]:
    """Host seconds of each of ``calls`` calls of ``fn`` after ``warmup``; ``sync()`` every SYNC_EVERY, untimed."""
    for i in range(warmup):
        fn()
        if sync is not None and i % SYNC_EVERY == SYNC_EVERY - 1:
            sync()
    if sync is not None:
        sync()
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if sync is not None and i % SYNC_EVERY == SYNC_EVERY - 1:
            sync()
    if sync is not None:
        sync()
    return times


def bounded_sync(timeout: float) -> None:
    """torch.cuda.synchronize(), failing after ``timeout`` seconds instead of hanging."""
    event = torch.cuda.Event()
    event.record()
    deadline = time.monotonic() + timeout
    while not event.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the GPU did not finish within {timeout:.0f} s")
        time.sleep(1e-4)


class EventWaiter:
    """Sees a CUDA event complete without polling: a helper thread blocks in its synchronize()
    (the GIL released) and releases a lock the caller waits on, with a timeout."""

    def __init__(self):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="event-waiter", daemon=True).start()

    def _run(self) -> None:
        while True:
            event, lock = self._work.get()
            try:
                event.synchronize()
            finally:
                lock.release()

    def wait(self, event, timeout: float) -> None:
        lock = threading.Lock()
        lock.acquire()
        self._work.put((event, lock))
        if not lock.acquire(timeout=timeout):
            raise TimeoutError(f"a completion event did not fire within {timeout:.0f} s")


# ------------------------------------------------------------------------------------- caches
def build_cache(device: str, seed: int, num_blocks: int = NUM_BLOCKS):
    """A W1-shaped cache filled from ``seed`` (the prefill child and this process build the same bytes)."""
    from kvlink import presets

    gen = torch.Generator(device=device).manual_seed(seed)
    return presets.allocate(PRESET, device=device, num_blocks=num_blocks,
                            fill=lambda t: t.view(torch.uint8).random_(0, 256, generator=gen), **SHAPE)


def packed(layout, ids, num_tokens):
    import kvlink

    chunk = torch.empty(kvlink.packed_nbytes(layout, num_tokens), dtype=torch.uint8, device=layout.device)
    kvlink.pack(layout, ids, num_tokens, chunk)
    return chunk[kvlink.HEADER_BYTES:]


def wrong_bytes(dst, dst_ids, src, src_ids, num_tokens) -> int:
    got, want = packed(dst, dst_ids, num_tokens), packed(src, src_ids, num_tokens)
    return int((got != want).sum().item())


def block_choice(gen: torch.Generator, count: int, num_blocks: int = NUM_BLOCKS) -> torch.Tensor:
    return torch.randperm(num_blocks, generator=gen)[:count]


# ------------------------------------------------------------------------------------- child processes
def prefill_child(conn, device: str, transport: str, num_blocks: int, timeout: float) -> None:
    """A prefill endpoint serving pulls from a cache built from SEED, until told to stop (or orphaned)."""
    try:
        import kvlink

        if device != "cpu":
            torch.cuda.set_device(0)
        _, layout = build_cache(device, SEED, num_blocks)
        with kvlink.Endpoint(layout, name="prefill", transport=transport, timeout=timeout) as endpoint:
            conn.send(("address", endpoint.address))
            parent = mp.parent_process()
            while True:
                if conn.poll(0.5):
                    if conn.recv() == "stop":
                        break
                elif parent is not None and not parent.is_alive():
                    break
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except Exception:
            pass


class Child:
    """A spawned helper process with a pipe; every wait on it bounded."""

    def __init__(self, target, *args, timeout: float):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.timeout = timeout
        self.process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()

    def receive(self, timeout: float | None = None):
        if not self.conn.poll(self.timeout if timeout is None else timeout):
            raise TimeoutError(f"helper process silent for {self.timeout:.0f} s (alive: {self.process.is_alive()})")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"helper process: {payload}")
        return payload

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except Exception:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def nccl_child(conn, sizes: list[int], calls: int, warmup: int) -> None:
    """Part B in a process of its own (a hung NCCL call cannot hold up the run): host us of a
    1-rank group {send to self, recv from self}, and of the send call inside it."""
    try:
        from cupy.cuda import nccl

        from kvlink import nccl as kvlink_nccl

        kvlink_nccl.apply_defaults()  # kvlink's NCCL settings, as its pipeline runs under them
        torch.cuda.set_device(0)
        uid = nccl.get_unique_id()
        try:
            comm = nccl.NcclCommunicator(1, bytes(uid) if isinstance(uid, (bytes, bytearray)) else uid, 0)
        except TypeError:
            comm = nccl.NcclCommunicator(1, uid, 0)
        stream = torch.cuda.Stream()
        results = {}
        for nbytes in sizes:
            a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
            b = torch.zeros_like(a)
            group, send = [], []
            for i in range(warmup + calls):
                t0 = time.perf_counter()
                nccl.groupStart()
                t1 = time.perf_counter()
                comm.send(a.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, stream.cuda_stream)
                t2 = time.perf_counter()
                comm.recv(b.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, stream.cuda_stream)
                nccl.groupEnd()
                t3 = time.perf_counter()
                if i >= warmup:
                    group.append(t3 - t0)
                    send.append(t2 - t1)
                if i % SYNC_EVERY == SYNC_EVERY - 1:
                    stream.synchronize()
            stream.synchronize()
            results[nbytes] = (group, send, int((a != b).sum().item()))
        comm.destroy()
        conn.send(("result", results))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------------- parts
def part_a(report: Report, args, src, dst) -> None:
    """torch copy_, Event.record, kvlink.pack and kvlink.unpack: host us per call."""
    import kvlink

    sync = lambda: bounded_sync(args.timeout)  # noqa: E731
    gen = torch.Generator().manual_seed(SEED + 1)
    for blocks in (1, 256):
        nbytes = kvlink.packed_nbytes(src, blocks * SHAPE["block_size"]) - kvlink.HEADER_BYTES
        source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        report.add(f"torch copy_ of {nbytes / MiB:g} MiB (baseline)",
                   host_times(lambda: target.copy_(source), args.calls, args.warmup, sync))
    event = torch.cuda.Event()
    report.add("torch.cuda.Event.record (reference)", host_times(event.record, args.calls, args.warmup, sync))
    for blocks in (1, 256):
        num_tokens = blocks * SHAPE["block_size"]
        src_ids, dst_ids = block_choice(gen, blocks), block_choice(gen, blocks)
        chunk = torch.empty(kvlink.packed_nbytes(src, num_tokens), dtype=torch.uint8, device="cuda")
        what = f"{blocks} block{'s' if blocks > 1 else ''}"
        for form, s_ids, d_ids in (("ids tensor", src_ids, dst_ids), ("ids list", src_ids.tolist(), dst_ids.tolist())):
            report.add(f"pack {what} ({form})",
                       host_times(lambda: kvlink.pack(src, s_ids, num_tokens, chunk), args.calls, args.warmup, sync))
            report.add(f"unpack {what} ({form})",
                       host_times(lambda: kvlink.unpack(dst, d_ids, num_tokens, chunk), args.calls, args.warmup, sync))
        kvlink.pack(src, src_ids, num_tokens, chunk)
        kvlink.check_status(kvlink.unpack(dst, dst_ids, num_tokens, chunk))
        report.wrong(f"pack -> unpack of {what}", wrong_bytes(dst, dst_ids, src, src_ids, num_tokens))
    from kvlink import kernels
    print(f"  (inline pack/unpack launches: {kernels.inline_launch_state()})", flush=True)


def part_b(report: Report, args) -> None:
    sizes = [2 * MiB, 512 * MiB]
    child = Child(nccl_child, sizes, args.calls, args.warmup, timeout=args.timeout + 60)
    try:
        results = child.receive()
    finally:
        child.stop()
    for nbytes, (group, send, wrong) in results.items():
        report.add(f"raw NCCL group{{send+recv to self}} {nbytes / MiB:g} MiB", group)
        report.add(f"raw NCCL send call in it, {nbytes / MiB:g} MiB", send)
        report.wrong(f"NCCL self send/recv of {nbytes / MiB:g} MiB", wrong)


# an ipc pull's host stamps (TransferHandle.stats.host_stamps), in the order pull() takes them
STAMP_STEPS = ("called", "validated", "locked", "geometry", "launch", "recorded")
STAMP_STEPS_NOTE = ("called -> validated: both sides' block ids checked, the handle made; locked: the launch "
                    "lock; geometry: the copy's plan; launch: its parameters and the launch; recorded: the "
                    "completion event")


def part_c(report: Report, args, mirror, dst) -> None:
    """ipc pull() between two processes on this GPU."""
    import kvlink

    child = Child(prefill_child, "cuda:0", "ipc", NUM_BLOCKS, args.timeout, timeout=args.timeout + 60)
    try:
        address = child.receive()
        with kvlink.Endpoint(dst, name="decode", listen=None, transport="ipc", timeout=args.timeout) as endpoint:
            peer = endpoint.connect(address)
            gen = torch.Generator().manual_seed(SEED + 2)
            waiter = EventWaiter()
            counter = iter(range(10**9))
            for blocks in (1, 256):
                num_tokens = blocks * SHAPE["block_size"]
                choices = [(block_choice(gen, blocks), block_choice(gen, blocks)) for _ in range(64)]
                walls, cpus, inside, to_wait, to_event, wrong = [], [], [], [], [], 0
                steps = {}  # pull()'s own host stamps: the time from each step to the next
                calls = args.calls if blocks == 1 else max(args.calls // 2, 50)
                for i in range(args.warmup + calls):
                    src_ids, dst_ids = choices[i % len(choices)]
                    c0, t0 = time.thread_time(), time.perf_counter()
                    handle = endpoint.pull(peer, f"c{next(counter)}", src_ids, dst_ids, num_tokens)
                    t1, c1 = time.perf_counter(), time.thread_time()
                    if i % 2:  # alternate: completion seen by wait(), or by a thread blocked on the event
                        handle.wait(args.timeout)
                        done = time.perf_counter()
                    else:
                        waiter.wait(handle.event, args.timeout)
                        done = time.perf_counter()
                        handle.wait(args.timeout)
                    if i >= args.warmup:
                        walls.append(t1 - t0)
                        cpus.append(c1 - c0)
                        inside.append(handle.stats.pull_cpu_seconds)
                        stamps = handle.stats.host_stamps
                        names = [name for name in STAMP_STEPS if name in stamps]
                        for before, after in zip(names, names[1:]):
                            steps.setdefault(f"{before} -> {after}", []).append(stamps[after] - stamps[before])
                        (to_wait if i % 2 else to_event).append(done - t0)
                    if i % 97 == 0:
                        wrong += wrong_bytes(dst, dst_ids, mirror, src_ids, num_tokens)
                report.add(f"ipc pull() wall, {num_tokens} tokens", walls)
                report.add(f"ipc pull() CPU, {num_tokens} tokens", cpus, note="time.thread_time around the call")
                report.add(f"ipc pull() CPU by kvlink's stats, {num_tokens} tokens", inside)
                report.add(f"ipc pull {num_tokens} tokens: call -> done (wait())", to_wait)
                report.add(f"ipc pull {num_tokens} tokens: call -> done (event)", to_event,
                           note="a thread blocked on the completion event")
                report.wrong(f"ipc pulls of {num_tokens} tokens (every 97th)", wrong)
                for step, seconds in steps.items():
                    report.add(f"ipc pull() {num_tokens} tokens, step {step}", seconds, note=STAMP_STEPS_NOTE)
    finally:
        child.stop()


def part_d(report: Report, args) -> None:
    """host-transport pull() on CPU caches."""
    import kvlink

    num_blocks = 64
    child = Child(prefill_child, "cpu", "host", num_blocks, args.timeout, timeout=args.timeout + 60)
    try:
        address = child.receive()
        _, mirror = build_cache("cpu", SEED, num_blocks)
        _, dst = build_cache("cpu", SEED + 1, num_blocks)
        with kvlink.Endpoint(dst, name="decode-host", listen=None, transport="host",
                             timeout=args.timeout) as endpoint:
            peer = endpoint.connect(address)
            gen = torch.Generator().manual_seed(SEED + 3)
            walls, cpus, wrong = [], [], 0
            calls = max(args.calls // 8, 20)
            for i in range(args.warmup // 4 + calls):
                src_ids, dst_ids = block_choice(gen, 1, num_blocks), block_choice(gen, 1, num_blocks)
                c0, t0 = time.thread_time(), time.perf_counter()
                handle = endpoint.pull(peer, f"h{i}", src_ids, dst_ids, 16)
                t1, c1 = time.perf_counter(), time.thread_time()
                handle.wait(args.timeout)
                if i >= args.warmup // 4:
                    walls.append(t1 - t0)
                    cpus.append(c1 - c0)
                if i % 17 == 0:
                    wrong += wrong_bytes(dst, dst_ids, mirror, src_ids, 16)
            report.add("host pull() wall, CPU caches, 16 tokens", walls)
            report.add("host pull() CPU, CPU caches, 16 tokens", cpus)
            report.wrong("host pulls (every 17th)", wrong)
    finally:
        child.stop()


def part_e(report: Report, args, src, dst) -> None:
    """The NCCL pipeline on the stand-in wire: host us per chunk per side, a 512 MiB pull against its kernels."""
    import kvlink
    from kvlink import EndpointConfig
    from kvlink.plan import box_payload_bytes, plan_chunks
    from kvlink.selection import select

    # from_env: KVLINK_PROFILE_PROGRESS profiles both progress threads (benchmarks/gpu_one_gpu_session.sh)
    config = EndpointConfig.from_env(transport="nccl", nccl_wire="loopback", timeout=args.timeout)
    num_tokens = 256 * SHAPE["block_size"]
    gen = torch.Generator().manual_seed(SEED + 4)
    waiter = EventWaiter()
    with kvlink.Endpoint(src, name="prefill-loop", config=config) as prefill, \
            kvlink.Endpoint(dst, name="decode-loop", listen=None, config=config) as decode:
        peer = decode.connect(prefill.address)

        def counters(endpoint):
            return dict(endpoint.stats()["transports"].get("nccl", {}))

        for tokens_each, pulls in ((16, max(args.calls // 10, 20)), (num_tokens, max(args.calls // 100, 15))):
            before = (counters(prefill), counters(decode))
            times, wrong = [], 0
            for i in range(args.warmup // 10 + pulls):
                src_ids, dst_ids = block_choice(gen, tokens_each // 16), block_choice(gen, tokens_each // 16)
                t0 = time.perf_counter()
                handle = decode.pull(peer, f"n{tokens_each}-{i}", src_ids, dst_ids, tokens_each)
                waiter.wait(handle.event, args.timeout)
                elapsed = time.perf_counter() - t0
                handle.wait(args.timeout)
                if i >= args.warmup // 10:
                    times.append(elapsed)
                if i % 5 == 0 or tokens_each == num_tokens:
                    wrong += wrong_bytes(dst, dst_ids, src, src_ids, tokens_each)
            chunks = handle.stats.chunks
            after = (counters(prefill), counters(decode))
            for side, b, a in (("prefill", before[0], after[0]), ("decode", before[1], after[1])):
                n = a.get(f"{side}_chunks", 0) - b.get(f"{side}_chunks", 0)
                seconds = a.get(f"{side}_seconds", 0.0) - b.get(f"{side}_seconds", 0.0)
                wire = a.get(f"{side}_wire_seconds", 0.0) - b.get(f"{side}_wire_seconds", 0.0)
                cpu = a.get(f"{side}_cpu_seconds", 0.0) - b.get(f"{side}_cpu_seconds", 0.0)
                label = "" if tokens_each == num_tokens else f", {tokens_each}-token pulls"
                report.add(f"nccl stand-in: {side} host CPU us per chunk{label}", value=cpu / max(n, 1) * 1e6,
                           note="the thread's CPU time: the wall time less its waits for the GIL (both sides "
                                "share one process here) or the OS")
                report.add(f"nccl stand-in: {side} host us per chunk{label}", value=seconds / max(n, 1) * 1e6,
                           note=f"{n} chunks ({chunks} a pull), the wire's calls included")
                report.add(f"nccl stand-in: {side} host us per chunk without the wire calls{label}",
                           value=(seconds - wire) / max(n, 1) * 1e6)
            report.add(f"nccl stand-in: {tokens_each}-token pull, call -> completion event", times)
            report.wrong(f"stand-in pulls of {tokens_each} tokens", wrong)

        # the summed GPU time of the 512 MiB pull's own kernels, on the same shapes and plan
        dst_sel = select(dst, list(range(256)), num_tokens, destination=True)
        boxes = plan_chunks((0, SHAPE["num_layers"]), num_tokens, dst_sel.token_layer_bytes, config.chunk_bytes)
        src_ids, dst_ids = block_choice(gen, 256), block_choice(gen, 256)
        sizes = [kvlink.HEADER_BYTES + box_payload_bytes(box, dst_sel.token_layer_bytes) for box in boxes]
        # a chunk buffer per box, sent and received: each unpack finds its own chunk (header included)
        sent = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
        received = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
        stream = torch.cuda.current_stream()

        def timed(step) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for i, box in enumerate(boxes):
                step(i, box)
            end.record(stream)
            bounded_sync(args.timeout)
            return start.elapsed_time(end) * 1e-3

        def pack(i, box):
            kvlink.pack(src, src_ids, num_tokens, sent[i], layers=box[:2], tokens=box[2:], max_ctas=config.max_ctas)

        def copy(i, box):
            received[i].copy_(sent[i])

        def unpack(i, box):
            kvlink.unpack(dst, dst_ids, num_tokens, received[i], layers=box[:2], tokens=box[2:],
                          max_ctas=config.max_ctas)

        kernel_times = {}
        for name, step in (("pack", pack), ("wire copy", copy), ("unpack", unpack)):
            samples = [timed(step) for _ in range(12)][2:]
            kernel_times[name] = statistics.median(samples)
            report.add(f"nccl stand-in: GPU time of the 512 MiB pull's {name} kernels", value=kernel_times[name] * 1e6,
                       note=f"{len(boxes)} chunks, CUDA events, median of 10")
        report.wrong("the kernels' own pack -> copy -> unpack", wrong_bytes(dst, dst_ids, src, src_ids, num_tokens))
        summed = sum(kernel_times.values())
        pull = report.rows[f"nccl stand-in: {num_tokens}-token pull, call -> completion event"]["median"] * 1e-6
        report.add("nccl stand-in: 512 MiB pull / summed kernel GPU time", value=pull / summed, unit="x",
                   note=f"pull {pull * 1e6:.0f} us, kernels {summed * 1e6:.0f} us")


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per figure (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls before them (default 200)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any one wait may take (default 60)")
    parser.add_argument("--parts", default="ABCDE", help="which parts to run, of ABCDE (default all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure and the targets here")
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from kvlink import kernels

    gpu_parts = set(args.parts) - {"D"}  # D runs on CPU caches: the one part a CPU-only machine can run
    on_gpu = kernels.cuda_available()
    if gpu_parts and not on_gpu:
        print(f"host_costs parts {''.join(sorted(gpu_parts))} need a CUDA GPU and CuPy (--parts D runs on a CPU)",
              file=sys.stderr)
        return 2
    import kvlink

    report = Report()
    device_name = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"host_costs on {device_name}, torch {torch.__version__}; W1 shape {SHAPE}, {args.calls} calls a figure "
          f"after {args.warmup} warm-up; host us per call unless said", flush=True)
    started = time.monotonic()
    src = dst = None
    if gpu_parts:
        torch.cuda.set_device(0)
        _, src = build_cache("cuda", SEED)       # the same bytes as the prefill children's caches
        _, dst = build_cache("cuda", SEED + 1)
        kvlink.prepare(src)  # compiles the kernels (CuPy caches them on disk for the children)
        kvlink.prepare(dst)
        print(f"  (caches built and kernels compiled in {time.monotonic() - started:.1f} s)", flush=True)
    parts = {"A": ("A pack/unpack vs torch copy_", lambda: part_a(report, args, src, dst)),
             "B": ("B raw NCCL send", lambda: part_b(report, args)),
             "C": ("C ipc pull, two processes on one GPU", lambda: part_c(report, args, src, dst)),
             "D": ("D host-transport pull, CPU caches", lambda: part_d(report, args)),
             "E": ("E NCCL pipeline on the stand-in wire", lambda: part_e(report, args, src, dst))}

    def write_json() -> None:  # after every part: a run cut short still leaves what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__,
                           "inline_launches": kernels.inline_launch_state(), "shape": {**SHAPE, "dtype": "bfloat16"},
                           "calls": args.calls, "warmup": args.warmup, "figures": list(report.rows.values()),
                           "targets": report.targets(), "wrong_bytes": report.wrong_bytes, "failed": report.failed},
                          f, indent=2)

    for key in args.parts:
        title, run = parts[key]
        print(f"{title}:", flush=True)
        t0 = time.monotonic()
        try:
            run()
        except Exception as exc:  # every part reports and the run goes on
            report.fail(title, exc)
        print(f"  ({time.monotonic() - t0:.1f} s)", flush=True)
        write_json()
    targets = report.targets()
    print("targets (the issue's, for the lent H200 host; medians):")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['figure']:<58} {value:>10} (target {t['target']}): {t['status']}")
    print("  (512 MiB ipc pull >= 0.80 x a device copy and 64 concurrent 512-token pulls >= 0.60 x: "
          "python -m kvlink.bench on this GPU, its 'vs copy' column)")
    print(f"wrong bytes: {report.wrong_bytes}; parts failed: {len(report.failed)}; "
          f"{time.monotonic() - started:.0f} s in all", flush=True)
    if report.wrong_bytes:
        return 1
    return 3 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
