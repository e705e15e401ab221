"""The sandboxed runtime: nodes run in a supervised pool of isolated worker processes.

Server side, one module per concern (how they fit together: ``_core``; the design:
docs/architecture.md, "Sandbox runtime design"):

* ``_runtime``: ``SandboxRuntime``, the public surface (lifecycle, ``call``/``acquire``/
  ``release``, catalogues of untrusted modules);
* ``_pool``: workers' lives (spawn, death, replacement, recycling, retiring, probes) and picking
  an idle worker; ``_records``: the records it keeps (``_Worker``, ``_Call``, ``_Turn``);
* ``_calls``: one request and its reply, deadlines, cancellation, one-shot ``run`` requests;
* ``_instances``: node instances in workers (placing, warm instances, releases);
* ``_streaming``: stream sessions; ``_failures``: ``WorkerFailure`` and its kinds;
* ``_launcher``: the launcher process that forks workers; ``_output``: workers' output, logged;
  ``_paths``: what workers may read.

Shared by both sides: ``_messages`` (the control protocol's requests and replies) and ``_shm``
(framing, shared-memory segments, the restricted unpickler).

Inside the launcher and the workers (never gRPC state): ``_zygote`` (the launcher process),
``_bootstrap`` (a worker's start), ``_isolation`` (the layers a worker applies to itself),
``_worker`` (a worker's request loop), ``_worker_errors`` (how it reports a failure).
"""

from tensorline.server.runtime.sandbox._failures import ModuleUnavailable, WorkerFailure
from tensorline.server.runtime.sandbox._instances import SandboxInstance
from tensorline.server.runtime.sandbox._launcher import Launcher, LauncherGone, minimal_environment
from tensorline.server.runtime.sandbox._runtime import SandboxRuntime

__all__ = [
    "Launcher",
    "LauncherGone",
    "ModuleUnavailable",
    "SandboxInstance",
    "SandboxRuntime",
    "WorkerFailure",
    "minimal_environment",
]
