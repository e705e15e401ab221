"""The pipeline repository: named, versioned pipelines loaded from a directory of manifests.

A request (PipelineService, or the Open Inference Protocol's ModelInfer) may name a pipeline
instead of carrying its manifest; the repository holds each name's compiled plan and the
signature (inputs and outputs) clients see.
"""

from tensorline.server.repository._model import LoadedPipeline, PipelinePort, PipelineState
from tensorline.server.repository._repository import (
    MANIFEST_SUFFIXES,
    WARM_TIMEOUT_S,
    Lease,
    PipelineRepository,
)
from tensorline.server.repository._signature import DATATYPES

__all__ = [
    "DATATYPES",
    "MANIFEST_SUFFIXES",
    "WARM_TIMEOUT_S",
    "Lease",
    "LoadedPipeline",
    "PipelinePort",
    "PipelineRepository",
    "PipelineState",
]
