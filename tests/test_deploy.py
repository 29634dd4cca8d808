"""Deployment files (deploy/): Kubernetes manifests and the BentoCloud config, checked offline.

* Every Kubernetes manifest validates against the OpenAPI schemas of a pinned Kubernetes version
  in strict mode (unknown fields fail), with `kubernetes-validate`; so does `kubectl kustomize`
  output (base, overlays, components) when kubectl is installed.
* The base is scaled out: the API Deployment (2+ replicas, RollingUpdate, PDB, HPA, no GPU) finds
  the runner Deployment (GPU) through BentoML's dependency mapping (`--depends`, parsed here with
  bentoml's own command line), on PostgreSQL and a bucket from Secrets.
* The single-pod overlay is the old layout: one pod, both services, SQLite on a PVC, Recreate.
* The BentoCloud config uses bentoml's own deployment schema field names.
* Every environment variable named anywhere in deploy/ is one the code (or a named tool) reads.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # requirements-dev.txt
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
COMPONENT = K8S / "components" / "models-volume"
POSTGRES = K8S / "components" / "postgres"
OVERLAY = K8S / "overlays" / "example"
SINGLE_POD = K8S / "overlays" / "single-pod"
BENTOCLOUD = DEPLOY / "bentocloud.yaml"
README = DEPLOY / "README.md"

K8S_VERSION = "1.33.0"  # pinned: the schemas kubernetes-validate ships for this release
API_PORT = 3000
BENTO_SRC = "/home/bentoml/bento/src"  # where the Bento's code (and configuration.yaml) sits in the image
MIN_STARTUP_BUDGET_S = 900  # 15 minutes: model loading on a cold node
API, RUNNER = "lipsync", "lipsync-runner"  # the two Deployments

# Variables read by the tools around our code, not by it: allowed in the manifests.
THIRD_PARTY_ENV = {
    "BENTOML_CONFIG",  # BentoML: runtime configuration file
    "BENTOML_HOME",  # BentoML: its home (moved to a writable emptyDir)
    "HF_HUB_OFFLINE",  # huggingface_hub: the image sets it, the model download initContainer clears it
    "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",  # boto3: the bucket's region and credentials
    "POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "PGDATA",  # the postgres image (components/postgres)
    "NVIDIA_DRIVER_CAPABILITIES",  # the NVIDIA container runtime: "video" mounts the NVDEC/NVENC libraries
}


# --------------------------------------------------------------------------------------- helpers


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _manifest_files() -> list[Path]:
    """Whole Kubernetes objects: every file the kustomizations list under `resources`."""
    files = []
    for directory in (BASE, COMPONENT, POSTGRES, SINGLE_POD):
        for entry in _kustomization(directory).get("resources", []):
            if (directory / entry).is_file():
                files.append(directory / entry)
    return files


def _objects() -> list[dict]:
    return [doc for path in _manifest_files() for doc in _load_docs(path)]


def _one(kind: str, docs: list[dict] | None = None, name: str | None = None) -> dict:
    found = [d for d in (docs if docs is not None else _base_objects()) if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _base_objects() -> list[dict]:
    return [doc for entry in _kustomization(BASE)["resources"] for doc in _load_docs(BASE / entry)]


def _api() -> dict:
    return _one("Deployment", name=API)


def _runner() -> dict:
    return _one("Deployment", name=RUNNER)


def _validate(doc: dict) -> None:
    """Strict schema validation; a kind without a schema is a failure, not a skip."""
    error = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        error = f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    if error:  # outside the except: the schema's long traceback is noise
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {error}")


def _container(deployment: dict, name: str | None = None) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _env_source(container: dict, name: str) -> dict:
    return next(e for e in container.get("env", []) if e["name"] == name)


def _start_http_server_args(container: dict) -> dict:
    """The container's args as bentoml's own `start-http-server` command parses them (not run)."""
    from bentoml_cli._internal.start import build_start_command

    args = container["args"]
    assert args[0] == "start-http-server", args  # the Bento's entrypoint turns this into the module call
    command = build_start_command().commands["start-http-server"]
    ctx = command.make_context("start-http-server", [*args[1:], "/home/bentoml/bento"], resilient_parsing=False)
    return ctx.params


def _pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _volume(deployment: dict, name: str) -> dict:
    return next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def _mount_at(container: dict, path: str) -> dict:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"expected one volume mounted at {path}, found {mounts}"
    return mounts[0]


def _resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def _kubectl_kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _manifest_env_names() -> set[str]:
    """Every environment variable name the Kubernetes files set (containers, initContainers, ConfigMaps)."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                for c in node.get(key) or []:
                    names.update(e["name"] for e in c.get("env") or [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _load_docs(path):
            if doc.get("kind") == "ConfigMap":
                names.update(doc.get("data", {}))
            walk(doc)
    return names


def _bentocloud() -> dict:
    return yaml.safe_load(BENTOCLOUD.read_text())


def _bentocloud_env_names() -> set[str]:
    cfg = _bentocloud()
    names = {e["name"] for e in cfg.get("envs") or []}
    for svc in cfg["services"].values():
        names.update(e["name"] for e in svc.get("envs") or [])
    return names


def _settings_env_names() -> set[str]:
    """The variables the settings tree reads (lipsync_runner/config.py: every section, every field)."""
    from lipsync_runner.config import Settings, env_names

    return {name.upper() for section in Settings.model_fields.values()
            for field in section.annotation.model_fields for name in env_names(section.annotation, field)}


_ENVIRON_READ = re.compile(r"""os\.(?:environ\.get|environ\s*\[|getenv)\(?\s*["']([A-Za-z0-9_]+)["']""")


def _code_env_names() -> set[str]:
    """Variables read directly with os.environ / os.getenv in service.py and lipsync_runner/."""
    names: set[str] = set()
    for path in [ROOT / "service.py", *sorted((ROOT / "lipsync_runner").rglob("*.py"))]:
        names.update(_ENVIRON_READ.findall(path.read_text()))
    return names


def _known_env_names() -> set[str]:
    return _settings_env_names() | _code_env_names() | THIRD_PARTY_ENV


def _service_names() -> set[str]:
    """Names of the @bentoml.service classes in service.py (without importing it)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "bentoml.service":
                    kw = {k.arg: k.value for k in dec.keywords}
                    names.add(ast.literal_eval(kw["name"]) if "name" in kw else node.name)
    return names


# ------------------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_strictly(path):
    docs = _load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        _validate(doc)


def test_the_base_has_every_piece_of_the_scaled_out_layout():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in _base_objects())
    assert kinds == sorted([
        ("ConfigMap", "lipsync-config"), ("Deployment", API), ("Deployment", RUNNER),
        ("HorizontalPodAutoscaler", "lipsync"), ("NetworkPolicy", "lipsync"), ("NetworkPolicy", "lipsync-runner"),
        ("PodDisruptionBudget", "lipsync"), ("Service", "lipsync"), ("Service", "lipsync-runner"),
        ("ServiceAccount", "lipsync")])


def test_strict_validation_rejects_unknown_fields():
    """The check above has teeth: a misspelt field fails, in a Deployment and in an HPA."""
    bad = copy.deepcopy(_api())
    _container(bad)["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": API_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    hpa = copy.deepcopy(_one("HorizontalPodAutoscaler"))
    hpa["spec"]["minReplica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_readme_manifests_validate():
    """The YAML examples in deploy/README.md (the Secrets) are valid objects too."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and "kind" in d]
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert {"lipsync-api-tokens", "lipsync-database", "lipsync-bucket", "lipsync-postgres"} <= secrets
    for doc in docs:
        _validate(doc)


def test_manifests_are_namespace_agnostic_and_labelled():
    for doc in _objects():
        meta = doc["metadata"]
        assert "namespace" not in meta, f"{doc['kind']}/{meta['name']} hard-codes a namespace"
        assert meta["name"].startswith("lipsync"), meta["name"]
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "lipsync", meta["name"]


# ----------------------------------------------------------------------- the API, scaled out


def test_the_api_runs_several_replicas_with_rolling_updates():
    spec = _api()["spec"]
    assert spec["replicas"] > 1
    assert spec["strategy"]["type"] == "RollingUpdate"  # never Recreate: a deploy is no downtime
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert set(spec["selector"]["matchLabels"].items()) <= set(_pod_labels(_api()).items())


def test_a_terminating_api_pod_keeps_serving_until_it_has_left_the_endpoints():
    """preStop: the pause in which the Service stops routing to the pod, before SIGTERM; then time
    for the requests in flight within the grace period."""
    pod = _api()["spec"]["template"]["spec"]
    pause = _container(_api())["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 5 <= pause and pause + 30 <= pod["terminationGracePeriodSeconds"]


def test_the_api_finds_the_runner_through_bentomls_dependency_mapping():
    api_args = _start_http_server_args(_container(_api()))
    assert api_args["service_name"] == "LipSync"
    depends = dict(d.split("=", 1) for d in api_args["depends"])  # what bentoml builds runner_map_dict from
    assert set(depends) == {"MuseTalkRunner"} and set(depends) <= _service_names()
    url = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", depends["MuseTalkRunner"])
    assert url, depends
    service = _one("Service", name=url.group(1))
    port = next(p for p in service["spec"]["ports"] if p["port"] == int(url.group(2)))
    runner = _runner()
    assert service["spec"]["selector"].items() <= _pod_labels(runner).items()
    assert not service["spec"]["selector"].items() <= _pod_labels(_api()).items()
    runner_args = _start_http_server_args(_container(runner))
    assert runner_args["service_name"] == "MuseTalkRunner"  # an inner service: takes the pickled arrays
    assert _resolve_port(_container(runner), port["targetPort"]) == runner_args["port"] == API_PORT


def test_the_api_has_no_gpu_and_the_runner_has_one():
    api, runner = _container(_api()), _container(_runner())
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    assert "tolerations" not in _api()["spec"]["template"]["spec"]
    assert int(api["resources"]["requests"]["cpu"]) >= 2  # the CPU half of the jobs; the HPA's base
    assert int(runner["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert _env(runner)["LIP_SYNC_DEVICE"] == "cuda"
    tolerations = runner_spec = _runner()["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations) and runner_spec


def test_the_api_keeps_its_state_in_postgresql_and_the_bucket():
    c = _container(_api())
    db = _env_source(c, "LIP_SYNC_DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert (db["name"], db["key"]) == ("lipsync-database", "url")  # never a password in a manifest
    assert _env(c)["LIP_SYNC_STORAGE_URL"].startswith("s3://")
    bucket = [src["secretRef"] for src in c["envFrom"] if "secretRef" in src]
    assert bucket == [{"name": "lipsync-bucket", "optional": True}]  # optional: IAM roles need no keys
    data = _mount_at(c, _env(c)["LIP_SYNC_DATA_DIR"])
    assert "emptyDir" in _volume(_api(), data["name"])  # scratch only: nothing there outlives the pod
    assert "LIP_SYNC_DATABASE_URL" not in _env(_container(_runner()))  # the runner needs neither
    assert not any("secretRef" in src for src in _container(_runner()).get("envFrom", []))


def test_the_hpa_scales_the_api_on_cpu_from_its_replica_count():
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    assert 2 <= hpa["minReplicas"] <= _api()["spec"]["replicas"] < hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # jobs restart when pods go


def test_the_pdb_keeps_an_api_pod_up_and_still_allows_drains():
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= _pod_labels(_api()).items()
    assert not pdb["selector"]["matchLabels"].items() <= _pod_labels(_runner()).items()
    assert pdb.get("maxUnavailable") == 1 or 0 < pdb.get("minAvailable", 0) < _one("HorizontalPodAutoscaler")[
        "spec"]["minReplicas"]


def _startup_budget_s(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_the_runner_probes_are_sized_for_model_loading():
    c = _container(_runner())
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe_name, path in expected.items():
        probe = c[probe_name]
        assert probe["httpGet"]["path"] == path, probe_name
        assert _resolve_port(c, probe["httpGet"]["port"]) == API_PORT, probe_name
    budget = _startup_budget_s(c["startupProbe"])
    assert budget >= MIN_STARTUP_BUDGET_S, f"startup budget {budget}s < {MIN_STARTUP_BUDGET_S}s"


def test_api_readiness_does_not_follow_the_runner():
    """/readyz of the API is 503 while its runner has no models (runner_probe, __is_ready__): as the
    readiness probe, a runner restart would take every API pod out of the Service, status and
    downloads included. The API pods are ready when they serve (/livez)."""
    c = _container(_api())
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe_name]["httpGet"]["path"] == "/livez", probe_name
        assert _resolve_port(c, c[probe_name]["httpGet"]["port"]) == API_PORT


def test_the_single_pod_waits_for_its_models():
    docs = _kubectl_kustomize(SINGLE_POD)
    c = _container(_one("Deployment", docs, API))
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert _startup_budget_s(c["startupProbe"]) >= MIN_STARTUP_BUDGET_S


@pytest.mark.parametrize("name", [API, RUNNER])
def test_each_pod_exposes_only_port_3000(name):
    c = _container(_one("Deployment", name=name))
    assert [(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]] == [(API_PORT, "TCP")]


def test_api_tokens_come_from_a_secret_file():
    dep = _api()
    c = _container(dep)
    tokens_file = Path(_env(c)["LIP_SYNC_API_TOKENS_FILE"])
    mount = _mount_at(c, str(tokens_file.parent))
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "subPath mounts never see Secret updates (token rotation)"
    secret = _volume(dep, mount["name"])["secret"]
    assert secret["secretName"] == "lipsync-api-tokens"
    files = {item["path"]: item["key"] for item in secret.get("items", [])}
    assert files.get(tokens_file.name) == "tokens" or (not files and tokens_file.name == "tokens")
    # the token itself is never in the repository's manifests
    assert not any(d["kind"] == "Secret" for d in _objects())
    assert "LIP_SYNC_API_TOKENS" not in _env(c)


@pytest.mark.parametrize("name", [API, RUNNER])
def test_security_context(name):
    dep = _one("Deployment", name=name)
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    env = _env(c)
    for writable in ("/tmp", env["BENTOML_HOME"]):
        assert "emptyDir" in _volume(dep, _mount_at(c, writable)["name"]), writable


@pytest.mark.parametrize("name", [API, RUNNER])
def test_bentoml_config_points_into_the_bento(name):
    c = _container(_one("Deployment", name=name))
    assert _env(c)["BENTOML_CONFIG"] == f"{BENTO_SRC}/configuration.yaml"
    assert (ROOT / "configuration.yaml").is_file()
    bentofile = ROOT / "bentofile.yaml"
    if bentofile.is_file():
        assert "configuration.yaml" in yaml.safe_load(bentofile.read_text()).get("include", [])


def test_env_from_refers_to_the_configmap():
    configmaps = {d["metadata"]["name"] for d in _objects() if d["kind"] == "ConfigMap"}
    for name in (API, RUNNER):
        c = _container(_one("Deployment", name=name))
        assert {src["configMapRef"]["name"] for src in c.get("envFrom", []) if "configMapRef" in src} <= configmaps


# ----------------------------------------------------------------------- Services, NetworkPolicies


def test_the_api_service_targets_the_api_pods_only():
    svc = _one("Service", name="lipsync")
    assert svc["spec"]["selector"].items() <= _pod_labels(_api()).items()
    assert not svc["spec"]["selector"].items() <= _pod_labels(_runner()).items()
    for port in svc["spec"]["ports"]:
        assert _resolve_port(_container(_api()), port["targetPort"]) == API_PORT


def test_network_policies_admit_the_api_port_and_the_runner_only_from_the_api():
    api_policy = _one("NetworkPolicy", name="lipsync")["spec"]
    assert api_policy["podSelector"]["matchLabels"].items() <= _pod_labels(_api()).items()
    assert not api_policy["podSelector"]["matchLabels"].items() <= _pod_labels(_runner()).items()
    runner_policy = _one("NetworkPolicy", name="lipsync-runner")["spec"]
    assert runner_policy["podSelector"]["matchLabels"].items() <= _pod_labels(_runner()).items()
    for policy in (api_policy, runner_policy):
        assert "Ingress" in policy["policyTypes"] and policy["ingress"]
        for rule in policy["ingress"]:
            assert rule.get("ports"), "a rule without ports admits every port"
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP" and port["port"] == API_PORT and "endPort" not in port
    for rule in runner_policy["ingress"]:  # the runner's pickle endpoints: from the API pods, nobody else
        assert rule.get("from"), "a rule without `from` admits every pod"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}
            assert peer["podSelector"]["matchLabels"].items() <= _pod_labels(_api()).items()


# ----------------------------------------------------------------------------------- kustomize


def test_kustomizations_list_every_file():
    base_files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_kustomization(BASE)["resources"]) == base_files
    for directory in (COMPONENT, POSTGRES):
        component = _kustomization(directory)
        listed = set(component.get("resources", [])) | {p["path"] for p in component.get("patches", [])}
        assert listed == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}, directory
    single = _kustomization(SINGLE_POD)
    listed = set(single["resources"]) | {p["path"] for p in single["patches"] if "path" in p}
    assert listed - {"../../base"} == {p.name for p in SINGLE_POD.glob("*.yaml")} - {"kustomization.yaml"}
    assert _kustomization(K8S)["resources"] == ["base"]
    assert "namespace" not in _kustomization(BASE)


def test_kubectl_kustomize_base():
    docs = _kubectl_kustomize(K8S)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in _base_objects())
    for doc in docs:
        _validate(doc)


def test_kubectl_kustomize_example_overlay():
    docs = _kubectl_kustomize(OVERLAY)
    for doc in docs:
        _validate(doc)
        assert doc["metadata"]["namespace"] == _kustomization(OVERLAY)["namespace"]
    wanted = _kustomization(OVERLAY)["images"][0]
    for name in (API, RUNNER):  # one image for both halves
        assert _container(_one("Deployment", docs, name))["image"] == f"{wanted['newName']}:{wanted['newTag']}"


def test_the_single_pod_overlay_is_the_embedded_layout():
    """One pod runs both services (`bentoml serve`, the Bento's default entrypoint) with SQLite and the
    job files on a ReadWriteOnce PVC: one replica, Recreate, no runner Deployment, no HPA or PDB."""
    docs = _kubectl_kustomize(SINGLE_POD)
    for doc in docs:
        _validate(doc)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", RUNNER) not in kinds and ("Service", RUNNER) not in kinds
    assert not {k for k, _ in kinds} & {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    dep = _one("Deployment", docs, API)
    spec, c = dep["spec"], _container(dep)
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert "args" not in c  # the entrypoint's `bentoml serve`: API and runner in one container
    env = _env(c)
    assert env["LIP_SYNC_DEVICE"] == "cuda" and int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert not {"LIP_SYNC_DATABASE_URL", "LIP_SYNC_STORAGE_URL"} & set(env)  # the embedded defaults
    assert not any("secretRef" in src for src in c.get("envFrom", []))
    claim = _volume(dep, _mount_at(c, env["LIP_SYNC_DATA_DIR"])["name"])["persistentVolumeClaim"]["claimName"]
    pvc = _one("PersistentVolumeClaim", docs, claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "emptyDir" in _volume(dep, _mount_at(c, "/dev/shm")["name"])


def _kustomize_with(tmp_path: Path, components: list[str]) -> list[dict]:
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "test"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"], "components": [f"../../components/{c}" for c in components],
        "images": [{"name": "lipsync", "newName": "registry.example.com/lipsync", "newTag": "v1"}],
    }))
    docs = _kubectl_kustomize(overlay)
    for doc in docs:
        _validate(doc)
    return docs


def test_kubectl_kustomize_models_volume_component(tmp_path):
    docs = _kustomize_with(tmp_path, ["models-volume"])
    dep = _one("Deployment", docs, RUNNER)
    c = _container(dep)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == c["image"] == "registry.example.com/lipsync:v1"
    models_dir = _env(c)["MUSETALK_MODELS_DIR"]
    assert _mount_at(c, models_dir).get("readOnly") is True
    assert models_dir in init["args"]
    assert _env(c)["LIP_SYNC_DEVICE"] == "cuda"  # the patch merged, it did not replace the env
    assert "MUSETALK_MODELS_DIR" not in _env(_container(_one("Deployment", docs, API)))  # the API loads no model


def test_kubectl_kustomize_postgres_component(tmp_path):
    docs = _kustomize_with(tmp_path, ["postgres"])
    db = _one("StatefulSet", docs, "lipsync-postgres")
    password = _env_source(_container(db), "POSTGRES_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert password["name"] == "lipsync-postgres"
    service = _one("Service", docs, "lipsync-postgres")
    assert service["spec"]["selector"].items() <= _pod_labels(db).items()
    policy = _one("NetworkPolicy", docs, "lipsync-postgres")["spec"]
    assert [p["podSelector"]["matchLabels"] for r in policy["ingress"] for p in r["from"]] == [
        {"app.kubernetes.io/name": "lipsync", "app.kubernetes.io/component": "server"}]  # the API pods only
    assert db["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------------------------- BentoCloud


def _attr_field_names(cls) -> set[str]:
    import attr

    return {f.name for f in attr.fields(cls)}


def test_bentocloud_config_uses_bentoml_schema_fields():
    from bentoml._internal.cloud.schemas.modelschemas import (
        DeploymentServiceConfig,
        DeploymentTargetHPAConf,
        EnvItemSchema,
    )
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema

    cfg = _bentocloud()
    # `cluster` is read by the CLI itself, the rest by CreateDeploymentSchema
    assert set(cfg) <= _attr_field_names(CreateDeploymentSchema) | {"cluster"}, set(cfg)
    for env in cfg.get("envs") or []:
        assert set(env) == _attr_field_names(EnvItemSchema)
    for name, svc in cfg["services"].items():
        assert set(svc) <= _attr_field_names(DeploymentServiceConfig), (name, set(svc))
        assert set(svc["scaling"]) <= _attr_field_names(DeploymentTargetHPAConf), name
        for env in svc.get("envs") or []:
            assert set(env) == _attr_field_names(EnvItemSchema), (name, env)


def test_bentocloud_config_structures_and_scales():
    """bentoml's own parsing and scaling checks accept it, as `bentoml deploy -f` would."""
    from bentoml._internal.cloud.deployment import DeploymentAPI
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    cfg = _bentocloud()
    cfg.pop("cluster", None)
    struct = bentoml_cattr.structure({**cfg, "bento": "lipsync:test"}, CreateDeploymentSchema)
    DeploymentAPI._fix_and_validate_schema(struct)
    assert set(struct.services) == _service_names() == {"LipSync", "MuseTalkRunner"}
    for name, svc in struct.services.items():
        assert 0 <= svc.scaling.min_replicas <= svc.scaling.max_replicas, name
        assert svc.scaling.max_replicas >= 1, name


def test_bentocloud_instance_types_and_envs():
    cfg = _bentocloud()
    api, runner = cfg["services"]["LipSync"], cfg["services"]["MuseTalkRunner"]
    assert api["instance_type"].startswith("cpu.")
    assert runner["instance_type"].startswith("gpu.")
    api_env = {e["name"]: e["value"] for e in (cfg.get("envs") or []) + api.get("envs", [])}
    runner_env = {e["name"]: e["value"] for e in (cfg.get("envs") or []) + runner.get("envs", [])}
    assert api_env["LIP_SYNC_DATA_DIR"]
    assert runner_env["LIP_SYNC_DEVICE"] == "cuda"
    assert api_env["BENTOML_CONFIG"] == f"{BENTO_SRC}/configuration.yaml"
    assert all(isinstance(v, str) for v in {**api_env, **runner_env}.values()), "env values must be strings"
    assert cfg["access_authorization"] is False  # our bearer tokens use the Authorization header


def test_bentocloud_runs_several_api_replicas_on_the_shared_database_and_bucket():
    cfg = _bentocloud()
    api = cfg["services"]["LipSync"]
    assert api["scaling"]["min_replicas"] >= 2 and api["scaling"]["max_replicas"] > api["scaling"]["min_replicas"]
    api_env = {e["name"]: e["value"] for e in (cfg.get("envs") or []) + api.get("envs", [])}
    assert api_env["LIP_SYNC_STORAGE_URL"].startswith("s3://")
    assert "LIP_SYNC_DATABASE_URL" not in api_env  # a secret, never a value in the file
    assert {"lipsync-api-tokens", "lipsync-database", "lipsync-bucket"} <= set(cfg["secrets"])
    documented = README.read_text()
    for secret, keys in (("lipsync-database", ["LIP_SYNC_DATABASE_URL"]),
                         ("lipsync-bucket", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])):
        line = next(l for l in documented.splitlines() if f"bentoml secret create {secret}" in l)
        assert all(k in line for k in keys), line


# ------------------------------------------------------------------------ env var names are real


def test_known_env_names_sanity():
    """The collection below finds what it should (so the next test is not vacuous)."""
    known = _known_env_names()
    for name in ("LIP_SYNC_DATA_DIR", "LIP_SYNC_DEVICE", "LIP_SYNC_API_TOKENS_FILE", "LIP_SYNC_MAX_VIDEO_BYTES",
                 "LIP_SYNC_SCOPE_JOBS_TO_TOKEN", "MUSETALK_MODELS_DIR", "LIP_SYNC_JOB_WORKERS"):
        assert name in known, name
    assert "LIP_SYNC_DATA_DIRS" not in known


def test_every_env_name_is_read_by_the_code():
    known = _known_env_names()
    used = _manifest_env_names() | _bentocloud_env_names()
    assert "LIP_SYNC_DATA_DIR" in used
    # names the README tells people to set (e.g. the BentoCloud secret's key)
    used |= set(re.findall(r"\b((?:LIP_SYNC|MUSETALK)_[A-Z0-9_]*[A-Z0-9])\b", README.read_text()))
    unknown = sorted(used - known)
    assert not unknown, f"environment variables nothing reads (typo?): {unknown}"


def test_bentocloud_deploy_is_documented():
    text = README.read_text()
    assert "bentoml deploy -f deploy/bentocloud.yaml" in text
    assert "kubectl apply -k deploy/kubernetes" in text
    assert "bentoml containerize" in text and "Docker" in text
    assert os.path.relpath(BENTOCLOUD, ROOT) in text
