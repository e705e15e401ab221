"""The deployment files in docker/ parse and agree with each other and with the server.

Kubernetes manifests, docker-compose.yml and the Dockerfile are checked for the fields the
deployment depends on (probes, no /dev/shm, drain timing, non-root user, selectors); every
``TENSORLINE_*`` variable they set must be a real server setting; nginx.conf passes ``nginx -t``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorline.server import Settings
from tests.support.processes import REPO_ROOT, free_port

DOCKER = REPO_ROOT / "docker"
K8S = DOCKER / "k8s"
# Not server settings: the config file path (read by Settings.load) and compose's published port.
NOT_SETTINGS = {"TENSORLINE_CONFIG", "TENSORLINE_LB_PORT"}


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_documents()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["__file__"] for d in found])
    return found[0]


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def image_uid() -> int:
    match = re.search(r"^ARG APP_UID=(\d+)$", dockerfile(), re.MULTILINE)
    assert match, "Dockerfile declares ARG APP_UID"
    return int(match[1])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_every_k8s_document_is_well_formed() -> None:
    docs = k8s_documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        assert doc.get("apiVersion") and doc["metadata"].get("name"), doc["__file__"]


def test_deployment_probes_memory_drain_and_security() -> None:
    deployment = only("Deployment", "tensorline")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    env = env_of(container)
    assert env["TENSORLINE_PORT"] == str(port)

    # Native gRPC probes on the serving port.
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == port, probe

    # No /dev/shm volume: tensors reach sandboxed workers in memfd segments, which count against
    # the container's memory limit (asserted below) and the worker cap, not /dev/shm.
    assert all(m["mountPath"] != "/dev/shm" for m in container["volumeMounts"])

    # Drain: the delay before refusing calls plus the server's grace fit inside
    # terminationGracePeriodSeconds, and liveness does not kill a draining pod before that.
    grace = float(env["TENSORLINE_GRACE_S"]) + float(env.get("TENSORLINE_DRAIN_DELAY_S", 0))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if pre_stop and pre_stop[0] == "sleep":
        grace += float(pre_stop[1])
    termination = pod["terminationGracePeriodSeconds"]
    assert grace < termination <= grace + 15
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > termination

    # Resources and a non-root, read-only, capability-free container matching the image's user.
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][key].keys()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image_uid()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_services_and_hpa_point_at_the_deployment() -> None:
    deployment = only("Deployment", "tensorline")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("tensorline", "tensorline-headless"):
        service = only("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    assert only("Service", "tensorline-headless")["spec"]["clusterIP"] == "None"
    hpa = only("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "tensorline"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_compose_has_three_replicas_behind_the_balancer() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("tensorline-"))
    assert len(replicas) == 3
    nginx_conf = (DOCKER / "nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", nginx_conf, re.MULTILINE)
    assert sorted(host for host, _ in upstreams) == replicas
    assert "grpc_pass grpc://tensorline;" in nginx_conf
    assert re.search(r"listen\s+50051\s+http2;", nginx_conf)
    ids = set()
    for name in replicas:
        service = services[name]
        ids.add(service["environment"]["TENSORLINE_INSTANCE_ID"])
        assert "shm_size" not in service  # memfd segments, not /dev/shm (README.md)
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        grace = float(service["environment"]["TENSORLINE_GRACE_S"])
        assert float(service["stop_grace_period"].rstrip("s")) > grace
    assert len(ids) == 3
    assert set(services["lb"]["depends_on"]) == set(replicas)


def test_dockerfile_contract() -> None:
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS builder$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS runtime$", text, re.MULTILINE)
    assert "COPY --from=builder /opt/tensorline /opt/tensorline" in text
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", text, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    assert re.search(r"CMD tensorline health --server \"127\.0\.0\.1:\$\{TENSORLINE_PORT\}\"",
                     text)
    assert 'ENTRYPOINT ["tensorline", "serve"]' in text
    # The memory note: memfd segments, bounded by the worker cap and the container's limit.
    assert "memfd" in text and "TENSORLINE_SANDBOX_MEMORY_MB" in text
    dockerignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(dockerignore)


def test_every_tensorline_variable_is_a_server_setting() -> None:
    fields = {f"TENSORLINE_{name.upper()}" for name in Settings.model_fields}
    used: set[str] = set()
    for path in [*K8S.glob("*.yaml"), DOCKER / "docker-compose.yml", DOCKER / "Dockerfile"]:
        used |= set(re.findall(r"\bTENSORLINE_[A-Z0-9_]+", path.read_text()))
    unknown = used - fields - NOT_SETTINGS
    assert not unknown, f"not settings of the server: {sorted(unknown)}"


def test_nginx_conf_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    # Same config with the compose hostnames (unresolvable here) on loopback and paths in tmp.
    text = (DOCKER / "nginx.conf").read_text()
    text = re.sub(r"tensorline-\d+:", "127.0.0.1:", text)
    text = text.replace("/tmp/", f"{tmp_path}/").replace(
        "listen 50051", f"listen 127.0.0.1:{free_port()}")
    text = re.sub(r"^(\s*error_log )/dev/stderr", rf"\g<1>{tmp_path}/error.log", text,
                  flags=re.MULTILINE)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf),
                             "-e", str(tmp_path / "error.log")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
