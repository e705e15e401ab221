"""The built-in catalogue, each node run through a real server and checked for real results."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from scipy.signal import resample_poly

from tensorline.client import AsyncClient, Audio, InvalidRequestError, Json, NodeError, PortItem
from tests.support.manifests import one_node

BUILTINS = {"PassThrough", "Scale", "Add", "Calculator", "Cast", "Reshape", "Normalize",
            "AudioResample"}

async def run(client: AsyncClient, node_type: str, value: Any,
              params: dict[str, Any] | None = None) -> Any:
    result = await client.execute(one_node(node_type, params), {"n": value})
    return result["n"]


async def test_catalogue_lists_every_builtin(client: AsyncClient) -> None:
    nodes = {n.node_type: n for n in await client.list_nodes()}
    assert set(nodes) >= BUILTINS
    for name in BUILTINS:
        info = nodes[name]
        assert info.description
        assert info.trusted
        assert info.module == "tensorline.server.nodes.builtin"
        assert "inprocess" in info.allowed_runtimes
        assert info.params_schema_json.startswith("{")
    assert [p.kind for p in nodes["Scale"].inputs] == ["tensor"]
    assert nodes["Add"].inputs[0].name == "in"
    assert "target_rate" in nodes["AudioResample"].params_schema_json


async def test_passthrough(client: AsyncClient) -> None:
    x = np.arange(5, dtype=np.int32)
    np.testing.assert_array_equal(await run(client, "PassThrough", x), x)
    assert await run(client, "PassThrough", "text") == "text"


@pytest.mark.parametrize(("value", "factor", "expected", "dtype"), [
    (np.array([1.5, -2.0], dtype=np.float32), 2, [3.0, -4.0], np.float32),
    (np.array([1, 2, 3], dtype=np.int16), 3, [3, 6, 9], np.int16),
    (np.array([1, 2], dtype=np.int16), 0.5, [0.5, 1.0], np.float64),
    (np.array([1 + 1j], dtype=np.complex64), -1, [-1 - 1j], np.complex64),
    (np.array([True, False]), 2, [2.0, 0.0], np.float64),
    # Whole factors the integer dtype cannot hold fall back to float64 instead of failing.
    (np.array([1, 2], dtype=np.uint8), -1, [-1.0, -2.0], np.float64),
    (np.array([1, -2], dtype=np.int8), 200, [200.0, -400.0], np.float64),
])
async def test_scale(client: AsyncClient, value: np.ndarray, factor: float,
                     expected: list[Any], dtype: Any) -> None:
    out = await run(client, "Scale", value, {"factor": factor})
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected)


async def test_scale_default_factor_is_identity(client: AsyncClient) -> None:
    np.testing.assert_array_equal(await run(client, "Scale", np.arange(3.0)), np.arange(3.0))


async def test_add_sums_n_connected_inputs(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [
        *({"id": f"s{i}", "node_type": "Scale", "params": {"factor": i}} for i in range(1, 5)),
        {"id": "sum", "node_type": "Add"},
    ], "connections": [{"from": f"s{i}", "to": "sum"} for i in range(1, 5)]}
    x = np.array([1.0, 2.0])
    result = await client.execute(manifest, {f"s{i}": x for i in range(1, 5)})
    np.testing.assert_array_equal(result["sum"], x * 10)


async def test_add_broadcasts_and_promotes(client: AsyncClient) -> None:
    items = [PortItem("n", "in", np.ones((2, 3), dtype=np.int32)),
             PortItem("n", "in", np.arange(3, dtype=np.float32))]
    out = (await client.execute(one_node("Add"), items))["n"]
    np.testing.assert_array_equal(out, np.ones((2, 3)) + np.arange(3))
    with pytest.raises(NodeError, match="broadcast"):
        await client.execute(one_node("Add"), [PortItem("n", "in", np.ones(2)),
                                          PortItem("n", "in", np.ones(3))])


@pytest.mark.parametrize(("operation", "operands", "result"), [
    ("add", [1, 2, 3], 6),
    ("subtract", [10, 4, 1], 5),
    ("multiply", [2, 3, 4], 24),
    ("divide", [10, 4], 2.5),
    ("divide", [9, 3], 3.0),
    ("add", [0.5, 0.25], 0.75),
])
async def test_calculator(client: AsyncClient, operation: str, operands: list[Any],
                          result: Any) -> None:
    out = await run(client, "Calculator", Json({"operation": operation, "operands": operands}))
    assert isinstance(out, Json)
    assert out.value == {"operation": operation, "operands": operands, "result": result}
    assert type(out.value["result"]) is type(result)


async def test_calculator_default_operation_from_params(client: AsyncClient) -> None:
    out = await run(client, "Calculator", Json({"operands": [6, 7]}), {"operation": "multiply"})
    assert out.value["result"] == 42


@pytest.mark.parametrize(("request_value", "exception_type", "text"), [
    ({"operation": "divide", "operands": [1, 0]}, "ZeroDivisionError", "division by zero"),
    ({"operation": "divide", "operands": [1, 2, 0.0]}, "ZeroDivisionError", "division by zero"),
    ({"operation": "power", "operands": [1, 2]}, "ValueError", "unknown operation 'power'"),
    ({"operation": "add", "operands": [1]}, "ValueError", "at least two numbers"),
    ({"operation": "add", "operands": [1, "2"]}, "ValueError", "at least two numbers"),
    ([1, 2], "ValueError", "expected a JSON object"),
    # An overflowing result (inf) cannot be JSON: the node's error, not INTERNAL.
    ({"operation": "multiply", "operands": [1e308, 10]}, "ValueError", "Out of range float"),
])
async def test_calculator_errors_are_node_errors(client: AsyncClient, request_value: Any,
                                                 exception_type: str, text: str) -> None:
    with pytest.raises(NodeError) as caught:
        await run(client, "Calculator", Json(request_value))
    assert caught.value.code == grpc.StatusCode.UNKNOWN
    assert caught.value.node_id == "n"
    assert caught.value.exception_type == exception_type
    assert text in caught.value.message


@pytest.mark.parametrize(("dtype", "values", "expected"), [
    ("int16", np.array([1.7, -2.2, 300.9]), [1, -2, 300]),
    ("float32", np.array([1, 2], dtype=np.int64), [1.0, 2.0]),
    ("bool", np.array([0, 3]), [False, True]),
    ("complex128", np.array([1.5]), [1.5 + 0j]),
    ("uint8", np.array([255, 256], dtype=np.int32), [255, 0]),
])
async def test_cast(client: AsyncClient, dtype: str, values: np.ndarray, expected: Any) -> None:
    out = await run(client, "Cast", values, {"dtype": dtype})
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, expected)


async def test_cast_to_same_dtype_and_invalid_dtype(client: AsyncClient) -> None:
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(await run(client, "Cast", x, {"dtype": "float32"}), x)
    with pytest.raises(InvalidRequestError) as caught:
        await run(client, "Cast", x, {"dtype": "object"})
    assert caught.value.violations[0].field == "nodes[0].params.dtype"


async def test_reshape(client: AsyncClient) -> None:
    x = np.arange(12, dtype=np.int8)
    out = await run(client, "Reshape", x, {"shape": [3, -1]})
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(out.ravel(), x)
    scalar = await run(client, "Reshape", np.array([5.0]), {"shape": []})
    assert scalar.shape == ()
    with pytest.raises(NodeError) as caught:
        await run(client, "Reshape", x, {"shape": [5, 5]})
    assert caught.value.exception_type == "ValueError"
    with pytest.raises(InvalidRequestError):
        await run(client, "Reshape", x, {"shape": [-1, -1]})


async def test_normalize_computed_and_given(client: AsyncClient) -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    out = await run(client, "Normalize", x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x - x.mean()) / (x.std() + 1e-8), rtol=1e-6)
    assert abs(float(out.mean())) < 1e-6
    given = await run(client, "Normalize", np.array([10, 20], dtype=np.int16),
                      {"mean": 10, "std": 5})
    assert given.dtype == np.float64
    np.testing.assert_allclose(given, [0.0, 2.0])
    constant = await run(client, "Normalize", np.full(3, 7.0))
    np.testing.assert_array_equal(constant, np.zeros(3))


async def test_normalize_keeps_complex_values(client: AsyncClient) -> None:
    x = np.array([1 + 1j, 2 - 1j, 3 + 0j], dtype=np.complex64)
    out = await run(client, "Normalize", x)
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, (x - x.mean()) / (x.std() + 1e-8), rtol=1e-5)
    assert np.any(out.imag != 0)


@pytest.mark.parametrize(("source", "target"), [
    (44100, 16000), (48000, 16000), (16000, 44100), (8000, 22050), (22050, 22050),
])
async def test_audio_resample_matches_scipy(client: AsyncClient, source: int, target: int) -> None:
    t = np.arange(source // 4) / source
    samples = (np.sin(2 * np.pi * 440 * t) * 0.5).astype(np.float32)
    out = await run(client, "AudioResample", Audio(samples, source), {"target_rate": target})
    assert isinstance(out, Audio)
    assert out.sample_rate == target
    assert out.samples.dtype == np.float32
    from math import gcd

    g = gcd(source, target)
    expected = resample_poly(samples, target // g, source // g).astype(np.float32)
    assert out.samples.shape == expected.shape
    np.testing.assert_allclose(out.samples, expected, rtol=1e-5, atol=1e-6)


async def test_audio_resample_int16_stereo_stays_int16(client: AsyncClient) -> None:
    source, target = 44100, 16000
    t = np.arange(source // 10) / source
    left = np.sin(2 * np.pi * 300 * t) * 32000
    stereo = np.stack([left, -left], axis=1).astype(np.int16)
    out = await run(client, "AudioResample", Audio(stereo, source), {"target_rate": target})
    assert out.samples.dtype == np.int16
    assert out.sample_rate == target
    expected = resample_poly(stereo.astype(np.float64), 160, 441, axis=0)
    expected = np.clip(np.rint(expected), -32768, 32767).astype(np.int16)
    assert out.samples.shape == expected.shape == (1600, 2)
    np.testing.assert_array_equal(out.samples, expected)


async def test_audio_resample_refuses_a_bare_tensor(client: AsyncClient) -> None:
    with pytest.raises(InvalidRequestError, match="takes audio, got tensor"):
        await run(client, "AudioResample", np.zeros(10), {"target_rate": 8000})
