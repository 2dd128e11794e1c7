"""The Kubernetes manifests (k8s/), rendered and validated offline.

Each overlay is rendered with `kubectl kustomize` (kustomize v5 is built into kubectl; no API
server, no network). Core objects are checked by kubernetes-validate against its bundled
Kubernetes schemas in strict mode (unknown fields fail), RayCluster/RayJob by jsonschema against
the KubeRay CRDs in tests/schemas/, closed the same way. Then the requirements of the deployment
itself: resources, security contexts, GPU scheduling, storage credentials, MLflow wiring, and the
RayJob's entrypoint, which must be a command that the dldkd CLI and config loader accept.
"""
from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "schemas" / "kuberay"
OVERLAYS = ("cpu-dev", "gpu")
# The oldest and the newest Kubernetes minor that kubernetes-validate 1.37.0 bundles.
K8S_VERSIONS = ("1.34.0", "1.37.0")
NAMESPACE = "dldkd"
CLUSTER_SCOPED = {"Namespace"}
ENTRY_MODULES = {"launch.sweep": "sweep", "launch.train": "train"}
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=\S+$")


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: it renders k8s/overlays/* offline with its built-in "
                    "kustomize (v5 needed for `labels` and `replacements`); install kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"k8s/overlays/{overlay} rendered nothing"
    return docs


def by_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- schemas -------------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """Forbid fields a schema does not list, as `kubectl --validate=strict` does for CRDs.

    A structural CRD schema only prunes unknown fields at admission, so a misspelt field would
    pass plain jsonschema and be dropped silently in the cluster.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not")
           else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(CRDS / f"ray.io_{plural}.yaml") as f:
        crd = yaml.load(f, Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = closed(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod a Ray object will create."""
    spec = obj["spec"]
    if obj["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "submitterPodTemplate", spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    yield "headGroupSpec", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group['groupName']}]", group["template"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_match_kubernetes_schemas(overlay: str, version: str) -> None:
    for doc in render(overlay):
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("ray.io/"):
            # The pods KubeRay creates from these templates, checked as core objects too.
            for part, template in pod_templates(doc):
                pt = {"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": "check"}, "template": template}
                try:
                    kubernetes_validate.validate(pt, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{where} {part}: {e.message} at {list(e.absolute_path)}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {list(e.absolute_path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_match_kuberay_crds(overlay: str) -> None:
    docs = render(overlay)
    ray = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray} == {"RayCluster", "RayJob"}
    for doc in ray:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = crd_errors(doc)
        assert not errors, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}:\n" + \
            "\n".join(errors)


def test_validators_reject_broken_manifests() -> None:
    """Both validators can fail: misspelt fields and wrong types are caught."""
    docs = render("gpu")
    cluster = copy.deepcopy(one(docs, "RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert any("rayStartParam" in e for e in crd_errors(cluster))
    job = copy.deepcopy(one(docs, "RayJob"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert crd_errors(job)
    deployment = copy.deepcopy(one(docs, "Deployment", "dldkd-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- what the deployment must do -------------------------------------------------------------


def all_pods(docs: tuple[dict, ...]) -> Iterator[tuple[str, dict]]:
    """(where, PodSpec) of every pod any rendered object creates."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("ray.io/"):
            for part, template in pod_templates(doc):
                yield f"{name} {part}", template["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield name, doc["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_runs_non_root(overlay: str) -> None:
    docs = render(overlay)
    checked = []
    for where, pod in all_pods(docs):
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in containers(pod):
            at = f"{overlay}: {where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, at
            checked.append((at, c.get("resources", {}), sc))
    # The autoscaler sidecar that KubeRay adds to the head pod.
    for cluster in by_kind(docs, "RayCluster"):
        opts = cluster["spec"]["autoscalerOptions"]
        checked.append((f"{overlay}: autoscaler", opts["resources"], opts["securityContext"]))
    assert len(checked) >= 8
    for at, res, sc in checked:
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{at}: no {part} for cpu/memory"
        assert sc.get("allowPrivilegeEscalation") is False, at
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
        assert not sc.get("privileged", False), at


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_cluster_shape(overlay: str) -> None:
    docs = render(overlay)
    cluster = one(docs, "RayCluster", "dldkd")
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    (workers,) = spec["workerGroupSpecs"]
    assert 0 <= workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["maxReplicas"] > workers["minReplicas"]
    for template in (spec["headGroupSpec"]["template"], workers["template"]):
        pod = template["spec"]
        shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1 and mounts[0]["name"] in shm, f"{overlay}: no memory /dev/shm"
    images = {t["spec"]["containers"][0]["image"]
              for t in (spec["headGroupSpec"]["template"], workers["template"])}
    assert len(images) == 1, f"{overlay}: head and workers run different images {images}"
    # The RayJob runs on exactly this cluster, not a stale copy of the base.
    job = one(docs, "RayJob")
    assert job["spec"]["rayClusterSpec"] == spec


def test_gpu_overlay_requests_gpus_and_tolerates_gpu_nodes() -> None:
    (workers,) = one(render("gpu"), "RayCluster")["spec"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in pod["tolerations"])
    assert pod["containers"][0]["image"].endswith("-cuda")
    assert "dist.use_gpu=true" in shlex.split(one(render("gpu"), "RayJob")["spec"]["entrypoint"])


def test_cpu_dev_overlay_asks_for_no_gpu() -> None:
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(render("cpu-dev")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_lifecycle(overlay: str) -> None:
    spec = one(render(overlay), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0
    assert spec["submitterConfig"]["backoffLimit"] >= 0
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_render(overlay: str) -> None:
    """Every Secret/ConfigMap key, PVC and Service selector points at something rendered."""
    docs = render(overlay)
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dldkd"
    data = {(d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
            for d in docs if d["kind"] in ("Secret", "ConfigMap")}
    claims = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
    for where, pod in all_pods(docs):
        for c in containers(pod):
            for env in c.get("env", []):
                for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if ref in env.get("valueFrom", {}):
                        r = env["valueFrom"][ref]
                        assert r["key"] in data.get((kind, r["name"]), {}), \
                            f"{overlay}: {where} env {env['name']}: no {kind} {r['name']}/{r['key']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in data, where
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, where
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {})
                  for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pod_labels), \
            f"{overlay}: Service {svc['metadata']['name']} selects no pod"


def service_port(docs: tuple[dict, ...], host: str) -> set[int]:
    name = host.split(".")[0]
    return {p["port"] for p in one(docs, "Service", name)["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_storage_credentials_and_mlflow_wiring(overlay: str) -> None:
    docs = render(overlay)
    storage = one(docs, "ConfigMap", "dldkd-storage")["data"]
    assert storage["AWS_ENDPOINT_URL"].startswith(("http://", "https://"))
    assert storage["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    tracking = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)", storage["MLFLOW_TRACKING_URI"])
    assert tracking, storage["MLFLOW_TRACKING_URI"]
    assert int(tracking[2]) in service_port(docs, tracking[1])

    # Ray pods (and the MLflow server) get the S3 keys from the Secret, never inline.
    cluster = one(docs, "RayCluster")["spec"]
    ray_pods = [cluster["headGroupSpec"]["template"]] + \
        [g["template"] for g in cluster["workerGroupSpecs"]]
    mlflow = one(docs, "Deployment", "dldkd-mlflow")["spec"]["template"]
    for template in ray_pods + [mlflow]:
        c = template["spec"]["containers"][0]
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "dldkd-s3", c["name"]
        assert {"configMapRef": {"name": "dldkd-storage"}} in c["envFrom"], c["name"]

    # MLflow: Postgres backend (password from the Secret), proxied artifacts, /health probes.
    c = mlflow["spec"]["containers"][0]
    args = c["command"] + c["args"]
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
    backend = [a for a in args if a.startswith("--backend-store-uri=")]
    db = re.fullmatch(r"--backend-store-uri=postgresql://(\w+):\$\(POSTGRES_PASSWORD\)@"
                      r"([a-z0-9-]+):(\d+)/(\w+)", backend[0] if backend else "")
    assert db, backend
    assert int(db[3]) in service_port(docs, db[2])
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert "--host=0.0.0.0" in args
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    allowed = next(e["value"] for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    assert f"{tracking[1]}:{tracking[2]}" in allowed.split(",")

    postgres = one(docs, "StatefulSet", "dldkd-postgres")
    pod = postgres["spec"]["template"]["spec"]
    pg = pod["containers"][0]
    env = {e["name"]: e for e in pg["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dldkd-postgres"
    assert env["POSTGRES_USER"]["value"] == db[1] and env["POSTGRES_DB"]["value"] == db[4]
    assert pg["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    assert any(m["name"] == claim["metadata"]["name"] for m in pg["volumeMounts"])


# --- the entrypoint is a real dldkd command ----------------------------------------------------


def readme_entrypoints() -> list[str]:
    """The commands k8s/README.md tells users to submit with `ray job submit ... -- CMD`."""
    text = (K8S / "README.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join shell line continuations
    found = re.findall(r"ray job submit [^\n]*? -- (python -m launch\.[^\n`]+)", text)
    assert found, "k8s/README.md shows no `ray job submit ... -- python -m launch....` command"
    return [f.strip() for f in found]


def entrypoints() -> list[tuple[str, str]]:
    jobs = [(f"RayJob in {o}", one(render(o), "RayJob")["spec"]["entrypoint"]) for o in OVERLAYS]
    return jobs + [("k8s/README.md", cmd) for cmd in readme_entrypoints()]


def parse_entrypoint(where: str, command: str) -> tuple[str, str, list[str]]:
    """`python -m launch.sweep|launch.train --config configs/X.yaml [key.sub=value ...]`."""
    argv = shlex.split(command)
    assert len(argv) >= 5 and argv[:2] == ["python", "-m"] and argv[3] == "--config", \
        f"{where}: {command!r} is not `python -m launch.MODULE --config CONFIG [k=v ...]`"
    module, config, overrides = argv[2], argv[4], argv[5:]
    assert module in ENTRY_MODULES, f"{where}: module {module!r} not in {sorted(ENTRY_MODULES)}"
    assert re.fullmatch(r"configs/[A-Za-z0-9_.-]+\.yaml", config), f"{where}: config {config!r}"
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    assert not bad, f"{where}: overrides must look like key.sub=value: {bad}"
    return module, config, overrides


def test_entrypoints_name_existing_configs_that_load(monkeypatch) -> None:
    from trainer.config import load_config

    # Every pod gets MLFLOW_TRACKING_URI from the dldkd-storage ConfigMap (remote run.storage
    # needs a tracking server, trainer/config.py).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://dldkd-mlflow:5000")
    for where, command in entrypoints():
        _, config, overrides = parse_entrypoint(where, command)
        # The image's working directory is the repository root, as in `ray job submit --working-dir .`
        assert (ROOT / config).is_file(), f"{where}: {config} does not exist in the repository"
        load_config(ROOT / config, overrides)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shards_runs_and_artifacts_live_in_one_object_store(overlay: str, monkeypatch) -> None:
    """Shards, run storage (checkpoints, best weights) and MLflow artifacts are in the bucket of
    the S3-compatible store, which every client finds through the standard variables only."""
    from trainer.config import load_config
    from trainer.infra.storage import endpoint_env

    docs = render(overlay)
    storage = one(docs, "ConfigMap", "dldkd-storage")["data"]
    # boto3/s3fs/pyarrow read AWS_ENDPOINT_URL, MLflow's S3 client MLFLOW_S3_ENDPOINT_URL.
    assert storage["MLFLOW_S3_ENDPOINT_URL"] == storage["AWS_ENDPOINT_URL"]
    assert {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"} <= set(endpoint_env(storage))
    assert not [k for k in storage if k.startswith("DLDKD")], "storage is set by standard names"
    bucket = re.fullmatch(r"s3://([a-z0-9.-]+)/.+", storage["MLFLOW_ARTIFACTS_DESTINATION"])[1]
    if overlay == "cpu-dev":  # the in-cluster MinIO is the store
        assert storage["AWS_ENDPOINT_URL"].split("//")[1].split(":")[0] in {
            s["metadata"]["name"] for s in by_kind(docs, "Service")}
    # The entrypoint's config, loaded with the pods' environment (the ConfigMap, as on the head
    # pod where the driver resolves it), keeps every split and the runs in that bucket.
    for key in list(storage):
        monkeypatch.delenv(key, raising=False)
    for key, value in storage.items():
        monkeypatch.setenv(key, value)
    _, config, overrides = parse_entrypoint(overlay, one(docs, "RayJob")["spec"]["entrypoint"])
    cfg = load_config(ROOT / config, overrides)
    for key in ("data.train", "data.val", "data.test", "run.storage"):
        value = cfg.flat()[key]
        assert value.startswith(f"s3://{bucket}/"), f"{overlay}: {key}={value!r} is not in " \
            f"s3://{bucket}/ (a path there would exist on no pod)"
    assert cfg.tracking.uri == storage["MLFLOW_TRACKING_URI"]


def test_entrypoints_parse_with_the_dldkd_cli() -> None:
    assert (ROOT / "launch" / "cli.py").is_file(), "launch/cli.py (the dldkd CLI) is missing"
    from launch.cli import build_parser

    for where, command in entrypoints():
        module, config, overrides = parse_entrypoint(where, command)
        args = build_parser().parse_args([ENTRY_MODULES[module], "--config", config, *overrides])
        assert (args.command, args.config, args.overrides) == (
            ENTRY_MODULES[module], config, list(overrides)), where
