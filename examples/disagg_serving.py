"""Disaggregated serving with kvlink, end to end, against colocated serving of the same prompts.

    python examples/disagg_serving.py                 # two GPUs if visible, else the CPU
    python examples/disagg_serving.py --requests 64 --rate 8 --ttft-ms 300 --tpot-ms 40

A small decoder-only transformer (random weights from a seed, GQA, a paged KV cache read and
written through kvlink layouts) serves one trace of requests (Poisson arrivals, random prompt
and output lengths) twice, greedy decoding:

- colocated: one process (GPU 0) prefills arriving requests and decodes the running ones,
  prefill first — the interference disaggregation removes;
- disaggregated: a prefill process (GPU 0, vLLM FlashAttention layout, 16-token blocks) and a
  decode process (GPU 1, FlashInfer HND layout, 32-token blocks); the decode side pulls each
  request's KV through a kvlink Endpoint (CUDA IPC / NCCL / host TCP as available) and the
  prefill frees the blocks when kvlink reports them delivered.

It checks that both modes generate the same tokens for every request (exit 1 otherwise) and
reports, per mode, TTFT (arrival -> first token), TPOT (time per output token after the first)
and goodput: requests per second that meet both targets (``--ttft-ms``, ``--tpot-ms``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

# ------------------------------------------------------------------------------------- the model


class TinyLM:
    """Decoder-only transformer, random weights from ``seed``; attention reads K/V from a paged cache."""

    def __init__(self, cfg: dict, device: str, dtype: torch.dtype, seed: int):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        g = torch.Generator().manual_seed(seed)
        d, h, kv, hd = cfg["d_model"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]

        def weight(*shape, scale=None):
            w = torch.randn(*shape, generator=g) * (scale or shape[0] ** -0.5)
            return w.to(device=self.device, dtype=dtype)

        self.embed = weight(cfg["vocab"], d, scale=1.0)
        self.positions = weight(cfg["max_len"], d, scale=0.1)
        self.layers = [dict(norm1=torch.ones(d, device=self.device, dtype=dtype), q=weight(d, h * hd),
                            k=weight(d, kv * hd), v=weight(d, kv * hd), o=weight(h * hd, d),
                            norm2=torch.ones(d, device=self.device, dtype=dtype), up=weight(d, 4 * d),
                            down=weight(4 * d, d)) for _ in range(cfg["layers"])]
        self.head = weight(d, cfg["vocab"])

    @staticmethod
    def _norm(x, w):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w

    def forward(self, tokens: list[int], start: int, layout, block_ids: list[int]) -> int:
        """Run ``tokens`` at positions start.., writing their K/V into the cache; the next token (greedy)."""
        cfg = self.cfg
        n, h, kv, hd = len(tokens), cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        positions = torch.arange(start, start + n)
        ids = torch.tensor(block_ids)
        x = self.embed[torch.tensor(tokens, device=self.device)] + self.positions[positions.to(self.device)]
        blocks = ids[positions // layout.block_size].to(self.device)
        offsets = (positions % layout.block_size).to(self.device)
        every = torch.arange(0, start + n)
        all_blocks = ids[every // layout.block_size].to(self.device)
        all_offsets = (every % layout.block_size).to(self.device)
        causal = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
        for index, w in enumerate(self.layers):
            y = self._norm(x, w["norm1"])
            q = (y @ w["q"]).view(n, h, hd)
            k_plane, v_plane = layout.plane(index, 0), layout.plane(index, 1)
            k_plane[blocks, offsets] = (y @ w["k"]).view(n, kv, hd)
            v_plane[blocks, offsets] = (y @ w["v"]).view(n, kv, hd)
            keys = k_plane[all_blocks, all_offsets].repeat_interleave(h // kv, dim=1)      # [T, h, hd]
            values = v_plane[all_blocks, all_offsets].repeat_interleave(h // kv, dim=1)
            scores = torch.einsum("nhd,thd->hnt", q.float(), keys.float()) / math.sqrt(hd)
            scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            attended = torch.einsum("hnt,thd->nhd", scores, values.float()).to(self.dtype).reshape(n, h * hd)
            x = x + attended @ w["o"]
            x = x + torch.relu(self._norm(x, w["norm2"]) @ w["up"]) @ w["down"]
        logits = (self._norm(x[-1:], torch.ones_like(x[0])) @ self.head).float()
        return int(logits.argmax(-1).item())


def build_cache(preset: str, cfg: dict, num_blocks: int, block_size: int, device: str, dtype):
    from kvlink import presets
    _, layout = presets.allocate(preset, num_layers=cfg["layers"], num_blocks=num_blocks, block_size=block_size,
                                 num_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], dtype=dtype, device=device)
    return layout


def setup_device(device: str, threads: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (set before its handle)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(threads)  # the same on every process: CPU matmuls reduce in thread-dependent order
    torch.use_deterministic_algorithms(True, warn_only=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- the trace
def make_trace(args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed + 1)
    trace, arrival = [], 0.0
    for i in range(args.requests):
        arrival += float(-math.log(1.0 - torch.rand(1, generator=g).item()) / args.rate)
        prompt_len = int(torch.randint(args.prompt_min, args.prompt_max + 1, (1,), generator=g))
        trace.append({"id": f"req-{i}", "arrival": arrival,
                      "prompt": torch.randint(0, args.vocab, (prompt_len,), generator=g).tolist(),
                      "max_new": int(torch.randint(args.output_min, args.output_max + 1, (1,), generator=g))})
    return trace


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def decode_step(model: TinyLM, running: list[dict], layout, device: str, t0: float) -> list[dict]:
    """One greedy token for every running request (same order, same shapes in both modes); the
    requests that reached their output length, removed from ``running``."""
    for req in running:
        pos = req["prompt_len"] + len(req["tokens"]) - 1
        req["tokens"].append(model.forward([req["tokens"][-1]], pos, layout, req["blocks"]))
    sync(device)
    stamp = time.time() - t0
    finished = []
    for req in list(running):
        req["times"].append(stamp)
        if len(req["tokens"]) >= req["max_new"]:
            running.remove(req)
            finished.append(req)
    return finished


# ------------------------------------------------------------------------------------- colocated
def colocated_main(args, cfg, trace, device, t0, results) -> None:
    setup_device(device, args.threads)
    dtype = getattr(torch, args.dtype)
    model = TinyLM(cfg, device, dtype, args.seed)
    per_request = blocks_for(args.prompt_max + args.output_max, args.block_size)
    layout = build_cache("vllm_flash_attn_nhd", cfg, per_request * len(trace), args.block_size, device, dtype)
    waiting, running, done = list(trace), [], {}
    while t0 > time.time():
        time.sleep(0.001)
    while waiting or running:
        now = time.time() - t0
        if waiting and waiting[0]["arrival"] <= now:  # prefill first: arrivals interrupt decoding
            req = waiting.pop(0)
            slot = int(req["id"].split("-")[1])
            req["blocks"] = list(range(slot * per_request, (slot + 1) * per_request))
            token = model.forward(req["prompt"], 0, layout, req["blocks"])
            sync(device)
            req["tokens"], req["times"], req["prompt_len"] = [token], [time.time() - t0], len(req["prompt"])
            running.append(req)
        elif running:
            for req in decode_step(model, running, layout, device, t0):
                done[req["id"]] = {"tokens": req["tokens"], "times": req["times"], "arrival": req["arrival"]}
        else:
            time.sleep(max(0.0, min(0.002, waiting[0]["arrival"] - now)))
    results.put(("colocated", done))


# ------------------------------------------------------------------------------------- disaggregated
def prefill_main(args, cfg, trace, device, t0, to_decode, results) -> None:
    import kvlink
    setup_device(device, args.threads)
    dtype = getattr(torch, args.dtype)
    model = TinyLM(cfg, device, dtype, args.seed)
    per_request = blocks_for(args.prompt_max, args.block_size)
    layout = build_cache("vllm_flash_attn_nhd", cfg, per_request * len(trace), args.block_size, device, dtype)
    with kvlink.Endpoint(layout, name="example-prefill", timeout=args.timeout) as endpoint:
        to_decode.send(("address", endpoint.address))
        held = {}
        while t0 > time.time():
            time.sleep(0.001)
        for req in trace:
            while time.time() - t0 < req["arrival"]:
                time.sleep(0.0005)
            slot = int(req["id"].split("-")[1])
            blocks = list(range(slot * per_request, (slot + 1) * per_request))[:blocks_for(len(req["prompt"]),
                                                                                           args.block_size)]
            token = model.forward(req["prompt"], 0, layout, blocks)
            sync(device)
            stamp = time.time() - t0
            held[req["id"]] = blocks  # until decode has them (kvlink's notification)
            # what a proxy forwards to decode (vLLM's kv_transfer_params): the transfer id, blocks, first token
            to_decode.send(("request", {"id": req["id"], "prompt_len": len(req["prompt"]), "first": token,
                                        "first_time": stamp, "src_blocks": blocks, "max_new": req["max_new"],
                                        "arrival": req["arrival"]}))
            for request, ok in endpoint.finished_sends():
                held.pop(request, None)
        deadline = time.time() + args.timeout
        while held and time.time() < deadline:
            for request, ok in endpoint.finished_sends():
                held.pop(request, None)
            time.sleep(0.005)
        to_decode.send(("done", None))
        results.put(("prefill_held_at_exit", sorted(held)))
        if to_decode.poll(args.timeout * 4):
            to_decode.recv()  # decode has finished: the link may close now


def decode_main(args, cfg, device, t0, from_prefill, results) -> None:
    import kvlink
    setup_device(device, args.threads)
    dtype = getattr(torch, args.dtype)
    model = TinyLM(cfg, device, dtype, args.seed)
    per_request = blocks_for(args.prompt_max + args.output_max, args.decode_block_size)
    layout = build_cache("vllm_flashinfer_hnd", cfg, per_request * args.requests, args.decode_block_size, device, dtype)
    with kvlink.Endpoint(layout, name="example-decode", listen=None, timeout=args.timeout) as endpoint:
        _, address = from_prefill.recv()
        peer = endpoint.connect(address)
        results.put(("transport", endpoint.links()[0]["transport"]))
        loading, running, done, prefill_done = [], [], {}, False
        while not prefill_done or loading or running:
            while from_prefill.poll(0):
                kind, req = from_prefill.recv()
                if kind == "done":
                    prefill_done = True
                    continue
                slot = int(req["id"].split("-")[1])
                req["blocks"] = list(range(slot * per_request, (slot + 1) * per_request))
                need = blocks_for(req["prompt_len"], args.decode_block_size)
                req["handle"] = endpoint.pull(peer, req["id"], req["src_blocks"], req["blocks"][:need],
                                              req["prompt_len"])
                req["tokens"], req["times"] = [req["first"]], [req["first_time"]]
                loading.append(req)
            for req in list(loading):
                if req["handle"].done():
                    loading.remove(req)
                    req["handle"].wait(0)  # raises the transfer's error, naming request and peer
                    if req["max_new"] <= 1:
                        done[req["id"]] = req
                    else:
                        running.append(req)
            if running:
                for req in decode_step(model, running, layout, device, t0):
                    done[req["id"]] = req
            else:
                from_prefill.poll(0.0005)  # idle: wait a little for the next request
        results.put(("disaggregated", {k: {"tokens": r["tokens"], "times": r["times"], "arrival": r["arrival"]}
                                       for k, r in done.items()}))
        from_prefill.send(("finished", None))


# ------------------------------------------------------------------------------------- report
def summarize(mode: str, done: dict, trace: list[dict], args) -> dict:
    ttft, tpot, good = [], [], 0
    end = 0.0
    for req in trace:
        result = done[req["id"]]
        first = result["times"][0] - req["arrival"]
        per_token = ((result["times"][-1] - result["times"][0]) / (len(result["times"]) - 1)
                     if len(result["times"]) > 1 else 0.0)
        ttft.append(first)
        tpot.append(per_token)
        end = max(end, result["times"][-1])
        good += first * 1e3 <= args.ttft_ms and per_token * 1e3 <= args.tpot_ms
    span = end - trace[0]["arrival"]
    pct = lambda values, q: sorted(values)[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"mode": mode, "requests": len(trace), "ttft_ms_p50": statistics.median(ttft) * 1e3,
            "ttft_ms_p90": pct(ttft, 0.9) * 1e3, "tpot_ms_p50": statistics.median(tpot) * 1e3,
            "tpot_ms_p90": pct(tpot, 0.9) * 1e3, "slo_attainment": good / len(trace),
            "goodput_rps": good / span, "throughput_rps": len(trace) / span, "span_s": span}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: two GPUs (colocated on GPU 0; prefill GPU 0, decode GPU 1)")
    p.add_argument("--requests", type=int, default=None, help="default 32 (GPU) / 12 (CPU)")
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (default 1.5 GPU / 4 CPU)")
    p.add_argument("--prompt-min", type=int, default=None)
    p.add_argument("--prompt-max", type=int, default=None)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=None)
    p.add_argument("--ttft-ms", type=float, default=None, help="TTFT target (default 300 GPU / 500 CPU)")
    p.add_argument("--tpot-ms", type=float, default=None, help="TPOT target (default 60 GPU / 30 CPU)")
    p.add_argument("--layers", type=int, default=None, help="model layers (default 4)")
    p.add_argument("--d-model", type=int, default=None, help="default 512 GPU / 384 CPU")
    p.add_argument("--block-size", type=int, default=16, help="prefill (and colocated) tokens per block")
    p.add_argument("--decode-block-size", type=int, default=32, help="decode tokens per block")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    if args.device == "cuda" and not gpus:
        p.error("--device cuda needs two visible GPUs")
    args.device = "cuda" if args.device == "auto" and gpus else ("cpu" if args.device == "auto" else args.device)
    on_gpu = args.device == "cuda"
    # GPU defaults: a load the per-request Python forward (tens of kernel launches a layer) keeps up with
    defaults = dict(requests=(32, 12), rate=(1.5, 4.0), prompt_min=(128, 32), prompt_max=(1024, 256),
                    output_max=(32, 16), ttft_ms=(300.0, 500.0), tpot_ms=(60.0, 30.0), layers=(4, 4),
                    d_model=(512, 384))
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    args.dtype = "bfloat16" if on_gpu else "float32"
    if not (0 < args.prompt_min <= args.prompt_max and 1 <= args.output_min <= args.output_max):
        p.error("need 0 < --prompt-min <= --prompt-max and 1 <= --output-min <= --output-max")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    heads = max(4, args.d_model // 64)
    cfg = {"vocab": args.vocab, "d_model": args.d_model, "heads": heads, "kv_heads": max(1, heads // 4),
           "head_dim": args.d_model // heads, "layers": args.layers, "max_len": args.prompt_max + args.output_max}
    trace = make_trace(args)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    gpu0, gpu1 = ("cuda:0", "cuda:1") if args.device == "cuda" else ("cpu", "cpu")
    print(f"disagg_serving: {args.requests} requests at {args.rate}/s, prompts {args.prompt_min}-{args.prompt_max}, "
          f"outputs {args.output_min}-{args.output_max} tokens, model {cfg['layers']}L d{cfg['d_model']} "
          f"{cfg['heads']}h/{cfg['kv_heads']}kv {args.dtype} on {args.device}", file=sys.stderr)

    outputs, summaries = {}, []
    # colocated: one process does everything
    t0 = time.time() + 2.0
    proc = ctx.Process(target=colocated_main, args=(args, cfg, trace, gpu0, t0, results))
    proc.start()
    kind, done = results.get(timeout=args.timeout * 10)
    proc.join(30)
    outputs[kind] = done
    # disaggregated: a prefill process and a decode process, kvlink between them
    t0 = time.time() + 4.0  # both processes build their model and link before the first arrival
    to_decode, from_prefill = ctx.Pipe()
    procs = [ctx.Process(target=prefill_main, args=(args, cfg, trace, gpu0, t0, to_decode, results)),
             ctx.Process(target=decode_main, args=(args, cfg, gpu1, t0, from_prefill, results))]
    for proc in procs:
        proc.start()
    transport, held = None, None
    deadline = time.time() + args.timeout * 10
    while "disaggregated" not in outputs or held is None:
        if time.time() > deadline or not any(p.is_alive() for p in procs) and results.empty():
            print("FAILED: the disaggregated run did not finish", file=sys.stderr)
            return 1
        try:
            kind, value = results.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
            continue
        if kind == "transport":
            transport = value
        elif kind == "prefill_held_at_exit":
            held = value
        else:
            outputs[kind] = value
    for proc in procs:
        proc.join(30)

    mismatched = [r["id"] for r in trace
                  if outputs["colocated"][r["id"]]["tokens"] != outputs["disaggregated"][r["id"]]["tokens"]]
    for mode in ("colocated", "disaggregated"):
        summaries.append(summarize(mode, outputs[mode], trace, args))
    print(f"{'mode':<14} {'TTFT p50/p90 (ms)':>18} {'TPOT p50/p90 (ms)':>18} {'SLO met':>8} {'goodput (req/s)':>16} "
          f"{'throughput':>10}")
    for s in summaries:
        print(f"{s['mode']:<14} {s['ttft_ms_p50']:>8.1f} /{s['ttft_ms_p90']:>8.1f} {s['tpot_ms_p50']:>8.1f} /"
              f"{s['tpot_ms_p90']:>8.1f} {s['slo_attainment']:>8.0%} {s['goodput_rps']:>16.2f} "
              f"{s['throughput_rps']:>10.2f}")
    print(f"# targets: TTFT <= {args.ttft_ms:.0f} ms and TPOT <= {args.tpot_ms:.0f} ms; kvlink transport "
          f"{transport}; tokens identical in both modes for {len(trace) - len(mismatched)} of {len(trace)} requests; "
          f"blocks still held by prefill at exit: {len(held)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "model": cfg, "transport": transport, "summaries": summaries,
                       "mismatched": mismatched}, f, indent=2)
    if mismatched:
        print(f"FAILED: generated tokens differ for {mismatched}", file=sys.stderr)
        return 1
    if held:
        print(f"FAILED: prefill never heard that decode received {held}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
