"""kvlink-bench with tensor parallelism on either side: ``--prefill-tp P --decode-tp D``.

One process per rank (GPU ``r`` for prefill rank r, GPU ``P + r`` for decode rank r; CPU
processes over the host transport on a machine without GPUs). Every decode rank pulls each
request from the prefill ranks :mod:`kvlink.resharding` assigns it, and releases the others.
Requests start on all decode ranks at one agreed instant; a transfer's time runs from there to
the last rank's completion.

The baseline, measured in the same run: the homogeneous transfer of the same request (1 prefill
rank -> 1 decode rank, every KV head, same tokens), timed the same way; "vs homog" is the
resharded transfer's delivered bandwidth (all bytes over its time) against that link's. "per-link
GB/s" (the bytes one link carries over the transfer's time) is printed for information: links
into or out of one GPU share its NVLink ports.

Every received byte is checked against the prefill ranks' caches, rebuilt from their seeds on
the decode side (with fp8 on the wire: against the reference conversion of those bytes). Records
are built by :func:`kvlink.bench.make_record`, as the main benchmark's are: median time with its
spread, ``verified`` (completed, no wrong byte); the table, its legend, ``--json`` and ``--plot``
come out the same way.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing as mp
import os
import sys
import time
from argparse import Namespace

import torch

from kvlink.bench import (build_cache, fmt_rate, legend_lines, make_record, plot, plural, progress_line,
                          share_cpus, sync, write_json)

START_DELAY = 0.005  # seconds between the parent's "go" and the agreed start: every rank has it by then


def _device(args, role: str, rank: int) -> str:
    if args.backend != "nccl":
        return "cpu"
    return f"cuda:{rank if role == 'prefill' else args.prefill_tp + rank}"


def _heads(args, tp: int, rank: int) -> tuple[int, int]:
    from kvlink.resharding import heads_of_rank
    return heads_of_rank(args.kv_heads, tp, rank)


def _rank_seed(args, rank: int) -> int:
    return args.seed + 1000 * (rank + 1)


def _start_rank(args, role: str, rank: int) -> str:
    """A rank process's first steps: stack dumps if stuck, its log prefix, its GPU; returns its device."""
    faulthandler.dump_traceback_later(180, repeat=True)
    logging.basicConfig(level=logging.INFO, format=f"[{role} {rank}] %(message)s", stream=sys.stderr)
    device = _device(args, role, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        share_cpus(args.prefill_tp + args.decode_tp)
    return device


def prefill_rank_main(args, rank: int, conn, results) -> None:
    import kvlink
    device = _start_rank(args, "prefill", rank)
    try:
        first, stop = _heads(args, args.prefill_tp, rank)
        _, layout = build_cache(args, _rank_seed(args, rank), device, num_heads=stop - first)
        endpoint = kvlink.Endpoint(layout, name=f"prefill-{rank}", transport=args.kvlink_transport,
                                   timeout=args.timeout, max_links=max(8, args.decode_tp))
        conn.send(("address", endpoint.address))
        while True:
            if not conn.poll(args.timeout * 10):
                raise TimeoutError(f"prefill rank {rank}: the benchmark went quiet")
            command = conn.recv()[0]
            if command == "stop":
                break
            if command == "finished":
                conn.send(("finished", endpoint.finished_sends()))
        endpoint.close()
    except Exception as exc:
        results.put(("error", f"prefill {rank}", f"{type(exc).__name__}: {exc}"))
        raise


def decode_rank_main(args, rank: int, conn, results) -> None:
    import kvlink
    from kvlink.resharding import plan_resharding, pull_resharded
    device = _start_rank(args, "decode", rank)
    try:
        plan = plan_resharding(args.kv_heads, args.prefill_tp, args.decode_tp)
        first, stop = _heads(args, args.decode_tp, rank)
        _, layout = build_cache(args, args.seed + 1, device, side="dst", num_heads=stop - first)
        mirrors = {}  # the caches of the prefill ranks we pull from, rebuilt for checking
        for s in plan.pulls_of(rank):
            p_first, p_stop = _heads(args, args.prefill_tp, s.prefill_rank)
            mirrors[s.prefill_rank] = build_cache(args, _rank_seed(args, s.prefill_rank), device,
                                                  num_heads=p_stop - p_first)[1]
        converted = build_cache(args, args.seed + 1, device, side="dst", num_heads=stop - first)[1] \
            if args.wire_dtype else None
        endpoint = kvlink.Endpoint(layout, name=f"decode-{rank}", listen=None, transport=args.kvlink_transport,
                                   timeout=args.timeout, max_links=max(8, args.prefill_tp),
                                   wire_dtype=args.wire_dtype)
        addresses = conn.recv()[1]
        peers = [endpoint.connect(address) for address in addresses]
        conn.send(("linked", sorted({link["transport"] for link in endpoint.links()})))

        def packed(cache, ids, num_tokens, heads):
            chunk = torch.empty(kvlink.packed_nbytes(cache, num_tokens, heads=heads), dtype=torch.uint8, device=device)
            kvlink.pack(cache, ids, num_tokens, chunk, heads=heads)
            return chunk[kvlink.HEADER_BYTES:]

        corrupt = [os.environ.get("KVLINK_BENCH_INJECT_CORRUPTION") == "1" and rank == 0]  # proves the check fails

        def wrong_bytes(src, dst, num_tokens) -> int:
            if corrupt[0]:
                corrupt[0] = False
                layout.planes[0][int(dst[0]), 0, 0].view(torch.uint8)[0] ^= 0xFF
            wrong = 0
            for s in plan.pulls_of(rank):
                mirror = mirrors[s.prefill_rank]
                if args.wire_dtype:
                    size = kvlink.packed_nbytes(mirror, num_tokens, heads=s.src_heads, wire_dtype=args.wire_dtype)
                    chunk = torch.empty(size, dtype=torch.uint8, device=device)
                    kvlink.pack(mirror, src, num_tokens, chunk, heads=s.src_heads, wire_dtype=args.wire_dtype)
                    kvlink.unpack(converted, dst, num_tokens, chunk, heads=s.dst_heads, wire_dtype=args.wire_dtype)
                    want = packed(converted, dst, num_tokens, s.dst_heads)
                else:
                    want = packed(mirror, src, num_tokens, s.src_heads)
                got = packed(layout, dst, num_tokens, s.dst_heads)
                sync(device)
                wrong += int((got != want).sum().item())
            return wrong

        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, request, src, dst, num_tokens, start_at = message
            while time.perf_counter() < start_at:
                pass
            started = time.perf_counter()
            pull = pull_resharded(endpoint, plan, rank, peers, request, src, dst, num_tokens)
            pull.wait(args.timeout)
            finished = time.perf_counter()
            conn.send(("pulled", started, finished, wrong_bytes(src, dst, num_tokens), pull.payload_bytes,
                       sum(h.stats.wire_bytes for h in pull.handles), len(pull.handles)))
        endpoint.close()
    except Exception as exc:
        results.put(("error", f"decode {rank}", f"{type(exc).__name__}: {exc}"))
        raise


def _receive(conn, timeout: float, who: str):
    if not conn.poll(timeout):
        raise TimeoutError(f"{who} did not answer within {timeout:.0f} s")
    return conn.recv()


def measure(args, label: str, results) -> list[dict]:
    """Start the ranks of one topology, run every size, return one record per size."""
    ctx = mp.get_context("spawn")
    prefills, decodes, procs = [], [], []
    for role, tp, target, conns in (("prefill", args.prefill_tp, prefill_rank_main, prefills),
                                    ("decode", args.decode_tp, decode_rank_main, decodes)):
        for rank in range(tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(args, rank, child, results), name=f"{role}-{rank}")
            proc.start()
            conns.append(parent)
            procs.append(proc)
    records = []
    try:
        addresses = [_receive(c, 120, f"prefill rank {r}")[1] for r, c in enumerate(prefills)]
        for conn in decodes:
            conn.send(("addresses", addresses))
        transports = sorted({t for r, c in enumerate(decodes) for t in _receive(c, 120, f"decode rank {r}")[1]})
        print(f"{label}: links use {', '.join(transports)}", file=sys.stderr, flush=True)
        rng = torch.Generator().manual_seed(args.seed + 2)
        for num_tokens in args.tokens:
            times, wrong, moved, wire, links = [], 0, 0, 0, 0
            for i in range(args.warmup + args.iters):
                src = torch.randperm(args.num_blocks, generator=rng)[:-(-num_tokens // args.block_size)].tolist()
                dst = torch.randperm(args.dst_num_blocks, generator=rng)[:-(-num_tokens // args.dst_block_size)].tolist()
                start_at = time.perf_counter() + START_DELAY
                for conn in decodes:
                    conn.send(("pull", f"{label}-{num_tokens}-{i}", src, dst, num_tokens, start_at))
                replies = [_receive(c, args.timeout * 2, f"decode rank {r}") for r, c in enumerate(decodes)]
                if i >= args.warmup:
                    times.append(max(r[2] for r in replies) - start_at)
                wrong += sum(r[3] for r in replies)
                moved, wire, links = sum(r[4] for r in replies), sum(r[5] for r in replies), sum(r[6] for r in replies)
            # every decode rank answered every iteration: the transfer completed
            record = make_record(label, num_tokens, moved, times, wrong, warmup=args.warmup, wire_bytes=wire,
                                 links=links, transport=",".join(transports), prefill_tp=args.prefill_tp,
                                 decode_tp=args.decode_tp, kv_heads=args.kv_heads, wire_dtype=args.wire_dtype)
            record["link_GBps"] = record["GBps"] / links
            records.append(record)
            print(progress_line(record, len(records), len(args.tokens)) +
                  f"  ({fmt_rate(record['link_GBps'])} GB/s a link, {plural(links, 'link')})",
                  file=sys.stderr, flush=True)
        # every prefill rank heard of every request from each decode rank that contacts it
        from kvlink.resharding import plan_resharding
        plan = plan_resharding(args.kv_heads, args.prefill_tp, args.decode_tp)
        expected = len(args.tokens) * (args.warmup + args.iters)
        deadline = time.time() + args.timeout
        heard = [0] * args.prefill_tp
        while time.time() < deadline and any(h < expected * plan.contacts_of(r) for r, h in enumerate(heard)):
            for rank, conn in enumerate(prefills):
                conn.send(("finished",))
                heard[rank] += len(_receive(conn, 30, f"prefill rank {rank}")[1])
            time.sleep(0.01)
        for rank, count in enumerate(heard):
            if count != expected * plan.contacts_of(rank):
                raise RuntimeError(f"prefill rank {rank} heard {count} notifications, expected "
                                   f"{expected * plan.contacts_of(rank)}")
    finally:
        for conn in prefills + decodes:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return records


def describe_methods(args, label: str) -> dict[str, str]:
    """What the two methods of a resharded run measure (the table's legend and the JSON's "methods")."""
    return {
        label: (f"{args.prefill_tp} prefill rank(s) -> {args.decode_tp} decode rank(s), one process each: every "
                f"decode rank pulls its heads from the prefill ranks the plan assigns; timed from one agreed "
                f"start to the last rank's completion"),
        "homogeneous": (f"the baseline: the same request 1 prefill rank -> 1 decode rank (all {args.kv_heads} KV "
                        f"heads), timed the same way"),
    }


def table(records: list[dict], args, label: str) -> str:
    base = {r["tokens"]: r for r in records if r["method"] == "homogeneous"}
    width = max([len(r["method"]) for r in records] + [12])
    lines = [f"{'method':<{width}} {'tokens':>7} {'size(B)':>12} {'links':>5} {'time(us)':>10} {'min(us)':>10} "
             f"{'max(us)':>10} {'GB/s':>8} {'GB/s/link':>9} {'vs homog':>8} {'#wrong':>7}"]
    for r in records:
        b = base.get(r["tokens"])
        ratio = f"{r['GBps'] / b['GBps'] * b['bytes'] / r['bytes']:.3f}" if b and r is not b else "-"
        lines.append(f"{r['method']:<{width}} {r['tokens']:>7} {r['bytes']:>12} {r['links']:>5} {r['time_us']:>10.1f} "
                     f"{r['time_min_us']:>10.1f} {r['time_max_us']:>10.1f} {fmt_rate(r['GBps']):>8} "
                     f"{fmt_rate(r['link_GBps']):>9} "
                     f"{ratio:>8} {r['wrong_bytes']:>7}")
    wrong = sum(r["wrong_bytes"] for r in records)
    verified = sum(bool(r["verified"]) for r in records)
    lines.append(f"# {len(records)} cases, {verified} verified, {wrong} wrong bytes")
    lines += legend_lines(describe_methods(args, label), records, (
        "vs homog = the homogeneous transfer's time over the resharded one's (same bytes); GB/s/link = the bytes "
        "one link carries over the transfer's time (links into or out of one GPU share its ports); #wrong = "
        "received bytes that differ from the prefill ranks' (every byte of every iteration is checked)",))
    return "\n".join(lines)


def main(args) -> int:
    from kvlink.resharding import plan_resharding
    results = mp.get_context("spawn").Queue()
    plan = plan_resharding(args.kv_heads, args.prefill_tp, args.decode_tp)
    print(plan.describe(), file=sys.stderr)
    label = f"tp {args.prefill_tp}->{args.decode_tp}"
    errors = []
    records = []
    try:
        records += measure(args, label, results)
        baseline = Namespace(**{**vars(args), "prefill_tp": 1, "decode_tp": 1})
        records += measure(baseline, "homogeneous", results)
    except Exception as exc:  # noqa: BLE001 - reported with the ranks' own errors below
        errors.append(f"{type(exc).__name__}: {exc}")
    while not results.empty():
        kind, *payload = results.get()
        if kind == "error":
            errors.append(f"{payload[0]}: {payload[1]}")
    print(table(records, args, label))
    device = torch.cuda.get_device_name(0) if args.backend == "nccl" else "CPU"
    if args.json:
        write_json(args.json, args, device, records, describe_methods(args, label))
    if args.plot and records:
        plot(records, args.plot, f"kvlink-bench {label} against 1 -> 1, {args.backend} on {device}, {args.layers} "
                                 f"layers x {args.kv_heads} KV heads x head dim {args.head_dim}, {args.dtype}")
        print(f"wrote {args.plot}", file=sys.stderr)
    wrong = sum(r["wrong_bytes"] for r in records)
    if errors:
        print("FAILED: " + "; ".join(errors), file=sys.stderr)
        return 1
    if wrong:
        print("FAILED: wrong bytes received", file=sys.stderr)
        return 1
    return 0
