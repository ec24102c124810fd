"""A prefill endpoint in its own process, driven over a pipe (tests and the benchmark's CPU twin).

The cache is filled from a seed, so the test process rebuilds the same bytes to verify against
without any copy crossing the processes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp

import torch


def build_cache(preset: str, seed: int, shape: dict, device: str = "cpu"):
    from engine_access import random_fill
    from kvlink import presets

    return presets.allocate(preset, device=device, fill=random_fill(torch.Generator().manual_seed(seed)), **shape)


def next_command(conn, check_seconds: float = 1.0):
    """The next command from the test process, or None once it is gone (its end of the pipe closed
    or the process died). A helper lives exactly as long as the test using it: a test may leave
    its pipe silent for as long as it likes (a soak on a slow machine) without the helper leaving."""
    parent = mp.parent_process()
    while not conn.poll(check_seconds):
        if parent is not None and not parent.is_alive():
            return None
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def prefill_main(conn, preset: str, seed: int, shape: dict, device: str, endpoint_kwargs: dict) -> None:
    """Serve pulls until told to stop; answer layer_ready and finished_sends commands.

    ``shape`` may carry ``rank_heads`` (a tensor-parallel rank): the cache then holds those heads
    of a truth built from ``seed`` (tests/sharded_caches.py), ``shape`` being the truth's.
    """
    import kvlink

    logging.basicConfig(level=logging.INFO, format="prefill %(levelname)s %(message)s")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    shape = dict(shape)
    rank_heads = shape.pop("rank_heads", None)
    if rank_heads is not None:
        from sharded_caches import make_truth, rank_cache

        _, layout = rank_cache(preset, make_truth(seed, **shape), tuple(rank_heads), device)
    else:
        _, layout = build_cache(preset, seed, shape, device)
    endpoint_kwargs.setdefault("name", "prefill")
    with kvlink.Endpoint(layout, **endpoint_kwargs) as endpoint:
        conn.send(endpoint.address)
        while True:
            command = next_command(conn)
            if command is None:
                return
            command, *args = command
            if command == "stop":
                return
            if command == "layer_ready":
                request, layers, *pulls = args
                for layer in layers:
                    endpoint.layer_ready(request, layer, pulls=pulls[0] if pulls else 1)
                conn.send(True)
            elif command == "finished_sends":
                conn.send(endpoint.finished_sends())
            elif command == "cancel":
                conn.send(endpoint.cancel_serving(args[0]))
            elif command == "links":
                conn.send(endpoint.links())


class PrefillProcess:
    def __init__(self, preset: str, seed: int, shape: dict, device: str = "cpu", **endpoint_kwargs):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=prefill_main, args=(child, preset, seed, shape, device, endpoint_kwargs),
                                   daemon=True)
        self.process.start()
        if not self.conn.poll(60):
            self.process.kill()
            raise TimeoutError("prefill process did not start")
        self.address = self.conn.recv()

    def call(self, *command, timeout: float = 30):
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"prefill process: no answer to {command[0]}")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def decode_main(conn, preset: str, seed: int, shape: dict, address: str, pull: tuple, device: str,
                endpoint_kwargs: dict) -> None:
    """Connect to ``address`` and start one pull ("doomed"), then report once data has landed and
    idle until killed. A layer-wise pull (GPU tests) reports ("pulled",) first and waits for layer
    1, which the test's prefill side announces; a plain one reports after its first chunk."""
    import time

    import kvlink

    logging.basicConfig(level=logging.INFO, format="decode %(levelname)s %(message)s")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    _, layout = build_cache(preset, seed, shape, device)
    endpoint = kvlink.Endpoint(layout, name="doomed-decode", listen=None, **endpoint_kwargs)
    peer = endpoint.connect(address)
    src, dst, num_tokens, layerwise = pull
    handle = endpoint.pull(peer, "doomed", src, dst, num_tokens, layerwise=layerwise)
    if layerwise:
        conn.send(("pulled",))
        handle.layer_event(1).synchronize()
    else:
        deadline = time.time() + 30
        while handle.chunks_landed == 0 and not handle.done() and time.time() < deadline:
            time.sleep(0.001)
    conn.send(("started", handle.chunks_landed, handle.done(), str(handle.error) if handle.error else None))
    next_command(conn)  # idle until the test kills this process or goes away


class DecodeProcess:
    """A decode endpoint in its own process with one pull under way (the fault tests kill it).

    ``pull``: (src blocks, dst blocks, num_tokens, layerwise). For a layer-wise pull, ``on_pulled``
    runs once the pull is issued (the caller announces the first layers there)."""

    def __init__(self, preset: str, seed: int, shape: dict, address: str, pull: tuple, device: str = "cpu",
                 on_pulled=None, **endpoint_kwargs):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=decode_main, args=(child, preset, seed, shape, address, pull, device,
                                                             endpoint_kwargs), daemon=True)
        self.process.start()
        reply = self._receive()
        if reply[0] == "pulled":
            on_pulled()
            reply = self._receive()
        self.started = reply

    def _receive(self):
        if not self.conn.poll(60):
            self.process.kill()
            raise TimeoutError("decode process did not get its pull under way")
        return self.conn.recv()
