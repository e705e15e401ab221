"""The layout caches of ``_layouts`` (requests, chunks, responses) stay within their bounds
whatever peers send: many sizes, many layouts of one size, large manifests and names
(``test_fast_paths`` holds their decodings to the general decoders')."""

from __future__ import annotations

import json

import numpy as np

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import PortItem, _layouts, _streams, _unary, encode_execute_request, join
from tensorline.wire._codec import DEFAULT_LIMITS
from tensorline.wire._unary import _pieces_of, decode_execute_request


def _request(padding: int, node: str = "n", elements: int = 4) -> bytes:
    manifest = json.dumps({"nodes": [{"id": node, "node_type": "PassThrough"}],
                           "description": "x" * padding})
    return encode_execute_request(manifest, [PortItem(node, "", np.ones(elements, np.float32))])


def _learn(layouts: _layouts.RequestLayouts, raw: bytes) -> None:
    """As the decoder does: learn on a miss (a size seen once, then learned)."""
    request = decode_execute_request(raw)
    assert not request.violations
    for _ in range(2):
        if layouts.decode(raw, DEFAULT_LIMITS) is None:
            layouts.learn(raw, request, DEFAULT_LIMITS, _pieces_of)


def test_request_layouts_keep_at_most_their_byte_budget() -> None:
    layouts = _layouts.RequestLayouts()
    # Manifests of ~60 KiB (under the per-layout bound), each its own size: past the total
    # budget everything is forgotten, never more kept.
    for padding in range(0, 200 * 61_000, 61_000):
        raw = _request(60_000 + padding % 997, elements=4 + padding // 61_000)
        _learn(layouts, raw)
        assert layouts.kept_bytes() <= _layouts.MAX_TOTAL_BYTES
        assert len(layouts._by_size) <= _layouts.MAX_SIZES
    # A manifest over the per-layout bound is never kept.
    big = _request(_layouts.MAX_FIXED_BYTES + 10)
    layouts.clear()
    _learn(layouts, big)
    assert layouts.decode(big, DEFAULT_LIMITS) is None and layouts.kept_bytes() == 0


def test_request_layouts_keep_a_few_per_size_and_the_newest() -> None:
    layouts = _layouts.RequestLayouts()
    # Node ids of one length: one size, different layouts.
    raws = [_request(10, node=f"n{i}") for i in range(_layouts.PER_SIZE + 2)]
    assert len({len(r) for r in raws}) == 1
    for raw in raws:
        _learn(layouts, raw)
    kept = [raw for raw in raws if layouts.decode(raw, DEFAULT_LIMITS) is not None]
    assert kept == raws[-_layouts.PER_SIZE:]
    assert layouts.kept_bytes() == sum(len(p) for layout in layouts._by_size[len(raws[0])]
                                       for _, p in layout.fixed)


def test_a_size_seen_once_is_not_learned() -> None:
    layouts = _layouts.RequestLayouts()
    raw = _request(3)
    layouts.learn(raw, decode_execute_request(raw), DEFAULT_LIMITS, _pieces_of)
    assert layouts.decode(raw, DEFAULT_LIMITS) is None and layouts.kept_bytes() == 0


def test_chunk_layouts_keep_at_most_their_byte_budget() -> None:
    layouts = _layouts.ChunkLayouts(_streams.CHUNK_LAYOUTS._tag, _streams.CHUNK_LAYOUTS._sequence_key)
    # Small chunks (more sizes than are kept), then chunks with 40 KB node ids (more bytes).
    for size in [*range(1, 600), *range(600, 900)]:
        node = "n" * (1 + size % 50 if size < 600 else 40_000)
        array = np.ones(size, np.uint8)
        raw = join(_streams.encode_stream_item(2, 7, node, "", array))
        for _ in range(2):  # as the decoder does: learn on a miss
            if layouts.decode(raw, DEFAULT_LIMITS) is None:
                layouts.learn(raw, node, "", array, DEFAULT_LIMITS,
                              lambda node=node, array=array: _streams._item_rest(node, "",
                                                                                 array))
        assert layouts.decode(raw, DEFAULT_LIMITS) is not None
        assert layouts.kept_bytes() <= _layouts.MAX_TOTAL_BYTES
        assert len(layouts._by_size) <= _layouts.MAX_SIZES


def test_response_layouts_keep_at_most_their_byte_budget() -> None:
    layouts = _layouts.ResponseLayouts(_unary.RESPONSE_LAYOUTS._metrics_tag)
    metrics = pb.ExecutionMetrics(total_ms=1.0)
    for size in range(1, 400):
        # Long node ids (30 KB) past the 60th response: more bytes than the budget.
        item = PortItem("n" * (1 + size % 50 if size < 60 else 30_000), "",
                        np.ones(size, np.uint8))
        raw = _unary.encode_execute_response([item], metrics)
        outputs = _unary.decode_execute_response(raw).outputs
        for _ in range(2):  # as the decoder does: learn on a miss
            if layouts.decode(raw) is None:
                layouts.learn(raw, outputs, lambda outputs=outputs: _unary._output_pieces(outputs))
        assert layouts.decode(raw) is not None
        assert layouts.kept_bytes() <= _layouts.MAX_TOTAL_BYTES
        assert len(layouts._by_size) <= _layouts.MAX_SIZES
