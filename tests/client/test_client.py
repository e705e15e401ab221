"""Client conveniences: manifest forms, input keys, errors raised before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tensorline.client import AsyncClient, TensorlineError, load_manifest, manifest_json

MANIFEST = {"version": "v1", "nodes": [{"id": "s", "node_type": "Scale", "params": {"factor": 3}}]}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"yaml": tmp_path / "pipeline.yaml", "yml": tmp_path / "pipeline.yml",
             "json": tmp_path / "pipeline.json"}
    paths["yaml"].write_text(yaml.safe_dump(MANIFEST))
    paths["yml"].write_text(yaml.safe_dump(MANIFEST))
    paths["json"].write_text(json.dumps(MANIFEST))
    return paths


def test_manifest_forms_give_the_same_json(files: dict[str, Path]) -> None:
    expected = json.loads(manifest_json(MANIFEST))
    assert expected == MANIFEST
    for path in files.values():
        assert json.loads(manifest_json(path)) == expected          # os.PathLike
        assert json.loads(manifest_json(str(path))) == expected     # a file name as str
        assert load_manifest(path) == MANIFEST
    assert json.loads(manifest_json(yaml.safe_dump(MANIFEST))) == expected
    assert json.loads(manifest_json("  " + json.dumps(MANIFEST))) == expected


@pytest.mark.parametrize("text", ["- a\n- b\n", "nodes: [", "just words"])
def test_manifest_text_that_is_not_a_mapping(text: str) -> None:
    with pytest.raises(ValueError, match="manifest text"):
        manifest_json(text)


async def test_execute_with_a_file_name(client: AsyncClient, files: dict[str, Path]) -> None:
    result = await client.execute(str(files["yaml"]), {"s": np.ones(2)})
    np.testing.assert_array_equal(result["s"], [3.0, 3.0])
    result = await client.execute(files["json"], {"s": np.ones(1)})
    np.testing.assert_array_equal(result["s"], [3.0])


@pytest.mark.parametrize("value", [object(), [1, 2, 3], {"a": 1}, np.array([object()])])
async def test_unsendable_inputs_raise_before_sending(client: AsyncClient, value: object) -> None:
    with pytest.raises(TensorlineError, match="cannot encode the request") as caught:
        await client.execute(MANIFEST, {"s": value})
    assert caught.value.code is None


async def test_bad_manifest_text_raises_tensorline_error(client: AsyncClient) -> None:
    with pytest.raises(TensorlineError, match="not valid YAML"):
        await client.execute("nodes: [", {"s": np.ones(1)})


@pytest.mark.parametrize("rate", [0, -5, 2**31])
async def test_bad_sample_rate_is_refused_clearly(client: AsyncClient, rate: int) -> None:
    from tensorline.client import Audio

    with pytest.raises(TensorlineError, match=r"audio sample_rate must be in 1\.\.2147483647"):
        await client.execute(MANIFEST, {"s": Audio(np.zeros(4, dtype=np.int16), rate)})
