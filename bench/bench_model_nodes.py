"""Per-call latency of the model nodes in each runtime against the library called directly
(run by hand; not run in CI).

    python bench/bench_model_nodes.py [--calls 300] [--batch 32] [--json FILE]

Builds a float32 MLP (256 -> 256 -> ReLU -> 10) twice with the same seeded weights, as an ONNX
file (onnx.helper) and a TorchScript file (torch.jit.script), in a temporary model root; starts
a server (in this process, its sandbox pool of real workers) with that root in
``model_dirs``, and times ExecutePipeline calls one after another: ``OnnxModel`` and
``TorchScriptModel`` with ``runtime_hint`` inprocess and sandbox, interleaved in rounds so drift
on a shared machine hits every variant alike. "direct" is onnxruntime (one thread, like the
node's default) or the TorchScript module called in this process, without gRPC. The first call
of each variant (session creation) is not counted. Figures: median and p90 per call, ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import run_and_save


def build_models(root: Path) -> tuple[Path, Path, list[np.ndarray]]:
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    b1 = (rng.standard_normal(256) / 16).astype(np.float32)
    w2 = (rng.standard_normal((256, 10)) / 16).astype(np.float32)
    b2 = (rng.standard_normal(10) / 16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["o"]),
         helper.make_node("Add", ["o", "B2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))])
    onnx_path = root / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                ir_version=8), str(onnx_path))

    class MLP(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.b1 = torch.from_numpy(w1), torch.from_numpy(b1)
            self.w2, self.b2 = torch.from_numpy(w2), torch.from_numpy(b2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    torch_path = root / "mlp.pt"
    torch.jit.save(torch.jit.script(MLP()), str(torch_path))
    for path in (root, onnx_path, torch_path):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return onnx_path, torch_path, [w1, b1, w2, b2]


def direct_calls(onnx_path: Path, torch_path: Path, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    module = torch.jit.load(str(torch_path))

    def run_torch() -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return {"OnnxModel direct": lambda: session.run(["y"], {"x": x}),
            "TorchScriptModel direct": run_torch}


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    from tensorline.client import AsyncClient
    from tensorline.server import Settings, create_server

    x = np.random.default_rng(1).standard_normal((arguments.batch, 256)).astype(np.float32)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "models"
        root.mkdir()
        onnx_path, torch_path, _ = build_models(root)
        server, port = await create_server(Settings(
            host="127.0.0.1", port=0, reflection=False, load_entry_points=False,
            node_modules=["tensorline.server.nodes.ecosystem"], model_dirs=[root],
            sandbox_workers=1))
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=120) as client:
                variants: dict[str, Callable[[], Any]] = {}
                for node_type, path in (("OnnxModel", onnx_path), ("TorchScriptModel",
                                                                   torch_path)):
                    for runtime in ("inprocess", "sandbox"):
                        manifest = {"nodes": [{"id": "m", "node_type": node_type,
                                               "runtime_hint": runtime,
                                               "params": {"path": path.name}}]}

                        async def call(manifest: dict[str, Any] = manifest) -> Any:
                            return await client.execute(manifest, {"m": x})

                        await call()  # session / module load
                        variants[f"{node_type} {runtime}"] = call
                directs = direct_calls(onnx_path, torch_path, x)
                times: dict[str, list[float]] = {name: [] for name in [*variants, *directs]}
                rounds = 10
                for _ in range(rounds):
                    for name, call in variants.items():
                        for _ in range(arguments.calls // rounds):
                            started = time.perf_counter()
                            await call()
                            times[name].append(time.perf_counter() - started)
                    for name, run in directs.items():
                        for _ in range(arguments.calls // rounds):
                            started = time.perf_counter()
                            run()
                            times[name].append(time.perf_counter() - started)
        finally:
            await server.stop(grace=1)
    figures: dict[str, Any] = {}
    print(f"batch {arguments.batch} x 256 float32, MLP 256 -> 256 -> 10; "
          f"{arguments.calls} calls each")
    print(f"{'variant':<28} {'median ms':>10} {'p90 ms':>8}")
    for name, values in sorted(times.items()):
        ms = sorted(v * 1000 for v in values)
        median, p90 = statistics.median(ms), ms[int(len(ms) * 0.9)]
        figures[name] = {"median_ms": median, "p90_ms": p90, "calls": len(ms)}
        print(f"{name:<28} {median:>10.3f} {p90:>8.3f}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    run_and_save(main, parser)
