"""infra/deploy: the KubeRay manifests against KubeRay's CRD schemas (as check-jsonschema runs them, and
strictly: no field the CRD does not know), the Dockerfile through hadolint, the launcher YAML through Ray's
own checks, and what ties them to the project: one Ray version, the image's Python, the entrypoint's
config, GPUs and spot tolerations on the workers only, storage from a Secret and a node-local cache."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "infra" / "deploy"
KUBERAY = REPO.parent / "shared" / "reference" / "kuberay"
BIN = Path(sys.executable).parent
MANIFESTS = {"rayjob.yaml": "RayJob", "raycluster.yaml": "RayCluster"}
SPOT_TAINTS = {"cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible",
               "eks.amazonaws.com/capacityType", "karpenter.sh/capacity-type"}
needs_kuberay = pytest.mark.skipif(not KUBERAY.is_dir(), reason=f"{KUBERAY} (KubeRay's schemas) absent")


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def cluster_spec(name: str) -> dict:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    p = pyproject()["project"]
    reqs = p["dependencies"] if extra is None else p["optional-dependencies"][extra]
    return {r.name: r for r in map(Requirement, reqs)}


@pytest.fixture(scope="module")
def steps() -> list[dict]:
    """The Dockerfile as the replay script reads it (--dry-run --extra gpu: every step, nothing installed)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "replay_dockerfile.py"), "--dry-run",
                          "--extra", "gpu"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def base_image(steps) -> tuple[str, Version, str]:
    """(image, Ray version, Python tag) of the Dockerfile's FROM, e.g. rayproject/ray:2.60.0-py312-cu128."""
    image = next(s["command"] for s in steps if s["instruction"] == "FROM")
    name, _, tag = image.partition(":")
    version, py, *_ = tag.split("-")
    assert name == "rayproject/ray" and py.startswith("py"), image
    return image, Version(version), py


def pip_commands(steps) -> list[list[str]]:
    return [shlex.split(s["command"]) for s in steps if s["action"] == "run" and s["command"].startswith("pip")]


# --- schemas and linters ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kuberay_runs() -> dict[str, subprocess.CompletedProcess]:
    """check-jsonschema on both manifests, started together (each is a couple of seconds of start-up)."""
    procs = {name: subprocess.Popen([str(BIN / "check-jsonschema"), "--schemafile",
                                     str(KUBERAY / f"{kind}-v1.schema.json"), str(DEPLOY / name)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, kind in MANIFESTS.items()}
    return {name: (p.wait(), p.stdout.read()) for name, p in procs.items()}


@needs_kuberay
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_kuberay_schema(name, kuberay_runs):
    rc, out = kuberay_runs[name]
    assert rc == 0, out


def strict(schema):
    """The schema with unknown fields refused wherever the CRD lists an object's fields (the API server
    prunes them silently: a misspelt `shutdownAfterJobFinishes` would just be ignored)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@needs_kuberay
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_has_no_field_the_crd_does_not_know(name):
    import jsonschema

    doc = load(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", MANIFESTS[name])
    schema = strict(json.loads((KUBERAY / f"{MANIFESTS[name]}-v1.schema.json").read_text()))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert errors == []


def test_dockerfile_passes_hadolint():
    run = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style",
                          str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_launcher_config_passes_rays_own_checks():
    """What `ray up` does to the YAML before it calls the cloud: Ray's defaults filled in, then its schema
    (no unknown key anywhere) and its cross-checks (head type exists, min_workers fit max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load("cluster.yaml"))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) > 0 for v in workers.values())
    assert all(v["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for v in workers.values())
    assert "InstanceMarketOptions" not in config["available_node_types"][config["head_node_type"]]["node_config"]


# --- the image --------------------------------------------------------------------------------------

def test_one_ray_version_everywhere(steps):
    """The image's tag, the Ray pinned in its project install, the manifests' rayVersion, pyproject's
    range and the Ray these tests run with are one version (nodes and driver must agree)."""
    import ray

    _, version, _ = base_image(steps)
    assert version in requirements()["ray"].specifier
    assert version == Version(ray.__version__), "the image's Ray is not the one the test suite runs"
    pins = [Requirement(w) for cmd in pip_commands(steps) for w in cmd if w.startswith("ray[")]
    assert pins and all(str(r.specifier) == f"=={version}" for r in pins)
    for name in MANIFESTS:
        assert Version(cluster_spec(name)["rayVersion"]) == version, name


def test_image_python_satisfies_requires_python(steps):
    _, _, py = base_image(steps)
    version = Version(f"{py[2]}.{py[3:]}")
    assert version in Requirement(f"x{pyproject()['project']['requires-python']}").specifier


def test_dockerfile_pins_satisfy_pyproject(steps):
    """Every `name==version` the Dockerfile installs is within pyproject's range for that name."""
    ranges = requirements() | requirements("gpu")
    pinned = [Requirement(w) for cmd in pip_commands(steps) for w in cmd
              if "==" in w and not w.startswith("-") and "$(" not in w]  # boto3==$(botocore's version)
    checked = [r.name for r in pinned if r.name in ranges]
    assert {"numpy", "scipy", "cyvlfeat", "faiss-gpu-cu12-cuvs", "ray"} <= set(checked)
    for r in pinned:
        if r.name in ranges:
            version = next(iter(r.specifier)).version
            assert ranges[r.name].specifier.contains(version, prereleases=True), (r, ranges[r.name])


def test_dockerfile_installs_in_the_makefiles_order(steps):
    """VLFeat from apt; numpy + cython, then cyvlfeat without build isolation, then the project with the
    gpu extra from the copied tree; then faiss-cpu out and the GPU build over it; then the import check."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "libvlfeat-dev" in text
    cmds = [s["command"] for s in steps if s["action"] in ("run", "copy")]

    def at(pred):
        return next(i for i, c in enumerate(cmds) if pred(c))
    build_deps = at(lambda c: c.startswith("pip install") and " numpy" in c and " cython" in c)
    cyvlfeat = at(lambda c: "cyvlfeat" in c and c.startswith("pip install"))
    copy = at(lambda c: c.endswith(". ."))
    project = at(lambda c: '".[gpu]"' in c)
    uninstall = at(lambda c: c == "pip uninstall -y faiss-cpu")
    gpu = at(lambda c: "--force-reinstall" in c and "faiss-gpu" in c)
    check = at(lambda c: "import faiss, cyvlfeat, torch, ray, pretrain.run" in c)
    assert build_deps < cyvlfeat < copy < project < uninstall < gpu < check
    assert "--no-build-isolation" in cmds[cyvlfeat] and "--no-deps" in cmds[gpu]


def test_replay_without_cuda_drops_only_the_gpu_parts(steps):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "replay_dockerfile.py"), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    cpu = [json.loads(line) for line in out.splitlines()]
    run = [s["command"] for s in cpu if s["action"] == "run"]
    assert any('".[gpu]"' in s["command"] for s in steps) and not any("[gpu]" in c for c in run)
    assert not any("faiss-gpu" in c or "faiss-cpu" in c for c in run)
    assert len(run) == len([s for s in steps if s["action"] == "run"]) - 3  # uninstall, reinstall, assert
    assert all(s["action"] == "skip" for s in cpu if "apt-get" in s["command"])


# --- the manifests ----------------------------------------------------------------------------------

def groups(name: str):
    spec = cluster_spec(name)
    return spec["headGroupSpec"], spec["workerGroupSpecs"]


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_rayjob_runs_the_paper_config_from_a_bucket(steps):
    """The entrypoint is this repo's driver on a config that loads (with its --set overrides), writing to
    a bucket; the job's working dir is the image's copy of the repo; resubmission and clean-up are on."""
    from pretrain.config import load_config

    spec = load("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pretrain/run.py"] and (REPO / argv[1]).is_file()
    opts = [(argv[i], argv[i + 1]) for i in range(2, len(argv), 2)]
    config = dict(opts)["--config"]
    cfg = load_config(REPO / config, [v for k, v in opts if k == "--set"])
    assert dict(opts)["--run-dir"].startswith("s3://") and cfg.data.shards_dir.startswith("s3://")
    workdir = next(s["command"] for s in steps if s["instruction"] == "WORKDIR")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == workdir
    assert spec["submitterConfig"]["backoffLimit"] > 0 and spec["backoffLimit"] > 0
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0

    # the cluster can hold the config's Ray Train workers: one GPU each, cpus_per_worker each
    (gpu_group,) = groups("rayjob.yaml")[1]
    limits = container(gpu_group)["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    assert cfg.train.num_workers <= gpu_group["maxReplicas"] * gpus
    assert min(cfg.train.num_workers, gpus) * cfg.train.cpus_per_worker <= int(limits["cpu"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_workers_ask_for_gpus_and_tolerate_spot_the_head_does_not(name):
    head, workers = groups(name)
    assert workers
    for g in workers:
        res = container(g)["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == int(res["requests"]["nvidia.com/gpu"]) == 8
        tolerated = {t["key"] for t in g["template"]["spec"].get("tolerations", [])}
        assert SPOT_TAINTS <= tolerated, SPOT_TAINTS - tolerated
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"] >= 1
    assert not head["template"]["spec"].get("tolerations")
    assert "nvidia.com/gpu" not in container(head)["resources"].get("limits", {})


@pytest.mark.parametrize("name", MANIFESTS)
def test_pods_read_the_bucket_with_secret_credentials_and_cache_on_the_node(name):
    head, workers = groups(name)
    for g in [head, *workers]:
        c, pod = container(g), g["template"]["spec"]
        env = {e["name"]: e for e in c["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == key and not ref.get("optional")
        cache = env["DISCOATTR_CACHE"]["value"]
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cache]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"


def test_one_image_everywhere(steps):
    images = {container(g)["image"] for name in MANIFESTS for g in [groups(name)[0], *groups(name)[1]]}
    images.add(load("cluster.yaml")["docker"]["image"])
    assert len(images) == 1, images
    assert images.pop().split("/")[-1].startswith("discoattr:")
