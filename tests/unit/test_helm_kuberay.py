"""The Helm chart against KubeRay itself, offline.

Helm, the CRD and the API server accept RayServices that the KubeRay operator then refuses
(an InvalidRayServiceSpec event, and no Ray cluster ever), or silently changes (replicas
clamped to maxReplicas, names rewritten). So for a matrix of value variants and each KubeRay
version the chart supports (kubeRayVersion):

- the RayService validates against that version's RayService CRD schema (vendored in
  kuberay_crds/), with unknown fields as errors and the list-map keys the API server enforces;
- KubeRay's own spec checks that a chart can trigger, re-implemented here from
  ray-operator/controllers/ray/utils/validation.go of each version, find nothing, and
  KubeRay would run exactly the pods and autoscaler the values asked for;
- every core object, and the pod templates and Service inside the RayService, validate
  strictly against Kubernetes' schemas, with names and labels Kubernetes accepts.

Then, value by value, each defect this chart used to have fails at render time with a message
naming the value, and the re-implemented rules themselves are tested on hand-made specs.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_helm_chart import (
    CHART,
    EVERYTHING_ON,
    EXTERNAL_REDIS_SECRET,
    EXTERNAL_REDIS_URL,
    GPU,
    KUBE_VERSIONS,
    NAMESPACE,
    NIXL,
    RAY_AUTOSCALER,
    SERVE_AUTOSCALING,
    merge,
    objects,
    one,
    pod_specs,
)

from control_plane.settings import TandemSettings

CRD_DIR = Path(__file__).resolve().parent / "kuberay_crds"
# The oldest operator the chart supports, the one docs/deploy.md installs, the newest release.
KUBERAY_VERSIONS = ("1.3.0", "1.6.2", "1.7.0")
REPO = Path(__file__).resolve().parents[2]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.lstrip("v").split("-")[0].split("."))


# KubeRay's RayService CRD schema, closed ------------------------------------------------------


def closed(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema (OpenAPI v3) as a JSON Schema that refuses unknown fields.

    The API server does not refuse unknown fields of a custom resource: it prunes them, so a
    misspelt or too-new field (`autoscalerOptions.version` on KubeRay 1.3) disappears without an
    error and the operator never sees it. Here an object that lists its `properties` and neither
    `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets
    `additionalProperties: false`, making every pruned field an error. Also: `nullable` becomes
    a "null" type, `x-kubernetes-int-or-string` an integer-or-string, and int32/int64 formats
    ranges (the API server checks those; jsonschema ignores formats)."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = closed(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [closed(sub) for sub in out[key]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    bits = {"int32": 31, "int64": 63}.get(out.get("format", ""))
    if bits:
        out.setdefault("minimum", -(2**bits))
        out.setdefault("maximum", 2**bits - 1)
    return out


@functools.cache
def crd_schema(version: str) -> dict[str, Any]:
    raw = json.loads(gzip.decompress((CRD_DIR / f"rayservice-{version}.json.gz").read_bytes()))
    return raw


@functools.cache
def crd_validator(version: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(closed(crd_schema(version)))


def list_map_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Duplicate keys in x-kubernetes-list-type map/set lists (env by name, volumeMounts by
    mountPath, ports by containerPort+protocol): the API server refuses those for a custom
    resource. Defaults the API server applies first (a port's protocol, TCP) are applied."""
    errors: list[str] = []
    if isinstance(value, dict):
        for name, sub in value.items():
            if name in schema.get("properties", {}):
                errors += list_map_errors(schema["properties"][name], sub, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += list_map_errors(schema["additionalProperties"], sub, f"{path}.{name}")
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            item_props = schema.get("items", {}).get("properties", {})
            seen = set()
            for item in value:
                if kind == "map":
                    key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
                else:
                    key = json.dumps(item, sort_keys=True)
                if key in seen:
                    errors.append(f"{path}: duplicate {keys or 'item'} {key}")
                seen.add(key)
        for index, item in enumerate(value):
            errors += list_map_errors(schema.get("items", {}), item, f"{path}[{index}]")
    return errors


def cel_rule_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where the CRD has CEL rules (x-kubernetes-validations), which jsonschema cannot run."""
    found = [path] if schema.get("x-kubernetes-validations") else []
    for name, sub in schema.get("properties", {}).items():
        found += cel_rule_paths(sub, (*path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += cel_rule_paths(schema[key], (*path, "[]"))
    return found


def present(doc: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "[]":
        items = doc if isinstance(doc, list) else list(doc.values()) if isinstance(doc, dict) else []
        return any(present(item, rest) for item in items)
    return isinstance(doc, dict) and head in doc and present(doc[head], rest)


def crd_errors(rayservice: dict[str, Any], version: str) -> list[str]:
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in crd_validator(version).iter_errors(rayservice)
    ]
    errors += list_map_errors(crd_schema(version), rayservice)
    # The CRD's CEL rules guard fields the chart never sets (managedBy, the GCS FT backend):
    # make sure it stays so, since they are not evaluated here.
    errors += [f"{'.'.join(path)} has CEL rules this test cannot run" for path in cel_rule_paths(crd_schema(version))
               if path and present(rayservice, path)]
    return errors


# KubeRay's spec checks, re-implemented -------------------------------------------------------

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# utils/constant.go (>= 1.4): "-serve-svc" is the longest suffix of a RayCluster's Services.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6  # GenerateRayClusterName appends "-xxxxx"


def env_value(container: dict[str, Any], name: str) -> str | None:
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry.get("value", "")
    return None


def check_name_1_3(name: str) -> str:
    """KubeRay 1.3's CheckName (utils/util.go), which it applies to the names it derives."""
    if len(name) > 50:
        name = name[len(name) - 50:]
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name


def autoscaler_v2(cluster: dict[str, Any], version: str) -> bool:
    """Whether KubeRay runs the Ray autoscaler as v2 (IsAutoscalingV2Enabled, or before 1.4
    the head's RAY_enable_autoscaler_v2 env, which 1.6's idle-timeout check also accepts)."""
    if not cluster.get("enableInTreeAutoscaling"):
        return False
    if (cluster.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return env_value(head, "RAY_enable_autoscaler_v2") in ("1", "true")


def kuberay_errors(rayservice: dict[str, Any], version: str) -> list[str]:
    """What KubeRay `version` refuses in this RayService: ValidateRayServiceMetadata,
    ValidateRayServiceSpec and ValidateRayClusterSpec (utils/validation.go), the checks a chart
    can trigger, each from the version that introduced it. The feature gates are taken as on
    (RayServiceIncrementalUpgrade), so that their rules apply too."""
    v = version_tuple(version)
    errors: list[str] = []
    name = rayservice["metadata"]["name"]
    annotations = rayservice["metadata"].get("annotations") or {}
    spec = rayservice["spec"]
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_spec = head["template"]["spec"]
    groups = cluster.get("workerGroupSpecs") or []
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    options = cluster.get("autoscalerOptions") or {}

    # ValidateRayServiceMetadata and, for the RayCluster it creates, ValidateRayClusterMetadata.
    if v >= (1, 4):
        if len(name) > MAX_RAYSERVICE_NAME:
            errors.append(f"RayService name should be no more than {MAX_RAYSERVICE_NAME} characters")
        if not DNS1035_LABEL.match(name) or len(name) > 63:
            errors.append("RayService name should be a valid DNS1035 label")
        if len(f"{name}-xxxxx") > MAX_RAYCLUSTER_NAME:
            errors.append(f"RayCluster name should be no more than {MAX_RAYCLUSTER_NAME} characters")
    else:
        # 1.3 checks no name, but CheckName (utils/util.go) silently rewrites the head
        # Service's name (cut from the front to 50 characters, a leading digit or punctuation
        # turned into "r"), and the API server refuses a Service name that is no DNS-1035 label.
        head_service = f"{name}-head-svc"
        if check_name_1_3(head_service) != head_service:
            errors.append(f"KubeRay 1.3 would rename the head Service {head_service!r} (CheckName)")
        if not DNS1035_LABEL.match(check_name_1_3(head_service)):
            errors.append(f"the API server refuses the head Service name {check_name_1_3(head_service)!r}")

    # ValidateRayClusterSpec
    if not head_spec.get("containers"):
        errors.append("headGroupSpec should have at least one container")
    head_container = (head_spec.get("containers") or [{}])[0]
    head_params = head.get("rayStartParams") or {}
    for group in groups:
        group_name = group["groupName"]
        if not group["template"]["spec"].get("containers"):
            errors.append("workerGroupSpec should have at least one container")
        minimum, maximum = group.get("minReplicas"), group.get("maxReplicas")
        if v >= (1, 6):
            if not autoscaling and (minimum is None or maximum is None):
                errors.append(f"worker group {group_name} must set both minReplicas and maxReplicas when autoscaling is disabled")
            if minimum is not None and minimum < 0:
                errors.append(f"worker group {group_name} has negative minReplicas {minimum}")
            if maximum is not None and maximum < 0:
                errors.append(f"worker group {group_name} has negative maxReplicas {maximum}")
            if minimum is not None and maximum is not None and minimum > maximum:
                errors.append(f"worker group {group_name} has minReplicas {minimum} greater than maxReplicas {maximum}")
        if v >= (1, 6) and group.get("idleTimeoutSeconds") is not None:  # validateWorkerGroupIdleTimeout
            if group["idleTimeoutSeconds"] < 0:
                errors.append(f"worker group {group_name}: idleTimeoutSeconds must be non-negative")
            elif options.get("version") != "v2" and env_value(head_container, "RAY_enable_autoscaler_v2") not in ("1", "true"):
                errors.append(f"worker group {group_name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled")
    if v >= (1, 5):
        for group_name, params, resources, labels in [
            ("Head", head_params, head.get("resources"), head.get("labels")),
            *[(g["groupName"], g.get("rayStartParams") or {}, g.get("resources"), g.get("labels")) for g in groups],
        ]:
            # validateRayGroupResources, validateRayGroupLabels
            if any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
                errors.append(f"resource fields should not be set in both rayStartParams and Resources for {group_name} group")
            if "labels" in params:
                errors.append(f"rayStartParams['labels'] is not supported for {group_name} group")
            for key, value in (labels or {}).items():
                if not LABEL_VALUE.match(value) or len(value) > 63:
                    errors.append(f"invalid label value for key '{key}' in {group_name} group")
    gcs_ft = cluster.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and gcs_ft is not None:
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    ft_enabled = gcs_ft is not None or str(annotations.get("ray.io/ft-enabled", "")).lower() == "true"
    if not ft_enabled and env_value(head_container, "RAY_REDIS_ADDRESS") is not None:
        errors.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance")
    if gcs_ft is not None:
        if head_params.get("redis-password"):
            errors.append("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled")
        if env_value(head_container, "REDIS_PASSWORD") is not None:
            errors.append("cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if env_value(head_container, "RAY_REDIS_ADDRESS") is not None:
            errors.append("cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append("cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled")
    if head_params.get("redis-username") or env_value(head_container, "REDIS_USERNAME") is not None:
        errors.append("cannot set redis username in rayStartParams or environment variables")
    if v >= (1, 5) and not autoscaling and env_value(head_container, "RAY_enable_autoscaler_v2") in ("1", "true"):
        errors.append("environment variable RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false")
    if autoscaling:
        if any(group.get("suspend") for group in groups):
            errors.append("worker group cannot be suspended with Autoscaler enabled")
        if v >= (1, 4):
            if options.get("version") and env_value(head_container, "RAY_enable_autoscaler_v2") is not None:
                errors.append("both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set")
            if options.get("version") == "v2":
                for group_name, template in [("head", head["template"]), *[(g["groupName"], g["template"]) for g in groups]]:
                    if template["spec"].get("restartPolicy", "Never") != "Never":
                        errors.append(f"restartPolicy for {group_name} should be Never or unset when using autoscaler V2")
    if v >= (1, 6) and options.get("idleTimeoutSeconds", 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")

    # ValidateRayServiceSpec
    if (head.get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
    upgrade = spec.get("upgradeStrategy") or {}
    valid_types = {"NewCluster", "None"} | ({"NewClusterWithIncrementalUpgrade"} if v >= (1, 5) else set())
    if upgrade.get("type") is not None and upgrade["type"] not in valid_types:
        errors.append(f"Spec.UpgradeStrategy.Type value {upgrade['type']} is invalid")
    if v >= (1, 6) and spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("Spec.RayClusterDeletionDelaySeconds should be a non-negative integer")
    if v >= (1, 5) and upgrade.get("type") == "NewClusterWithIncrementalUpgrade":  # ValidateClusterUpgradeOptions
        upgrade_options = upgrade.get("clusterUpgradeOptions")
        if not autoscaling:
            errors.append("Ray Autoscaler is required for NewClusterWithIncrementalUpgrade")
        elif upgrade_options is None:
            errors.append("ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade")
        else:
            surge = upgrade_options.get("maxSurgePercent", 100)  # the CRD's default
            step = upgrade_options.get("stepSizePercent")
            if not 0 <= surge <= 100:
                errors.append("maxSurgePercent must be between 0 and 100")
            elif step is None or not 0 <= step <= 100:
                errors.append("stepSizePercent must be between 0 and 100")
            elif step > surge:
                errors.append("stepSizePercent must be less than or equal to maxSurgePercent")
            elif not upgrade_options.get("intervalSeconds") or upgrade_options["intervalSeconds"] <= 0:
                errors.append("intervalSeconds must be greater than 0")
            elif not upgrade_options.get("gatewayClassName"):
                errors.append("gatewayClassName is required for NewClusterWithIncrementalUpgrade")
    return errors


def kuberay_desired_replicas(group: dict[str, Any], version: str) -> int:
    """The pods KubeRay runs for a worker group (GetWorkerGroupDesiredReplicas, utils/util.go):
    replicas clamped into minReplicas..maxReplicas without a word (before 1.6, also when
    min > max: then maxReplicas)."""
    minimum = group.get("minReplicas", 0)
    maximum = group.get("maxReplicas", 2**31 - 1)
    replicas = group.get("replicas")
    if version_tuple(version) < (1, 6) and minimum > maximum:
        return maximum
    if replicas is None or replicas < minimum:
        return minimum
    return min(replicas, maximum)


def kuberay_names(rayservice: dict[str, Any]) -> dict[str, str]:
    """Names KubeRay >= 1.4 derives from the RayService's as they are (utils/util.go): its
    RayCluster (a random suffix), that cluster's Services, the RayService's head Service. (1.3
    passed them through CheckName, which cuts and rewrites instead: see kuberay_errors.)"""
    name = rayservice["metadata"]["name"]
    return {
        "RayCluster": f"{name}-xxxxx",
        "RayCluster head Service": f"{name}-xxxxx-head-svc",
        "RayCluster serve Service": f"{name}-xxxxx-serve-svc",
        "head Service": f"{name}-head-svc",
    }


# Kubernetes names and labels -----------------------------------------------------------------


def name_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server refuses in an object's name and labels (kubernetes-validate checks
    the schema, not names): Services are DNS-1035 labels; other objects DNS-1123 subdomains;
    label values at most 63 characters. A StatefulSet's pods carry the label
    controller-revision-hash=<name>-<hash of up to 10 characters>."""
    errors = []
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Service":
        if not DNS1035_LABEL.match(name) or len(name) > 63:
            errors.append(f"Service name {name!r} is not a DNS-1035 label")
    elif not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"{kind} name {name!r} is not a DNS-1123 subdomain")
    if kind == "StatefulSet" and len(f"{name}-0123456789") > 63:
        errors.append(f"StatefulSet {name!r}: its controller-revision-hash label would exceed 63 characters")
    label_sets = [doc["metadata"].get("labels") or {}]
    template = (doc.get("spec") or {}).get("template")
    if isinstance(template, dict):
        label_sets.append((template.get("metadata") or {}).get("labels") or {})
    for labels in label_sets:
        for key, value in labels.items():
            if not LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
                errors.append(f"{kind} {name}: label {key}={value!r} is not a valid label value")
    return errors


# The matrix ----------------------------------------------------------------------------------

LONG_RELEASE = "inference-platform-team-llm-serving-production-eu1"  # 50 characters, Helm allows 53
assert len(LONG_RELEASE) == 50
GPU_DEFAULTS = merge(GPU, {"workerGroups": {role: {"tolerations": []} for role in ("prefill", "decode")}})
POD_FIELDS = {
    "serviceAccount": {"create": True, "annotations": {"iam.gke.io/gcp-service-account": "llm@p.iam.gserviceaccount.com"}},
    "priorityClassName": "inference",
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    "gpu": {"runtimeClassName": "nvidia"},
    "head": {
        "priorityClassName": "inference-critical",
        "rayStartParams": {"num-cpus": "2", "dashboard-port": "8266", "metrics-export-port": "9090"},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway"}],
        "terminationGracePeriodSeconds": 120,
    },
    "workerGroups": {
        role: {
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "DoNotSchedule"}],
            "terminationGracePeriodSeconds": 300,
            "startupProbe": {"httpGet": {"path": "/api/local_raylet_healthz", "port": 52365},
                             "periodSeconds": 15, "failureThreshold": 120},
        }
        for role in ("prefill", "decode")
    },
    "redis": {"internal": {"priorityClassName": ""}},
}
GITOPS = {
    "generateSecrets": False,
    "auth": {"existingSecret": "tandem-keys", "existingSecretKey": "key", "kvExistingSecret": "tandem-kv"},
    "redis": {"internal": {"auth": {"existingSecret": "tandem-redis", "existingSecretKey": "password"}}},
}
SECRET_VALUES = {
    "generateSecrets": False,
    "auth": {"apiKey": "tk-0123456789abcdef", "kvSecret": "k" * 48},
    "redis": {"internal": {"auth": {"password": "Redis-Pa55word_1"}}},
}
AUTOSCALER_V2 = merge(RAY_AUTOSCALER, {
    "rayAutoscaler": {"version": "v2"},
    "workerGroups": {"prefill": {"idleTimeoutSeconds": 300}, "decode": {"idleTimeoutSeconds": 120}},
})
INCREMENTAL_UPGRADE = merge(RAY_AUTOSCALER, {
    "upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                        "clusterUpgradeOptions": {"gatewayClassName": "istio", "maxSurgePercent": 50,
                                                  "stepSizePercent": 25, "intervalSeconds": 60}},
})

# name -> (values, release name, lowest KubeRay version it applies to)
MATRIX: dict[str, tuple[dict[str, Any], str, str]] = {
    "default": ({}, "demo", "1.3.0"),
    "gpu-default-tolerations": (GPU_DEFAULTS, "demo", "1.3.0"),
    "gpu-nixl-rdma": (merge(GPU, NIXL), "demo", "1.3.0"),
    "external-redis-url": (EXTERNAL_REDIS_URL, "demo", "1.3.0"),
    "external-redis-secret": (EXTERNAL_REDIS_SECRET, "demo", "1.3.0"),
    "ray-autoscaler-v1": (RAY_AUTOSCALER, "demo", "1.3.0"),
    "ray-autoscaler-v2-idle-timeouts": (AUTOSCALER_V2, "demo", "1.3.0"),
    "serve-autoscaling": (SERVE_AUTOSCALING, "demo", "1.3.0"),
    "serve-autoscaling-v2": (merge(SERVE_AUTOSCALING, {"rayAutoscaler": {"version": "v2"}}), "demo", "1.3.0"),
    "ingress-tls-everything": (EVERYTHING_ON, "demo", "1.3.0"),
    "colocated": ({"tandem": {"mode": "colocated", "colocated": {"replicas": 3}},
                   "workerGroups": {"colocated": {"enginesPerPod": 2}}}, "demo", "1.3.0"),
    "pod-fields": (merge(GPU, POD_FIELDS), "demo", "1.3.0"),
    "gitops-existing-secrets": (GITOPS, "demo", "1.3.0"),
    "secret-values": (SECRET_VALUES, "demo", "1.3.0"),
    "explicit-pod-counts": ({"workerGroups": {"prefill": {"replicas": 3}, "decode": {"minReplicas": 2}}}, "demo", "1.3.0"),
    "upgrade-none": ({"upgradeStrategy": {"type": "None"}}, "demo", "1.3.0"),
    "older-ray-exec-startup-probe": ({"rayVersion": "2.46.0"}, "demo", "1.3.0"),
    "upgrade-incremental": (INCREMENTAL_UPGRADE, "demo", "1.5.0"),
    "release-name-1-char": ({}, "a", "1.3.0"),
    "release-name-50-chars": ({}, LONG_RELEASE, "1.3.0"),
    "fullname-override-1-char": ({"fullnameOverride": "t"}, "demo", "1.3.0"),
    "fullname-override-40-chars": ({"fullnameOverride": "t" * 40}, "demo", "1.3.0"),
}
CASES = [
    pytest.param(name, version, id=f"{name}@{version}")
    for name, (_, _, since) in MATRIX.items()
    for version in KUBERAY_VERSIONS
    if version_tuple(version) >= version_tuple(since)
]


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None, *, name: str = "demo", kuberay: str | None = None) -> list[dict[str, Any]]:
    values = copy.deepcopy(values or {})
    if kuberay is not None:
        values["kubeRayVersion"] = kuberay
    return objects(chart.render(values=values, name=name, namespace=NAMESPACE, is_install=True))


_rendered: dict[tuple[str, str], list[dict[str, Any]]] = {}


def rendered(chart, case: str, version: str) -> list[dict[str, Any]]:
    if (case, version) not in _rendered:
        values, release, _ = MATRIX[case]
        _rendered[case, version] = render(chart, values, name=release, kuberay=version)
    return _rendered[case, version]


@pytest.mark.parametrize(("case", "version"), CASES)
def test_rayservice_matches_the_kuberay_crd(chart, case, version):
    """Against the CRD of kubeRayVersion, and of every newer vendored version: upgrading the
    operator before the values must not break the release. (An older operator's CRD may lack
    fields the chart writes for a newer one, e.g. autoscalerOptions.version before 1.4: that
    is what kubeRayVersion is for.)"""
    rayservice = one(rendered(chart, case, version), "RayService")
    for newer in KUBERAY_VERSIONS:
        if version_tuple(newer) >= version_tuple(version):
            assert crd_errors(rayservice, newer) == [], newer
            assert kuberay_errors(rayservice, newer) == [], newer


@pytest.mark.parametrize(("case", "version"), CASES)
def test_kuberay_accepts_the_rayservice_as_written(chart, case, version):
    """No InvalidRayServiceSpec/Metadata, no silently clamped group, no renamed Service, and
    the autoscaler version the values asked for."""
    values = merge(chart.values, MATRIX[case][0])
    rayservice = one(rendered(chart, case, version), "RayService")
    assert kuberay_errors(rayservice, version) == []
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert kuberay_desired_replicas(group, version) == group["replicas"], group["groupName"]
        if "idleTimeoutSeconds" in group:  # honoured by autoscaler v2 only, on every version
            assert autoscaler_v2(cluster, version)
    if cluster["enableInTreeAutoscaling"]:
        assert autoscaler_v2(cluster, version) == (values["rayAutoscaler"]["version"] == "v2")
    if version_tuple(version) >= (1, 4):
        for what, derived in kuberay_names(rayservice).items():
            assert DNS1035_LABEL.match(derived) and len(derived) <= 63, (what, derived)
    # The serve Service's selector label, <name>-serve, is a label value.
    assert len(f"{rayservice['metadata']['name']}-serve") <= 63


@pytest.mark.parametrize(("case", "version"), CASES)
def test_objects_inside_the_rayservice_are_strictly_valid(chart, case, version):
    rayservice = one(rendered(chart, case, version), "RayService")
    embedded = [rayservice["spec"]["serveService"]]
    for group, template in pod_specs(rayservice).items():
        metadata = {**template["metadata"], "name": f"{rayservice['metadata']['name']}-{group}-xxxxx"}
        embedded.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    for doc in embedded:
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, kube, strict=True)
        assert name_errors(doc) == []


@pytest.mark.parametrize("case", list(MATRIX))
def test_core_objects_are_strictly_valid(chart, case):
    """Core objects do not depend on kubeRayVersion: checked once per variant."""
    since = version_tuple(MATRIX[case][2])
    docs = rendered(chart, case, next(v for v in KUBERAY_VERSIONS if version_tuple(v) >= since))
    for doc in docs:
        assert name_errors(doc) == []
        if doc["kind"] in {"RayService", "ServiceMonitor"}:
            continue
        for kube in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, kube, strict=True)


def test_default_rendering_fits_every_supported_kuberay(chart):
    """Whatever kubeRayVersion says, the default values make a RayService every supported
    operator takes as is."""
    rayservice = one(render(chart), "RayService")
    for version in KUBERAY_VERSIONS:
        assert crd_errors(rayservice, version) == [], version
        assert kuberay_errors(rayservice, version) == [], version


def test_vendored_crds_are_the_ones_documented():
    readme = (CRD_DIR / "README.md").read_text()
    for version in KUBERAY_VERSIONS:
        assert f"rayservice-{version}.json.gz" in readme and f"`v{version}`" in readme
        schema = crd_schema(version)
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec", "status"}


# The re-implemented KubeRay rules, on specs that break them ---------------------------------


def base_rayservice(chart, version: str = "1.6.2") -> dict[str, Any]:
    return copy.deepcopy(one(render(chart, kuberay=version), "RayService"))


def test_rules_idle_timeout_needs_autoscaler_v2(chart):
    """What this chart used to render with rayAutoscaler.enabled or Serve autoscaling: a
    per-group idleTimeoutSeconds without autoscalerOptions.version. The CRD of every version
    takes it; KubeRay >= 1.6 refuses the spec."""
    rayservice = base_rayservice(chart)
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscaling"] = True
    cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 60}
    for group in cluster["workerGroupSpecs"]:
        group["idleTimeoutSeconds"] = 60
    for version in KUBERAY_VERSIONS:
        assert crd_errors(rayservice, version) == []
    assert kuberay_errors(rayservice, "1.3.0") == []
    for version in ("1.6.2", "1.7.0"):
        assert "worker group prefill: idleTimeoutSeconds is set, but autoscaler v2 is not enabled" in kuberay_errors(rayservice, version)
    cluster["autoscalerOptions"]["version"] = "v2"
    assert kuberay_errors(rayservice, "1.6.2") == []
    # ...but KubeRay 1.3 has no such field: the API server would prune it without a word.
    assert any("version" in error for error in crd_errors(rayservice, "1.3.0"))


def test_rules_replica_bounds(chart):
    """What this chart used to render for `minReplicas: 2` alone (1.6 refuses it) and
    `replicas: 3` alone (every version silently runs 1 pod)."""
    rayservice = base_rayservice(chart)
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group.update(minReplicas=2, replicas=2, maxReplicas=1)
    assert "worker group prefill has minReplicas 2 greater than maxReplicas 1" in kuberay_errors(rayservice, "1.6.2")
    assert kuberay_errors(rayservice, "1.3.0") == [] and kuberay_desired_replicas(group, "1.3.0") == 1
    group.update(minReplicas=1, replicas=3, maxReplicas=1)
    assert kuberay_errors(rayservice, "1.7.0") == []
    assert kuberay_desired_replicas(group, "1.7.0") == 1
    del group["maxReplicas"]
    assert "worker group prefill must set both minReplicas and maxReplicas when autoscaling is disabled" in kuberay_errors(rayservice, "1.6.2")
    assert any("maxReplicas" in error for error in crd_errors(rayservice, "1.7.0"))  # required there


@pytest.mark.parametrize("name", ["1st-llm-tandem", "llm.v2-tandem", "a" * 48, "Tandem"])
def test_rules_rayservice_names(chart, name):
    rayservice = base_rayservice(chart)
    rayservice["metadata"]["name"] = name
    assert any("RayService name" in error for error in kuberay_errors(rayservice, "1.6.2"))
    assert any("RayService name" in error for error in kuberay_errors(rayservice, "1.7.0"))
    if name[0].isdigit() or len(name) > 41:
        assert any("CheckName" in error for error in kuberay_errors(rayservice, "1.3.0"))
    if not DNS1035_LABEL.match(check_name_1_3(f"{name}-head-svc")):  # "Tandem", "llm.v2-tandem"
        assert any("the API server refuses the head Service name" in error for error in kuberay_errors(rayservice, "1.3.0"))


def test_rules_autoscaler_v2_forms(chart):
    rayservice = base_rayservice(chart)
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["env"].append({"name": "RAY_enable_autoscaler_v2", "value": "1"})
    assert any("enableInTreeAutoscaling is false" in e for e in kuberay_errors(rayservice, "1.6.2"))
    assert kuberay_errors(rayservice, "1.3.0") == []  # 1.3 did not check it
    cluster["enableInTreeAutoscaling"] = True
    cluster["autoscalerOptions"] = {"version": "v2"}
    assert any("both .spec.autoscalerOptions.version" in e for e in kuberay_errors(rayservice, "1.6.2"))
    head["containers"][0]["env"].pop()
    head["restartPolicy"] = "Always"
    assert any("restartPolicy for head" in e for e in kuberay_errors(rayservice, "1.6.2"))


def test_rules_gcs_fault_tolerance_and_upgrades(chart):
    rayservice = base_rayservice(chart)
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster["gcsFaultToleranceOptions"] = {"redisAddress": "redis:6379"}
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "REDIS_PASSWORD", "value": "x"})
    assert any("REDIS_PASSWORD" in e for e in kuberay_errors(rayservice, "1.3.0"))
    rayservice = base_rayservice(chart)
    rayservice["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade",
                                             "clusterUpgradeOptions": {"gatewayClassName": "x", "stepSizePercent": 10,
                                                                       "intervalSeconds": 30}}
    assert any("invalid" in e for e in kuberay_errors(rayservice, "1.3.0"))
    assert "Ray Autoscaler is required for NewClusterWithIncrementalUpgrade" in kuberay_errors(rayservice, "1.6.2")
    assert any("clusterUpgradeOptions" in e for e in crd_errors(rayservice, "1.3.0"))


def test_crd_refuses_unknown_and_mistyped_fields(chart):
    rayservice = base_rayservice(chart)
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 2
    errors = crd_errors(rayservice, "1.6.2")
    assert any("'minReplica' was unexpected" in e for e in errors)
    assert any("num-cpus" in e and "is not of type 'string'" in e for e in errors)
    rayservice = base_rayservice(chart)
    env = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert any("duplicate" in e for e in crd_errors(rayservice, "1.7.0"))


# Each former defect, now refused (or fixed) at render time -----------------------------------


def render_error(chart, values: dict[str, Any], *, name: str = "demo", kuberay: str | None = None) -> str:
    with pytest.raises((helm_python.HelmRenderError, helm_python.HelmValuesError)) as error:
        render(chart, values, name=name, kuberay=kuberay)
    return str(error.value)


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_autoscaling_never_sets_a_per_group_idle_timeout_without_v2(chart, version):
    for values in (RAY_AUTOSCALER, SERVE_AUTOSCALING):
        cluster = one(render(chart, values, kuberay=version), "RayService")["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60  # every group, v1 or v2
        assert all("idleTimeoutSeconds" not in group for group in cluster["workerGroupSpecs"])
    message = render_error(chart, merge(RAY_AUTOSCALER, {"workerGroups": {"prefill": {"idleTimeoutSeconds": 30}}}), kuberay=version)
    assert "workerGroups.prefill.idleTimeoutSeconds needs the Ray autoscaler v2" in message


@pytest.mark.parametrize(("version", "field", "env"), [("1.3.0", False, True), ("1.6.2", True, False), ("1.7.0", True, False)])
def test_autoscaler_v2_is_written_the_way_each_kuberay_reads_it(chart, version, field, env):
    rayservice = one(render(chart, AUTOSCALER_V2, kuberay=version), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert ("version" in cluster["autoscalerOptions"]) is field
    head = pod_specs(rayservice)["head"]
    assert (env_value(head["spec"]["containers"][0], "RAY_enable_autoscaler_v2") == "1") is env
    for template in pod_specs(rayservice).values():
        assert template["spec"]["restartPolicy"] == "Never"
    assert {g["groupName"]: g["idleTimeoutSeconds"] for g in cluster["workerGroupSpecs"]} == {"prefill": 300, "decode": 120}
    # v1 leaves the pods' restart policy alone.
    for template in pod_specs(one(render(chart, RAY_AUTOSCALER, kuberay=version), "RayService")).values():
        assert "restartPolicy" not in template["spec"]


def group_sizes(chart, values: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    cluster = one(render(chart, values), "RayService")["spec"]["rayClusterConfig"]
    return {g["groupName"]: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}


def test_one_pod_count_alone_means_what_it_says(chart):
    """`minReplicas: 2` alone used to render maxReplicas 1 (refused by KubeRay 1.6);
    `replicas: 3` alone used to be clamped to 1 pod."""
    assert group_sizes(chart, {"workerGroups": {"prefill": {"minReplicas": 2}}})["prefill"] == (2, 2, 2)
    assert group_sizes(chart, {"workerGroups": {"prefill": {"replicas": 3}}})["prefill"] == (3, 3, 3)
    assert group_sizes(chart, {"workerGroups": {"prefill": {"maxReplicas": 4}}})["prefill"] == (1, 1, 4)
    with_autoscaler = {"rayAutoscaler": {"enabled": True}, "workerGroups": {"decode": {"replicas": 3}}}
    assert group_sizes(chart, with_autoscaler)["decode"] == (1, 3, 3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workerGroups": {"prefill": {"minReplicas": 3, "maxReplicas": 2}}},
         "workerGroups.prefill: minReplicas 3 is greater than maxReplicas 2 (minReplicas, maxReplicas set"),
        ({"workerGroups": {"decode": {"replicas": 5, "maxReplicas": 4}}},
         "workerGroups.decode: replicas 5 is outside minReplicas 4 .. maxReplicas 4 (replicas, maxReplicas set, the rest derived from tandem.decode.replicas and enginesPerPod 1): KubeRay would silently run 4 pods"),
        ({"workerGroups": {"decode": {"replicas": 1, "minReplicas": 2, "maxReplicas": 4}}},
         "workerGroups.decode: replicas 1 is outside minReplicas 2 .. maxReplicas 4 (replicas, minReplicas, maxReplicas set, the rest derived from tandem.decode.replicas and enginesPerPod 1): KubeRay would silently run 2 pods"),
        ({"tandem": {"prefill": {"replicas": 3}}, "workerGroups": {"prefill": {"replicas": 1}}},
         "workerGroups.prefill: replicas 1 x enginesPerPod 1 hosts 1 engines, but tandem.prefill.replicas asks for 3 and the Ray autoscaler is off"),
        ({"tandem": {"prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 8}}}, "workerGroups": {"prefill": {"maxReplicas": 2}}},
         "workerGroups.prefill: maxReplicas 2 x enginesPerPod 1 hosts 2 engines, but tandem.prefill.autoscaling asks for up to 8"),
        ({"tandem": {"prefill": {"replicas": 0}}}, "tandem.prefill.replicas: Tandem needs at least one prefill engine"),
        ({"tandem": {"decode": {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}}},
         "tandem.decode.autoscaling: Tandem needs at least one decode engine"),
        ({"tandem": {"decode": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
         "tandem.decode.autoscaling: min_replicas 3 is greater than max_replicas 2"),
    ],
    ids=["min-over-max", "replicas-over-max", "replicas-under-min", "too-few-pods", "too-few-max-pods",
         "no-engines", "autoscaled-to-zero", "engine-min-over-max"],
)
def test_pod_counts_are_checked_at_render_time(chart, values, message):
    assert message in render_error(chart, values)


def test_zero_engines_is_what_tandem_refuses_too():
    """The render-time check above mirrors the settings model's own rule."""
    with pytest.raises(ValueError, match="at least one prefill and one decode replica"):
        TandemSettings(prefill={"replicas": 0})


def test_schema_refuses_impossible_pod_counts(chart):
    assert "at '/workerGroups/prefill/maxReplicas'" in render_error(chart, {"workerGroups": {"prefill": {"maxReplicas": 0}}})
    assert "at '/workerGroups/prefill/replicas'" in render_error(chart, {"workerGroups": {"prefill": {"replicas": -1}}})


@pytest.mark.parametrize("release", ["1st-llm", "llm.v2", "9"])
def test_release_names_helm_accepts_but_kuberay_refuses_fail_at_render(chart, release):
    helm_python.validate_release_name(release)  # Helm itself takes it
    message = render_error(chart, {}, name=release)
    assert "is not a DNS-1035 label" in message and f'the release name "{release}"' in message
    assert "fullnameOverride" in message
    # The way out the message names works.
    assert one(render(chart, {"fullnameOverride": "llm-v2"}, name=release), "RayService")["metadata"]["name"] == "llm-v2"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fullnameOverride": "t" * 41}, "at '/fullnameOverride'"),
        ({"fullnameOverride": "Tandem"}, "at '/fullnameOverride'"),
        ({"fullnameOverride": "llm.v2"}, "at '/fullnameOverride'"),
        ({"nameOverride": "LLM"}, "at '/nameOverride'"),
    ],
)
def test_bad_name_overrides_fail(chart, values, message):
    assert message in render_error(chart, values)


def test_long_release_names_are_cut_to_a_valid_name(chart):
    docs = render(chart, name=LONG_RELEASE)
    name = one(docs, "RayService")["metadata"]["name"]
    assert name == LONG_RELEASE[:40].rstrip("-") and DNS1035_LABEL.match(name)
    assert one(docs, "StatefulSet")["metadata"]["name"] == f"{name}-redis"


def test_numeric_image_tags_are_refused_not_rounded(chart):
    """`tag: 1.10` in a values file is the number 1.1 to YAML: refuse it instead of pulling
    the wrong image. Quoted, it is used as written."""
    values = helm_python.values_from_yaml("image:\n  repository: registry.example.com/tandem\n  tag: 1.10\n")
    assert values["image"]["tag"] == 1.1
    assert "at '/image/tag'" in render_error(chart, values)
    values = helm_python.values_from_yaml('image:\n  repository: registry.example.com/tandem\n  tag: "1.10"\n')
    for template in pod_specs(one(render(chart, values), "RayService")).values():
        assert template["spec"]["containers"][0]["image"] == "registry.example.com/tandem:1.10"
    assert "at '/redis/internal/image/tag'" in render_error(chart, {"redis": {"internal": {"image": {"tag": 7.4}}}})


def test_image_defaults_to_the_app_version_and_takes_a_digest(chart):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    rayservice = one(render(chart), "RayService")
    assert {t["spec"]["containers"][0]["image"] for t in pod_specs(rayservice).values()} == {f"tandem:{app_version}"}
    digest = "sha256:" + "ab" * 32
    rayservice = one(render(chart, {"image": {"tag": "0.1.0", "digest": digest}}), "RayService")
    assert {t["spec"]["containers"][0]["image"] for t in pod_specs(rayservice).values()} == {f"tandem@{digest}"}
    assert "at '/image/digest'" in render_error(chart, {"image": {"digest": "latest"}})


def test_ray_ports_come_from_one_place(chart):
    """The dashboard and metrics ports: rayStartParams, read once, for the container ports
    (KubeRay's head Service and its dashboard client use the port named "dashboard"), the
    NetworkPolicy and the startup probe."""
    values = {
        "head": {"rayStartParams": {"num-cpus": "2", "dashboard-port": 8266, "metrics-export-port": "9090",
                                    "dashboard-agent-listen-port": "52400"}},
        "workerGroups": {"prefill": {"rayStartParams": {"metrics-export-port": "9091"}},
                         "decode": {"rayStartParams": {"metrics-export-port": "9092"}}},
        "serviceMonitor": {"enabled": True},
    }
    docs = render(chart, values)
    rayservice = one(docs, "RayService")
    head = pod_specs(rayservice)["head"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert ports["dashboard"] == 8266 and ports["metrics"] == 9090
    assert head["startupProbe"]["httpGet"]["port"] == 52400
    prefill = pod_specs(rayservice)["prefill"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in prefill["ports"]}["metrics"] == 9091
    policy = one(docs, "NetworkPolicy", "demo-tandem-ray")
    opened = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
    assert {8266, 9090, 9091, 9092} <= opened and not {8265, 8080} & opened
    assert "8265" not in json.dumps(docs) and '"8080"' not in json.dumps(docs)
    assert "head.rayStartParams.dashboard-port is \"lots\"" in render_error(
        chart, {"head": {"rayStartParams": {"dashboard-port": "lots"}}})


# Pod-level fields ----------------------------------------------------------------------------


def test_pod_fields_reach_every_ray_pod(chart):
    docs = render(chart, merge(GPU, POD_FIELDS))
    rayservice = one(docs, "RayService")
    templates = pod_specs(rayservice)
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["name"] == "demo-tandem"
    assert account["metadata"]["annotations"] == POD_FIELDS["serviceAccount"]["annotations"]
    for group, template in templates.items():
        spec = template["spec"]
        assert spec["serviceAccountName"] == "demo-tandem"
        assert spec["securityContext"] == POD_FIELDS["podSecurityContext"]
        assert spec["containers"][0]["securityContext"] == POD_FIELDS["containerSecurityContext"]
        assert spec["priorityClassName"] == ("inference-critical" if group == "head" else "inference")
        # The GPU runtime class on the GPU groups only.
        assert spec.get("runtimeClassName") == (None if group == "head" else "nvidia")
        (constraint,) = spec["topologySpreadConstraints"]
        # No labelSelector given: the group's own pods.
        assert constraint["labelSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": group}
        assert constraint["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert templates["head"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert templates["prefill"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert templates["prefill"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 120
    redis = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert "priorityClassName" not in redis  # "" : none for Redis
    assert redis["automountServiceAccountToken"] is False
    assert redis["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_existing_service_account_and_empty_overrides(chart):
    values = {"serviceAccount": {"name": "ray-pods"}, "priorityClassName": "inference",
              "workerGroups": {"decode": {"priorityClassName": "", "podSecurityContext": {}}}}
    docs = render(chart, values)
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    templates = pod_specs(one(docs, "RayService"))
    assert {t["spec"]["serviceAccountName"] for t in templates.values()} == {"ray-pods"}
    assert "priorityClassName" not in templates["decode"]["spec"] and "securityContext" not in templates["decode"]["spec"]
    assert templates["prefill"]["spec"]["priorityClassName"] == "inference"


def test_gpu_groups_tolerate_gpu_taints_by_default(chart):
    templates = pod_specs(one(render(chart, GPU_DEFAULTS), "RayService"))
    for role in ("prefill", "decode"):
        assert templates[role]["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "tolerations" not in templates["head"]["spec"]
    # A group's own tolerations come first; an identical GPU one is not repeated.
    templates = pod_specs(one(render(chart, merge(GPU, {"workerGroups": {"prefill": {"tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}})), "RayService"))
    assert [t["key"] for t in templates["prefill"]["spec"]["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    # CPU groups get none.
    assert all("tolerations" not in t["spec"] for t in pod_specs(one(render(chart), "RayService")).values())
    # Another vendor's GPUs: the resource and the tolerations follow gpu.*.
    amd = merge(GPU_DEFAULTS, {"gpu": {"resourceName": "amd.com/gpu", "tolerations": [{"key": "amd.com/gpu", "operator": "Exists"}]}})
    container = pod_specs(one(render(chart, amd), "RayService"))["decode"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["amd.com/gpu"] == 1 and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "at '/gpu/resourceName'" in render_error(chart, {"gpu": {"resourceName": "example.com/fpga"}})


def serve_engine_grace_margin() -> int:
    """Serve's graceful_shutdown_timeout_s of an engine is drain_grace_s + this
    (control_plane/app.py): read there, so that the chart follows if it changes."""
    source = (REPO / "control_plane" / "app.py").read_text()
    margins = [int(m) for m in re.findall(r"graceful_shutdown_timeout_s=settings\.routing\.drain_grace_s \+ (\d+)", source)]
    assert margins, "graceful_shutdown_timeout_s not found in control_plane/app.py"
    return max(margins)


@pytest.mark.parametrize("drain", [60, 15, 300])
def test_workers_outlive_serve_graceful_shutdown(chart, drain):
    templates = pod_specs(one(render(chart, {"tandem": {"routing": {"drain_grace_s": drain}}}), "RayService"))
    for group, template in templates.items():
        grace = template["spec"]["terminationGracePeriodSeconds"]
        if group == "head":
            assert grace > drain  # the preStop drain runs for drain_grace_s
        else:
            assert grace >= drain + serve_engine_grace_margin(), group
    assert "workerGroups.decode.terminationGracePeriodSeconds 30 is shorter than Serve's graceful shutdown" in render_error(
        chart, {"workerGroups": {"decode": {"terminationGracePeriodSeconds": 30}}})
    assert "head.terminationGracePeriodSeconds 10 is shorter than tandem.routing.drain_grace_s 60" in render_error(
        chart, {"head": {"terminationGracePeriodSeconds": 10}})


def test_startup_probe_covers_a_slow_first_start(chart):
    templates = pod_specs(one(render(chart), "RayService"))
    for template in templates.values():
        probe = template["spec"]["containers"][0]["startupProbe"]
        assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}  # Ray >= 2.53's endpoint
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
        # KubeRay's own liveness/readiness probes are still injected (the chart sets none).
        assert "livenessProbe" not in template["spec"]["containers"][0]
    # Older Ray: KubeRay's own exec check of the raylet through the agent.
    older_ray = pod_specs(one(render(chart, {"rayVersion": "2.46.0"}), "RayService"))
    assert older_ray["head"]["spec"]["containers"][0]["startupProbe"]["exec"]["command"] == [
        "bash", "-c", "wget --tries 1 -T 5 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"]
    off = pod_specs(one(render(chart, {"rayStartupProbe": {"enabled": False}}), "RayService"))
    assert all("startupProbe" not in t["spec"]["containers"][0] for t in off.values())


def test_kuberay_reserved_settings_fail_at_render(chart):
    cases = [
        ({"head": {"env": [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]}}, "RAY_enable_autoscaler_v2 in head.env or extraEnv"),
        ({"extraEnv": [{"name": "REDIS_PASSWORD", "value": "x"}]}, "REDIS_PASSWORD in head.env or extraEnv"),
        ({"head": {"rayStartParams": {"redis-password": "x"}}}, "head.rayStartParams.redis-password: KubeRay rejects it"),
        ({"workerGroups": {"decode": {"rayStartParams": {"labels": "a=b"}}}}, "workerGroups.decode rayStartParams.labels"),
        ({"extraEnv": [{"name": "TANDEM_REDIS_URL", "value": "redis://x"}]}, 'name "TANDEM_REDIS_URL" appears twice'),
        ({"kubeRayVersion": "1.2.2"}, "the chart needs the KubeRay operator 1.3.0 or newer"),
    ]
    for values, message in cases:
        assert message in render_error(chart, values), values


# Secrets ---------------------------------------------------------------------------------------


def chart_secrets(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}


def test_generated_secrets_change_at_every_offline_render(chart):
    """Why GitOps needs generateSecrets: false: without a cluster, `lookup` finds nothing and
    every render generates new values (a real `helm upgrade` reads the old ones back)."""
    first, second = chart_secrets(render(chart)), chart_secrets(render(chart))
    assert set(first) == {"demo-tandem-api-key", "demo-tandem-kv", "demo-tandem-redis-auth"}
    assert all(first[name] != second[name] for name in first)


@pytest.mark.parametrize("case", ["gitops-existing-secrets", "secret-values"])
def test_supplied_secrets_are_stable(chart, case):
    values = MATRIX[case][0]
    first, second = render(chart, values), render(chart, values)
    assert first == second  # byte-for-byte the same manifests: nothing for Argo CD to re-sync
    if case == "gitops-existing-secrets":
        assert chart_secrets(first) == {}
        refs = {
            json.dumps(entry["valueFrom"]["secretKeyRef"], sort_keys=True)
            for template in pod_specs(one(first, "RayService")).values()
            for entry in template["spec"]["containers"][0]["env"] if "valueFrom" in entry
        }
        assert refs == {json.dumps(ref, sort_keys=True) for ref in (
            {"name": "tandem-keys", "key": "key"}, {"name": "tandem-kv", "key": "kv-secret"},
            {"name": "tandem-redis", "key": "password"})}
    else:
        import base64
        secrets = {name: {k: base64.b64decode(v).decode() for k, v in data.items()} for name, data in chart_secrets(first).items()}
        assert secrets == {"demo-tandem-api-key": {"api-key": "tk-0123456789abcdef"},
                           "demo-tandem-kv": {"kv-secret": "k" * 48},
                           "demo-tandem-redis-auth": {"redis-password": "Redis-Pa55word_1"}}


def test_gitops_mode_names_every_missing_secret(chart):
    message = render_error(chart, {"generateSecrets": False})
    assert "generateSecrets is false and no API key is given: set auth.existingSecret (your Secret) or auth.apiKey" in message
    message = render_error(chart, {"generateSecrets": False, "auth": {"apiKey": "tk-x"}})
    assert "no KV secret is given: set auth.kvExistingSecret (your Secret) or auth.kvSecret" in message
    message = render_error(chart, {"generateSecrets": False, "auth": {"apiKey": "tk-x", "kvSecret": "k" * 32}})
    assert "no Redis password is given: set redis.internal.auth.existingSecret (your Secret) or redis.internal.auth.password" in message
    # No internal Redis password needed: nothing missing.
    render(chart, {"generateSecrets": False, "auth": {"apiKey": "tk-x", "kvSecret": "k" * 32},
                   "redis": {"internal": {"auth": {"enabled": False}}}})
    assert "auth.kvSecret must be at least 32 characters" in render_error(chart, {"auth": {"kvSecret": "short"}})
    assert "at '/redis/internal/auth/password'" in render_error(chart, {"redis": {"internal": {"auth": {"password": "p@ss"}}}})


# Upgrades and disruption budgets -------------------------------------------------------------


def test_upgrade_strategies(chart):
    assert one(render(chart), "RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert one(render(chart, {"upgradeStrategy": {"type": "None"}}), "RayService")["spec"]["upgradeStrategy"] == {"type": "None"}
    spec = one(render(chart, INCREMENTAL_UPGRADE, kuberay="1.6.2"), "RayService")["spec"]
    assert spec["upgradeStrategy"] == INCREMENTAL_UPGRADE["upgradeStrategy"]
    incremental = INCREMENTAL_UPGRADE["upgradeStrategy"]
    cases = [
        ({"upgradeStrategy": incremental}, "1.6.2", "needs the Ray autoscaler"),
        (INCREMENTAL_UPGRADE, "1.4.0", "needs KubeRay >= 1.5.0 (kubeRayVersion is 1.4.0)"),
        (merge(RAY_AUTOSCALER, {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}), "1.6.2",
         "needs upgradeStrategy.clusterUpgradeOptions.gatewayClassName"),
        (merge(INCREMENTAL_UPGRADE, {"upgradeStrategy": {"clusterUpgradeOptions": {"stepSizePercent": 80}}}), "1.6.2",
         "stepSizePercent must be <= maxSurgePercent"),
        ({"upgradeStrategy": {"clusterUpgradeOptions": {"gatewayClassName": "x"}}}, "1.6.2",
         "clusterUpgradeOptions is only read with upgradeStrategy.type NewClusterWithIncrementalUpgrade"),
    ]
    for values, version, message in cases:
        assert message in render_error(chart, values, kuberay=version), message


def test_notes_warn_when_an_upgrade_needs_twice_the_gpus(chart):
    notes = chart.render(values=GPU, name="demo", namespace=NAMESPACE, is_install=True)["tandem/templates/NOTES.txt"]
    assert "2 more GPU(s)" in notes and "nvidia.com/gpu" in notes
    notes = chart.render(values=merge(GPU, {"upgradeStrategy": {"type": "None"}}), name="demo", namespace=NAMESPACE,
                         is_install=True)["tandem/templates/NOTES.txt"]
    assert "more GPU" not in notes
    assert "more GPU" not in chart.render(values={}, name="demo", namespace=NAMESPACE, is_install=True)["tandem/templates/NOTES.txt"]


def test_disruption_budgets_never_block_a_drain_by_default(chart):
    budgets = [d for d in render(chart) if d["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"] for b in budgets} == {f"demo-tandem-{c}" for c in ("head", "prefill", "decode", "redis")}
    for budget in budgets:
        assert budget["spec"]["maxUnavailable"] not in (0, "0%"), budget["metadata"]["name"]
    # Blocking is still possible, on purpose.
    budgets = [d for d in render(chart, {"podDisruptionBudget": {"head": {"maxUnavailable": 0}, "workers": {"maxUnavailable": "25%"}}})
               if d["kind"] == "PodDisruptionBudget"]
    assert {b["metadata"]["name"]: b["spec"]["maxUnavailable"] for b in budgets}["demo-tandem-head"] == 0
    assert "at '/podDisruptionBudget/workers/maxUnavailable'" in render_error(chart, {"podDisruptionBudget": {"workers": {"maxUnavailable": "lots"}}})
