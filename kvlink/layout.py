"""What an engine's paged KV cache looks like in memory, read from its real tensors.

Every supported engine layout reduces to the same model: a list of *planes*, one per
(layer, K or V) — a single plane per layer for MLA's latent — and inside each plane a 4-D
strided view ``[block, token, head, head_dim]``. The strides are read from the engine's
tensors, never assumed, so strided views into one shared buffer (vLLM 2026, TensorRT-LLM)
work the same as one contiguous tensor per layer.

The pack/unpack kernels and the torch reference both address a token as
``plane_base + block * block_stride + token * token_stride + head * head_stride``; head_dim
must be the innermost, unit-stride dimension (true of every engine we know).

Engine-specific constructors live in :mod:`kvlink.presets`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch

from kvlink.errors import ArgumentTypeError, InvalidArgument

# Dtypes a cache may use, with the code that identifies them on the wire (kvlink.wire).
# Codes are part of the wire format: never renumber, only append.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.uint8: 4,  # raw bytes, e.g. vLLM's fp8 MLA cache (656 bytes a token)
    torch.float8_e4m3fn: 5,
    torch.float8_e5m2: 6,
    torch.int8: 7,
}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True, eq=False)
class CacheLayout:
    """An engine's paged KV cache, described by per-plane 4-D views.

    Build one with a constructor in :mod:`kvlink.presets` (or :meth:`from_planes` for a
    layout of your own). The layout keeps the engine's tensors alive; it never copies them.

    Attributes:
        name: the preset that built it, e.g. ``"vllm_flash_attn_nhd"``; used in logs and errors.
        num_layers: layers in this cache (the local ones, under pipeline parallelism).
        num_kv: 2 when K and V are stored, 1 for MLA's single latent.
        num_blocks: blocks (pages) per plane.
        block_size: tokens per block.
        num_heads: KV heads held locally.
        head_dim: elements per head (576 for an MLA latent, 656 for vLLM's fp8 MLA bytes).
        dtype: element type.
        block_stride, token_stride, head_stride: byte strides inside every plane.
        planes: ``num_layers * num_kv`` tensors ``[num_blocks, block_size, num_heads,
            head_dim]`` ordered layer-major (layer 0 K, layer 0 V, layer 1 K, ...).
    """

    name: str
    num_layers: int
    num_kv: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    block_stride: int
    token_stride: int
    head_stride: int
    planes: tuple[torch.Tensor, ...] = field(repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_planes(cls, name: str, planes_by_layer: Sequence[Sequence[torch.Tensor]]) -> "CacheLayout":
        """Build a layout from ``[block, token, head, head_dim]`` views, one list per layer.

        Each layer's list holds its K and V views (or the one MLA latent view). All views must
        share shape, dtype, device and strides, and head_dim must have unit stride.
        """
        if not isinstance(planes_by_layer, (list, tuple)) or len(planes_by_layer) == 0:
            raise InvalidArgument(f"{name}: expected a non-empty list of layers, got {type(planes_by_layer).__name__}")
        num_kv = len(planes_by_layer[0])
        if num_kv not in (1, 2):
            raise InvalidArgument(f"{name}: each layer needs 1 (MLA) or 2 (K, V) planes, got {num_kv}")
        flat: list[torch.Tensor] = []
        for layer_idx, layer_planes in enumerate(planes_by_layer):
            if len(layer_planes) != num_kv:
                raise InvalidArgument(
                    f"{name}: layer {layer_idx} has {len(layer_planes)} planes, layer 0 has {num_kv}"
                )
            for plane in layer_planes:
                if not isinstance(plane, torch.Tensor):
                    raise ArgumentTypeError(f"{name}: layer {layer_idx}: expected torch.Tensor, got {type(plane).__name__}")
                flat.append(plane)

        first = flat[0]
        if first.dim() != 4:
            raise InvalidArgument(f"{name}: plane views must be 4-D [block, token, head, head_dim], got shape {tuple(first.shape)}")
        if first.dtype not in DTYPE_CODES:
            raise ArgumentTypeError(f"{name}: unsupported cache dtype {first.dtype}; supported: {sorted(map(str, DTYPE_CODES))}")
        for plane_idx, plane in enumerate(flat):
            where = f"{name}: layer {plane_idx // num_kv} plane {plane_idx % num_kv}"
            if plane.shape != first.shape:
                raise InvalidArgument(f"{where}: shape {tuple(plane.shape)} differs from layer 0's {tuple(first.shape)}")
            if plane.dtype != first.dtype:
                raise ArgumentTypeError(f"{where}: dtype {plane.dtype} differs from layer 0's {first.dtype}")
            if plane.device != first.device:
                raise InvalidArgument(f"{where}: device {plane.device} differs from layer 0's {first.device}")
            if plane.stride() != first.stride():
                raise InvalidArgument(
                    f"{where}: strides {plane.stride()} differ from layer 0's {first.stride()}; "
                    "kvlink needs one stride pattern for all layers"
                )
        num_blocks, block_size, num_heads, head_dim = (int(s) for s in first.shape)
        if min(num_blocks, block_size, num_heads, head_dim) <= 0:
            raise InvalidArgument(f"{name}: empty cache shape {tuple(first.shape)}")
        block_stride, token_stride, head_stride, dim_stride = first.stride()
        if dim_stride != 1 and head_dim > 1:
            raise InvalidArgument(
                f"{name}: head_dim must be the innermost unit-stride dimension, got stride {dim_stride}"
            )
        for dim_name, stride in (("block", block_stride), ("token", token_stride), ("head", head_stride)):
            if stride <= 0:
                raise InvalidArgument(f"{name}: {dim_name} stride must be positive, got {stride}")
        _check_no_self_overlap(name, first.shape, first.stride())
        ptrs = [plane.data_ptr() for plane in flat]
        if len(set(ptrs)) != len(ptrs):
            raise InvalidArgument(f"{name}: two planes start at the same address; K and V of every layer must be distinct")

        esize = first.element_size()
        return cls(
            name=name,
            num_layers=len(planes_by_layer),
            num_kv=num_kv,
            num_blocks=num_blocks,
            block_size=block_size,
            num_heads=num_heads,
            head_dim=head_dim,
            dtype=first.dtype,
            device=first.device,
            block_stride=block_stride * esize,
            token_stride=token_stride * esize,
            head_stride=head_stride * esize,
            planes=tuple(flat),
        )

    # ------------------------------------------------------------------ derived facts
    @property
    def num_planes(self) -> int:
        return self.num_layers * self.num_kv

    @property
    def element_size(self) -> int:
        return self.planes[0].element_size()

    @cached_property
    def dtype_name(self) -> str:
        """The dtype as the handshake spells it, e.g. ``"bfloat16"``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def row_bytes(self) -> int:
        """Bytes of one (token, head) row: head_dim elements."""
        return self.head_dim * self.element_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across every layer, K and V, and all local heads."""
        return self.num_planes * self.num_heads * self.row_bytes

    def plane(self, layer_idx: int, kv_idx: int = 0) -> torch.Tensor:
        """The ``[block, token, head, head_dim]`` view of one layer's K (0) or V (1)."""
        return self.planes[layer_idx * self.num_kv + kv_idx]

    def plane_ptrs(self) -> list[int]:
        return [plane.data_ptr() for plane in self.planes]

    @cached_property
    def fingerprint(self) -> str:
        """Identifies what must match between two sides to exchange packed chunks.

        Covers layers, K/V or MLA, head_dim and dtype: what one packed row is. Block size and
        physical layout are left out on purpose, since pack and unpack convert between them,
        and so is the local head count, which differs under tensor parallelism (a chunk names
        its head range in its header instead).
        """
        return layout_fingerprint(self.num_layers, self.num_kv, self.head_dim, self.dtype)

    def describe(self) -> str:
        """One line for logs: preset, geometry, dtype, device and strides."""
        kind = "MLA latent" if self.num_kv == 1 else "K/V"
        return (
            f"{self.name}: {self.num_layers} layers {kind}, {self.num_blocks} blocks x {self.block_size} tokens, "
            f"{self.num_heads} heads x {self.head_dim} {str(self.dtype).removeprefix('torch.')}, "
            f"strides block/token/head {self.block_stride}/{self.token_stride}/{self.head_stride} B, "
            f"on {self.device}, fingerprint {self.fingerprint}"
        )

    def to_dict(self) -> dict:
        """What a peer needs to know of this cache (sent in the handshake)."""
        return {
            "name": self.name, "num_layers": self.num_layers, "num_kv": self.num_kv, "num_blocks": self.num_blocks,
            "block_size": self.block_size, "num_heads": self.num_heads, "head_dim": self.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."), "fingerprint": self.fingerprint,
        }

    def check_compatible(self, other: "CacheLayout", wire_dtype: str | None = None) -> None:
        """Raise ValueError naming the first field where ``other`` cannot receive our chunks.

        Layers, K/V or MLA, head_dim and dtype must match; different dtypes only meet through
        ``wire_dtype="fp8"`` (bf16/fp16/fp32 into another of those or an e4m3 cache). Head counts
        may differ (tensor parallelism); the head ranges of each chunk are checked when it is
        packed and unpacked. Block size and physical layout may differ: the kernels convert.
        """
        check_compatible(self.to_dict(), other.to_dict(), wire_dtype=wire_dtype)


@functools.lru_cache(maxsize=256)  # fp8 chunk headers ask for it per chunk
def layout_fingerprint(num_layers: int, num_kv: int, head_dim: int, dtype: torch.dtype) -> str:
    """What one packed row is: layers, K/V or MLA, head_dim and element type (see CacheLayout.fingerprint)."""
    text = (f"kvlink-layout-v1|layers={num_layers}|kv={num_kv}"
            f"|head_dim={head_dim}|dtype={str(dtype).removeprefix('torch.')}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# dtype pairs (source, destination) that differ but can meet: through fp8 on the wire (kvlink.selection)
_CONVERTIBLE_SOURCES = ("float16", "bfloat16", "float32")
_CONVERTIBLE_DESTINATIONS = _CONVERTIBLE_SOURCES + ("float8_e4m3fn",)


def dtypes_meet_through_fp8(source_dtype: str, destination_dtype: str) -> bool:
    """True when two caches of these (different) dtypes can exchange blocks with ``wire_dtype="fp8"``."""
    return source_dtype in _CONVERTIBLE_SOURCES and destination_dtype in _CONVERTIBLE_DESTINATIONS


def check_compatible(mine: dict, theirs: dict, wire_dtype: str | None = None) -> None:
    """Compare two :meth:`CacheLayout.to_dict` descriptions (``mine`` the source's, ``theirs`` the
    destination's); ValueError names the first mismatch. Different dtypes are compatible only
    with ``wire_dtype="fp8"``, when fp8 on the wire can convert between them."""
    for attr in ("num_layers", "num_kv", "head_dim", "dtype"):
        if mine.get(attr) != theirs.get(attr):
            if attr == "dtype" and wire_dtype == "fp8" and dtypes_meet_through_fp8(mine.get(attr), theirs.get(attr)):
                continue
            raise InvalidArgument(
                f"incompatible layouts: {attr} is {mine.get(attr)} in {mine.get('name')} "
                f"but {theirs.get(attr)} in {theirs.get('name')}"
            )


def _check_no_self_overlap(name: str, shape: Sequence[int], strides: Sequence[int]) -> None:
    """Reject views whose (block, token, head, dim) addresses collide.

    Sufficient test: sorted by stride, each dimension must step past the whole extent of the
    smaller ones. Every real engine layout passes; a broadcast or aliased view does not.
    """
    dims = sorted((int(st), int(sz)) for st, sz in zip(strides, shape) if sz > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            raise InvalidArgument(
                f"{name}: the view's strides {tuple(strides)} for shape {tuple(shape)} make cache entries overlap"
            )
        extent = stride * (size - 1) + extent


@dataclass(frozen=True, eq=False)
class PeerLayout(CacheLayout):
    """A peer process's cache, mapped into this process by CUDA IPC (kvlink.ipc).

    Same geometry as the peer's :class:`CacheLayout`, but the planes are bare addresses valid on
    ``device`` (this process's GPU), with no tensors: only the copy kernel reads them.
    """

    mapped_ptrs: tuple[int, ...] = ()
    element_bytes: int = 0

    @classmethod
    def from_description(cls, description: dict, strides: list[int], addresses: list[int],
                         device: torch.device) -> PeerLayout:
        """Build from the peer's :meth:`CacheLayout.to_dict`, byte strides and mapped plane addresses."""
        dtype = getattr(torch, description["dtype"], None)
        if dtype not in DTYPE_CODES:
            raise InvalidArgument(f"peer cache dtype {description['dtype']!r} is not one kvlink supports")
        planes = description["num_layers"] * description["num_kv"]
        if len(addresses) != planes or len(strides) != 3:
            raise InvalidArgument(f"peer cache description holds {len(addresses)} plane addresses for {planes} planes")
        return cls(name=f"peer:{description['name']}", num_layers=description["num_layers"],
                   num_kv=description["num_kv"], num_blocks=description["num_blocks"],
                   block_size=description["block_size"], num_heads=description["num_heads"],
                   head_dim=description["head_dim"], dtype=dtype, device=device, block_stride=int(strides[0]),
                   token_stride=int(strides[1]), head_stride=int(strides[2]), planes=(),
                   mapped_ptrs=tuple(int(a) for a in addresses),
                   element_bytes=torch.empty(0, dtype=dtype).element_size())

    @property
    def element_size(self) -> int:
        return self.element_bytes

    def plane_ptrs(self) -> list[int]:
        return list(self.mapped_ptrs)

    def plane(self, layer_idx: int, kv_idx: int = 0) -> torch.Tensor:
        raise ArgumentTypeError(f"{self.name} is a peer's cache mapped by address; it has no tensors")
