"""Requests that name a pipeline of the repository instead of carrying a manifest, and the
repository's listing (ListPipelines, GetServerInfo.pipelines).

ExecuteRequest and StreamInit carry exactly one of ``manifest_json`` and ``pipeline`` (with an
optional ``pipeline_version``, 0 = the newest ready one); ``named_version`` checks that and says
which was given. A server without a repository refuses a named pipeline with
FAILED_PRECONDITION; an unknown name or version is NOT_FOUND (``PipelineNotFound``, raised by
the repository's ``lease``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tensorline.server._errors import RequestInvalid
from tensorline.server.repository import PipelinePort, PipelineRepository, PipelineState
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import Violation

NO_REPOSITORY = ("this server has no pipeline repository: start it with --pipelines DIR "
                 "(TENSORLINE_PIPELINES_DIR) to serve named pipelines")


@dataclass(frozen=True, slots=True)
class Named:
    """A request's named pipeline: the repository holding it, its name and version (None =
    the newest ready one)."""

    repository: PipelineRepository
    name: str
    version: int | None


def named_version(manifest_json: str, pipeline: str, version: int,
                  repository: PipelineRepository | None, *, prefix: str = "",
                  prior: Sequence[Violation] = ()) -> Named | None:
    """None when the request carries a manifest, else the pipeline it names. RequestInvalid
    (with the decoder's ``prior`` violations) names the field when both or neither are given,
    or a version below 0; FAILED_PRECONDITION when there is no repository."""
    problem: Violation | None = None
    if pipeline and manifest_json:
        problem = Violation(f"{prefix}pipeline", "give either a manifest (manifest_json) or the "
                                                 "name of a pipeline (pipeline), not both")
    elif not pipeline and version:
        problem = Violation(f"{prefix}pipeline_version", "is set, but pipeline (the name) is not")
    elif not pipeline and not manifest_json:
        problem = Violation(f"{prefix}manifest_json", "empty manifest: give a manifest "
                                                      "(manifest_json) or the name of a pipeline "
                                                      "(pipeline)")
    elif pipeline and version < 0:
        problem = Violation(f"{prefix}pipeline_version", f"must be >= 0 (0 = the newest "
                                                         f"version), got {version}")
    elif pipeline and repository is None:
        problem = Violation(f"{prefix}pipeline", NO_REPOSITORY, kind="precondition")
    if problem is not None:
        raise RequestInvalid([*prior, problem], "invalid request")
    if not pipeline:
        return None
    assert repository is not None
    return Named(repository, pipeline, version or None)


def _port(port: PipelinePort) -> pb.PipelinePort:
    return pb.PipelinePort(name=port.name, node_id=port.node_id, port=port.port, kind=port.kind,
                           datatype=port.datatype or "", shape=list(port.shape or ()),
                           required=port.required)


def pipeline_status(state: PipelineState) -> pb.PipelineStatus:
    return pb.PipelineStatus(name=state.name, state=state.state, versions=list(state.versions),
                             reason=state.reason,
                             source=str(state.source) if state.source is not None else "")


def pipeline_statuses(repository: PipelineRepository | None) -> list[pb.PipelineStatus]:
    return [] if repository is None else [pipeline_status(s) for s in repository.states()]


def list_pipelines(repository: PipelineRepository | None) -> pb.ListPipelinesResponse:
    """Every name with its state; the signature of the version new calls get."""
    if repository is None:
        raise RequestInvalid([Violation("pipeline", NO_REPOSITORY, kind="precondition")],
                             "no pipeline repository")
    served = {pipeline.name: pipeline for pipeline in repository.pipelines()}
    infos = []
    for state in repository.states():
        pipeline = served.get(state.name)
        infos.append(pb.PipelineInfo(
            status=pipeline_status(state),
            inputs=[_port(p) for p in pipeline.inputs] if pipeline is not None else [],
            outputs=[_port(p) for p in pipeline.outputs] if pipeline is not None else []))
    return pb.ListPipelinesResponse(pipelines=infos)
