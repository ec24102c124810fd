"""Adapters that plug kvlink into serving engines (the README's "Serving engines" section says how to load them).

- :mod:`kvlink.integrations.vllm`: ``KVLinkConnector``, a vLLM v1 KV connector
  (``kv_connector_module_path="kvlink.integrations.vllm"``).
- :mod:`kvlink.integrations.sglang`: ``KVLinkKVManager``, ``KVLinkKVSender``,
  ``KVLinkKVReceiver`` and ``KVLinkKVBootstrapServer``, an SGLang disaggregation backend.

Both import without the engine installed; where it is importable they subclass its real base
classes. Transfers are keyed on ids carried between the two engines (vLLM's
``kv_transfer_params["transfer_id"]``, SGLang's bootstrap room), never on engine-local request ids.
"""
