"""Our Open Inference Protocol messages are wire-compatible with Triton's: every field of every
message we define has the name, number, type and label of its namesake in tritonclient's own
descriptors (package ``inference``), nested messages included, and every method we implement
has Triton's request and response types and streaming."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton

from tensorline.oip.v2 import METHODS, SERVICE_NAME
from tensorline.oip.v2 import inference_pb2 as ours


def _short(full_name: str, package: str) -> str:
    return full_name.removeprefix(package + ".")


def _fields(message: Descriptor, package: str) -> list[tuple[str, int, int, bool, bool, str]]:
    # The label, as protobuf 7 exposes it: repeated or not, and explicit presence or not.
    return [(field.name, field.number, field.type, field.is_repeated, field.has_presence,
             _short(field.message_type.full_name, package) if field.message_type else "")
            for field in message.fields]


def _check(mine: Descriptor, theirs: Descriptor) -> None:
    assert _fields(mine, "tensorline.oip.v2") == _fields(theirs, "inference"), mine.full_name
    assert [o.name for o in mine.oneofs] == [o.name for o in theirs.oneofs], mine.full_name
    for nested in mine.nested_types:
        assert nested.name in theirs.nested_types_by_name, f"{nested.full_name}: not in Triton's"
        _check(nested, theirs.nested_types_by_name[nested.name])


def test_every_message_matches_triton_field_for_field() -> None:
    defined = ours.DESCRIPTOR.message_types_by_name
    assert len(defined) >= 20
    for name, mine in defined.items():
        assert name in triton.DESCRIPTOR.message_types_by_name, f"{name}: not a Triton message"
        _check(mine, triton.DESCRIPTOR.message_types_by_name[name])


def test_every_method_matches_triton() -> None:
    assert triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE_NAME
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert set(METHODS) == set(mine)
    for name, method in mine.items():
        triton_method = theirs[name]
        assert (_short(method.input_type.full_name, "tensorline.oip.v2"),
                _short(method.output_type.full_name, "tensorline.oip.v2"),
                method.client_streaming, method.server_streaming) == (
            _short(triton_method.input_type.full_name, "inference"),
            _short(triton_method.output_type.full_name, "inference"),
            triton_method.client_streaming, triton_method.server_streaming), name
