"""The pipeline repository loads a directory of manifests into named pipelines; one that fails
validation is reported and does not stop the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tensorline.server import PipelineEngine
from tensorline.server._errors import PipelineNotFound
from tensorline.server.repository import PipelineRepository
from tensorline.wire import PortItem


async def test_named_pipelines_load_run_and_report_failures(tmp_path: Path) -> None:
    (tmp_path / "scale.yaml").write_text(
        "metadata: {name: scaler}\nnodes:\n  - {id: s, node_type: Scale, params: {factor: 2}}\n")
    (tmp_path / "broken.yaml").write_text("nodes:\n  - {id: s, node_type: NoSuchNode}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    engine = PipelineEngine.local()
    await engine.start()
    try:
        repository = PipelineRepository(engine, tmp_path)
        await repository.start()
        states = {state.name: state for state in repository.states()}
        assert set(states) == {"scaler", "broken"}
        assert states["scaler"].state == "READY"
        assert states["broken"].state == "UNAVAILABLE"
        assert "NoSuchNode" in states["broken"].reason
        pipeline = repository.get("scaler")
        assert [(p.name, p.node_id, p.port) for p in pipeline.inputs] == [("s", "s", "in")]
        assert [(p.name, p.port) for p in pipeline.outputs] == [("s", "out")]
        result = await engine.execute_plan(pipeline.plan, [PortItem("s", "", np.arange(3.0))])
        np.testing.assert_array_equal(result.outputs[0].value, [0.0, 2.0, 4.0])
        with pytest.raises(PipelineNotFound, match="NoSuchNode"):
            repository.get("broken")
        with pytest.raises(PipelineNotFound, match="no version 7"):
            repository.get("scaler", 7)
    finally:
        await engine.shutdown()
