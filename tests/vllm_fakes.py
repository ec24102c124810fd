"""The few vLLM objects the connector reads, as plain stand-ins (vLLM is not installed in CI).

Only the attributes the engines' connector interface documents are present, so a connector that reached for anything
else would fail here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVTransferConfig:
    kv_role: str
    kv_connector_extra_config: dict = field(default_factory=dict)
    kv_connector: str = "KVLinkConnector"
    kv_connector_module_path: str = "kvlink.integrations.vllm"


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class CacheConfig:
    block_size: int = 16


@dataclass
class VllmConfig:
    kv_transfer_config: KVTransferConfig
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None


@dataclass
class KVCacheBlocks:
    block_ids: list[int]

    def get_block_ids(self):
        return (list(self.block_ids),)  # one KV-cache group


@dataclass
class NewRequestData:
    req_id: str


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)


def config(role: str, tp: int = 1, block_size: int = 16, **extra) -> VllmConfig:
    return VllmConfig(KVTransferConfig(role, extra), ParallelConfig(tp), CacheConfig(block_size))
