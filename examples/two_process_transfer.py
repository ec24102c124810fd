"""Move one request's KV-cache blocks from a prefill process to a decode process.

    python examples/two_process_transfer.py            # a GPU when there is one, else the CPU
    python examples/two_process_transfer.py --device cpu

The prefill process owns a vLLM FlashAttention-shaped cache (per layer ``[2, B, 16, H, D]``),
the decode process a FlashInfer HND one with 32-token blocks: kvlink converts layout and block
size on the way. The prefill endpoint's address reaches the decode side through a
multiprocessing pipe here; an engine carries it in its own metadata (vLLM's kv_transfer_params,
SGLang's bootstrap server). The prefill process must stay alive, with its endpoint open, until
the decode side has pulled: it waits for ``finished_sends()`` to list the request, which is when
an engine may free the request's blocks. Exits 1 if a byte differs.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import time

import torch

import kvlink

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 4, 4, 64
PREFILL_BLOCKS, PREFILL_BLOCK_SIZE = 64, 16
DECODE_BLOCKS, DECODE_BLOCK_SIZE = 32, 32
REQUEST, NUM_TOKENS = "req-42", 300
SRC_BLOCKS = [5, 17, 2, 40, 33, 8, 61, 12, 20, 9, 44, 1, 30, 27, 50, 3, 11, 38, 59]   # ceil(300 / 16) = 19
DST_BLOCKS = [7, 0, 21, 13, 30, 4, 18, 25, 9, 2]                                       # ceil(300 / 32) = 10


def prefill_cache(device: str) -> list[torch.Tensor]:
    """The prefill engine's cache: one ``[2, B, N, H, D]`` tensor per layer, filled from a seed
    so the decode process can rebuild the same bytes to check against."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, PREFILL_BLOCKS, PREFILL_BLOCK_SIZE, NUM_HEADS, HEAD_DIM, generator=generator)
            .to(torch.bfloat16).to(device) for _ in range(NUM_LAYERS)]


def run_prefill(address_pipe, device: str, timeout: float) -> None:
    logging.basicConfig(level=logging.INFO, format="prefill %(name)s: %(message)s")
    layout = kvlink.presets.vllm_flash_attn(prefill_cache(device), kv_layout="NHD")
    with kvlink.Endpoint(layout, name="prefill-0", listen="tcp://127.0.0.1:0", timeout=timeout) as prefill:
        address_pipe.send(prefill.address)   # the decode side needs this to connect
        # Serve until the decode side confirms it has the blocks (the endpoint's own thread
        # serves pulls; this loop only watches for the confirmation).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for request_id, ok in prefill.finished_sends():
                print(f"prefill: decode has {request_id} (ok={ok}); its blocks may be freed")
                return
            if address_pipe.poll(0.05):   # the decode side gave up
                return
        print(f"prefill: nobody pulled {REQUEST} within {timeout} s", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="where both caches live (default: cuda:0 when a GPU is visible, else cpu)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds any wait may take (default 30)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="decode %(name)s: %(message)s")  # link logs: transport, path

    decode_pipe, prefill_pipe = mp.Pipe()
    prefill = mp.get_context("spawn").Process(target=run_prefill, args=(prefill_pipe, args.device, args.timeout))
    prefill.start()
    try:
        if not decode_pipe.poll(args.timeout):
            raise TimeoutError(f"the prefill process did not report its address within {args.timeout} s")
        prefill_address = decode_pipe.recv()

        # the decode engine's cache: FlashInfer HND, per layer [B, 2, H, N, D], poisoned with NaN
        decode_tensors = [torch.full((DECODE_BLOCKS, 2, NUM_HEADS, DECODE_BLOCK_SIZE, HEAD_DIM), float("nan"),
                                     dtype=torch.bfloat16, device=args.device) for _ in range(NUM_LAYERS)]
        decode_layout = kvlink.presets.flashinfer(decode_tensors, kv_layout="HND")
        with kvlink.Endpoint(decode_layout, name="decode-0", listen=None, timeout=args.timeout) as decode:
            peer = decode.connect(prefill_address)   # handshake; the log line names the transport
            handle = decode.pull(peer, REQUEST, SRC_BLOCKS, DST_BLOCKS, NUM_TOKENS)
            handle.wait(timeout=args.timeout)        # on a GPU an engine would order its stream after
            print(f"decode: {handle.stats.payload_bytes} bytes of {REQUEST} in "
                  f"{handle.stats.seconds * 1e6:.0f} us over {decode.links()[0]['transport']}")
            prefill.join(args.timeout)               # it leaves once it has seen the confirmation

        # check every token against the prefill's cache, rebuilt from its seed
        source = prefill_cache("cpu")
        wrong = 0
        for token in range(NUM_TOKENS):
            src_block, src_slot = SRC_BLOCKS[token // PREFILL_BLOCK_SIZE], token % PREFILL_BLOCK_SIZE
            dst_block, dst_slot = DST_BLOCKS[token // DECODE_BLOCK_SIZE], token % DECODE_BLOCK_SIZE
            for layer in range(NUM_LAYERS):
                want = source[layer][:, src_block, src_slot]                      # [2, H, D]
                got = decode_tensors[layer][dst_block, :, :, dst_slot].cpu()      # [2, H, D]
                wrong += int((got.view(torch.int16) != want.view(torch.int16)).sum())
        print(f"decode: {NUM_TOKENS} tokens x {NUM_LAYERS} layers checked, {wrong} wrong elements")
        return 1 if wrong else 0
    finally:
        decode_pipe.send("done")
        prefill.join(5)
        if prefill.is_alive():
            prefill.kill()


if __name__ == "__main__":
    sys.exit(main())
