"""SGLang plug-in: ``--disaggregation-transfer-backend kvlink`` on an unpatched SGLang.

Installing kvlink registers :func:`register` as an entry point of the group
``sglang.srt.plugins``; SGLang's ``load_plugins()`` runs it in the engine, the CLI and every
scheduler process (``SGLANG_PLUGINS=kvlink`` restricts loading to it). SGLang 0.5.23 has no
registry of transfer backends (``TransferBackend`` is a closed Enum, ``get_kv_class`` an if/elif
chain), so the plug-in

1. adds ``kvlink`` to the CLI's choices (``add_disagg_transfer_backend_choices``);
2. REPLACEs ``sglang.srt.disaggregation.utils.TransferBackend`` with the same Enum plus
   ``KVLINK = "kvlink"`` (SGLang's HookRegistry rebinds every module that imported it);
3. wraps ``get_kv_class`` (AROUND): for ``kvlink`` it returns kvlink's manager, sender,
   receiver and bootstrap server (and SGLang's own KVArgs), and passes everything else on.

:func:`register` is idempotent and does nothing (but log) when SGLang is not installed.
"""

from __future__ import annotations

import enum
import importlib
import logging

log = logging.getLogger("kvlink.sglang")

BACKEND_NAME = "kvlink"
TRANSFER_BACKEND_TARGET = "sglang.srt.disaggregation.utils.TransferBackend"
GET_KV_CLASS_TARGET = "sglang.srt.disaggregation.utils.get_kv_class"
BACKEND_MODULE = "kvlink.integrations.sglang"  # the module whose classes "kvlink" resolves to


def kv_class(class_type):
    """kvlink's class for a ``KVClassType`` (or its value: "kvargs", "manager", ...)."""
    backend = importlib.import_module(BACKEND_MODULE)
    name = str(getattr(class_type, "value", class_type)).lower()
    classes = {"kvargs": backend.KVArgs, "manager": backend.KVLinkKVManager, "sender": backend.KVLinkKVSender,
               "receiver": backend.KVLinkKVReceiver, "bootstrap_server": backend.KVLinkKVBootstrapServer}
    if name not in classes:
        raise ValueError(f"kvlink has no SGLang class of type {class_type!r}")
    return classes[name]


def get_kv_class_around(original, transfer_backend, class_type):
    """The AROUND hook on ``get_kv_class``: kvlink's classes for "kvlink", SGLang's otherwise."""
    value = getattr(transfer_backend, "value", transfer_backend)
    if value == BACKEND_NAME:
        return kv_class(class_type)
    if isinstance(value, str):
        # Old and new enum members are different objects: re-wrap by value, so the original's
        # `== TransferBackend.MOONCAKE` comparisons (against the replaced Enum) match.
        from sglang.srt.disaggregation import utils as du

        transfer_backend = du.TransferBackend(value)
    return original(transfer_backend, class_type)


get_kv_class_around._kvlink_hook = True  # type: ignore[attr-defined]


def extended_transfer_backend(current):
    """``current`` (SGLang's TransferBackend Enum) with a ``KVLINK`` member added."""
    members = {m.name: m.value for m in current}
    members.setdefault(BACKEND_NAME.upper(), BACKEND_NAME)
    extended = enum.Enum("TransferBackend", members, module=current.__module__)
    extended.__qualname__ = "TransferBackend"
    extended._kvlink_hook = True
    return extended


def _pending(registry, target: str) -> bool:
    return any(getattr(hook, "_kvlink_hook", False) for _, hook, _ in registry._hooks.get(target, ()))


def _wrapped_by_us(function) -> bool:
    """Whether HookRegistry already wrapped ``function`` with our hook (its wrapper closes over it)."""
    for _ in range(32):
        if function is None:
            return False
        cells = getattr(function, "__closure__", None) or ()
        if any(getattr(cell, "cell_contents", None) is get_kv_class_around for cell in cells):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def register() -> bool:
    """The entry point: make SGLang accept and build the "kvlink" transfer backend.

    Returns True when SGLang is present (hooks registered or already in place), False when it
    is not. Safe to call any number of times, before or after ``HookRegistry.apply_hooks()``.
    """
    try:
        from sglang.srt.disaggregation import utils as du
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
        from sglang.srt.server_args import add_disagg_transfer_backend_choices
        from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
    except Exception as exc:  # noqa: BLE001 - SGLang absent or of another shape: nothing to do
        log.info("kvlink: SGLang not importable (%s); the SGLang plug-in does nothing", exc)
        return False

    if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND_NAME])
    if BACKEND_NAME.upper() not in du.TransferBackend.__members__ and not _pending(HookRegistry,
                                                                                   TRANSFER_BACKEND_TARGET):
        HookRegistry.register(TRANSFER_BACKEND_TARGET, extended_transfer_backend(du.TransferBackend),
                              HookType.REPLACE)
    if not _wrapped_by_us(du.get_kv_class) and not _pending(HookRegistry, GET_KV_CLASS_TARGET):
        HookRegistry.register(GET_KV_CLASS_TARGET, get_kv_class_around, HookType.AROUND)
    log.info("kvlink: SGLang plug-in registered (--disaggregation-transfer-backend %s)", BACKEND_NAME)
    return True

