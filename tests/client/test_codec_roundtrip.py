"""Every value kind and every dtype through a real server (PassThrough) and the real client."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Audio, Json, PortItem, Tagged
from tensorline.wire import SUPPORTED_DTYPES

DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic values that exercise the dtype (sign, fractions, imaginary parts)."""
    count = int(np.prod(shape))
    base = np.arange(count, dtype=np.float64) - count // 2
    if dtype.kind == "b":
        values: np.ndarray = (np.arange(count) % 3) == 0
    elif dtype.kind == "u":
        values = np.arange(count) * 7
    elif dtype.kind == "i":
        values = base * 3
    elif dtype.kind == "f":
        values = base / 4
    else:
        values = base / 4 + 1j * (base + 0.5)
    return values.astype(dtype).reshape(shape)


def passthrough_manifest(ids: list[str]) -> dict[str, Any]:
    return {"version": "v1", "nodes": [{"id": i, "node_type": "PassThrough"} for i in ids]}


def test_dtype_list_matches_protocol() -> None:
    assert sorted(SUPPORTED_DTYPES) == sorted(DTYPES)


@pytest.mark.parametrize("name", DTYPES)
async def test_every_dtype_round_trips(client: AsyncClient, name: str) -> None:
    dtype = np.dtype(name)
    big = dtype.newbyteorder(">")
    cases: dict[str, np.ndarray] = {
        "scalar": sample(dtype, ()),
        "empty": sample(dtype, (0,)),
        "empty2d": sample(dtype, (3, 0, 2)),
        "matrix": sample(dtype, (4, 5)),
        # A strided, non-contiguous view (every other column, reversed rows).
        "strided": sample(dtype, (6, 8))[::-1, ::2],
        "fortran": np.asfortranarray(sample(dtype, (3, 4))),
        # Big-endian input (for one-byte dtypes the byte order is irrelevant).
        "bigendian": sample(dtype, (2, 3)).astype(big),
    }
    assert not cases["strided"].flags.c_contiguous
    result = await client.execute(passthrough_manifest(list(cases)), inputs=cases)
    assert set(result.outputs) == set(cases)
    for key, sent in cases.items():
        got = result.outputs[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == dtype, (key, got.dtype)
        assert got.dtype.byteorder in ("=", "|", "<"), key
        assert got.shape == sent.shape, key
        np.testing.assert_array_equal(got, sent, err_msg=key)


async def test_numpy_scalar_stays_zero_dimensional(client: AsyncClient) -> None:
    result = await client.execute(passthrough_manifest(["p"]), {"p": np.float32(2.5)})
    assert result["p"].shape == ()
    assert result["p"].dtype == np.float32
    assert result["p"] == np.float32(2.5)


async def test_received_arrays_are_read_only_views(client: AsyncClient) -> None:
    result = await client.execute(passthrough_manifest(["p"]), {"p": np.arange(4.0)})
    assert not result["p"].flags.writeable
    copy = np.array(result["p"])
    copy[0] = 9
    assert result["p"][0] == 0


async def test_unsupported_dtype_is_refused_by_the_client(client: AsyncClient) -> None:
    from tensorline.client import TensorlineError

    with pytest.raises(TensorlineError, match="supported"):
        await client.execute(passthrough_manifest(["p"]), {"p": np.array(["a", "b"])})


async def test_audio_pcm_int16_stays_int16(client: AsyncClient) -> None:
    pcm = (np.sin(np.linspace(0, 20, 480)) * 20000).astype(np.int16)
    stereo = np.stack([pcm, -pcm], axis=1).astype(np.int32)
    result = await client.execute(
        passthrough_manifest(["mono", "stereo", "floaty"]),
        {"mono": Audio(pcm, 16000), "stereo": Audio(stereo, 44100),
         "floaty": Audio(pcm.astype(np.float32) / 32768, 8000)})
    mono = result["mono"]
    assert isinstance(mono, Audio)
    assert mono.sample_rate == 16000
    assert mono.samples.dtype == np.int16
    np.testing.assert_array_equal(mono.samples, pcm)
    assert result["stereo"].channels == 2
    assert result["stereo"].samples.dtype == np.int32
    np.testing.assert_array_equal(result["stereo"].samples, stereo)
    assert result["floaty"].samples.dtype == np.float32
    assert result["floaty"].sample_rate == 8000


async def test_text_json_bytes_round_trip(client: AsyncClient) -> None:
    document = {"int": 12345678901234567, "neg": -3, "float": 0.1, "list": [1, 2.0, "x"],
                "nested": {"ok": True, "none": None}, "unicode": "héllo ✓"}
    values = {
        "text": "grüße, 世界 \n\t end",
        "empty_text": "",
        "json": Json(document),
        "json_scalar": Json(7),
        "blob": bytes(range(256)) * 3,
        "empty_blob": b"",
    }
    result = await client.execute(passthrough_manifest(list(values)), values)
    assert result["text"] == values["text"]
    assert result["empty_text"] == ""
    assert result["json"] == Json(document)
    # Ints stay ints (no float round trip), floats stay floats.
    assert isinstance(result["json"].value["int"], int)
    assert result["json"].value["int"] == 12345678901234567
    assert isinstance(result["json"].value["list"][1], float)
    assert result["json_scalar"] == Json(7)
    assert isinstance(result["json_scalar"].value, int)
    assert bytes(result["blob"]) == values["blob"]
    assert bytes(result["empty_blob"]) == b""


async def test_metadata_travels_with_values(client: AsyncClient) -> None:
    values = {
        "t": Tagged(np.arange(3, dtype=np.int16), {"unit": "mV", "source": "probe-1"}),
        "s": Tagged("hello", {"lang": "en"}),
        "j": Tagged(Json({"a": 1}), {"k": "v"}),
    }
    result = await client.execute(passthrough_manifest(list(values)), values)
    tagged = result["t"]
    assert isinstance(tagged, Tagged)
    assert tagged.metadata == {"unit": "mV", "source": "probe-1"}
    np.testing.assert_array_equal(tagged.value, np.arange(3, dtype=np.int16))
    assert result["s"] == Tagged("hello", {"lang": "en"})
    assert result["j"] == Tagged(Json({"a": 1}), {"k": "v"})


async def test_inputs_as_port_items(client: AsyncClient) -> None:
    items = [PortItem("a", "", np.arange(2)), PortItem("b", "in", "x")]
    result = await client.execute(passthrough_manifest(["a", "b"]), items)
    np.testing.assert_array_equal(result["a"], np.arange(2))
    assert result["b"] == "x"
    assert [(i.node_id, i.port) for i in result.items] == [("a", "out"), ("b", "out")]
