"""deploy/kubernetes: every overlay renders, validates, and says what the code expects."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate as kv
import pytest
import typer
import yaml
from pydantic.alias_generators import to_camel

from warmstart.cli.app import app as warmstart_app
from warmstart.k8s import contract
from warmstart.k8s.resources import (
    Condition,
    LabelSelector,
    Options,
    PhaseTimingStatus,
    SnapshotSpec,
    SnapshotStatus,
    Source,
    new_snapshot,
)
from warmstart.k8s.settings import AgentSettings, ControllerSettings

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
TARGETS = [".", "overlays/hostpath", "overlays/pvc", "overlays/nfs", "overlays/k3s",
           "overlays/prometheus"]
#: The Kubernetes versions the manifests claim (base/kustomization.yaml), as far as
#: kubernetes-validate ships their schemas offline.
CLAIMED = [f"1.{m}" for m in range(29, 38)]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) not found")


def _shipped_versions() -> list[str]:
    base = Path(kv.__file__).parent / "kubernetes-json-schema"
    have = {p.name.removeprefix("v").split(".")[0] + "." + p.name.split(".")[1]
            for p in base.iterdir() if p.name.endswith("-local")}
    return [v for v in CLAIMED if v in have]


SHIPPED = _shipped_versions()


def render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run([KUBECTL or "kubectl", "kustomize", str(ROOT / target)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) not found")
    return {t: render(t) for t in TARGETS}


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or
                                                        d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def crd_schema(docs: list[dict[str, Any]]) -> dict[str, Any]:
    crd = one(docs, "CustomResourceDefinition", f"{contract.PLURAL}.{contract.GROUP}")
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == contract.VERSION]
    return ver["schema"]["openAPIV3Schema"]


def closed(schema: Any) -> Any:
    """The schema with unknown fields rejected: what the API server would silently prune."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    return schema


def test_claimed_versions_are_shipped_by_kubernetes_validate():
    assert SHIPPED == CLAIMED, f"kubernetes-validate lacks {set(CLAIMED) - set(SHIPPED)}"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_overlay_renders_and_validates_for_every_claimed_version(target, rendered):
    docs = rendered[target]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "ClusterRole",
            "ClusterRoleBinding", "ServiceAccount", "Service", "Namespace"} <= kinds
    checked = 0
    for version in SHIPPED:
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # the Prometheus Operator's CRD: checked below by hand
            kv.validate(doc, version, strict=True)
            checked += 1
    assert checked >= len(SHIPPED) * 13


@needs_kubectl
def test_validation_catches_a_broken_manifest(rendered):
    ds = copy.deepcopy(one(rendered["."], "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostPID"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, SHIPPED[0], strict=True)


@needs_kubectl
def test_agent_daemonset_has_what_checkpoint_restore_needs(rendered):
    ds = one(rendered["."], "DaemonSet", "snapshot-agent")
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    c, watch = containers["agent"], containers["node-watch"]
    assert pod["hostPID"] is True and c["securityContext"]["privileged"] is True
    assert watch["securityContext"].get("privileged") is not True
    # both command lines parse with the real CLI, and they agree on the socket
    from warmstart.cli import agent, workers  # noqa: F401  (register their commands)

    cli = typer.main.get_command(warmstart_app)
    root = cli.context_class(cli, info_name="warmstart")
    for args in (c["args"], watch["args"]):
        sub = cli.get_command(root, args[0])
        assert sub is not None, args[0]
        sub.make_context(args[0], list(args[1:]), parent=root)
    assert "--socket=/run/warmstart/agent.sock" in c["args"]
    assert "/run/warmstart" in {m["mountPath"] for m in watch["volumeMounts"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/run/containerd", "/var/lib/containerd", "/dev", "/sys/fs/cgroup",
                 "/var/lib/warmstart/snapshots", "/run/warmstart"):
        assert path in mounts, path
    assert mounts["/run/containerd"]["mountPropagation"] == "HostToContainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["snapshots"]["hostPath"]["path"] == "/var/lib/warmstart/snapshots"
    # the env the manifest sets is what AgentSettings.from_env reads
    env = {e["name"]: e.get("value", "") for e in watch["env"]}
    assert watch["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    env["NODE_NAME"] = "gpu-node-1"
    old = dict(os.environ)
    try:
        os.environ.update(env)
        s = AgentSettings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert s.node_name == "gpu-node-1" and s.metrics_port == 9464
    assert s.socket_path == "/run/warmstart/agent.sock"
    assert s.default_store == "file://" + "/var/lib/warmstart/snapshots"
    assert s.socket_path.startswith("/run/warmstart/")
    ports = {p["name"]: p["containerPort"] for p in watch["ports"]}
    assert ports["metrics"] == s.metrics_port
    agent_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--metrics-port={agent_ports['agent-metrics']}" in c["args"]
    assert agent_ports["agent-metrics"] != s.metrics_port  # one pod, two listeners


@needs_kubectl
def test_controller_is_unprivileged(rendered):
    dep = one(rendered["."], "Deployment", "warmstart-controller")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["controller"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert not pod.get("hostPID") and not c["securityContext"].get("privileged")
    env = {e["name"]: e.get("value", "") for e in c["env"]}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        assert ControllerSettings.from_env().metrics_port == 9464
    finally:
        os.environ.clear()
        os.environ.update(old)


@needs_kubectl
def test_rbac_is_least_privilege(rendered):
    docs = rendered["."]

    def rules(name: str) -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for r in one(docs, "ClusterRole", name)["rules"]:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    out.setdefault((g, res), set()).update(r["verbs"])
        return out

    ctl, agent = rules("warmstart-controller"), rules("warmstart-agent")
    for role in (ctl, agent):
        assert all("*" not in v and "delete" not in v for v in role.values())
        assert all(res not in ("secrets", "pods/exec", "nodes") for _, res in role)
    assert ctl[("", "pods")] == {"get", "list", "watch"}  # never writes pods
    assert agent[("", "pods")] == {"get", "list", "watch", "patch"}
    assert agent[(contract.GROUP, "snapshots")] == {"get", "list", "watch"}
    assert agent[(contract.GROUP, "snapshots/status")] == {"get", "update"}
    assert "create" in ctl[(contract.GROUP, "snapshots")]


@needs_kubectl
def test_storage_overlays_replace_the_snapshot_volume(rendered):
    def snapshots_volume(target: str) -> dict[str, Any]:
        ds = one(rendered[target], "DaemonSet")
        (v,) = [v for v in ds["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "snapshots"]
        return v

    pvc = snapshots_volume("overlays/pvc")
    assert "hostPath" not in pvc
    claim = one(rendered["overlays/pvc"], "PersistentVolumeClaim")
    assert pvc["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    nfs = snapshots_volume("overlays/nfs")
    assert "hostPath" not in nfs and nfs["nfs"]["path"]


@needs_kubectl
def test_k3s_overlay_moves_the_containerd_socket(rendered):
    ds = one(rendered["overlays/k3s"], "DaemonSet")
    c = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WARMSTART_CONTAINERD_SOCKET"] == "/run/k3s/containerd/containerd.sock"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v.get("hostPath", {}).get("path") for v in
            ds["spec"]["template"]["spec"]["volumes"]}
    for name in ("containerd-run", "containerd-state"):  # same path inside as on the host
        assert mounts[name] == vols[name] and "containerd" in mounts[name]
    assert mounts["containerd-run"] == "/run/k3s/containerd"


@needs_kubectl
def test_servicemonitor_selects_the_metrics_services(rendered):
    docs = rendered["overlays/prometheus"]
    sm = one(docs, "ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"
                and all(d["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
    assert {s["metadata"]["name"] for s in services} == {"warmstart-controller-metrics",
                                                         "snapshot-agent-metrics"}
    port = sm["spec"]["endpoints"][0]["port"]
    assert all(any(p["name"] == port for p in s["spec"]["ports"]) for s in services)
    assert "ServiceMonitor" not in {d["kind"] for d in rendered["."]}


@needs_kubectl
def test_crd_printer_columns_point_at_real_fields(rendered):
    crd = one(rendered["."], "CustomResourceDefinition")
    (ver,) = crd["spec"]["versions"]
    assert ver["subresources"] == {"status": {}}
    schema = crd_schema(rendered["."])
    for col in ver["additionalPrinterColumns"]:
        parts = col["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for p in parts:
            node = node["properties"][p]
        assert node["type"] == col["type"], col


@needs_kubectl
def test_python_models_fit_the_crd_schema(rendered):
    """Every field the code writes exists in the CRD (else the API server would prune it)."""
    schema = closed(crd_schema(rendered["."]))
    spec = SnapshotSpec(source=Source(selector=LabelSelector(match_labels={"app": "llm"}),
                                      container="worker"),
                        workload="llm", store="file:///s", options=Options())
    obj = new_snapshot("s", "default", spec, labels={"a": "b"})
    status = SnapshotStatus(
        phase="Ready", node="n", source_pod="p", container="c", claimed_by="n", store_key="k",
        snapshot_id="i", size_bytes=1 << 40, gpu_model="H100", driver_version="580",
        image_digest="sha256:a", arch="x86_64", compat_key="x", started_at="2026-01-01T00:00:00Z",
        completed_at="2026-01-01T00:00:01Z", failure_reason="r", message="m",
        timings=[PhaseTimingStatus(name="dump", seconds=1.5)],
        conditions=[Condition(type="Ready", status="True", reason="r",
                              last_transition_time="2026-01-01T00:00:00Z")])
    obj["status"] = status.wire()
    missing = {to_camel(f) for f in SnapshotStatus.model_fields} - set(obj["status"])
    assert not missing  # the sample above sets every field the model has
    jsonschema.validate(obj, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**obj, "status": {**obj["status"], "gpuModle": "typo"}}, schema)


@needs_kubectl
def test_examples_validate(rendered):
    schema = closed(crd_schema(rendered["."]))
    docs = [d for p in sorted((ROOT / "examples").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if doc["kind"] == contract.KIND:
            jsonschema.validate(doc, schema)
        else:
            for version in SHIPPED:
                kv.validate(doc, version, strict=True)
    assert kinds == {"Deployment", "Snapshot"}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"][contract.LABEL_WORKLOAD]
    ann = tmpl["metadata"]["annotations"]
    assert ann[contract.ANN_RESTORE] == contract.RESTORE_LATEST
    assert ann[contract.ANN_CHECKPOINT] == contract.CHECKPOINT_WHEN_READY
    (c,) = tmpl["spec"]["containers"]
    assert c["command"][:2] == ["warmstart", "placeholder"]
    probe = " ".join(c["startupProbe"]["exec"]["command"])
    assert contract.PLACEHOLDER_COLD_START in probe and "restore-complete" in probe
