"""The KubeRay manifests (examples/kuberay/) against KubeRay's own CRD schemas, as the API server checks them.

The schemas are the ``openAPIV3Schema`` of KubeRay's CRDs (``../shared/k8s/ray.io_rayjobs.yaml``,
``ray.io_raycronjobs.yaml``). A CRD schema is structural: the API server drops (and with
``kubectl apply``'s default strict field validation, refuses) any field the schema does not name, unless
the object is a map (``additionalProperties``) or says ``x-kubernetes-preserve-unknown-fields``. JSON
Schema allows unknown fields by default, so ``structural`` adds ``additionalProperties: false`` to every
object schema with ``properties`` and neither of those; the root ``metadata`` (ObjectMeta, checked by the
API server itself, not by the CRD) gets an ObjectMeta schema. CEL rules (``x-kubernetes-validations``) and
integer formats are not evaluated here.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT.parent / "shared" / "k8s"
EXAMPLES = ROOT / "examples" / "kuberay"
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra: pip install -e '.[test]'")
pytestmark = pytest.mark.skipif(not K8S.is_dir(), reason=f"KubeRay CRDs not found at {K8S} (../shared/k8s)")

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {  # the ObjectMeta fields a manifest may set; the server fills in the others
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": DNS_SUBDOMAIN},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema that refuses unknown fields where the API server prunes them.

    Walks schema positions only (``properties`` values, ``items``, ``additionalProperties``, ``anyOf``/
    ``allOf``/``oneOf``/``not``), never into a ``properties`` map as if it were a schema, so a field named
    e.g. ``properties`` or ``items`` is not mistaken for a keyword."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: structural(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        out["items"] = structural(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(schema["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [structural(s) for s in schema[key]]
    if isinstance(schema.get("not"), dict):
        out["not"] = structural(schema["not"])
    return out


@functools.cache
def served_versions(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((K8S / CRDS[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    return {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v.get("served")}


@functools.cache
def crd_validator(kind: str, version: str) -> Any:
    schema = structural(served_versions(kind)[version])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft4Validator(schema)


def errors(doc: dict[str, Any]) -> list[str]:
    """The API server's objections to one custom resource, as ``path: message`` lines ([] when accepted)."""
    group, _, version = doc.get("apiVersion", "").partition("/")
    if group != "ray.io" or doc.get("kind") not in CRDS:
        return [f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')} is not a KubeRay RayJob or RayCronJob"]
    if version not in served_versions(doc["kind"]):
        return [f"apiVersion: {doc['kind']} is not served at {doc['apiVersion']} "
                f"(served: {', '.join(sorted(served_versions(doc['kind'])))})"]
    found = crd_validator(doc["kind"], version).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)


def documents(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob")])
def test_manifest_is_accepted_by_the_crd_schema(name, kind):
    doc = documents(name)[kind]
    assert errors(doc) == []


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob")])
def test_misspelled_or_mistyped_fields_are_refused(name, kind):
    """The check can fail: a misspelled field at the top of the spec, deep in a worker group's pod
    template, in the metadata, or a wrong type, each gives an error naming its path."""
    good = documents(name)[kind]

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(good)
        edit(job_spec(doc), doc)
        return errors(doc)

    def rename(d: dict, old: str, new: str) -> None:
        d[new] = d.pop(old)

    top = broken(lambda s, d: rename(s, "shutdownAfterJobFinishes", "shutdownAfterJobFinish"))
    assert any("shutdownAfterJobFinish'" in e and "not allowed" in e for e in top), top
    group = broken(lambda s, d: rename(s["rayClusterSpec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"))
    assert any("'minReplica' was unexpected" in e for e in group) and any("'minReplicas' is a required" in e
                                                                          for e in group), group
    pod = broken(lambda s, d: rename(s["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"],
                                     "nodeSelector", "nodeSelectors"))
    where = "spec.jobTemplate" if kind == "RayCronJob" else "spec"
    assert pod == [f"{where}.rayClusterSpec.workerGroupSpecs.1.template.spec: "
                   "Additional properties are not allowed ('nodeSelectors' was unexpected)"], pod
    meta = broken(lambda s, d: d["metadata"].update(label={"a": "b"}))
    assert any(e.startswith("metadata:") and "'label'" in e for e in meta), meta
    typed = broken(lambda s, d: s["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="16"))
    assert any("maxReplicas: '16' is not of type 'integer'" in e for e in typed), typed
    enum = broken(lambda s, d: s["rayClusterSpec"]["autoscalerOptions"].update(version="v3"))
    assert any("autoscalerOptions.version" in e for e in enum), enum
    assert errors({**good, "apiVersion": "ray.io/v2"}) and errors({**good, "kind": "RayCluster"})


def test_structural_keeps_maps_open_and_walks_only_schema_positions():
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "string"}}},  # a field named properties
        "labels": STRING_MAP,
        "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"x": {}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer"}}}},
    }}
    v = jsonschema.Draft4Validator(structural(schema))
    assert v.is_valid({"properties": {"a": "x"}, "labels": {"any": "thing"}, "raw": {"y": 1}, "list": [{"k": 1}]})
    assert not v.is_valid({"properties": {"b": "x"}})
    assert not v.is_valid({"list": [{"j": 1}]})
    assert not v.is_valid({"other": 1})


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob")])
def test_manifest_runs_farm_on_a_gpu_farm_that_scales_from_zero(name, kind):
    """What the manifests promise: `farm submit` on a valid farm job from the ConfigMap the head mounts,
    a CPU-only head, GPU worker groups from 0 (spot preferred, on-demand), and a finite lifetime."""
    from farm.spec import parse_spec

    docs = documents(name)
    spec = job_spec(docs[kind])
    cluster = spec["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0

    # The entrypoint names a file the ConfigMap provides, at the path the head mounts it.
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["farm", "submit"] and argv[argv.index("--address") + 1] == "auto"
    job_path = Path(argv[-1])
    head = cluster["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for c in head["containers"] for m in c.get("volumeMounts", []) if Path(m["mountPath"]) ==
                job_path.parent]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    job = parse_spec(configmap["data"][job_path.name], f"{name}:{job_path.name}")  # a job farm accepts
    assert all("://" in u for u in [*job.inputs, job.output.uri]), "a cluster job reads and writes object storage"

    # CPU-only head: no logical CPUs for actors, no GPU.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in head["containers"])

    # GPU groups from zero, one spot and one on demand, told apart by Ray and Kubernetes node labels.
    groups = {g["labels"]["ray.io/market-type"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"spot", "on-demand"}
    for market, g in groups.items():
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] > 0
        pod = g["template"]["spec"]
        assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == market
        assert all(c["resources"]["limits"]["nvidia.com/gpu"] == "1" for c in pod["containers"])
        assert set(job.resources.custom) <= set(g["resources"]), "the job's custom resources exist on the group"
    assert groups["spot"]["priority"] > groups["on-demand"].get("priority", 0)
    assert cluster["enableInTreeAutoscaling"] and cluster["autoscalerOptions"]["version"] == "v2"


def test_dockerfile_installs_farm_like_the_readme():
    text = (EXAMPLES / "Dockerfile").read_text()
    ray_version = documents("rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"FROM rayproject/ray:{ray_version}-" in text
    assert "torch==2.13.0" in text and "pip install --no-cache-dir ." in text
    for path in ("pyproject.toml", "farm", "actors"):
        assert (ROOT / path).exists() and path in text
