"""The pipeline repository loads a directory of manifests into named, versioned pipelines: one
that fails validation or warm-up is reported and does not stop the others; a changed file
becomes the next version while calls holding the old one finish on it; declarations name the
signature; two files defining one name are both reported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tensorline.server import PipelineEngine
from tensorline.server._errors import PipelineNotFound, RequestInvalid
from tensorline.server.nodes import NodeRegistry
from tensorline.server.repository import PipelineRepository
from tensorline.wire import PortItem
from tests.nodes import basic


def scale(factor: float, name: str = "scaler") -> str:
    return (f"metadata: {{name: {name}}}\n"
            f"nodes:\n  - {{id: s, node_type: Scale, params: {{factor: {factor}}}}}\n")


@pytest.fixture
async def engine() -> AsyncIterator[PipelineEngine]:
    engine = PipelineEngine.local(NodeRegistry.default(
        modules=["tests.nodes.basic", "tests.nodes.spine"], entry_points=False))
    await engine.start()
    yield engine
    await engine.shutdown()


async def run(engine: PipelineEngine, repository: PipelineRepository, name: str,
              version: int | None = None) -> list[float]:
    with repository.lease(name, version) as pipeline:
        result = await engine.execute_plan(pipeline.plan, [PortItem("s", "", np.arange(3.0))])
    return [float(v) for v in result.outputs[0].value]


async def test_named_pipelines_load_run_and_report_failures(tmp_path: Path,
                                                            engine: PipelineEngine) -> None:
    (tmp_path / "scale.yaml").write_text(scale(2))
    (tmp_path / "broken.yaml").write_text("nodes:\n  - {id: s, node_type: NoSuchNode}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    states = {state.name: state for state in repository.states()}
    assert set(states) == {"scaler", "broken"}
    assert (states["scaler"].state, states["scaler"].versions) == ("READY", (1,))
    assert states["broken"].state == "UNAVAILABLE"
    assert "NoSuchNode" in states["broken"].reason
    pipeline = repository.get("scaler")
    assert [(p.name, p.node_id, p.port) for p in pipeline.inputs] == [("s", "s", "in")]
    assert [(p.name, p.port) for p in pipeline.outputs] == [("s", "out")]
    assert await run(engine, repository, "scaler") == [0.0, 2.0, 4.0]
    with pytest.raises(PipelineNotFound, match="NoSuchNode"):
        repository.get("broken")
    with pytest.raises(PipelineNotFound, match="no version 7"):
        repository.get("scaler", 7)
    assert repository.ready("scaler") and repository.ready("scaler", 1)
    assert not repository.ready("broken") and not repository.ready("nothing")
    await repository.close()


async def test_a_changed_file_is_the_next_version_and_the_old_one_drains(
        tmp_path: Path, engine: PipelineEngine) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(scale(2))
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    with repository.lease("scaler") as held:
        path.write_text(scale(3))
        await repository.refresh()
        # New calls get version 2; this call still runs version 1's plan.
        assert repository.get("scaler").version == 2
        assert held.version == 1
        result = await engine.execute_plan(held.plan, [PortItem("s", "", np.ones(1))])
        assert float(result.outputs[0].value[0]) == 2.0
        with pytest.raises(PipelineNotFound, match="version 1 was replaced by version 2"):
            repository.get("scaler", 1)
    assert not repository.ready("scaler", 1)
    assert await run(engine, repository, "scaler", 2) == [0.0, 3.0, 6.0]
    # An unchanged file (a touch) makes no new version.
    path.write_text(scale(3))
    await repository.refresh()
    assert [s.versions for s in repository.states()] == [(2,)]
    await repository.close()


async def test_nodes_are_warm_before_the_pipeline_is_ready(tmp_path: Path,
                                                          engine: PipelineEngine) -> None:
    basic.EVENTS.pop("warm:repo-model", None)
    (tmp_path / "model.yaml").write_text(
        "nodes:\n  - {id: s, node_type: WarmModel, params: {name: repo-model}}\n")
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    # Initialized once at load, before any call; the first call reuses it.
    assert basic.EVENTS["warm:repo-model"] == ["initialize"]
    assert await run(engine, repository, "model") == [0.0, 1.0, 2.0]
    assert basic.EVENTS["warm:repo-model"] == ["initialize"]
    await repository.close()


async def test_a_warm_up_failure_keeps_the_previous_version_serving(
        tmp_path: Path, engine: PipelineEngine) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(scale(2))
    (tmp_path / "initfails.yaml").write_text("nodes:\n  - {id: s, node_type: FailInit}\n")
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    states = {state.name: state for state in repository.states()}
    assert states["initfails"].state == "UNAVAILABLE"
    assert "cannot load the model" in states["initfails"].reason
    path.write_text("metadata: {name: scaler}\nnodes:\n  - {id: s, node_type: FailInit}\n")
    await repository.refresh()
    state = {state.name: state for state in repository.states()}["scaler"]
    assert (state.state, state.versions) == ("READY", (1,))
    assert "version 2 (scale.yaml) UNAVAILABLE" in state.reason
    assert "cannot load the model" in state.reason
    assert await run(engine, repository, "scaler") == [0.0, 2.0, 4.0]
    # Fixed: the next attempt is version 3.
    path.write_text(scale(5))
    await repository.refresh()
    assert repository.get("scaler").version == 3
    assert {s.name: s.reason for s in repository.states()}["scaler"] == ""
    await repository.close()


async def test_declared_inputs_and_outputs(tmp_path: Path, engine: PipelineEngine) -> None:
    (tmp_path / "declared.yaml").write_text(
        "metadata:\n  inputs: [{name: audio, node: s, datatype: FP32, shape: [-1]}]\n"
        "  outputs: [{name: scaled, node: s, port: out, datatype: FP32, shape: [-1]}]\n"
        "nodes:\n  - {id: s, node_type: Scale}\n")
    (tmp_path / "bad.yaml").write_text(
        "metadata:\n  inputs: [{name: x, node: nope, datatype: FLOAT}]\n"
        "  outputs: [{name: y, node: s, shape: [2, -3], colour: red}]\n"
        "nodes:\n  - {id: s, node_type: Scale}\n")
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    pipeline = repository.get("declared")
    assert [(p.name, p.node_id, p.port, p.datatype, p.shape) for p in pipeline.inputs] == [
        ("audio", "s", "in", "FP32", (-1,))]
    assert [(p.name, p.port, p.datatype, p.shape) for p in pipeline.outputs] == [
        ("scaled", "out", "FP32", (-1,))]
    reason = {s.name: s.reason for s in repository.states()}["bad"]
    assert "metadata.inputs[0].node: nope is no request-fed input" in reason
    assert "metadata.outputs[0].shape" in reason
    assert "metadata.outputs[0].colour: unknown field" in reason
    with pytest.raises(PipelineNotFound, match=r"metadata\.inputs\[0\]\.node"):
        repository.get("bad")
    await repository.close()


async def test_two_files_defining_one_name_are_both_reported(tmp_path: Path,
                                                             engine: PipelineEngine) -> None:
    (tmp_path / "a.yaml").write_text(scale(2, "same"))
    (tmp_path / "b.json").write_text(
        '{"metadata": {"name": "same"}, "nodes": [{"id": "s", "node_type": "Scale"}]}')
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    [state] = repository.states()
    assert (state.name, state.state) == ("same", "UNAVAILABLE")
    assert "a.yaml, b.json" in state.reason
    with pytest.raises(PipelineNotFound, match="several manifests"):
        repository.get("same")
    (tmp_path / "b.json").unlink()
    await repository.refresh()
    assert await run(engine, repository, "same") == [0.0, 2.0, 4.0]
    await repository.close()


async def test_load_and_unload(tmp_path: Path, engine: PipelineEngine) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(scale(2))
    repository = PipelineRepository(engine, tmp_path)
    await repository.start()
    with repository.lease("scaler") as held:
        await repository.unload("scaler")
        with pytest.raises(PipelineNotFound, match="unloaded"):
            repository.get("scaler")
        # The call in flight still runs its version.
        result = await engine.execute_plan(held.plan, [PortItem("s", "", np.ones(1))])
        assert float(result.outputs[0].value[0]) == 2.0
    # The file did not change: a refresh does not bring it back, load does.
    await repository.refresh()
    assert not repository.ready("scaler")
    await repository.load("scaler")
    assert repository.get("scaler").version == 2
    with pytest.raises(PipelineNotFound, match="defines a pipeline named 'other'"):
        await repository.load("other")
    path.write_text("metadata: {name: scaler}\nnodes:\n  - {id: s, node_type: Scale, "
                    "params: {factr: 2}}\n")
    with pytest.raises(RequestInvalid, match="factr"):
        await repository.load("scaler")
    assert repository.get("scaler").version == 2
    path.unlink()
    await repository.refresh()
    assert repository.states() == []
    with pytest.raises(PipelineNotFound, match="no pipeline named 'scaler'"):
        await repository.unload("scaler")
    await repository.close()


async def test_a_missing_directory_is_refused(tmp_path: Path, engine: PipelineEngine) -> None:
    with pytest.raises(OSError, match="does not exist or is not a directory"):
        PipelineRepository(engine, tmp_path / "nope")


async def test_a_warm_up_past_its_timeout_is_a_failed_version(tmp_path: Path,
                                                               engine: PipelineEngine) -> None:
    from tensorline.server import DeadlineExceeded

    # SlowInitWarm's initialize waits for an event nobody sets.
    (tmp_path / "stuck.yaml").write_text(
        "nodes:\n  - {id: s, node_type: SlowInitWarm, params: {name: repo-stuck}}\n")
    repository = PipelineRepository(engine, tmp_path, warm_timeout_s=0.2)
    await repository.start()
    [state] = repository.states()
    assert state.state == "UNAVAILABLE"
    assert "warm-up not finished within 0.2 s" in state.reason
    with pytest.raises(DeadlineExceeded, match="warm-up not finished"):
        await repository.load("stuck")
    await repository.close()
