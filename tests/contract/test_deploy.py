"""deploy/ as far as it can be checked without a container engine or a cluster: the compose file
passes docker-compose's schema check and mounts files that exist, the image installs every package,
and the Kubernetes manifests render with kustomize and validate against the Kubernetes schemas."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as K8sValidationError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = "1.30.0"
"""The Kubernetes version the manifests are validated for (an old enough one that clusters run it)."""
OPERATOR_API = "monitoring.coreos.com/v1"
"""The Prometheus Operator's CRDs: not in the Kubernetes schemas; checked against alerts.yml instead."""


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def rendered() -> list[dict[str, Any]]:
    """The Kubernetes objects of deploy/k8s: `kubectl kustomize` where kubectl is installed, else the
    kustomization's resource files as they are (without its namespace, label and image transforms)."""
    if shutil.which("kubectl") is not None:
        out = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if doc]
    return docs


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (.ci/run does)")
def test_compose_file_passes_the_compose_schema() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config", "-q"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_compose_runs_the_whole_stack_and_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert {"nats", "postgres", "s3", "worker", "executor", "llm-serve", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"


def test_the_image_copies_every_package_folder() -> None:
    """The Dockerfile once left client/ out, so `pip install .` failed in the image."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {line.split()[1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY")}
    assert set(package_dir.values()) <= copied


def test_every_python_package_folder_is_installed() -> None:
    """worker/rollouts was once left out of `packages`: an installed forseti failed at its first import."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for prefix, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            if "node_modules" not in relative.parts:
                assert ".".join((prefix, *relative.parts)) in listed, f"{init.parent} is not in pyproject's packages"


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    docs = rendered()
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"Deployment", "StatefulSet", "Service", "ServiceMonitor", "PrometheusRule"} <= set(kinds)
    for doc in docs:
        if doc["apiVersion"] != OPERATOR_API:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    """A misspelt field in a Deployment is caught, so the check above checks something."""
    deployment = next(doc for doc in rendered() if doc["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(K8sValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_workers_are_probed_scraped_and_alerted_on() -> None:
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered()}
    worker = docs[("Deployment", "forseti-worker")]["spec"]["template"]
    container = worker["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    nats = docs[("StatefulSet", "nats")]["spec"]
    assert nats["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "jetstream" in docs[("ConfigMap", "nats-config")]["data"]["nats-server.conf"]
    service = docs[("Service", "forseti-worker")]
    monitor = docs[("ServiceMonitor", "forseti-worker")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {port["name"] for port in service["spec"]["ports"]}
    rules = docs[("PrometheusRule", "forseti")]["spec"]
    assert rules == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text()), (
        "deploy/k8s/monitoring.yaml's PrometheusRule differs from deploy/prometheus/alerts.yml"
    )
