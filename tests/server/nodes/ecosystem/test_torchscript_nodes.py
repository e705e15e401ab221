"""TorchScriptModel through a real server in each runtime, against the same module run by torch
directly.

The models are small ``nn.Module``s made here (fixed weights from a seeded generator), compiled
with ``torch.jit.script`` or ``torch.jit.trace`` and saved with ``torch.jit.save`` below the
server's model root. The reference is the saved file loaded back with ``torch.jit.load`` in the
test and run on the same input: equal bit for bit (the same build on the same bytes; these
sizes are far below where torch splits a reduction across threads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, NodeError, PortItem, Tagged
from tests.server.nodes.ecosystem.conftest import (
    RUNTIMES,
    assert_bit_exact,
    check_runtime,
    one_node,
    readable,
    run_node,
)

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")


class Dense(torch.nn.Module):  # type: ignore[misc]
    """Linear -> tanh with seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.linear = torch.nn.Linear(6, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 6, generator=generator))
            self.linear.bias.copy_(torch.randn(3, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class Pair(torch.nn.Module):  # type: ignore[misc]
    """Two arguments, a tuple of two results (the second an integer tensor)."""

    def forward(self, signal: torch.Tensor,
                offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = signal * 2.0 + offset
        return shifted, torch.argmax(shifted, dim=-1)


def save(module: Any, path: Path) -> Path:
    torch.jit.save(module, str(path))
    return readable(path)


def direct(path: Path, *arrays: np.ndarray) -> Any:
    """The saved file loaded by torch itself and run on the same inputs."""
    module = torch.jit.load(str(path))
    module.eval()
    with torch.inference_mode():
        return module(*(torch.from_numpy(a) for a in arrays))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("compile_with", ["script", "trace"])
async def test_one_input_equals_torch(model_client: AsyncClient, model_root: Path,
                                      runtime: str, compile_with: str) -> None:
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    module = Dense().eval()
    compiled = (torch.jit.script(module) if compile_with == "script"
                else torch.jit.trace(module, torch.from_numpy(x)))
    path = save(compiled, model_root / "dense.pt")
    result = await run_node(model_client, runtime, "TorchScriptModel", {"path": "dense.pt"},
                            {"in": x})
    expected = direct(path, x).numpy()
    np.testing.assert_array_equal(result["n"], expected)
    assert_bit_exact(result["n"], expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_two_inputs_and_a_tuple_result(model_client: AsyncClient, model_root: Path,
                                             runtime: str) -> None:
    path = save(torch.jit.script(Pair()), model_root / "pair.pt")
    signal = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    offset = np.array([0.0, 1.5, -0.5, 0.25])
    shifted, best = direct(path, signal, offset)
    for output, expected in ((0, shifted), (1, best)):
        manifest = one_node("TorchScriptModel", {"path": "pair.pt", "output": output}, runtime)
        tagged = await model_client.execute(manifest, [
            PortItem("n", "in", Tagged(offset, {"input": "offset"})),
            PortItem("n", "in", Tagged(signal, {"input": "signal"}))])
        check_runtime(tagged, runtime)
        positional = await model_client.execute(manifest, [PortItem("n", "in", signal),
                                                           PortItem("n", "in", offset)])
        assert_bit_exact(tagged["n"], expected.numpy())
        assert_bit_exact(positional["n"], expected.numpy())


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_mistakes_are_node_errors(model_client: AsyncClient, model_root: Path,
                                        runtime: str) -> None:
    save(torch.jit.script(Pair()), model_root / "pair.pt")
    (model_root / "broken.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive")
    readable(model_root / "broken.pt")
    two = [np.ones((1, 4)), np.ones(4)]
    cases = [
        ("broken.pt", None, two, "cannot load the TorchScript model 'broken.pt'"),
        ("pair.pt", None, two, "the model returns 2 values; set output to an index below 2"),
        ("pair.pt", 0, [np.ones((1, 4))], "the model takes 2 input(s) (signal, offset)"),
        ("pair.pt", 0, [np.ones((1, 4)), np.ones(5)], "the model failed"),
    ]
    for path, output, values, message in cases:
        manifest = one_node("TorchScriptModel", {"path": path, "output": output}, runtime)
        with pytest.raises(NodeError) as caught:
            await model_client.execute(manifest, [PortItem("n", "in", v) for v in values])
        assert caught.value.node_id == "n", caught.value
        assert message in caught.value.message, (message, caught.value.message)
        assert str(model_root) not in caught.value.message
