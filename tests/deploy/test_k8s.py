"""deploy/k8s: every manifest validates against the Kubernetes schema (kubernetes-validate ships the
schemas, no cluster needed), and the pieces agree with each other and with the image."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"     # the oldest release the manifests promise to work with


def documents() -> list[tuple[str, dict]]:
    docs = [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]
    assert docs
    return docs


def find(kind: str, file: str | None = None) -> dict:
    matches = [doc for name, doc in documents() if doc["kind"] == kind and (file is None or name == file)]
    assert len(matches) == 1, (kind, file, len(matches))
    return matches[0]


@pytest.mark.parametrize(("file", "doc"), [d for d in documents() if d[1]["kind"] != "Kustomization"],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_manifest_is_valid(file, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_existing_files():
    kustomization = find("Kustomization")
    assert kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "hpa-queue.yaml" not in kustomization["resources"]      # one autoscaler per Deployment


def test_service_and_probes_reach_the_container():
    deployment, service = find("Deployment"), find("Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == int(env["ATTNSERVE_PORT"]) == 8000
    assert env["ATTNSERVE_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == 8000, probe


def test_pod_matches_the_image():
    """Non-root with the image's uid; the checkpoint and metrics paths the Dockerfile sets up."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+)", dockerfile, re.M).group(1)
    pod = find("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert f"ATTNSERVE_CHECKPOINT={env['ATTNSERVE_CHECKPOINT']}" in dockerfile
    # Read-only root: the metrics dir must be on a writable volume.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(env["ATTNSERVE_METRICS_DIR"].startswith(m.rstrip("/") + "/") for m in mounts)
    assert container["resources"]["requests"]["cpu"]          # a CPU autoscaler needs requests


@pytest.mark.parametrize("file", ["hpa.yaml", "hpa-queue.yaml"])
def test_autoscaler_targets_the_deployment(file):
    hpa, deployment = find("HorizontalPodAutoscaler", file), find("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metric = hpa["spec"]["metrics"][0]
    if metric["type"] == "Pods":
        assert metric["pods"]["metric"]["name"] == "attnserve_num_requests_waiting"   # a metric of API.md
    else:
        assert metric["resource"]["name"] == "cpu"
