"""The committed generated stubs must be exactly what protoc makes from protos/ today."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PROTO = PROTOS / "tensorline" / "v1" / "tensorline.proto"
OIP_PROTO = PROTOS / "tensorline" / "oip" / "v2" / "inference.proto"
# Per .proto: the files generated from it and protoc's output flags. The Open Inference
# Protocol's service is registered through a generic handler at Triton's paths, so it has no
# generated gRPC module.
STUBS = {
    PROTO: (("tensorline_pb2.py", "tensorline_pb2.pyi", "tensorline_pb2_grpc.py"),
            ("--python_out", "--pyi_out", "--grpc_python_out")),
    OIP_PROTO: (("inference_pb2.py", "inference_pb2.pyi"), ("--python_out", "--pyi_out")),
}


@pytest.mark.parametrize("proto", list(STUBS), ids=lambda path: path.name)
def test_committed_stubs_match_the_proto(tmp_path: Path, proto: Path) -> None:
    generated, flags = STUBS[proto]
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}",
                        *(f"{flag}={tmp_path}" for flag in flags), str(proto)])
    assert code == 0, "protoc failed"
    relative = proto.parent.relative_to(PROTOS)
    for name in generated:
        fresh = (tmp_path / relative / name).read_bytes()
        committed = (proto.parent / name).read_bytes()
        assert fresh == committed, (
            f"{name} drifted from {proto.name}; regenerate with: python -m grpc_tools.protoc "
            f"-Iprotos {' '.join(f'{flag}=protos' for flag in flags)} "
            f"{proto.relative_to(ROOT)}")


def test_generated_module_is_the_installed_one() -> None:
    from tensorline.oip.v2 import inference_pb2
    from tensorline.v1 import tensorline_pb2

    assert Path(tensorline_pb2.__file__).resolve() == (PROTO.parent / "tensorline_pb2.py")
    assert tensorline_pb2.DESCRIPTOR.package == "tensorline.v1"
    assert set(tensorline_pb2.DESCRIPTOR.services_by_name) == {"PipelineService"}
    assert Path(inference_pb2.__file__).resolve() == (OIP_PROTO.parent / "inference_pb2.py")
    assert inference_pb2.DESCRIPTOR.package == "tensorline.oip.v2"
