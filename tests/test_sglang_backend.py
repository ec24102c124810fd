"""kvlink's SGLang adapters on GPUs, where SGLang itself cannot run in CI: SGLang's calls replayed.

The real-engine tests (tests/engines/test_sglang_engine.py) drive the adapters through SGLang
0.5.23's own queues on the CPU; the GPU cases cannot run there (no GPU in CI, and SGLang is not
installed in this environment). So here the prefill side runs in a process of its own and the
decode side in the test process, each replaying exactly the calls the real queues make
(tests/engines/sglang_sequence.py, which the real-engine test
``test_sglang_makes_the_calls_the_gpu_tests_replay`` holds to the engine), over buffers shaped
as SGLang's pools and metadata buffers are, with KVArgs as SGLang fills them on each side.

- ``host`` on the CPU: the sequence itself, in this environment (its real-engine twin is
  ``test_a_request_completes_in_both_engines_byte_exact_with_its_metadata_row``);
- ``ipc`` on one GPU: two processes on the same GPU (the lent H200);
- ``ipc`` and ``nccl`` between two GPUs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvlink import ipc, kernels
from kvlink.integrations import sglang as kv_sglang

sys.path.insert(0, str(Path(__file__).resolve().parent / "engines"))
import sglang_sequence as seq  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, PAGES = 2, 2, 64, 16, 64
PROMPT, CHUNK = 40, 16  # chunked prefill: one page, then the rest
PREFILL_PAGES, DECODE_PAGES = [9, 4, 30], [12, 2, 45]
PREFILL_AUX, DECODE_AUX = 2, 5  # metadata buffer indices
ROOM = 0x5EED_0001
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
HAVE_GPU = GPUS >= 1 and kernels.cuda_available()
NO_IPC = ipc.disabled_reason() if HAVE_GPU else "needs a CUDA GPU and CuPy"


def aux_buffers(slots: int = 8, hidden: int = 128) -> list[torch.Tensor]:
    """SGLang's MetadataBuffers (utils.py): CPU rows per request, bootstrap_room last."""
    return [torch.zeros(slots, 16, dtype=torch.int32), torch.zeros(slots, 16, dtype=torch.int32),
            torch.zeros(slots, 16, dtype=torch.float32), torch.zeros(slots, 16, dtype=torch.int32),
            torch.zeros(slots, 128, dtype=torch.float32), torch.zeros(slots, 128, dtype=torch.int32),
            torch.zeros(slots, 16, dtype=torch.float32), torch.zeros(slots, 16, dtype=torch.int64),
            torch.zeros(slots, hidden, dtype=torch.float16), torch.zeros(slots, 8, dtype=torch.uint64)]


def pool(device: str, fill_seed: int | None) -> list[torch.Tensor]:
    """MHATokenToKVPool's buffers: K of every layer, then V, each [slots, heads, head_dim]."""
    gen = torch.Generator().manual_seed(fill_seed if fill_seed is not None else 0)
    slots = (PAGES + 1) * PAGE
    return [torch.randn(slots, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).to(device)
            if fill_seed is not None else torch.zeros(slots, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
            for _ in range(2 * LAYERS)]


def kv_args(buffers, aux, device: str, mode: str):
    """KVArgs as PrefillBootstrapQueue / DecodePreallocQueue fill them (decode: no kv_head_num)."""
    args = SimpleNamespace(
        engine_rank=0, pp_rank=0, system_dp_rank=0, kv_cache_dtype_str="auto", kv_layout=None,
        kv_data_ptrs=[b.data_ptr() for b in buffers], kv_data_lens=[b.nbytes for b in buffers],
        kv_item_lens=[b[0].nbytes * PAGE for b in buffers], num_draft_entries=0, kv_layer_ids=[], page_size=PAGE,
        aux_data_ptrs=[a.data_ptr() for a in aux], aux_data_lens=[a.nbytes for a in aux],
        aux_item_lens=[a[0].nbytes for a in aux], state_types=[], state_data_ptrs=[], state_data_lens=[],
        state_item_lens=[], ib_device=None, gpu_id=torch.device(device).index or 0)
    if mode == "prefill":
        args.kv_head_num, args.total_kv_head_num = HEADS, HEADS
    return args


def server_args(port: int):
    return SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=port, tp_size=1, dp_size=1, pp_size=1)


def poll_until(obj, state, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = obj.poll()
        if got == state:
            return
        if got == kv_sglang.KVPoll.Failed:
            raise AssertionError(f"{type(obj).__name__} failed: {obj.error}")
        time.sleep(0.002)
    raise AssertionError(f"{type(obj).__name__} not {state} within {timeout} s (last {obj.poll()})")


def prefill_main(conn, device: str, transport: str, seed: int) -> None:
    """The prefill rank: bootstrap server, manager, and the sender's calls as SGLang makes them."""
    os.environ["KVLINK_TRANSPORT"] = transport
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    recorder = seq.Recorder()
    recorder.install(kv_sglang.KVLinkKVSender, seq.SENDER_METHODS)
    try:
        buffers, aux = pool(device, seed), aux_buffers()
        server = kv_sglang.KVLinkKVBootstrapServer("127.0.0.1", 0)
        manager = kv_sglang.KVLinkKVManager(kv_args(buffers, aux, device, "prefill"), "prefill",
                                            server_args(server.port))
        conn.send(server.port)
        conn.recv()  # the decode side has a receiver
        sender = kv_sglang.KVLinkKVSender(mgr=manager, bootstrap_addr=f"127.0.0.1:{server.port}",
                                          bootstrap_room=ROOM, req_has_disagg_prefill_dp_rank=False)
        poll_until(sender, kv_sglang.KVPoll.WaitingForInput)  # pop_bootstrapped
        prefix = sender.pop_decode_prefix_len()
        sender.init(len(PREFILL_PAGES), PREFILL_AUX)
        # the forward pass wrote the KV (the seed's bytes); set_buf writes the metadata row
        aux[0][PREFILL_AUX, 0] = 4242
        aux[1][PREFILL_AUX, :4] = torch.tensor([16, 16, 0, 0], dtype=torch.int32)
        aux[8][PREFILL_AUX] = torch.arange(aux[8].shape[1], dtype=torch.float16)
        aux[9][PREFILL_AUX, 0] = ROOM
        for start, stop, last in ((prefix, CHUNK, False), (CHUNK, PROMPT, True)):  # _send_kv_chunk
            pages = np.asarray(PREFILL_PAGES[start // PAGE:-(-stop // PAGE)], dtype=np.int32)
            sender.get_max_transfer_tokens()
            if sender.should_send_kv_chunk(len(pages), last):
                sender.send(pages, [] if last else None, num_kv_tokens=stop - start)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        poll_until(sender, kv_sglang.KVPoll.Success)  # process_disagg_prefill_inflight_queue
        sender.clear()
        metric = sender.get_transfer_metric()
        conn.send(("ok", recorder.of(sender), metric.transfer_total_bytes,
                   [a[PREFILL_AUX].contiguous().view(torch.uint8).numpy().tobytes() for a in aux]))
        conn.recv()
        manager.close()
        server.close()
    except BaseException as exc:  # noqa: BLE001 - report to the test process
        import traceback

        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


CASES = [
    pytest.param("cpu", "cpu", "host", id="host-cpu"),
    pytest.param("cuda:0", "cuda:0", "ipc", id="ipc-one-gpu-two-processes",
                 marks=pytest.mark.skipif(NO_IPC is not None, reason=f"needs a GPU and CUDA IPC ({NO_IPC})")),
    pytest.param("cuda:0", "cuda:1", "ipc", id="ipc-two-gpus",
                 marks=pytest.mark.skipif(GPUS < 2 or NO_IPC is not None, reason="needs two GPUs and CUDA IPC")),
    pytest.param("cuda:0", "cuda:1", "nccl", id="nccl-two-gpus",
                 marks=pytest.mark.skipif(GPUS < 2 or not HAVE_GPU, reason="needs two CUDA GPUs")),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefill_device,decode_device,transport", CASES)
def test_sglangs_call_sequence_moves_the_request_byte_exact(prefill_device, decode_device, transport, monkeypatch):
    monkeypatch.setenv("KVLINK_TRANSPORT", transport)
    seed = 1234
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=prefill_main, args=(child, prefill_device, transport, seed), daemon=True)
    process.start()
    recorder = seq.Recorder()
    recorder.install(kv_sglang.KVLinkKVReceiver, seq.RECEIVER_METHODS)
    recorder.install(kv_sglang.KVLinkKVManager, seq.MANAGER_METHODS)
    manager = None
    try:
        assert parent.poll(120), "the prefill process did not start"
        port = parent.recv()
        if isinstance(port, tuple):
            raise AssertionError(port[1])
        if decode_device.startswith("cuda"):
            torch.cuda.set_device(torch.device(decode_device))
        buffers, aux = pool(decode_device, None), aux_buffers()
        manager = kv_sglang.KVLinkKVManager(kv_args(buffers, aux, decode_device, "decode"), "decode",
                                            server_args(port))
        address = f"127.0.0.1:{port}"
        receiver = kv_sglang.KVLinkKVReceiver(mgr=manager, bootstrap_addr=address, bootstrap_room=ROOM)
        parent.send("go")
        receiver.poll()
        deadline = time.monotonic() + 60
        while not manager.try_ensure_parallel_info(address):  # SGLang retries about once a second
            assert time.monotonic() < deadline, "the prefill never registered"
            time.sleep(0.05)
        receiver.init(0)
        poll_until(receiver, kv_sglang.KVPoll.WaitingForInput)
        receiver.send_metadata(np.asarray(DECODE_PAGES, dtype=np.int32), DECODE_AUX, [], decode_prefix_len=0)
        poll_until(receiver, kv_sglang.KVPoll.Success)
        got_row = [a[DECODE_AUX].contiguous().view(torch.uint8).numpy().tobytes() for a in aux]
        receiver.clear()
        assert parent.poll(60), "the prefill never reached Success"
        status, *result = parent.recv()
        if status != "ok":
            raise AssertionError(result[0])
        sender_calls, total_bytes, prefill_row = result
        assert [link["transport"] for link in manager.endpoint.links()] == [transport]
        truth = pool("cpu", seed)
        src = torch.tensor([p * PAGE + t for p in PREFILL_PAGES for t in range(PAGE)][:PROMPT])
        dst = torch.tensor([p * PAGE + t for p in DECODE_PAGES for t in range(PAGE)][:PROMPT])
        for i, (want, have) in enumerate(zip(truth, buffers)):
            assert torch.equal(have.cpu()[dst], want[src]), f"buffer {i} differs"
        assert got_row == prefill_row, "the metadata row differs"
        assert total_bytes == len(PREFILL_PAGES) * sum(b[0].nbytes * PAGE for b in buffers)
        # the calls were SGLang's (the real-engine test holds sglang_sequence to the engine)
        assert sender_calls == seq.SENDER_CALLS
        assert recorder.of(receiver) == seq.RECEIVER_CALLS
        assert recorder.of(manager) == seq.MANAGER_CALLS
        parent.send("stop")
    finally:
        recorder.uninstall()
        if manager is not None:
            manager.close()
        process.join(30)
        if process.is_alive():
            process.kill()


def test_wire_messages_round_trip_and_refuse_garbage():
    """The typed request metadata on the control socket (decoded on the manager's I/O thread)."""
    meta = kv_sglang.RoomMetadata(room=7, nonce="abc", decode_rank=1, decode_tp=2, decode_prefix_len=16,
                                  num_pages=3, page_size=16, pulls=True, reply_to="tcp://127.0.0.1:5",
                                  endpoint="d", aux_item_lens=(64, 64), state_types=("swa",),
                                  state_item_lens=((1024, 1024),), state_counts=(2,))
    assert kv_sglang.decode_message(kv_sglang.encode_message(meta)) == meta
    pages = kv_sglang.RoomPages(room=7, nonce="abc", prefill_rank=0, pages=(1, 2), num_tokens=20,
                                aux=(b"\0" * 64,), state=(None, (b"x", b"y")))
    assert kv_sglang.decode_message(kv_sglang.encode_message(pages)) == pages
    abort = kv_sglang.RoomAbort(room=7, nonce="", side="decode", rank=0, reason="client gone")
    assert kv_sglang.decode_message(kv_sglang.encode_message(abort)) == abort
    import msgpack

    for junk in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"t": "META", "v": 1}),
                 msgpack.packb({"t": "META", "v": 2}), msgpack.packb({"t": "ABORT", "v": 1, "room": 1, "nonce": "",
                                                                    "side": "elsewhere", "rank": 0, "reason": ""})):
        with pytest.raises(kv_sglang.ProtocolError):
            kv_sglang.decode_message(junk)


def test_kv_cache_dtype_strings_map_to_element_types():
    assert kv_sglang.kv_dtype_of("fp8_e5m2") is torch.float8_e5m2
    assert kv_sglang.kv_dtype_of("fp8_e4m3") is torch.float8_e4m3fn
    assert kv_sglang.kv_dtype_of("bf16") is torch.bfloat16
    assert kv_sglang.kv_dtype_of("auto") is torch.uint8  # the model's dtype: moved as its bytes
