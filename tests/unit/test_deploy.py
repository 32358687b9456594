"""deploy/: the container image definition and the KubeRay RayJob, checked offline (no docker, no cluster).

No package ships KubeRay's CRD schema, so the RayJob's own fields are checked here by name; its pod
templates and the volume claim are checked against the Kubernetes schema (kubernetes-validate).
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from msbt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
K8S_VERSION = "1.30"  # a Kubernetes release still widely run; the templates use nothing newer


@pytest.fixture(scope="module")
def dockerfile():
    parse = pytest.importorskip("dockerfile_parse")
    parser = parse.DockerfileParser(path=str(DOCKERFILE))
    return parser


@pytest.fixture(scope="module")
def manifest():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"PersistentVolumeClaim", "RayJob"}, "rayjob.yaml holds the claim and the job"
    return by_kind


def pod_templates(job):
    cluster = job["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def pyproject_version():
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_dockerfile_builds_on_rays_gpu_image_and_installs_from_pyproject(dockerfile):
    base = dockerfile.baseimage  # with the ARG default substituted
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py3(10|11|12)-gpu", base), base
    pin = re.search(r'"ray\[[^\]]+\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and base.split(":")[1].startswith(pin.group(1)), "the base image's Ray must be the pinned one"
    runs = [i["value"] for i in dockerfile.structure if i["instruction"] == "RUN"]
    assert any("pip install" in r and "'.[gpu]'" in r for r in runs), "dependencies from pyproject.toml"
    assert any("pip install" in r and "-e ." in r for r in runs), "the project installed as CI does"
    copies = [i["value"] for i in dockerfile.structure if i["instruction"] == "COPY"]
    for needed in ("pyproject.toml", "msbt", "workflows"):
        assert any(needed in c.split() for c in copies), needed
    labels = dockerfile.labels
    assert labels["org.opencontainers.image.version"] == pyproject_version()
    ray_version = base.split(":")[1].split("-")[0]
    assert labels["org.opencontainers.image.ref.name"] == f"msbt:{pyproject_version()}-ray{ray_version}-py311-gpu"
    assert f"-t {labels['org.opencontainers.image.ref.name']} " in DOCKERFILE.read_text(), "build command in the header"


def test_rayjob_has_the_fields_kuberay_requires(manifest):
    job = manifest["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].strip() and spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "rayStartParams" in cluster["headGroupSpec"]
    assert cluster["authOptions"]["mode"] == "token"  # Ray 2.60 APIs need the token (README: Authentication)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_gpu_workers_ask_for_gpus_and_the_head_for_none(manifest):
    job = manifest["RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert limit >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        gpus += limit * group["replicas"]
    # The entrypoint's config trains with num_workers workers of one GPU each: the cluster must hold them.
    config = entrypoint_config(job)
    assert config.run.use_gpu and gpus >= config.run.num_workers


def test_every_pod_mounts_the_shared_claim_and_run_storage_lies_on_it(manifest):
    claim = manifest["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "head and GPU pods on different nodes share it"
    job = manifest["RayJob"]
    config = entrypoint_config(job)
    for name, template in pod_templates(job):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert set(mounts) <= set(volumes), f"{name}: a volumeMount without its volume"
            shared = [n for n in mounts if volumes[n].get("persistentVolumeClaim", {}).get("claimName")
                      == claim["metadata"]["name"]]
            assert shared, f"{name}: the shared claim is not mounted"
            root = mounts[shared[0]]
            for path in (config.run.storage_path, config.data.microscope, config.data.ultrasound):
                assert path.startswith(root + "/"), f"{name}: {path} is not on the shared volume {root}"


def test_images_are_the_dockerfiles_tag_and_entrypoint_paths_exist(manifest, dockerfile):
    job = manifest["RayJob"]
    tag = dockerfile.labels["org.opencontainers.image.ref.name"]
    for name, template in pod_templates(job):
        assert [c["image"] for c in template["spec"]["containers"]] == [tag], name
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == dockerfile.baseimage.split(":")[1].split("-")[0]
    workdir = [i["value"] for i in dockerfile.structure if i["instruction"] == "WORKDIR"][-1]
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[0] == "python" and args[1] == f"{workdir}/workflows/pipeline.py"
    assert (ROOT / "workflows" / "pipeline.py").is_file()


def entrypoint_config(job):
    """The config the entrypoint resolves: its --config files (in the image = in this repo) and --set."""
    workdir = "/home/ray/msbt/"
    args = shlex.split(job["spec"]["entrypoint"])
    configs = [ROOT / a[len(workdir):] for flag, a in zip(args, args[1:]) if flag == "--config"]
    sets = [a for flag, a in zip(args, args[1:]) if flag == "--set"]
    assert all(p.is_file() for p in configs), configs
    return load_config(configs, sets)  # raises ConfigError on an unknown key or a bad value


def test_pod_templates_and_claim_pass_the_kubernetes_schema(manifest):
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(manifest["PersistentVolumeClaim"], K8S_VERSION, strict=True)
    for name, template in pod_templates(manifest["RayJob"]):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kv.validate(wrapped, K8S_VERSION, strict=True)


def test_schema_check_catches_a_broken_template(manifest):
    kv = pytest.importorskip("kubernetes_validate")
    _, template = next(pod_templates(manifest["RayJob"]))
    broken = yaml.safe_load(yaml.safe_dump(template))
    broken["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/typo"  # misspelt key
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": broken},
                    K8S_VERSION, strict=True)
