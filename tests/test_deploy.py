"""Deployment files (deploy/): Kubernetes manifests and the BentoCloud config, checked offline.

* Every Kubernetes manifest validates against the OpenAPI schemas of a pinned Kubernetes version
  in strict mode (unknown fields fail), with `kubernetes-validate`; so does `kubectl kustomize`
  output when kubectl is installed.
* The Deployment has what the service needs: a GPU, probes on /readyz and /livez with room for
  model loading, the data PVC at LIP_SYNC_DATA_DIR, the token Secret as a file, port 3000 only.
* The BentoCloud config uses bentoml's own deployment schema field names.
* Every environment variable named anywhere in deploy/ is one the code reads.
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
OVERLAY = K8S / "overlays" / "example"
BENTOCLOUD = DEPLOY / "bentocloud.yaml"
README = DEPLOY / "README.md"

K8S_VERSION = "1.33.0"  # pinned: the schemas kubernetes-validate ships for this release
API_PORT = 3000
BENTO_SRC = "/home/bentoml/bento/src"  # where the Bento's code (and configuration.yaml) sits in the image
MIN_STARTUP_BUDGET_S = 900  # 15 minutes: model loading on a cold node

# Variables read by the tools around our code, not by it: allowed in the manifests.
THIRD_PARTY_ENV = {
    "BENTOML_CONFIG",  # BentoML: runtime configuration file
    "BENTOML_HOME",  # BentoML: its home (moved to a writable emptyDir)
    "HF_HUB_OFFLINE",  # huggingface_hub: the image sets it, the model download initContainer clears it
}


# --------------------------------------------------------------------------------------- helpers


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _manifest_files() -> list[Path]:
    """Whole Kubernetes objects: everything the kustomizations list under `resources`."""
    files = []
    for directory in (BASE, COMPONENT):
        for entry in _kustomization(directory).get("resources", []):
            files.append(directory / entry)
    return files


def _objects() -> list[dict]:
    return [doc for path in _manifest_files() for doc in _load_docs(path)]


def _one(kind: str, docs: list[dict] | None = None) -> dict:
    found = [d for d in (docs if docs is not None else _objects()) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _validate(doc: dict) -> None:
    """Strict schema validation; a kind without a schema is a failure, not a skip."""
    error = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        error = f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    if error:  # outside the except: the schema's long traceback is noise
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {error}")


def _container(deployment: dict, name: str = "lipsync") -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


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
    """The variables our settings classes read (env prefix + field, or the field's aliases)."""
    from pydantic import AliasChoices

    from lipsync_runner.api.auth import AuthSettings
    from lipsync_runner.api.limits import ApiLimits
    from lipsync_runner.serving.settings import ServiceSettings
    from lipsync_runner.settings import RunnerSettings

    names: set[str] = set()
    for cls in (RunnerSettings, ServiceSettings, ApiLimits, AuthSettings):
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(c for c in alias.choices if isinstance(c, str))
            elif isinstance(alias, str):
                names.add(alias)
            else:
                names.add(f"{prefix}{field_name}")
    return {n.upper() for n in names}


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


def test_strict_validation_rejects_unknown_fields():
    """The check above has teeth: a misspelt field fails."""
    bad = copy.deepcopy(_one("Deployment"))
    _container(bad)["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": API_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_readme_manifests_validate():
    """The YAML examples in deploy/README.md (the token Secret) are valid objects too."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and "kind" in d]
    assert any(d["kind"] == "Secret" for d in docs)
    for doc in docs:
        _validate(doc)


def test_manifests_are_namespace_agnostic_and_labelled():
    for doc in _objects():
        meta = doc["metadata"]
        assert "namespace" not in meta, f"{doc['kind']}/{meta['name']} hard-codes a namespace"
        assert meta["name"].startswith("lipsync"), meta["name"]
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "lipsync", meta["name"]


# ------------------------------------------------------------------------------------ Deployment


def test_deployment_requests_a_gpu_and_resources():
    c = _container(_one("Deployment"))
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert c["resources"]["requests"]["cpu"] == "4"
    assert c["resources"]["requests"]["memory"] == "16Gi"
    assert c["resources"]["limits"]["memory"] == "32Gi"
    assert _env(c)["LIP_SYNC_DEVICE"] == "cuda"


def test_deployment_is_single_replica_recreate():
    """The job store is a locked SQLite file on a ReadWriteOnce volume: never two pods at once."""
    spec = _one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    assert set(spec["selector"]["matchLabels"].items()) <= set(_pod_labels(_one("Deployment")).items())


def test_deployment_probes_sized_for_model_loading():
    c = _container(_one("Deployment"))
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe_name, path in expected.items():
        probe = c[probe_name]
        assert probe["httpGet"]["path"] == path, probe_name
        assert _resolve_port(c, probe["httpGet"]["port"]) == API_PORT, probe_name
    startup = c["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    assert budget >= MIN_STARTUP_BUDGET_S, f"startup budget {budget}s < {MIN_STARTUP_BUDGET_S}s"


def test_deployment_exposes_only_the_api_port():
    c = _container(_one("Deployment"))
    assert [(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]] == [(API_PORT, "TCP")]


def test_data_dir_is_the_pvc():
    dep = _one("Deployment")
    c = _container(dep)
    data_dir = _env(c)["LIP_SYNC_DATA_DIR"]
    mount = _mount_at(c, data_dir)
    assert not mount.get("readOnly", False)
    claim = _volume(dep, mount["name"])["persistentVolumeClaim"]["claimName"]
    pvc = next(d for d in _objects() if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_api_tokens_come_from_a_secret_file():
    dep = _one("Deployment")
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


def test_deployment_security_context():
    dep = _one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    if sc.get("readOnlyRootFilesystem"):
        env = _env(c)
        for writable in ("/tmp", env["BENTOML_HOME"]):
            assert "emptyDir" in _volume(dep, _mount_at(c, writable)["name"]), writable


def test_bentoml_config_points_into_the_bento():
    c = _container(_one("Deployment"))
    config = _env(c)["BENTOML_CONFIG"]
    assert config == f"{BENTO_SRC}/configuration.yaml"
    assert (ROOT / "configuration.yaml").is_file()
    bentofile = ROOT / "bentofile.yaml"
    if bentofile.is_file():
        assert "configuration.yaml" in yaml.safe_load(bentofile.read_text()).get("include", [])


def test_env_from_refers_to_the_configmap():
    c = _container(_one("Deployment"))
    names = {src["configMapRef"]["name"] for src in c.get("envFrom", [])}
    configmaps = {d["metadata"]["name"] for d in _objects() if d["kind"] == "ConfigMap"}
    assert names <= configmaps


# ----------------------------------------------------------------------- Service, NetworkPolicy


def test_service_targets_the_api_port():
    dep = _one("Deployment")
    svc = _one("Service")
    assert svc["spec"]["selector"].items() <= _pod_labels(dep).items()
    assert svc["spec"]["ports"]
    for port in svc["spec"]["ports"]:
        assert _resolve_port(_container(dep), port["targetPort"]) == API_PORT


def test_network_policy_admits_only_the_api_port():
    dep = _one("Deployment")
    policy = _one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= _pod_labels(dep).items()
    assert "Ingress" in policy["policyTypes"]
    assert policy["ingress"], "no ingress rule: the API would be unreachable"
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port (the runner's included)"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            assert _resolve_port(_container(dep), port["port"]) == API_PORT
            assert "endPort" not in port


# ----------------------------------------------------------------------------------- kustomize


def test_kustomizations_list_every_file():
    base_files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_kustomization(BASE)["resources"]) == base_files
    component = _kustomization(COMPONENT)
    listed = set(component.get("resources", [])) | {p["path"] for p in component.get("patches", [])}
    assert listed == {p.name for p in COMPONENT.glob("*.yaml")} - {"kustomization.yaml"}
    assert _kustomization(K8S)["resources"] == ["base"]
    assert "namespace" not in _kustomization(BASE)


def test_kubectl_kustomize_base():
    docs = _kubectl_kustomize(K8S)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(d["kind"] for d in _objects() if d["metadata"]["name"] != "lipsync-models")
    for doc in docs:
        _validate(doc)


def test_kubectl_kustomize_example_overlay():
    docs = _kubectl_kustomize(OVERLAY)
    for doc in docs:
        _validate(doc)
        assert doc["metadata"]["namespace"] == _kustomization(OVERLAY)["namespace"]
    image = _container(_one("Deployment", docs))["image"]
    wanted = _kustomization(OVERLAY)["images"][0]
    assert image == f"{wanted['newName']}:{wanted['newTag']}"


def test_kubectl_kustomize_models_volume_component(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "models"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"], "components": ["../../components/models-volume"],
        "images": [{"name": "lipsync", "newName": "registry.example.com/lipsync", "newTag": "v1"}],
    }))
    docs = _kubectl_kustomize(overlay)
    for doc in docs:
        _validate(doc)
    dep = _one("Deployment", docs)
    c = _container(dep)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == c["image"] == "registry.example.com/lipsync:v1"
    models_dir = _env(c)["MUSETALK_MODELS_DIR"]
    assert _mount_at(c, models_dir).get("readOnly") is True
    assert models_dir in init["args"]
    assert _env(c)["LIP_SYNC_DATA_DIR"] == "/data"  # the patch merged, it did not replace the env


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
    # one API replica: its job store is local to the replica
    assert api["scaling"]["max_replicas"] == 1
    api_env = {e["name"]: e["value"] for e in (cfg.get("envs") or []) + api.get("envs", [])}
    runner_env = {e["name"]: e["value"] for e in (cfg.get("envs") or []) + runner.get("envs", [])}
    assert api_env["LIP_SYNC_DATA_DIR"]
    assert runner_env["LIP_SYNC_DEVICE"] == "cuda"
    assert api_env["BENTOML_CONFIG"] == f"{BENTO_SRC}/configuration.yaml"
    assert all(isinstance(v, str) for v in {**api_env, **runner_env}.values()), "env values must be strings"
    assert cfg["secrets"], "the API tokens come from a BentoCloud secret"
    assert cfg["access_authorization"] is False  # our bearer tokens use the Authorization header


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
