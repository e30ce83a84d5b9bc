"""deploy/k8s: the manifests parse, validate against real Kubernetes schemas (kubernetes-validate, offline),
and fit together: GPU limit, probes on the right paths and port, a grace period covering preStop + drain +
shutdown timeout, the engine-cache PVC at the configured path, an HPA on a Pods metric, selectors that select."""

from __future__ import annotations

import copy

import pytest
import yaml
from deploy_testkit import (
    K8S,
    PROMETHEUS_DIR,
    adapter_metric_names,
    k8s_objects,
    load_yaml_docs,
    parse_dockerfile,
    settings_problems,
)

OBJECTS = k8s_objects()
BUILTIN_KINDS = {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                 "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def one(kind: str) -> dict:
    found = [o for (k, _), o in OBJECTS.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


DEPLOYMENT, CONFIGMAP = one("Deployment"), one("ConfigMap")
POD = DEPLOYMENT["spec"]["template"]
[CONTAINER] = POD["spec"]["containers"]
ENV = CONFIGMAP["data"]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def port_number(port: int | str) -> int:
    if isinstance(port, int):
        return port
    [match] = [p["containerPort"] for p in CONTAINER["ports"] if p["name"] == port]
    return match


# -- parsing and schemas ----------------------------------------------------------------------------

def test_every_yaml_file_parses_and_the_kustomization_lists_every_resource():
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    for name in files:
        assert load_yaml_docs(K8S / name), f"{name} is empty"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    not_resources = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}  # the latter: Helm values
    assert sorted(kustomization["resources"]) == sorted(set(files) - not_resources)
    assert {k for k, _ in OBJECTS} == BUILTIN_KINDS | {"PodMonitor", "PrometheusRule"}
    assert [i["name"] for i in kustomization["images"]] == [CONTAINER["image"].split(":")[0]]


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_builtin_kinds_validate_against_the_kubernetes_schema(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) has the offline schemas")
    version = kv.utils.latest_version() if version == "latest" else version
    for (kind, name), obj in OBJECTS.items():
        if kind in BUILTIN_KINDS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{kind}/{name} against Kubernetes {version}: {e.message} at {list(e.path)}")


def test_the_schema_validation_rejects_a_typo():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) has the offline schemas")
    bad = copy.deepcopy(DEPLOYMENT)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.utils.latest_version(), strict=True)


# -- the deployment ---------------------------------------------------------------------------------

def test_one_gpu_per_pod():
    limits = CONTAINER["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    requests = CONTAINER["resources"].get("requests", {})
    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == 1, "GPU requests must equal limits"
    assert any(t.get("key") == "nvidia.com/gpu" for t in POD["spec"].get("tolerations", []))


def test_probes_use_the_right_paths_and_the_service_port():
    port = int(ENV["DIFFPROMPT_PORT"])
    assert [p["containerPort"] for p in CONTAINER["ports"]] == [port]
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = CONTAINER[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(get["port"]) == port, probe
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "warm-up (TensorRT build) takes minutes"
    assert ENV["DIFFPROMPT_HOST"] == "0.0.0.0", "the probes come from the kubelet, not loopback"


def test_grace_period_covers_prestop_drain_and_shutdown_timeout():
    pre_stop = CONTAINER["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        pre_stop_s = float(command[1])
    else:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    drain, timeout = float(ENV["DIFFPROMPT_SHUTDOWN_DRAIN_S"]), float(ENV["DIFFPROMPT_SHUTDOWN_TIMEOUT_S"])
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_s + drain + timeout + 10, (grace, pre_stop_s, drain, timeout)
    # The drain keeps serving while readiness turns: at least one failed readiness period.
    assert drain >= CONTAINER["readinessProbe"]["periodSeconds"]


def test_configmap_settings_are_valid_and_reach_the_container(deploy_artifact):
    assert settings_problems(dict(ENV), deploy_artifact) == []
    assert [e["configMapRef"]["name"] for e in CONTAINER["envFrom"]] == [CONFIGMAP["metadata"]["name"]]
    image_env = parse_dockerfile().stage("runtime").env()
    assert ENV["DIFFPROMPT_ARTIFACT_DIR"] == image_env["DIFFPROMPT_ARTIFACT_DIR"]


def test_engine_cache_pvc_is_mounted_at_the_configured_path():
    pvc = one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    cache = ENV["DIFFPROMPT_ENGINE_CACHE_DIR"]
    assert cache in mounts, f"nothing mounted at {cache}"
    volume = volumes[mounts[cache]]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas on several nodes share the cache"
    # Writable by the image's user: fsGroup, and the Dockerfile's VOLUME is the same path.
    assert POD["spec"]["securityContext"]["fsGroup"] == POD["spec"]["securityContext"]["runAsUser"]
    assert cache == parse_dockerfile().stage("runtime").env()["DIFFPROMPT_ENGINE_CACHE_DIR"]


def test_runs_as_the_image_user_with_a_read_only_root():
    uid = int(parse_dockerfile().stage("runtime").all("USER")[-1].args.split(":")[0])
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    assert CONTAINER["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in CONTAINER["volumeMounts"]}, "uploads spool to /tmp"


def test_scrape_annotations_point_at_metrics():
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(ENV["DIFFPROMPT_PORT"])
    assert annotations["prometheus.io/path"] == "/metrics"


# -- objects that refer to the deployment --------------------------------------------------------------

def test_deployment_selector_matches_its_pods():
    assert matches(DEPLOYMENT["spec"]["selector"]["matchLabels"], POD["metadata"]["labels"])


def test_service_selects_the_pods_on_the_http_port():
    service = one("Service")
    assert matches(service["spec"]["selector"], POD["metadata"]["labels"])
    [port] = service["spec"]["ports"]
    assert port_number(port["targetPort"]) == int(ENV["DIFFPROMPT_PORT"])


def test_hpa_targets_the_deployment_with_pods_metrics_the_adapter_serves():
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", DEPLOYMENT["metadata"]["name"])
    assert "replicas" not in DEPLOYMENT["spec"], "the HPA owns the replica count"
    metrics = hpa["spec"]["metrics"]
    assert metrics and all(m["type"] == "Pods" for m in metrics)
    served = adapter_metric_names()
    for m in metrics:
        assert m["pods"]["metric"]["name"] in served
        assert m["pods"]["target"]["type"] == "AverageValue" and float(m["pods"]["target"]["averageValue"]) > 0
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    queue = [m for m in metrics if m["pods"]["metric"]["name"] == "diffprompt_queue_depth"]
    assert queue and float(queue[0]["pods"]["target"]["averageValue"]) < float(ENV["DIFFPROMPT_MAX_QUEUE"]), \
        "scale out before the queue is full (503 queue_full)"


def test_pdb_leaves_room_for_drains():
    pdb = one("PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], POD["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < one("HorizontalPodAutoscaler")["spec"]["minReplicas"], \
        "with minAvailable >= minReplicas no node could ever be drained"


def test_podmonitor_scrapes_the_pods_as_job_diffprompt():
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert matches(monitor["spec"]["selector"]["matchLabels"], POD["metadata"]["labels"])
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert port_number(endpoint["port"]) == int(ENV["DIFFPROMPT_PORT"]) and endpoint["path"] == "/metrics"
    job = POD["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == "diffprompt", "the alert rules select job=\"diffprompt\""


def test_prometheusrule_carries_exactly_the_alerts_file():
    rule = one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "copy deploy/prometheus/alerts.yml's groups into it"
