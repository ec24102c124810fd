"""How one request is cut into chunks for the pipeline.

A chunk is a box the pack/unpack kernels move in one launch: either whole layers
``[l0, l1) x all tokens`` or a token slice of one layer ``[l, l+1) x [t0, t1)``. The decode
side makes the plan and sends it in its PULL, so both sides cut the same boxes.

Sizes ramp: the first chunk is small so the wire starts early (pipeline fill), chunks double up
to ``chunk_bytes``, and the last ones halve so little is left to unpack after the last byte
lands (pipeline drain). A request of at most two chunks is cut in one or two equal chunks: it
pays for no pipeline at all.
"""

from __future__ import annotations

Box = tuple[int, int, int, int]  # layer_start, layer_stop, token_start, token_stop


def box_payload_bytes(box: Box, token_layer_bytes: int) -> int:
    layer_start, layer_stop, token_start, token_stop = box
    return (layer_stop - layer_start) * (token_stop - token_start) * token_layer_bytes


def plan_chunks(layers: tuple[int, int], num_tokens: int, token_layer_bytes: int, chunk_bytes: int, *,
                first_chunk_bytes: int | None = None, layerwise: bool = False) -> list[Box]:
    """Cut ``layers x [0, num_tokens)`` into boxes of at most ``chunk_bytes`` of payload.

    Args:
        token_layer_bytes: payload bytes of one token in one layer (K and V, selected heads).
        chunk_bytes: payload capacity of a staging slot (a slot holds the 64-byte header too).
        first_chunk_bytes: size of the first and last chunks (default chunk_bytes / 8).
        layerwise: never put two layers in one chunk (each layer travels once it is written).
    """
    if num_tokens <= 0 or layers[1] <= layers[0]:
        raise ValueError(f"empty request: layers={layers}, num_tokens={num_tokens}")
    capacity = chunk_bytes
    if capacity < token_layer_bytes:
        raise ValueError(f"chunk_bytes={chunk_bytes} cannot hold one token of one layer ({token_layer_bytes} bytes)")
    layer_bytes = num_tokens * token_layer_bytes
    remaining = (layers[1] - layers[0]) * layer_bytes
    if not layerwise and remaining <= 2 * capacity:
        # small enough that a ramp would only add chunks: one or two equal chunks
        first_chunk_bytes = capacity if remaining <= capacity else -(-remaining // 2)
    edge = max(token_layer_bytes, min(capacity, first_chunk_bytes or capacity // 4))
    boxes: list[Box] = []
    layer, token = layers[0], 0
    budget = edge
    while layer < layers[1]:
        # ramp down: never take more than half of what is left, unless that is already small
        target = min(budget, max(edge, -(-remaining // 2)))
        if token == 0 and layer_bytes <= target and not layerwise:
            count = min(target // layer_bytes, layers[1] - layer)
            boxes.append((layer, layer + count, 0, num_tokens))
            layer += count
            taken = count * layer_bytes
        else:
            tokens = min(num_tokens - token, max(1, target // token_layer_bytes))
            left = num_tokens - token - tokens
            if left and (left * token_layer_bytes < edge // 2 or (layerwise and layer_bytes <= capacity)) \
                    and (num_tokens - token) * token_layer_bytes <= capacity:
                tokens = num_tokens - token  # no sliver chunks; a whole layer when layer-wise and it fits
            boxes.append((layer, layer + 1, token, token + tokens))
            token += tokens
            taken = tokens * token_layer_bytes
            if token == num_tokens:
                layer, token = layer + 1, 0
        remaining -= taken
        budget = min(capacity, budget * 2)
    return boxes
