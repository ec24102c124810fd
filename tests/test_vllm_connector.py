"""KVLinkConnector through vLLM v1's call sequence over stand-in vLLM objects (tests/vllm_fakes.py).

Only for what cannot run inside the real engine on a CPU: the same prefill -> decode sequence over
the GPU transports (ipc between two processes on one GPU, NCCL or ipc between two GPUs). Each case
has a real-engine twin, tests/engines/test_vllm_lifecycle.py::test_prefill_to_decode (vLLM 0.33.0's
own Scheduler, allocator and model-runner code, host transport); the host cases here run the
fakes through the same sequence on the CPU, so the two harnesses are seen to agree.
"""

import multiprocessing as mp

import pytest
import torch

import kvlink
from kvlink import ipc
from kvlink.integrations import vllm as kv_vllm
from kvlink.integrations.vllm import ParamsError, RemotePrefillParams
from kvlink.resharding import heads_of_rank
from sharded_caches import make_truth, poisoned_cache, rank_cache, read_rows, truth_rows
from vllm_fakes import FakeEngine, KVCacheBlocks, Request, layer_names, prefill_process_main, run_prefill

LAYERS, HEADS, HEAD_DIM, BLOCKS, BLOCK = 3, 4, 16, 32, 16
SHAPE = dict(num_layers=LAYERS, num_kv=2, num_blocks=BLOCKS, block_size=BLOCK, num_heads=HEADS, head_dim=HEAD_DIM)
NUM_TOKENS = 77
PREFILL_BLOCKS = [5, 17, 2, 30, 11]
DECODE_BLOCKS = [9, 1, 22, 4, 13, 28]  # one more than needed, as vLLM may allocate


def build(prefill_tp, decode_tp, seed, decode_preset, prefill_device="cpu", decode_device="cpu"):
    truth = make_truth(seed, **SHAPE)
    prefill_caches = [rank_cache("vllm_flash_attn_nhd", truth, heads_of_rank(HEADS, prefill_tp, r), prefill_device)
                      for r in range(prefill_tp)]
    decode_caches = []
    for r in range(decode_tp):
        first, stop = heads_of_rank(HEADS, decode_tp, r)
        decode_caches.append(poisoned_cache(decode_preset, num_layers=LAYERS, num_blocks=BLOCKS, block_size=BLOCK,
                                            num_heads=stop - first, head_dim=HEAD_DIM, seed=seed + r,
                                            device=decode_device))
    return truth, prefill_caches, decode_caches


def decode_and_check(decode, decode_caches, decode_preset, truth, params, decode_tp, transport):
    """The decode side of the sequence: matched tokens, allocation, steps until every rank received."""
    request = Request("cmpl-7f3a-0-41b2", list(range(NUM_TOKENS)), dict(params))  # another engine-local id
    decode.add(request)
    count, load_async = decode.scheduler.get_num_new_matched_tokens(request, 0)
    assert (count, load_async) == (NUM_TOKENS, True)
    decode.scheduler.update_state_after_alloc(request, KVCacheBlocks.of(DECODE_BLOCKS), count)
    assert decode.scheduler.get_num_new_matched_tokens(request, 0) == (0, False), "loaded twice"
    decode.until(lambda: request.request_id in decode.finished_recving, what="decode receiving the request")
    assert not decode.failed_recving
    for worker in decode.workers:
        assert all(link["transport"] == transport for link in worker.endpoint.links())
    for rank, (engine_tensors, layout) in enumerate(decode_caches):
        got = read_rows(decode_preset, engine_tensors, layout, DECODE_BLOCKS[:-(-NUM_TOKENS // BLOCK)], NUM_TOKENS)
        want = truth_rows(truth, PREFILL_BLOCKS, NUM_TOKENS, heads_of_rank(HEADS, decode_tp, rank))
        assert torch.equal(got.to(want.device), want), f"decode rank {rank} differs"


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and kvlink.kernels.cuda_available()
ONE_GPU_IPC = torch.cuda.is_available() and kvlink.kernels.cuda_available() and ipc.disabled_reason() is None
CASES = [pytest.param(1, 1, "vllm_flash_attn_nhd", "host", id="1-1-host"),
         pytest.param(2, 1, "vllm_flashinfer_hnd", "host", id="2-1-host"),
         pytest.param(1, 2, "vllm_2026", "host", id="1-2-host")]
GPU_CASES = [pytest.param(1, 1, "vllm_flashinfer_hnd", transport, id=f"1-1-gpus-{transport}",
                          marks=pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs"))
             for transport in ("nccl", "ipc")]


@pytest.mark.parametrize("prefill_tp,decode_tp,decode_preset,transport", CASES + GPU_CASES)
def test_prefill_to_decode_through_the_documented_call_sequence(prefill_tp, decode_tp, decode_preset, transport,
                                                                  generator):
    seed = int(generator.initial_seed())
    devices = ("cuda:0", "cuda:1") if transport != "host" else ("cpu", "cpu")
    truth, prefill_caches, decode_caches = build(prefill_tp, decode_tp, seed, decode_preset, *devices)
    prefill = FakeEngine("kv_producer", prefill_tp, prefill_caches, HEADS, decode_tp_size=decode_tp,
                         transport=transport, timeout=20.0)
    decode = FakeEngine("kv_consumer", decode_tp, decode_caches, HEADS, transport=transport, timeout=20.0,
                        **({"kv_layout": "HND"} if decode_preset.endswith("_hnd") else {}))
    try:
        params = run_prefill(prefill, "cmpl-7f3a-0-8c1e", NUM_TOKENS, PREFILL_BLOCKS)
        assert params["remote_block_ids"] == PREFILL_BLOCKS and params["num_tokens"] == NUM_TOKENS
        assert len(params["remote_addresses"]) == prefill_tp and params["remote_num_kv_heads"] == HEADS
        prefill.step(finished={"cmpl-7f3a-0-8c1e"})
        assert not prefill.finished_sending, "sent before decode confirmed"
        decode_and_check(decode, decode_caches, decode_preset, truth, params, decode_tp, transport)
        prefill.until(lambda: "cmpl-7f3a-0-8c1e" in prefill.finished_sending, what="prefill freeing the blocks")
    finally:
        prefill.close()
        decode.close()


@pytest.mark.skipif(not ONE_GPU_IPC, reason=f"needs a GPU and CUDA IPC ({ipc.disabled_reason()})")
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1), (1, 2)], ids=["1-1", "2-1", "1-2"])
def test_prefill_and_decode_processes_on_one_gpu_over_ipc(prefill_tp, decode_tp, generator):
    """Prefill in its own process, decode here, both on GPU 0 (GPU 1 for decode where there is one):
    the connectors link over CUDA IPC and move the request byte-exact; prefill frees once decode confirms."""
    seed = int(generator.initial_seed())
    decode_device = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    process = ctx.Process(target=prefill_process_main, daemon=True,
                          args=(child, seed, SHAPE, prefill_tp, decode_tp, "cuda:0", "ipc", PREFILL_BLOCKS,
                                NUM_TOKENS))
    process.start()
    decode = None
    try:
        assert conn.poll(120), "the prefill process did not answer"
        params = conn.recv()
        torch.cuda.set_device(decode_device)
        truth = make_truth(seed, **SHAPE)
        _, _, decode_caches = build(1, decode_tp, seed, "vllm_2026", decode_device, decode_device)
        decode = FakeEngine("kv_consumer", decode_tp, decode_caches, HEADS, transport="ipc", timeout=30.0)
        decode_and_check(decode, decode_caches, "vllm_2026", truth, params, decode_tp, "ipc")
        assert conn.poll(60), "prefill never saw decode's confirmation"
        sent, transports = conn.recv()
        assert sent == "sent" and set(transports) == {"ipc"}
    finally:
        if decode is not None:
            decode.close()
        try:
            conn.send("done")
        except OSError:
            pass
        process.join(20)
        if process.is_alive():
            process.kill()


# ---------------------------------------------------------------------------- pure helpers (no engine)
def test_remote_prefill_params_name_the_bad_field():
    good = {"do_remote_prefill": True, "transfer_id": "t", "remote_block_ids": [1, 2], "remote_addresses":
            ["tcp://127.0.0.1:1"], "remote_tp_size": 1, "num_tokens": 20, "remote_block_size": 16}
    parsed = RemotePrefillParams.parse(good)
    assert parsed.remote_block_ids == (1, 2) and parsed.num_tokens == 20 and parsed.remote_tp_size == 1
    for key, value in (("remote_block_ids", "12"), ("num_tokens", -1), ("num_tokens", True), ("transfer_id", 3),
                       ("remote_addresses", ["nowhere"]), ("remote_tp_size", 2), ("remote_block_ids", [1])):
        with pytest.raises(ParamsError) as info:
            RemotePrefillParams.parse({**good, key: value})
        assert info.value.field == key and key in str(info.value)
    with pytest.raises(ParamsError):
        RemotePrefillParams.parse(["not", "a", "dict"])


def test_registration_reads_each_vllm_layout_from_its_tensors():
    for preset in ("vllm_flash_attn_nhd", "vllm_flashinfer_nhd", "vllm_2026", "vllm_mla"):
        heads = 1 if preset == "vllm_mla" else 2
        tensors, _ = kvlink.presets.allocate(preset, num_layers=2, num_blocks=4, block_size=8, num_heads=heads,
                                             head_dim=16)
        layout = kv_vllm.layout_from_vllm(dict(zip(layer_names(2), tensors)))
        assert layout.name == preset and layout.num_blocks == 4 and layout.block_size == 8
    views, _ = kvlink.presets.allocate("vllm_2026", num_layers=2, num_blocks=4, block_size=8, num_heads=1, head_dim=36)
    mla = kv_vllm.layout_from_vllm(dict(zip(layer_names(2), views)), mla=True)  # vLLM 0.33's MLA: [B, 1, N, latent]
    assert mla.name == "vllm_mla" and mla.num_kv == 1 and mla.head_dim == 72
    aliased = dict(zip(layer_names(2), views))
    aliased["model.layers.2.self_attn.attn"] = views[0]  # vLLM's cross-layer KV sharing
    assert kv_vllm.layout_from_vllm(aliased).num_layers == 2
    with pytest.raises(ValueError, match="unrecognised vLLM KV cache shape"):
        kv_vllm.layout_from_vllm({"x": torch.empty(2, 3)})


def test_listen_ports_and_advertised_addresses():
    from types import SimpleNamespace

    config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=4, data_parallel_index=2))
    assert kv_vllm._listen_port({"port": 7700}, config, 3) == 7700 + 2 * 4 + 3
    assert kv_vllm._listen_port({}, config, 3) == 0  # any free port: addresses come from the handshake
    assert kv_vllm._advertised_host({"host": "10.0.0.5"}) == "10.0.0.5"
    assert kv_vllm._advertised_host({"host": "0.0.0.0", "advertise_host": "p0.example"}) == "p0.example"
    assert kv_vllm._advertised_host({"host": "0.0.0.0"}) not in ("0.0.0.0", "")
