"""The client's public types: one NodeMetrics for calls and streams, and a cancelled call's
exception that is not asyncio's."""

from __future__ import annotations

import asyncio

import tensorline.client as client
from tensorline.client import CallCancelledError, NodeMetrics, TensorlineError
from tensorline.v1 import tensorline_pb2 as pb


def test_one_node_metrics_type_for_calls_and_streams() -> None:
    proto = pb.NodeMetrics(node_id="n", node_type="gain", runtime="inprocess",
                           selection_reason="default", wall_ms=1.5, fallback="",
                           inputs_consumed=3, outputs_produced=2)
    metrics = NodeMetrics.from_proto(proto)
    assert metrics == NodeMetrics("n", "gain", "inprocess", "default", 1.5, "", 3, 2)
    assert NodeMetrics("n", "gain", "inprocess", "default", 1.5).inputs_consumed == 0
    assert not hasattr(client, "StreamNodeMetrics")
    assert "NodeMetrics" in client.__all__


def test_cancelled_call_does_not_shadow_asyncio() -> None:
    assert issubclass(CallCancelledError, TensorlineError)
    assert not issubclass(CallCancelledError, asyncio.CancelledError)
    assert not hasattr(client, "CancelledError")
