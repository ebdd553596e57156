"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK; no
helm binary, no cluster).

For the default values and each variant: every core Kubernetes object (and the pod templates
and Service inside the RayService) validates against Kubernetes' schemas, the RayService's
serveConfigV2 builds Tandem's settings with the same loader as the CLI, placement resources
line up between engines and pods, and the objects reference each other by the right names.
Bad values fail at install with a message that names the value.

test_helm_kuberay.py checks the RayService against KubeRay itself (its CRDs and its spec
checks, per operator version) and the chart's fixes for what KubeRay used to refuse.
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
from redis.connection import SSLConnection, parse_url

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
# TLS to an external Redis: the URL (and its certificate options) reach redis-py unchanged.
EXTERNAL_REDIS_TLS = {
    "redis": {"mode": "external",
              "external": {"url": "rediss://:s3cret@redis.data.svc.cluster.local:6380/0?ssl_cert_reqs=required"}},
}
# The internal Redis's password from your Secret, GCS on it, and every NetworkPolicy knob.
REDIS_OWN_SECRET = {
    "redis": {"internal": {"auth": {"existingSecret": "my-redis", "existingSecretKey": "pw"}}},
    "gcsFaultTolerance": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "networkPolicy": {
        "serve": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]},
        "dashboard": {"enabled": True, "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "kubeRayOperator": {"namespace": "ray-system", "from": [{"ipBlock": {"cidr": "172.20.0.1/32"}}]},
        "metrics": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        "redis": {"from": [{"podSelector": {"matchLabels": {"app": "redis-exporter"}}}]},
    },
}
# Opting out of both: no password, no NetworkPolicy.
REDIS_OPEN = {"redis": {"internal": {"auth": {"enabled": False}}}, "networkPolicy": {"enabled": False}}
# GitOps: nothing generated, every secret from a Secret you manage.
GITOPS = {
    "generateSecrets": False,
    "auth": {"existingSecret": "tandem-keys", "existingSecretKey": "key",
             "kvExistingSecret": "tandem-kv", "kvExistingSecretKey": "secret"},
    "redis": {"internal": {"auth": {"existingSecret": "tandem-redis", "existingSecretKey": "password"}}},
}
EVERYTHING_ON = {
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["llm.example.local"], "secretName": "tls"}],
                "hosts": [{"host": "llm.example.local", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"},
                       "bearerTokenSecret": {"name": "my-keys", "key": "key"}},
    "auth": {"existingSecret": "my-keys", "existingSecretKey": "key"},
    "redis": {"internal": {"persistence": {"enabled": False}}},
    "gcsFaultTolerance": {"enabled": True},
    "tandem": {"route_prefix": "/llm", "routing": {"prefill_router": "prefix_tree",
                                                    "prefill_router_options": {"cache_threshold": 0.5}},
               "auth": {"metrics_require_key": True}},
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
    "external-redis-tls": EXTERNAL_REDIS_TLS,
    "redis-own-secret": REDIS_OWN_SECRET,
    "redis-open": REDIS_OPEN,
    "gitops-secrets": GITOPS,
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


def settings_from_rayservice(rayservice: dict[str, Any], env: dict[str, str] | None = None) -> TandemSettings:
    """Build settings the way Serve's call of build_app(args) does, with no TANDEM_* env of
    this machine leaking in; ``env``: the pod's TANDEM_* env (after Kubernetes expanded it)."""
    (application,) = serve_config(rayservice)["applications"]
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("TANDEM_")}
    os.environ.update(env or {})
    try:
        return load_settings(None, **copy.deepcopy(application["args"]))
    finally:
        for key in env or {}:
            os.environ.pop(key, None)
        os.environ.update(saved)


def pod_specs(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod templates by group: "head" and each worker group's name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    return templates


def env_of(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in template["spec"]["containers"][0].get("env", [])}


def redis_auth_secret(values: dict[str, Any]) -> dict[str, str] | None:
    """The secretKeyRef of the internal Redis's password; None without one."""
    redis = values["redis"]
    if redis["mode"] != "internal" or not redis["internal"]["auth"]["enabled"]:
        return None
    auth = redis["internal"]["auth"]
    if auth["existingSecret"]:
        return {"name": auth["existingSecret"], "key": auth["existingSecretKey"]}
    return {"name": f"{FULLNAME}-redis-auth", "key": "redis-password"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, wanted = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in wanted,
            "NotIn": labels.get(key) not in wanted,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


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
        tag = values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        assert container["image"] == f"{values['image']['repository']}:{tag}"
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
        assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
        claims = statefulset["spec"].get("volumeClaimTemplates", [])
        assert bool(claims) == redis["internal"]["persistence"]["enabled"]
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert "--appendonly" in container["args"]
        readiness = " ".join(container["readinessProbe"]["exec"]["command"])
        assert "redis-cli ping" in readiness and "PONG" in readiness  # NOAUTH or LOADING is not ready
        if redis_auth_secret(values) is not None:
            assert settings.redis_url is None  # the URL holds the password: env only
            check_redis_password_wiring(values, docs, rayservice)
            return
        assert settings.redis_url == f"redis://{FULLNAME}-redis:6379/0"
        assert "command" not in container and "env" not in container
        assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{FULLNAME}-redis-auth"]
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


def check_redis_password_wiring(values, docs, rayservice):
    """The internal Redis requires the Secret's password, its probes log in with it, and every
    Ray pod builds its URL from it by Kubernetes' $(VAR) expansion."""
    ref = redis_auth_secret(values)
    if ref["name"] == f"{FULLNAME}-redis-auth":
        password = base64.b64decode(one(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
        assert len(password) >= 32 and password.isalnum()  # URL-safe as generated
    else:
        assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{FULLNAME}-redis-auth"]
    (container,) = one(docs, "StatefulSet", f"{FULLNAME}-redis")["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    # requirepass from env, through a shell that execs redis-server with the args after it.
    assert container["command"][:2] == ["sh", "-c"]
    assert container["command"][2].endswith('exec redis-server "$@" --requirepass "$REDIS_PASSWORD"')
    assert "--requirepass" not in container["args"]
    # redis-cli in both probes logs in with REDISCLI_AUTH (the same Secret).
    assert env["REDISCLI_AUTH"]["value"] == "$(REDIS_PASSWORD)"
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli" in " ".join(container[probe]["exec"]["command"])
    url = f"redis://:$(REDIS_AUTH_PASSWORD)@{FULLNAME}-redis:6379/0"
    for template in pod_specs(rayservice).values():
        entries = template["spec"]["containers"][0]["env"]
        names = [entry["name"] for entry in entries]
        # Kubernetes expands $(VAR) only from variables defined earlier in the list.
        assert names.index("REDIS_AUTH_PASSWORD") < names.index("TANDEM_REDIS_URL")
        assert "REDIS_PASSWORD" not in names  # KubeRay rejects it on the head with GCS FT
        pod_env = env_of(template)
        assert pod_env["REDIS_AUTH_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
        assert pod_env["TANDEM_REDIS_URL"]["value"] == url
    # Once expanded, the env URL is the one Tandem uses (the args carry none to override it),
    # and redis-py's URL parser hands the password to the client.
    expanded = url.replace("$(REDIS_AUTH_PASSWORD)", "Pa55word")
    assert settings_from_rayservice(rayservice, {"TANDEM_REDIS_URL": expanded}).redis_url == expanded
    parsed = parse_url(expanded)
    assert (parsed["password"], parsed["host"], parsed["port"]) == ("Pa55word", f"{FULLNAME}-redis", 6379)


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
    gcs = values["gcsFaultTolerance"]
    password = options.get("redisPassword")
    if gcs["redisPasswordSecret"]:
        assert password["valueFrom"]["secretKeyRef"] == {"name": gcs["redisPasswordSecret"], "key": gcs["redisPasswordSecretKey"]}
    elif redis_auth_secret(values) and not gcs["redisAddress"]:
        # The internal Redis's password, from its Secret, without being asked.
        assert password == {"valueFrom": {"secretKeyRef": redis_auth_secret(values)}}
    else:
        assert password is None


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
    key = values["auth"]["kvExistingSecretKey"] if values["auth"].get("kvExistingSecret") else "kv-secret"
    for template in pod_specs(rayservice).values():
        assert env_of(template)["TANDEM_KV_CONNECTOR__AUTH_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}


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
        # With /metrics behind the API keys, Prometheus sends one from the named Secret.
        token = values["serviceMonitor"]["bearerTokenSecret"]
        if settings.auth.metrics_require_key:
            assert token, "auth.metrics_require_key without serviceMonitor.bearerTokenSecret"
        if token:
            assert endpoint["authorization"] == {"type": "Bearer", "credentials": token}
        else:
            assert "authorization" not in endpoint
    else:
        assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


def test_network_policies(variant):
    """Redis admits only the release's pods on 6379; the Ray pods admit every port from the
    release's pods and from elsewhere only the serve port, the dashboard for the KubeRay
    operator (and whoever networkPolicy.dashboard names), and the metrics ports with a
    ServiceMonitor. Egress is never restricted."""
    values, docs = variant
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    np = values["networkPolicy"]
    if not np["enabled"]:
        assert not policies
        return
    rayservice = one(docs, "RayService")
    ray_pods = {group: template["metadata"]["labels"] for group, template in pod_specs(rayservice).items()}
    internal = values["redis"]["mode"] == "internal"
    redis_pod = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"] if internal else None
    release_pods = [*ray_pods.values(), *([redis_pod] if internal else [])]
    assert set(policies) == {f"{FULLNAME}-ray", *([f"{FULLNAME}-redis"] if internal else [])}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress open: hub downloads, DNS

    def release_peer(peer):
        return set(peer) == {"podSelector"} and all(selects(peer["podSelector"], labels) for labels in release_pods)

    ray = policies[f"{FULLNAME}-ray"]["spec"]
    assert all(selects(ray["podSelector"], labels) for labels in ray_pods.values())
    assert redis_pod is None or not selects(ray["podSelector"], redis_pod)
    (everything,) = [rule for rule in ray["ingress"] if "ports" not in rule]
    (peer,) = everything["from"]
    assert release_peer(peer)  # Ray's and the KV listeners' random ports: the release only
    # Every other rule names its ports; None: from anywhere.
    opened: dict[int, list] = {}
    for rule in ray["ingress"]:
        for port in rule.get("ports", []):
            assert port["protocol"] == "TCP"
            opened.setdefault(port["port"], []).append(rule.get("from"))
    serve_port = values["serve"]["port"]
    assert rayservice["spec"]["serveService"]["spec"]["ports"][0]["targetPort"] == serve_port
    assert (np["serve"]["from"] or None) in opened[serve_port]
    dashboard = opened.pop(8265)
    assert operator_peers(np["kubeRayOperator"]) in dashboard
    assert len(dashboard) == 1 + bool(np["dashboard"]["enabled"])
    if np["dashboard"]["enabled"]:
        assert (np["dashboard"]["from"] or None) in dashboard
    metrics = opened.pop(8080, None)
    if values["serviceMonitor"]["enabled"]:
        assert metrics == [np["metrics"]["from"] or None]
        assert (np["metrics"]["from"] or None) in opened[serve_port]
    else:
        assert metrics is None and len(opened[serve_port]) == 1
    assert set(opened) == {serve_port}
    if internal:
        redis = policies[f"{FULLNAME}-redis"]["spec"]
        assert selects(redis["podSelector"], redis_pod)
        assert not any(selects(redis["podSelector"], labels) for labels in ray_pods.values())
        (rule,) = redis["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
        assert release_peer(rule["from"][0]) and rule["from"][1:] == np["redis"]["from"]


def operator_peers(operator: dict[str, Any]) -> list[dict[str, Any]]:
    """The peers the dashboard port admits for the KubeRay operator: its pods by label AND in
    its namespace (one peer), then the extra ones."""
    pinned = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator["namespace"]}},
              "podSelector": {"matchLabels": operator["podLabels"]}}
    return ([pinned] if operator["namespace"] else []) + operator["from"]


def dashboard_peers(values: dict[str, Any] | None, chart) -> list[list[dict[str, Any]] | None]:
    ray = one(objects(render(chart, values)), "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    return [rule.get("from") for rule in ray["ingress"] if {"protocol": "TCP", "port": 8265} in rule.get("ports", [])]


def test_only_the_operator_in_its_namespace_reaches_the_dashboard(chart):
    """A pod labelled like the KubeRay operator in another namespace is not the operator:
    the label and the operator's namespace are one peer (both must match)."""
    (default,) = dashboard_peers(None, chart)
    assert default == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    ((peer,),) = dashboard_peers({"networkPolicy": {"kubeRayOperator": {"namespace": "ray-ops"}}}, chart)
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ray-ops"}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    # Neither an empty namespace selector (every namespace) nor a peer without one.
    assert all(p.get("namespaceSelector", {}).get("matchLabels") for p in default)
    # No namespace and no extra peers: no operator rule at all (dashboard.from must admit it).
    assert dashboard_peers({"networkPolicy": {"kubeRayOperator": {"namespace": ""}}}, chart) == []
    proxy = [{"ipBlock": {"cidr": "172.20.0.1/32"}}]
    assert dashboard_peers({"networkPolicy": {"kubeRayOperator": {"namespace": "", "from": proxy}}}, chart) == [proxy]


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
    # No API-key Secret; only the KV secret between workers and the Redis password.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{FULLNAME}-kv", f"{FULLNAME}-redis-auth"]
    rayservice = one(docs, "RayService")
    for template in pod_specs(rayservice).values():
        assert "TANDEM_AUTH__API_KEYS" not in env_of(template)
    settings = settings_from_rayservice(rayservice)
    assert settings.auth.allow_unauthenticated and not settings.auth_required


def test_redis_password_is_never_in_clear_text(chart):
    """The generated password is only in its Secret: not in the RayService (serve config, pod
    templates, GCS options) nor in the Redis StatefulSet."""
    docs = objects(render(chart, {"gcsFaultTolerance": {"enabled": True}}))
    secret = one(docs, "Secret", f"{FULLNAME}-redis-auth")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    for doc in docs:
        if doc["kind"] != "Secret":
            assert password not in yaml.safe_dump(doc), doc["kind"]
    assert "redis_url" not in serve_config(one(docs, "RayService"))["applications"][0]["args"]


def test_external_tls_url_passes_through(chart):
    """A rediss:// URL reaches Tandem as given; redis-py then connects with TLS."""
    url = EXTERNAL_REDIS_TLS["redis"]["external"]["url"]
    rayservice = one(objects(render(chart, EXTERNAL_REDIS_TLS)), "RayService")
    assert settings_from_rayservice(rayservice).redis_url == url
    for template in pod_specs(rayservice).values():
        assert env_of(template)["TANDEM_REDIS_URL"]["value"] == url
    parsed = parse_url(url)
    assert parsed["connection_class"] is SSLConnection and parsed["password"] == "s3cret"
    assert parsed["ssl_cert_reqs"] == "required"


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
        ({"redis": {"internal": {"auth": {"existingSecretKey": ""}}}}, "at '/redis/internal/auth/existingSecretKey'"),
        ({"networkPolicy": {"serve": {"from": [{"podSelectr": {}}]}}}, "additional properties 'podSelectr' not allowed"),
        ({"networkPolicy": {"dashboard": {"from": {"ipBlock": {"cidr": "10.0.0.0/8"}}}}}, "at '/networkPolicy/dashboard/from'"),
        ({"networkPolicy": {"kubeRayOperator": {"namespace": "Ray System"}}}, "at '/networkPolicy/kubeRayOperator/namespace'"),
        ({"networkPolicy": {"kubeRayOperator": {"podLabels": {"tier": 5}}}}, "at '/networkPolicy/kubeRayOperator/podLabels/tier'"),
        ({"serviceMonitor": {"bearerTokenSecret": {"name": "my-keys"}}}, "at '/serviceMonitor/bearerTokenSecret'"),
    ],
    ids=[
        "negative-replicas", "unknown-transport", "misspelt-section", "unknown-router",
        "unquoted-off", "chart-owned-field", "negative-gpus", "zero-engines-per-pod",
        "bad-quantity", "unknown-redis-mode", "non-redis-url", "address-not-host-port",
        "empty-image", "misspelt-top-level", "empty-redis-secret-key", "misspelt-peer",
        "peers-not-a-list", "operator-namespace-not-a-name", "operator-label-not-a-string",
        "bearer-token-without-key",
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
        ({"redis": {"mode": "external", "external": {"url": "rediss://redis.example:6380/0"}}, "gcsFaultTolerance": {"enabled": True}},
         "gcsFaultTolerance.enabled with a rediss:// redis.external.url"),
        ({"redis": {"mode": "external", "external": {"url": "redis://:pw@redis.example:6379/0"}}, "gcsFaultTolerance": {"enabled": True}},
         "set gcsFaultTolerance.redisPasswordSecret"),
    ],
    ids=["external-redis-without-url", "gpus-unused", "too-few-gpus", "gcs-ft-without-address",
         "gcs-ft-over-tls", "gcs-ft-without-password"],
)
def test_inconsistent_values_fail_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as error:
        render(chart, values)
    assert message in str(error.value)


def test_head_drains_before_it_stops(chart):
    for values, grace in (({}, 60), ({"tandem": {"routing": {"drain_grace_s": 15}}}, 15)):
        rayservice = one(objects(render(chart, values)), "RayService")
        head = pod_specs(rayservice)["head"]["spec"]
        hook = head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == ["tandem", "drain", "--grace", str(grace)]
        # Kubernetes kills the pod after terminationGracePeriodSeconds, preStop included.
        assert head["terminationGracePeriodSeconds"] > grace


PLANNER = {"tandem": {"planner": {"enabled": True, "min_prefill": 1, "max_prefill": 4, "min_decode": 2, "max_decode": 6,
                                  "max_total": 9, "slo_ttft_s": 1.5}}}


def test_planner_is_the_apps_autoscaling_policy(chart):
    """planner.enabled: Serve's application-level policy is Tandem's planner (with the
    settings the app gets), and the Ray autoscaler sizes the worker groups to its bounds."""
    rayservice = one(objects(render(chart, PLANNER)), "RayService")
    (application,) = serve_config(rayservice)["applications"]
    policy = application["autoscaling_policy"]
    assert policy["policy_function"] == "control_plane.planner.serve_policy:PlannerPolicy"
    settings = settings_from_rayservice(rayservice)
    assert settings.planner.enabled and settings.planner.max_total == 9
    assert policy["policy_kwargs"]["app_name"] == settings.app_name
    # The Redis URL is the head's TANDEM_REDIS_URL (it carries the password from a Secret).
    assert policy["policy_kwargs"]["redis_url"] in ("", settings.redis_url)
    assert "TANDEM_REDIS_URL" in env_of(pod_specs(rayservice)["head"])
    # The policy builds the same planner settings as the app.
    from control_plane.planner.serve_policy import PlannerPolicy

    assert PlannerPolicy(**policy["policy_kwargs"]).settings == settings.planner
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    sizes = {g["groupName"]: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    # One engine a pod: prefill 1..4 pods; decode starts at its minimum of 2, up to 6.
    assert sizes == {"prefill": (1, 1, 4), "decode": (2, 2, 6)}


def test_planner_off_adds_no_policy(chart):
    (application,) = serve_config(one(objects(render(chart)), "RayService"))["applications"]
    assert "autoscaling_policy" not in application
