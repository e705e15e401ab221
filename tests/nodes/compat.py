"""A probe node for the compatibility matrix (docs/compatibility.md): it tries one operation
(network, files, subprocess, threads, GPU, ...) and reports what happened as JSON instead of
raising, so a blocked operation in the sandbox is data, not a failure that fallback would retry
in-process."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field

from tensorline.client import Json
from tensorline.server.nodes import Node, NodeParams, Port


class ProbeParams(NodeParams):
    what: str
    port: int = Field(0, description="loopback TCP port for tcp_connect")
    propagate: bool = Field(False, description="let the exception out instead of reporting it")


def _tcp_connect(node: Probe) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", node.params.port), timeout=5):
        return "connected"


def _write_outside(node: Probe) -> str:
    # A fixed path: in a worker tempfile.gettempdir() is the scratch dir (TMPDIR points there).
    path = f"/tmp/tensorline-probe-{uuid.uuid4().hex}"
    with open(path, "w") as handle:
        handle.write("x")
    os.unlink(path)
    return f"wrote {path}"


def _write_scratch(node: Probe) -> str:
    scratch = node.context.scratch_dir or tempfile.gettempdir()
    path = os.path.join(scratch, "probe.txt")
    with open(path, "w") as handle:
        handle.write("x")
    os.unlink(path)
    return "wrote the scratch dir" if node.context.scratch_dir else f"no scratch dir; wrote {path}"


def _tempdir(node: Probe) -> str:
    return f"tempfile.gettempdir() = {tempfile.gettempdir()}"


def _read_file(node: Probe) -> str:
    with open("/etc/os-release") as handle:
        return f"read {len(handle.read())} bytes of /etc/os-release"


def _device_node(node: Probe) -> str:
    # A device file beyond /dev/null, zero, random, urandom, full: how a GPU is reached too
    # (/dev/nvidia*, /dev/dri/*), so this stands in for device access on machines without one.
    fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    os.close(fd)
    return "opened /dev/ptmx"


def _subprocess(node: Probe) -> str:
    done = subprocess.run(["/bin/true"], check=True, timeout=10)
    return f"/bin/true exited {done.returncode}"


def _os_system(node: Probe) -> str:
    # os.system does not raise where programs cannot run: the C library's system() starts its
    # child without fork(), and the child's exec of /bin/sh is what fails (exit status 127).
    status = os.system("/bin/true")
    return f"os.system returned {status}"


def _fork(node: Probe) -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return f"child exited {status}"


def _threads(node: Probe) -> str:
    results: list[int] = []
    workers = [threading.Thread(target=lambda i=i: results.append(sum(range(i * 1000))))
               for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return f"{len(results)} threads ran"


def _torch_threads(node: Probe) -> str:
    import torch

    a = torch.ones(256, 256)
    return f"torch intra-op threads {torch.get_num_threads()}, matmul sum {float((a @ a).sum()):g}"


def _gpu(node: Probe) -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible (torch.cuda.is_available() is False)")
    return f"CUDA devices {torch.cuda.device_count()}"


def _shared_memory(node: Probe) -> str:
    from multiprocessing import shared_memory

    segment = shared_memory.SharedMemory(create=True, size=4096)
    segment.close()
    segment.unlink()
    return "created a /dev/shm segment"


def _pandas(node: Probe) -> str:
    import pandas as pd

    return f"pandas {pd.__version__}: {int(pd.DataFrame({'a': [1, 2]})['a'].sum())}"


def _scipy(node: Probe) -> str:
    import scipy
    from scipy.signal import butter

    return f"scipy {scipy.__version__}: {len(butter(4, 0.2, output='sos'))} sections"


PROBES: dict[str, Callable[[Probe], str]] = {
    "tcp_connect": _tcp_connect,
    "write_outside_scratch": _write_outside,
    "write_scratch": _write_scratch,
    "tempdir": _tempdir,
    "read_system_file": _read_file,
    "device_node": _device_node,
    "subprocess": _subprocess,
    "os_system": _os_system,
    "fork": _fork,
    "threads": _threads,
    "torch_threads": _torch_threads,
    "gpu": _gpu,
    "shared_memory": _shared_memory,
    "pandas": _pandas,
    "scipy": _scipy,
}


class Probe(Node):
    """Try one operation; output JSON {"ok": bool, "detail": str}."""

    Params = ProbeParams
    params: ProbeParams
    inputs = (Port("in", required=False),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        try:
            detail = PROBES[self.params.what](self)
            return Json({"ok": True, "detail": detail})
        except Exception as exc:  # the outcome is the data, whatever it is
            if self.params.propagate:
                raise
            return Json({"ok": False, "detail": f"{type(exc).__name__}: {exc}"})
