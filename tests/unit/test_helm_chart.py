"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK; no
helm binary, no cluster).

For the default values and each variant: every core Kubernetes object (and the pod templates
and Service inside the RayService) validates against Kubernetes' schemas, the RayService's
serveConfigV2 builds Tandem's settings with the same loader as the CLI, placement resources
line up between engines and pods, and the objects reference each other by the right names.
Bad values fail at install with a message that names the value.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from control_plane.settings import TandemSettings, WorkerSettings, load_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "tandem"
RELEASE = "demo"
NAMESPACE = "serving"
FULLNAME = "demo-tandem"
# The chart's kubeVersion floor and the newest schema kubernetes-validate ships with.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# Custom resources: checked structurally here (their CRDs are not in kubernetes-validate).
CUSTOM_KINDS = {"RayService", "ServiceMonitor"}

GPU = {
    "tandem": {
        "model": {"path": "Qwen/Qwen2.5-7B-Instruct", "served_name": "qwen2.5-7b-instruct", "max_model_len": 8192},
        "prefill": {"num_gpus": 1, "cpu_threads": None, "engine_args": {"gpu_memory_utilization": 0.9}},
        "decode": {"num_gpus": 1, "cpu_threads": None, "engine_args": {"gpu_memory_utilization": 0.9}},
        "kv_connector": {"buffer_device": "cuda"},
    },
    "workerGroups": {
        role: {
            "gpus": 1,
            "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"cpu": "8", "memory": "64Gi"}},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
        for role in ("prefill", "decode")
    },
    "huggingface": {"tokenSecret": "hf-token"},
}
EXTERNAL_REDIS_URL = {
    "redis": {"mode": "external", "external": {"url": "redis://:s3cret@redis.data.svc.cluster.local:6380/2"}},
    "gcsFaultTolerance": {"enabled": True, "redisPasswordSecret": "redis-password"},
}
EXTERNAL_REDIS_SECRET = {
    "redis": {"mode": "external", "external": {"existingSecret": "tandem-redis", "existingSecretKey": "url"}},
    "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis.data.svc.cluster.local:6379"},
}
RAY_AUTOSCALER = {
    "tandem": {"prefill": {"replicas": 2}, "decode": {"replicas": 3}},
    "workerGroups": {"prefill": {"maxReplicas": 4}, "decode": {"enginesPerPod": 2, "maxReplicas": 6}},
    "rayAutoscaler": {"enabled": True},
}
SERVE_AUTOSCALING = {
    "tandem": {
        "prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}},
        "decode": {"autoscaling": {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 32}},
    },
    "workerGroups": {"decode": {"enginesPerPod": 2}},
}
NIXL = {
    "tandem": {"kv_connector": {"transport": "nixl"}},
    "workerGroups": {
        role: {
            "rdmaResources": {"rdma/rdma_shared_device_a": 1},
            "env": [{"name": "UCX_TLS", "value": "rc,tcp"}],
        }
        for role in ("prefill", "decode")
    },
}
COLOCATED = {"tandem": {"mode": "colocated", "colocated": {"replicas": 2, "cpu_threads": 4}}}
EVERYTHING_ON = {
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["llm.example.local"], "secretName": "tls"}],
                "hosts": [{"host": "llm.example.local", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "auth": {"existingSecret": "my-keys", "existingSecretKey": "key"},
    "redis": {"internal": {"persistence": {"enabled": False}}},
    "gcsFaultTolerance": {"enabled": True},
    "tandem": {"route_prefix": "/llm", "routing": {"prefill_router": "prefix_tree",
                                                    "prefill_router_options": {"cache_threshold": 0.5}}},
    "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
    "extraVolumeMounts": [{"name": "models", "mountPath": "/models"}],
    "extraEnv": [{"name": "HF_HOME", "value": "/models"}],
    "podLabels": {"team": "llm"},
    "podAnnotations": {"example.local/owner": "llm-team"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "head": {"readinessProbe": {"httpGet": {"path": "/api/healthz", "port": 52365}, "periodSeconds": 5}},
}

SERVE_AUTOSCALING_PENDING = "autoscaling" not in WorkerSettings.model_fields

VARIANTS = {
    "default": {},
    "gpu": GPU,
    "external-redis-url": EXTERNAL_REDIS_URL,
    "external-redis-secret": EXTERNAL_REDIS_SECRET,
    "ray-autoscaler": RAY_AUTOSCALER,
    "serve-autoscaling": pytest.param(
        SERVE_AUTOSCALING,
        marks=pytest.mark.skipif(
            SERVE_AUTOSCALING_PENDING,
            reason="WorkerSettings.autoscaling is not in the settings model yet",
        ),
    ),
    "nixl": NIXL,
    "colocated": COLOCATED,
    "everything-on": EVERYTHING_ON,
}


# Rendering -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [
        document
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def settings_from_rayservice(rayservice: dict[str, Any]) -> TandemSettings:
    """Build settings the way Serve's call of build_app(args) does, with no TANDEM_* env of
    this machine leaking in."""
    (application,) = serve_config(rayservice)["applications"]
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("TANDEM_")}
    try:
        return load_settings(None, **copy.deepcopy(application["args"]))
    finally:
        os.environ.update(saved)


def pod_specs(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod templates by group: "head" and each worker group's name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    return templates


def env_of(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in template["spec"]["containers"][0].get("env", [])}


def ray_custom_resources(group: dict[str, Any]) -> dict[str, float]:
    # rayStartParams.resources is `ray start --resources`, a JSON object in quotes.
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Every variant ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(VARIANTS.values()), ids=list(VARIANTS))
def variant(request, chart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = request.param
    return merge(chart.values, values), objects(render(chart, values))


def test_core_objects_are_valid_kubernetes(variant):
    _, docs = variant
    assert {"RayService", "ConfigMap", "PodDisruptionBudget"} <= {doc["kind"] for doc in docs}
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_objects_inside_the_rayservice_are_valid_kubernetes(variant):
    """The pod templates and the serve Service are core objects KubeRay creates as is."""
    _, docs = variant
    rayservice = one(docs, "RayService")
    embedded = [rayservice["spec"]["serveService"]]
    for group, template in pod_specs(rayservice).items():
        metadata = {**template["metadata"], "name": f"{FULLNAME}-{group}"}
        embedded.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    for doc in embedded:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_rayservice_structure(variant):
    values, docs = variant
    rayservice = one(docs, "RayService", FULLNAME)
    assert rayservice["apiVersion"] == "ray.io/v1"
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == values["rayVersion"]
    expected_groups = ["colocated"] if values["tandem"]["mode"] == "colocated" else ["prefill", "decode"]
    assert [group["groupName"] for group in cluster["workerGroupSpecs"]] == expected_groups
    head = cluster["headGroupSpec"]
    assert all(isinstance(value, str) for value in head["rayStartParams"].values())
    for template in pod_specs(rayservice).values():
        (container,) = template["spec"]["containers"]
        assert container["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        (shm,) = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert "serve" in {port["name"] for port in container["ports"]}
        assert container["resources"]["limits"] and container["resources"]["requests"]
    assert rayservice["spec"]["serveService"]["spec"]["ports"][0]["name"] == "serve"


def test_serve_config_builds_tandem_settings(variant):
    """serveConfigV2 is what Serve hands to control_plane.app:build_app: its args must pass
    the same settings model (and loader) as `tandem up`."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    config = serve_config(rayservice)
    assert config["http_options"] == {"host": "0.0.0.0", "port": values["serve"]["port"]}
    (application,) = config["applications"]
    assert application["import_path"] == "control_plane.app:build_app"
    settings = settings_from_rayservice(rayservice)
    assert application["name"] == settings.app_name
    assert application["route_prefix"] == settings.route_prefix
    assert settings.host == "0.0.0.0" and settings.port == values["serve"]["port"]
    # What the values asked for arrives unchanged.
    tandem_values = values["tandem"]
    assert settings.mode == tandem_values["mode"]
    assert settings.kv_connector.transport == tandem_values["kv_connector"]["transport"]
    assert settings.routing.prefill_router == tandem_values["routing"]["prefill_router"]
    for role in settings.roles():
        for field, wanted in tandem_values.get(role, {}).items():
            if field != "autoscaling":
                assert getattr(settings.worker(role), field) == wanted, (role, field)


def test_engines_are_placed_on_their_own_worker_group(variant):
    """Each engine asks for one `tandem_<role>` unit; only that role's pods advertise it,
    enough of them for every engine (the head advertises none)."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    settings = settings_from_rayservice(rayservice)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]
    for group in cluster["workerGroupSpecs"]:
        role = group["groupName"]
        worker = settings.worker(role)
        assert worker.ray_resources == {f"tandem_{role}": 1}
        per_pod = values["workerGroups"][role]["enginesPerPod"]
        assert ray_custom_resources(group) == {f"tandem_{role}": per_pod}
        autoscaling = getattr(worker, "autoscaling", None)
        max_engines = autoscaling.max_replicas if autoscaling else worker.replicas
        assert group["maxReplicas"] * per_pod >= max_engines
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= worker.num_gpus * per_pod


def test_redis_wiring(variant):
    """Tandem finds Redis through its settings (a plain URL) or TANDEM_REDIS_URL from a
    Secret in every Ray pod, so wherever Serve runs the app builder it never falls back to
    an embedded Redis."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    settings = settings_from_rayservice(rayservice)
    redis = values["redis"]
    templates = pod_specs(rayservice).values()
    if redis["mode"] == "internal":
        statefulset = one(docs, "StatefulSet", f"{FULLNAME}-redis")
        service = one(docs, "Service", f"{FULLNAME}-redis")
        assert settings.redis_url == f"redis://{FULLNAME}-redis:6379/0"
        assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
        claims = statefulset["spec"].get("volumeClaimTemplates", [])
        assert bool(claims) == redis["internal"]["persistence"]["enabled"]
        assert "--appendonly" in statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    elif redis["external"]["url"]:
        assert not [d for d in docs if d["kind"] == "StatefulSet"]
        assert settings.redis_url == redis["external"]["url"]
    else:
        assert settings.redis_url is None  # comes from the Secret, per pod:
        for template in templates:
            secret_ref = env_of(template)["TANDEM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert secret_ref == {"name": redis["external"]["existingSecret"], "key": redis["external"]["existingSecretKey"]}
        return
    # `tandem status` / `tandem keys` run in a pod find the same Redis through env.
    for template in templates:
        assert env_of(template)["TANDEM_REDIS_URL"]["value"] == settings.redis_url


def test_gcs_fault_tolerance_uses_the_same_redis(variant):
    values, docs = variant
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    options = cluster.get("gcsFaultToleranceOptions")
    if not values["gcsFaultTolerance"]["enabled"]:
        assert options is None
        return
    redis = values["redis"]
    if values["gcsFaultTolerance"]["redisAddress"]:
        expected = values["gcsFaultTolerance"]["redisAddress"]
    elif redis["mode"] == "internal":
        expected = f"{FULLNAME}-redis:6379"
    else:
        expected = "redis.data.svc.cluster.local:6380"  # the external URL's host:port
    assert options["redisAddress"] == expected
    if values["gcsFaultTolerance"]["redisPasswordSecret"]:
        assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == values["gcsFaultTolerance"]["redisPasswordSecret"]


def test_api_key_reaches_the_settings(variant):
    """The key Secret becomes TANDEM_AUTH__API_KEYS (a JSON list) in every Ray pod."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    auth = values["auth"]
    secret_name = auth["existingSecret"] or f"{FULLNAME}-api-key"
    secret_key = auth["existingSecretKey"] if auth["existingSecret"] else "api-key"
    if not auth["existingSecret"]:
        secret = one(docs, "Secret", secret_name)
        assert base64.b64decode(secret["data"]["api-key"]).decode().startswith("tk-")
    for template in pod_specs(rayservice).values():
        env = env_of(template)
        assert env["ENDPOINT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": secret_key}
        assert env["TANDEM_AUTH__API_KEYS"]["value"] == '["$(ENDPOINT_API_KEY)"]'
    # Kubernetes expands $(ENDPOINT_API_KEY); the settings then read the list from env.
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("TANDEM_")}
    os.environ["TANDEM_AUTH__API_KEYS"] = '["tk-from-secret"]'
    try:
        (application,) = serve_config(rayservice)["applications"]
        settings = load_settings(None, **copy.deepcopy(application["args"]))
    finally:
        os.environ.pop("TANDEM_AUTH__API_KEYS")
        os.environ.update(saved)
    assert settings.auth.api_keys == ["tk-from-secret"] and settings.auth_required


def test_kv_secret_reaches_every_pod(variant):
    """The cluster's KV secret (generated once, or yours) is in every Ray pod's env, where
    the settings read it as kv_connector.auth_secret."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    name = values["auth"].get("kvExistingSecret") or f"{FULLNAME}-kv"
    if not values["auth"].get("kvExistingSecret"):
        assert len(base64.b64decode(one(docs, "Secret", name)["data"]["kv-secret"])) >= 32
    for template in pod_specs(rayservice).values():
        assert env_of(template)["TANDEM_KV_CONNECTOR__AUTH_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == name


def test_selectors_match_pods(variant):
    """PDBs, the metrics Service and the ServiceMonitor select what they are meant to."""
    values, docs = variant
    rayservice = one(docs, "RayService")
    pods = {group: template["metadata"]["labels"] for group, template in pod_specs(rayservice).items()}
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [group for group, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) <= 1, (budget["metadata"]["name"], matched)
        covered.update(matched)
    assert covered == set(pods)
    if values["serviceMonitor"]["enabled"]:
        service = one(docs, "Service", f"{FULLNAME}-metrics")
        assert service["spec"]["selector"].items() <= pods["head"].items()
        monitor = one(docs, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        settings = settings_from_rayservice(rayservice)
        assert endpoint["path"] == settings.route_prefix.rstrip("/") + "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    else:
        assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


def test_ingress_targets_the_openai_service(variant):
    values, docs = variant
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    if not values["ingress"]["enabled"]:
        assert not ingresses
        return
    serve_service = one(docs, "RayService")["spec"]["serveService"]
    (ingress,) = ingresses
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": serve_service["metadata"]["name"], "port": {"name": "serve"}}


def test_dashboard_configmap_holds_the_dashboard(variant):
    _, docs = variant
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["tandem.json"]) == json.loads((CHART / "dashboards" / "tandem.json").read_text())


# Specific variants -----------------------------------------------------------------------------


def test_gpu_and_rdma_resources(chart):
    docs = objects(render(chart, merge(GPU, NIXL)))
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        for bucket in ("limits", "requests"):
            assert container["resources"][bucket]["nvidia.com/gpu"] == 1
            assert container["resources"][bucket]["rdma/rdma_shared_device_a"] == 1
        assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert env_of(group["template"])["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
        assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_ray_autoscaler_sizes_worker_groups(chart):
    rayservice = one(objects(render(chart, RAY_AUTOSCALER)), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    sizes = {g["groupName"]: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    # 2 prefill engines, 1 per pod; 3 decode engines, 2 per pod -> 2 pods.
    assert sizes == {"prefill": (2, 2, 4), "decode": (2, 2, 6)}


@pytest.mark.skipif(SERVE_AUTOSCALING_PENDING, reason="WorkerSettings.autoscaling is not in the settings model yet")
def test_serve_autoscaling_turns_on_ray_autoscaler(chart):
    rayservice = one(objects(render(chart, SERVE_AUTOSCALING)), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    sizes = {g["groupName"]: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    # prefill 1..4 engines, 1 per pod; decode 2..8 engines, 2 per pod.
    assert sizes == {"prefill": (1, 1, 4), "decode": (1, 1, 4)}
    settings = settings_from_rayservice(rayservice)
    assert settings.prefill.autoscaling.max_replicas == 4


def test_default_is_cpu_only_and_unscaled(chart):
    cluster = one(objects(render(chart)), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False
    assert "gcsFaultToleranceOptions" not in cluster
    for group in cluster["workerGroupSpecs"]:
        assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 1)


def test_compression_mode_off_stays_a_string(chart):
    """`off` is a YAML 1.1 boolean: the serve config must carry the string Tandem expects."""
    rayservice = one(objects(render(chart)), "RayService")
    assert "mode: \"off\"" in rayservice["spec"]["serveConfigV2"]
    assert settings_from_rayservice(rayservice).kv_connector.compression.mode == "off"


def test_unauthenticated_opt_out(chart):
    docs = objects(render(chart, {"auth": {"allowUnauthenticated": True}}))
    # No API-key Secret; only the KV secret between workers.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{FULLNAME}-kv"]
    rayservice = one(docs, "RayService")
    for template in pod_specs(rayservice).values():
        assert "TANDEM_AUTH__API_KEYS" not in env_of(template)
    settings = settings_from_rayservice(rayservice)
    assert settings.auth.allow_unauthenticated and not settings.auth_required


def test_notes_print_how_to_reach_the_endpoint(chart):
    notes = render(chart)["tandem/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-openai 8000:8000" in notes
    assert "/v1/chat/completions" in notes and "Authorization: Bearer" in notes
    assert '"model":"smollm2-135m-instruct"' in notes
    notes = render(chart, EVERYTHING_ON)["tandem/templates/NOTES.txt"]
    assert "export TANDEM_URL=https://llm.example.local/llm\n" in notes  # the Ingress passes the route prefix
    assert "jsonpath='{.data.key}'" in notes


def test_chart_lints_clean():
    report = helm_python.lint(CHART, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_schema_is_generated_from_the_settings_model():
    """values.schema.json's `tandem` part must be what generate_schema.py makes from
    TandemSettings today (rerun it after changing the settings)."""
    spec = importlib.util.spec_from_file_location("tandem_chart_schema", CHART / "generate_schema.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = (CHART / "values.schema.json").read_text()
    assert committed == generator.dumps(generator.render(json.loads(committed))), (
        "values.schema.json is stale: run python helm/tandem/generate_schema.py"
    )


# Bad values fail at install --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tandem": {"prefill": {"replicas": -1}}}, "at '/tandem/prefill/replicas': minimum: got -1, want 0"),
        ({"tandem": {"kv_connector": {"transport": "carrier-pigeon"}}}, "at '/tandem/kv_connector/transport': value must be one of 'tcp', 'nixl', 'nccl', 'gloo'"),
        ({"tandem": {"prefil": {"replicas": 2}}}, "additional properties 'prefil' not allowed"),
        ({"tandem": {"routing": {"prefill_router": "random"}}}, "at '/tandem/routing/prefill_router'"),
        ({"tandem": {"kv_connector": {"compression": {"mode": False}}}}, "at '/tandem/kv_connector/compression/mode'"),
        ({"tandem": {"redis_url": "redis://elsewhere:6379"}}, "additional properties 'redis_url' not allowed"),
        ({"workerGroups": {"decode": {"gpus": -2}}}, "at '/workerGroups/decode/gpus': minimum: got -2, want 0"),
        ({"workerGroups": {"prefill": {"enginesPerPod": 0}}}, "at '/workerGroups/prefill/enginesPerPod': minimum: got 0, want 1"),
        ({"workerGroups": {"prefill": {"shmSize": "lots"}}}, "at '/workerGroups/prefill/shmSize'"),
        ({"redis": {"mode": "sentinel"}}, "at '/redis/mode': value must be one of 'internal', 'external'"),
        ({"redis": {"external": {"url": "http://redis:6379"}}}, "at '/redis/external/url'"),
        ({"gcsFaultTolerance": {"redisAddress": "redis://redis:6379"}}, "at '/gcsFaultTolerance/redisAddress'"),
        ({"image": {"repository": ""}}, "at '/image/repository'"),
        ({"servicemonitor": {"enabled": True}}, "additional properties 'servicemonitor' not allowed"),
    ],
    ids=[
        "negative-replicas", "unknown-transport", "misspelt-section", "unknown-router",
        "unquoted-off", "chart-owned-field", "negative-gpus", "zero-engines-per-pod",
        "bad-quantity", "unknown-redis-mode", "non-redis-url", "address-not-host-port",
        "empty-image", "misspelt-top-level",
    ],
)
def test_schema_rejects_bad_values(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as error:
        render(chart, values)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"mode": "external"}}, "redis.mode=external needs redis.external.url or redis.external.existingSecret"),
        ({"workerGroups": {"prefill": {"gpus": 1}}}, "workerGroups.prefill.gpus is 1 but tandem.prefill.num_gpus is 0"),
        ({"tandem": {"decode": {"num_gpus": 1}}, "workerGroups": {"decode": {"gpus": 1, "enginesPerPod": 2}}},
         "needs 2 GPUs per pod but workerGroups.decode.gpus is 1"),
        ({"redis": {"mode": "external", "external": {"existingSecret": "r"}}, "gcsFaultTolerance": {"enabled": True}},
         "set gcsFaultTolerance.redisAddress"),
    ],
    ids=["external-redis-without-url", "gpus-unused", "too-few-gpus", "gcs-ft-without-address"],
)
def test_inconsistent_values_fail_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as error:
        render(chart, values)
    assert message in str(error.value)
