"""The deployment files in docker/ parse and agree with each other and with the server.

Every Kubernetes manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
which ships them: no cluster, no network) of pinned Kubernetes versions, strictly (unknown fields
are errors, so a misspelt probe is not silently ignored by the check either). On top of that,
Kubernetes manifests, docker-compose.yml and the Dockerfile are checked for the fields the
deployment depends on (probes, no /dev/shm, drain timing, non-root user, selectors); every
``TENSORLINE_*`` variable they set must be a real server setting; nginx.conf passes ``nginx -t``
and haproxy.cfg ``haproxy -c``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from tensorline.server import Settings
from tests.support.haproxy import SERVING_MESSAGE, grpc_health_check_bytes, haproxy_binary
from tests.support.haproxy import render_config as render_haproxy
from tests.support.processes import REPO_ROOT, free_port

DOCKER = REPO_ROOT / "docker"
K8S = DOCKER / "k8s"
# Not server settings: the config file path (read by Settings.load) and compose's published port.
NOT_SETTINGS = {"TENSORLINE_CONFIG", "TENSORLINE_LB_PORT"}
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27) and the
# newest whose schemas the pinned kubernetes-validate ships: API removals show up in the newer
# one, fields that do not exist yet in the older one. Exact versions the package has schemas for
# (it would otherwise fall back silently to an older schema set).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def schema_errors(paths: list[Path], version: str) -> list[str]:
    """One message per manifest document that fails the Kubernetes ``version`` schema, naming
    file, document, kind/name and the field (a dotted path) the schema rejects."""
    errors: list[str] = []
    for path in paths:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            where = f"{path.name} document {index}"
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                errors.append(f"{where}: not a Kubernetes object (needs apiVersion and kind)")
                continue
            what = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                field = ".".join(str(part) for part in error.absolute_path) or "(top level)"
                errors.append(f"{where} {what}: field {field}: {error.message} "
                              f"(Kubernetes {error.version} schema)")
            except kubernetes_validate.SchemaNotFoundError as error:
                # The package only warns on these; here an apiVersion the cluster does not serve
                # (removed beta APIs, a typo) is an error like any other.
                errors.append(f"{where} {what}: {error.message}")
    return errors


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


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_k8s_document_passes_the_kubernetes_schema(version: str) -> None:
    assert version in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for {version}")
    paths = sorted(K8S.glob("*.yaml"))
    assert paths, K8S
    errors = schema_errors(paths, version)
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_broken_manifests(tmp_path: Path) -> None:
    """The check above can fail: broken copies of the real manifests, each error named."""
    deployment_docs = list(yaml.safe_load_all((K8S / "deployment.yaml").read_text()))
    container = deployment_docs[0]["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # misspelt: silently ignored
    container["ports"][0]["containerPort"] = "fifty"
    broken_deployment = tmp_path / "deployment.yaml"
    broken_deployment.write_text(yaml.safe_dump_all(deployment_docs))
    broken_pdb = tmp_path / "pdb.yaml"
    broken_pdb.write_text((K8S / "pdb.yaml").read_text().replace(
        "apiVersion: policy/v1", "apiVersion: policy/v1beta1"))  # removed in Kubernetes 1.25
    broken_service = tmp_path / "service.yaml"
    broken_service.write_text((K8S / "service.yaml").read_text().replace(
        "clusterIP: None", "clusterIP: [None]", 1))
    assert "clusterIP: [None]" in broken_service.read_text()

    errors = schema_errors([broken_deployment, broken_pdb, broken_service], KUBERNETES_VERSIONS[0])
    text = "\n".join(errors)
    assert len(errors) == 3, text
    deployment_error, pdb_error, service_error = errors
    # Only the first error of a document is reported: strict validation meets the unknown
    # field or the bad port first, either names the container's field.
    assert deployment_error.startswith("deployment.yaml document 0 Deployment/tensorline: field "
                                       "spec.template.spec.containers.0"), deployment_error
    assert "readinesProbe" in deployment_error or "containerPort" in deployment_error
    assert pdb_error.startswith("pdb.yaml document 0 PodDisruptionBudget/tensorline: "), pdb_error
    assert "policy/v1beta1" in pdb_error
    assert service_error.startswith(
        "service.yaml document 1 Service/tensorline-headless: field spec.clusterIP: "), service_error

    # And each fault alone, so neither masks the other.
    container["ports"][0]["containerPort"] = 50051
    broken_deployment.write_text(yaml.safe_dump_all(deployment_docs))
    (unknown_field,) = schema_errors([broken_deployment], KUBERNETES_VERSIONS[0])
    assert "field spec.template.spec.containers.0: " in unknown_field
    assert "'readinesProbe' was unexpected" in unknown_field, unknown_field
    container["readinessProbe"] = container.pop("readinesProbe")
    container["ports"][0]["containerPort"] = "fifty"
    broken_deployment.write_text(yaml.safe_dump_all(deployment_docs))
    (bad_type,) = schema_errors([broken_deployment], KUBERNETES_VERSIONS[0])
    assert "field spec.template.spec.containers.0.ports.0.containerPort: 'fifty' is not of type " \
        "'integer'" in bad_type, bad_type


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


def test_haproxy_cfg_balances_the_compose_replicas_and_is_valid(tmp_path: Path) -> None:
    text = (DOCKER / "haproxy.cfg").read_text()
    services = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    replicas = sorted(name for name in services if name.startswith("tensorline-"))
    servers = re.findall(r"^\s*server\s+(\S+)\s+([\w.-]+):50051\s*$", text, re.MULTILINE)
    assert sorted(host for _, host in servers) == replicas
    assert re.search(r"^\s*bind\s+:50051\s+proto h2$", text, re.MULTILINE)
    assert re.search(r"^\s*default-server\s+proto h2\s+check\s+check-proto none\b", text,
                     re.MULTILINE)
    # The health check's bytes are the gRPC Health/Check call the support module builds.
    sent = re.search(r"^\s*tcp-check send-binary ([0-9a-f]+)$", text, re.MULTILINE)
    assert sent and bytes.fromhex(sent[1]) == grpc_health_check_bytes()
    assert re.search(rf"^\s*tcp-check expect binary {SERVING_MESSAGE}$", text, re.MULTILINE)

    haproxy = haproxy_binary()
    if haproxy is None:
        # .ci/run installs it: a CI machine without it is a broken CI machine, not a skip.
        assert os.environ.get("CI", "").lower() not in ("1", "true", "yes"), "haproxy missing"
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")
    # The compose hostnames do not resolve here: the test's rendering puts loopback in their
    # place; everything else is the file as shipped.
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(render_haproxy([f"127.0.0.1:{free_port()}" for _ in replicas],
                                   listen=f"127.0.0.1:{free_port()}",
                                   admin_socket=tmp_path / "admin.sock"))
    result = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
