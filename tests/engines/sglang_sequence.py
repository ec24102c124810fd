"""The calls SGLang 0.5.23 makes on kvlink's sender, receiver and manager for one request.

Recorded from the real engine (tests/engines/test_sglang_engine.py checks that the real queues
still make exactly these calls), replayed by the fake-based GPU tests (tests/test_sglang_backend.py),
which cannot run SGLang. One request, chunked prefill of two chunks, no state buffers; each call
is (method, types of the positional arguments, names of the keyword arguments), and repeats of
one call in a row count once (SGLang polls as often as its loop turns).
No import of SGLang or torch here: the project's own environment imports this too.
"""

SENDER_CALLS = [
    ("__init__", (), ("bootstrap_addr", "bootstrap_room", "mgr", "req_has_disagg_prefill_dp_rank")),
    ("poll", (), ()),  # PrefillBootstrapQueue.pop_bootstrapped: Bootstrapping, then WaitingForInput
    ("pop_decode_prefix_len", (), ()),  # finalize_bootstrap
    ("init", ("int", "int"), ()),  # finalize_bootstrap: (num_pages, metadata_buffer_index)
    ("get_max_transfer_tokens", (), ()),  # _send_kv_chunk, a non-last chunk
    ("should_send_kv_chunk", ("int", "bool"), ()),
    ("send", ("ndarray", "NoneType"), ("num_kv_tokens",)),
    ("get_max_transfer_tokens", (), ()),  # _send_kv_chunk, the last chunk (metadata row set first)
    ("should_send_kv_chunk", ("int", "bool"), ()),
    ("send", ("ndarray", "list"), ("num_kv_tokens",)),
    ("poll", (), ()),  # process_disagg_prefill_inflight_queue until Success
    ("clear", (), ()),
    ("get_transfer_metric", (), ()),
]

RECEIVER_CALLS = [
    ("__init__", (), ("bootstrap_addr", "bootstrap_room", "mgr")),  # _create_receiver_and_enqueue
    ("poll", (), ()),
    ("init", ("int",), ()),  # _init_receiver(prefill_dp_rank), once try_ensure_parallel_info said True
    ("poll", (), ()),  # _update_handshake_waiters: WaitingForInput
    ("send_metadata", ("ndarray", "int", "list"), ("decode_prefix_len",)),  # _send_kv_metadata
    ("poll", (), ()),  # pop_transferred through the metadata gate until Success
    ("clear", (), ()),  # _commit_transfer_to_req
]

MANAGER_CALLS = [
    ("try_ensure_parallel_info", ("str",), ()),  # the slow path of the first request to a prefill
]

SENDER_METHODS = ("__init__", "init", "poll", "send", "pop_decode_prefix_len", "should_send_kv_chunk",
                  "get_max_transfer_tokens", "clear", "get_transfer_metric", "failure_exception", "abort",
                  "mark_prefill_complete")
RECEIVER_METHODS = ("__init__", "init", "poll", "send_metadata", "clear", "failure_exception", "abort")
MANAGER_METHODS = ("try_ensure_parallel_info",)


class Recorder:
    """Wraps the methods of kvlink's classes to record calls per object, repeats collapsed."""

    def __init__(self):
        self.calls: dict[int, list] = {}
        self._saved: list = []

    def install(self, cls, methods) -> None:
        import functools

        for name in methods:
            original = cls.__dict__.get(name)
            if original is None:
                continue

            def wrapper(obj, *args, __original=original, __name=name, **kwargs):
                call = (__name, tuple(type(a).__name__ for a in args), tuple(sorted(kwargs)))
                seen = self.calls.setdefault(id(obj), [])
                if not seen or seen[-1] != call:
                    seen.append(call)
                return __original(obj, *args, **kwargs)

            functools.update_wrapper(wrapper, original)
            self._saved.append((cls, name, original))
            setattr(cls, name, wrapper)

    def of(self, obj) -> list:
        return self.calls.get(id(obj), [])

    def uninstall(self) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()
