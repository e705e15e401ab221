"""The committed generated stubs must be exactly what protoc makes from protos/ today."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PROTO = PROTOS / "tensorline" / "v1" / "tensorline.proto"
GENERATED = ("tensorline_pb2.py", "tensorline_pb2.pyi", "tensorline_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(PROTO),
    ])
    assert code == 0, "protoc failed"
    for name in GENERATED:
        fresh = (tmp_path / "tensorline" / "v1" / name).read_bytes()
        committed = (PROTO.parent / name).read_bytes()
        assert fresh == committed, (
            f"{name} drifted from tensorline.proto; regenerate with: python -m grpc_tools.protoc "
            "-Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos "
            "protos/tensorline/v1/tensorline.proto")


def test_generated_module_is_the_installed_one() -> None:
    from tensorline.v1 import tensorline_pb2

    assert Path(tensorline_pb2.__file__).resolve() == (PROTO.parent / "tensorline_pb2.py")
    assert tensorline_pb2.DESCRIPTOR.package == "tensorline.v1"
    assert set(tensorline_pb2.DESCRIPTOR.services_by_name) == {"PipelineService"}
