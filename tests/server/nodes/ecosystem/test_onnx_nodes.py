"""OnnxModel through a real server in each runtime, against onnxruntime called directly.

The models are built here with onnx's helper API (fixed weights) and saved below the server's
model root. onnxruntime runs them directly with the node's own session settings (one intra-op
and one inter-op thread), so the results must be equal bit for bit: the same build on the same
bytes, in-process or in a sandboxed worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorline.client import AsyncClient, InvalidRequestError, NodeError, PortItem, Tagged
from tests.server.nodes.ecosystem.conftest import (
    ECOSYSTEM,
    RUNTIMES,
    assert_bit_exact,
    check_runtime,
    one_node,
    readable,
    run_node,
)

WEIGHTS = (np.arange(32, dtype=np.float32).reshape(8, 4) - 16) / 9
BIAS = np.array([0.5, -1.0, 0.25, 0.0], dtype=np.float32)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return readable(path)


def dense_relu(path: Path) -> Path:
    """x [batch, 8] float32 -> Relu(x @ W + B) [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Add", ["h", "B"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])],
        "dense_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "B")])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=8), path)


def two_inputs(path: Path) -> Path:
    """a [n, 3] float64, b [3] float64 -> sum = a + b, scaled = a * b (two outputs)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]),
         helper.make_node("Mul", ["a", "b"], ["scaled"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.DOUBLE, ["n", 3]),
         helper.make_tensor_value_info("b", TensorProto.DOUBLE, [3])],
        [helper.make_tensor_value_info("sum", TensorProto.DOUBLE, ["n", 3]),
         helper.make_tensor_value_info("scaled", TensorProto.DOUBLE, ["n", 3])])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=8), path)


def direct(path: Path, feeds: dict[str, Any], output: str) -> Any:
    """onnxruntime called directly, with the node's session settings."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_dense_relu_equals_onnxruntime(model_client: AsyncClient, model_root: Path,
                                             runtime: str) -> None:
    model = dense_relu(model_root / "dense.onnx")
    x = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    result = await run_node(model_client, runtime, "OnnxModel", {"path": "dense.onnx"},
                            {"in": x})
    expected = direct(model, {"x": x}, "y")
    assert (expected > 0).any() and (expected == 0).any()  # Relu did something both ways
    np.testing.assert_array_equal(result["n"], expected)
    assert_bit_exact(result["n"], expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_two_inputs_by_name_and_by_position(model_client: AsyncClient, model_root: Path,
                                                  runtime: str) -> None:
    model = two_inputs(model_root / "pair.onnx")
    a = np.linspace(-2.0, 2.0, 12).reshape(4, 3)
    b = np.array([0.5, -3.0, 7.25])
    manifest = one_node("OnnxModel", {"path": "pair.onnx", "output": "scaled"}, runtime)
    # Tagged with the model input names, in the other order.
    tagged = await model_client.execute(manifest, [
        PortItem("n", "in", Tagged(b, {"input": "b"})),
        PortItem("n", "in", Tagged(a, {"input": "a"}))])
    check_runtime(tagged, runtime)
    # Untagged: in the model's input order.
    positional = await model_client.execute(manifest, [PortItem("n", "in", a),
                                                       PortItem("n", "in", b)])
    expected = direct(model, {"a": a, "b": b}, "scaled")
    np.testing.assert_array_equal(tagged["n"], expected)
    np.testing.assert_array_equal(positional["n"], expected)
    # The default output is the model's first.
    first = await model_client.execute(one_node("OnnxModel", {"path": "pair.onnx"}, runtime),
                                       [PortItem("n", "in", a), PortItem("n", "in", b)])
    np.testing.assert_array_equal(first["n"], direct(model, {"a": a, "b": b}, "sum"))


async def test_model_nodes_in_a_pipeline(model_client: AsyncClient, model_root: Path) -> None:
    """Connections feed the model (one input from each of two nodes), and models chain: one
    OnnxModel in-process, one sandboxed."""
    model = two_inputs(model_root / "pair.onnx")
    a = np.arange(6.0).reshape(2, 3)
    b = np.array([1.0, 2.0, 3.0])
    manifest = {"nodes": [
        {"id": "a", "node_type": "PassThrough"},
        {"id": "b", "node_type": "PassThrough"},
        {"id": "sum", "node_type": "OnnxModel", "params": {"path": "pair.onnx"},
         "runtime_hint": "inprocess"},
        {"id": "again", "node_type": "OnnxModel",
         "params": {"path": str(model), "output": "scaled"}, "runtime_hint": "sandbox"}],
        "connections": [{"from": "a", "to": "sum"}, {"from": "b", "to": "sum"},
                        {"from": "sum", "to": "again"}, {"from": "b", "to": "again"}]}
    result = await model_client.execute(manifest, {"a": a, "b": b})
    step = direct(model, {"a": a, "b": b}, "sum")
    np.testing.assert_array_equal(result["again"], direct(model, {"a": step, "b": b}, "scaled"))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_inputs_are_checked_against_the_signature(model_client: AsyncClient,
                                                        model_root: Path, runtime: str) -> None:
    dense_relu(model_root / "dense.onnx")
    two_inputs(model_root / "pair.onnx")
    cases = [
        ("dense.onnx", [np.ones((2, 8), np.float64)], "model input 'x' takes float32, got float64"),
        ("dense.onnx", [np.ones((2, 7), np.float32)], "model input 'x' takes shape [?x8]"),
        ("dense.onnx", [np.ones(8, np.float32)], "model input 'x' takes shape [?x8]"),
        ("pair.onnx", [np.ones((2, 3))], "the model takes 2 input(s) (a, b)"),
        ("pair.onnx", [Tagged(np.ones(3), {"input": "c"}), np.ones((1, 3))],
         "tagged for model input 'c'"),
        ("pair.onnx", [np.ones((2, 3)), np.ones(4)], "model input 'b' takes shape [3]"),
    ]
    for path, values, message in cases:
        with pytest.raises(NodeError) as caught:
            await model_client.execute(one_node("OnnxModel", {"path": path}, runtime),
                                       [PortItem("n", "in", value) for value in values])
        assert caught.value.node_id == "n", caught.value
        assert message in caught.value.message, (message, caught.value.message)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_corrupt_model_is_a_node_error(model_client: AsyncClient, model_root: Path,
                                               runtime: str) -> None:
    (model_root / "broken.onnx").write_bytes(b"\x08\x07not a model at all")
    readable(model_root / "broken.onnx")
    with pytest.raises(NodeError) as caught:
        await model_client.execute(one_node("OnnxModel", {"path": "broken.onnx"}, runtime),
                                   {"n": np.ones((1, 8), np.float32)})
    assert caught.value.node_id == "n"
    assert "cannot load the ONNX model 'broken.onnx'" in caught.value.message
    assert str(model_root) not in caught.value.message


async def test_an_unknown_output_is_a_node_error(model_client: AsyncClient,
                                                 model_root: Path) -> None:
    dense_relu(model_root / "dense.onnx")
    with pytest.raises(NodeError, match=r"has no output 'z' \(outputs: y\)"):
        await model_client.execute(one_node("OnnxModel", {"path": "dense.onnx", "output": "z"},
                                            "inprocess"), {"n": np.ones((1, 8), np.float32)})


async def test_the_session_is_made_once_per_warm_instance(model_client: AsyncClient,
                                                          model_root: Path) -> None:
    """The file is read when the warm instance is set up, not per call: once it is loaded,
    the file may go and the node still answers (until its instance is evicted)."""
    model = dense_relu(model_root / "dense.onnx")
    x = np.ones((1, 8), np.float32)
    manifest = one_node("OnnxModel", {"path": "dense.onnx"}, "inprocess")
    first = await model_client.execute(manifest, {"n": x})
    os.remove(model)
    again = await model_client.execute(manifest, {"n": x})
    np.testing.assert_array_equal(first["n"], again["n"])


async def test_paths_out_of_the_model_roots_are_refused(model_client: AsyncClient,
                                                        model_root: Path) -> None:
    outside = dense_relu(model_root.parent / "outside.onnx")
    (model_root / "escape.onnx").symlink_to(outside)
    (model_root / "sub").mkdir()
    dense_relu(model_root / "sub" / "inside.onnx")
    refused = {
        "../outside.onnx": "'..' is not allowed",
        "sub/../sub/inside.onnx": "'..' is not allowed",
        str(outside): "outside the model roots",
        "escape.onnx": "outside the model roots",
        "missing.onnx": "no model file 'missing.onnx'",
        "sub": "not a regular file",
        "": "at least 1 character",
    }
    for path, why in refused.items():
        manifest = {"nodes": [{"id": "ok", "node_type": "PassThrough"},
                              {"id": "m", "node_type": "OnnxModel", "params": {"path": path}}]}
        with pytest.raises(InvalidRequestError) as caught:
            await model_client.execute(manifest, {"ok": np.ones(1), "m": np.ones((1, 8))})
        fields = {v.field: v.description for v in caught.value.violations}
        assert list(fields) == ["nodes[1].params.path"], (path, fields)
        assert "node 'm'" in fields["nodes[1].params.path"], fields
        assert why in fields["nodes[1].params.path"], (path, fields)
        assert str(model_root) not in caught.value.message
    # Below the root, relative or absolute, a symlink staying inside included.
    (model_root / "alias.onnx").symlink_to(model_root / "sub" / "inside.onnx")
    for path in ("sub/inside.onnx", str(model_root / "sub" / "inside.onnx"), "alias.onnx"):
        result = await model_client.execute(one_node("OnnxModel", {"path": path}, "inprocess"),
                                            {"n": np.ones((1, 8), np.float32)})
        assert result["n"].shape == (1, 4)


async def test_without_model_roots_no_model_file_is_loaded(eco_client: AsyncClient,
                                                           tmp_path: Path) -> None:
    model = dense_relu(tmp_path / "dense.onnx")
    with pytest.raises(InvalidRequestError) as caught:
        await eco_client.execute(one_node("OnnxModel", {"path": str(model)}, None),
                                 {"n": np.ones((1, 8), np.float32)})
    assert "has no model roots" in caught.value.violations[0].description


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_paths_resolve_against_the_pipeline_repository(
        server_factory: Callable[..., Any], tmp_path: Path, runtime: str) -> None:
    """A named pipeline's relative model path resolves below the pipelines dir (no
    TENSORLINE_MODEL_DIRS needed); one that leads out of it leaves that pipeline unavailable,
    naming the param."""
    pipelines = tmp_path / "pipelines"
    (pipelines / "models").mkdir(parents=True)
    for directory in (pipelines, pipelines / "models"):
        directory.chmod(0o755)
    model = dense_relu(pipelines / "models" / "dense.onnx")
    dense_relu(tmp_path / "outside.onnx")
    (pipelines / "dense.yaml").write_text(
        "metadata: {name: dense}\nnodes:\n"
        f"  - {{id: m, node_type: OnnxModel, runtime_hint: {runtime}, "
        "params: {path: models/dense.onnx}}\n")
    (pipelines / "escape.yaml").write_text(
        "metadata: {name: escape}\nnodes:\n"
        "  - {id: m, node_type: OnnxModel, params: {path: ../outside.onnx}}\n")
    server = await server_factory(node_modules=["tests.nodes.basic", ECOSYSTEM],
                                  pipelines_dir=pipelines)
    assert server.repository is not None
    states = {state.name: state for state in server.repository.states()}
    assert states["dense"].state == "READY", states["dense"]
    assert states["escape"].state == "UNAVAILABLE"
    assert "nodes[0].params.path" in states["escape"].reason
    assert "'..' is not allowed" in states["escape"].reason
    x = np.random.default_rng(8).standard_normal((3, 8)).astype(np.float32)
    pipeline = server.repository.get("dense")
    result = await server.engine.execute_plan(pipeline.plan, [PortItem("m", "", x)])
    assert result.reports[0].runtime == runtime
    np.testing.assert_array_equal(result.outputs[0].value, direct(model, {"x": x}, "y"))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_thread_settings(model_client: AsyncClient, model_root: Path,
                               runtime: str) -> None:
    """More threads give the same result; pools that cannot fit under a sandboxed worker's
    thread cap (TENSORLINE_SANDBOX_THREADS, 64) are refused before onnxruntime starts them."""
    model = two_inputs(model_root / "pair.onnx")
    a = np.linspace(-2.0, 2.0, 3000).reshape(1000, 3)
    b = np.array([0.5, -3.0, 7.25])
    manifest = one_node("OnnxModel", {"path": "pair.onnx", "output": "scaled",
                                      "intra_op_threads": 2, "inter_op_threads": 2}, runtime)
    result = await model_client.execute(manifest, [PortItem("n", "in", a),
                                                   PortItem("n", "in", b)])
    check_runtime(result, runtime)
    np.testing.assert_array_equal(result["n"], direct(model, {"a": a, "b": b}, "scaled"))
    layers = {layer.name: layer for layer in (await model_client.server_info()).sandbox_layers}
    uid_layer = layers.get("unprivileged uid")
    capped = uid_layer is not None and "RLIMIT_NPROC" in uid_layer.detail
    if runtime == "sandbox" and capped:  # the cap holds for workers of their own uid
        manifest["nodes"][0]["params"]["intra_op_threads"] = 64
        with pytest.raises(NodeError) as caught:
            await model_client.execute(manifest, [PortItem("n", "in", a),
                                                  PortItem("n", "in", b)])
        assert caught.value.node_id == "n"
        assert "need 64 more threads" in caught.value.message
        assert "TENSORLINE_SANDBOX_THREADS" in caught.value.message
