"""The built images, run for real on a Docker engine (marker `image`: `make test IMAGE_TESTS=1`, which is what CI
runs; deploy/local-engine.sh builds the images first and names them in DEPLOY_* variables).

The CPU serving image: it becomes ready, grounds a PNG, runs as uid 10001 with neither torch nor the build's
secrets inside, passes its own HEALTHCHECK, and `docker stop` with requests in flight answers all of them and
exits 0. docker-compose.cpu.yml: two replicas and Prometheus (Debian's package) on one compose network;
Prometheus scrapes both, loads the alert rules, and `histogram_quantile` over the request histogram is a number.
The image's size and start time are reported at the end of the run.
"""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
from deploy_testkit import REPO, parse_dockerfile
from image_testkit import (
    PROMETHEUS_IMAGE,
    REPORT,
    SERVING_IMAGE,
    SERVING_TAG,
    Container,
    Network,
    compose,
    docker,
    image_size_bytes,
    unique,
)
from packaging.utils import canonicalize_name
from service_testkit import free_port, ground_slowly, parse_metrics, sample_png

pytestmark = pytest.mark.image

CPU_COMPOSE = REPO / "docker-compose.cpu.yml"
RUNTIME = parse_dockerfile().stage("runtime")
SIZE_BUDGET_MB = 800  # base ~160 MB + onnxruntime/numpy/web stack + 2 artifacts; torch alone would add ~700 MB


@pytest.fixture(scope="module")
def network():
    with Network() as net:
        yield net.name


@pytest.fixture(scope="module")
def container(network):
    with Container(SERVING_IMAGE, network) as c:
        c.start().wait_ready()
        REPORT["serving image start (docker run -> /readyz 200)"] = f"{c.ready_seconds:.1f} s"
        yield c


def ground(client: httpx.Client, expression: str = "the blue star") -> httpx.Response:
    return client.post("/v1/ground", files={"image": ("squares.png", sample_png())}, data={"expression": expression})


def assert_boxes(response: httpx.Response) -> list:
    assert response.status_code == 200, response.text
    boxes = response.json()["boxes"]
    assert boxes, response.json()
    return boxes


def test_the_image_is_small_and_was_built_here():
    size_mb = image_size_bytes(SERVING_IMAGE) / 1e6
    REPORT["serving image size"] = f"{size_mb:.0f} MB ({SERVING_TAG}, {SERVING_IMAGE[:19]})"
    layers = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", SERVING_IMAGE).stdout)
    REPORT["serving image layers"] = str(len(layers))
    assert size_mb < SIZE_BUDGET_MB, f"{size_mb:.0f} MB: something heavy (torch?) got into the runtime image"


def test_the_container_becomes_ready_and_grounds_a_png(container):
    ready = container.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["provider"] == "CPUExecutionProvider", ready.text
    boxes = assert_boxes(ground(container.client))
    first = boxes[0]
    assert len(first["xyxy"]) == 4 and 0 <= first["score"] <= 1 and first["rank"] == 1, first
    assert container.client.get("/livez").status_code == 200


def test_the_image_holds_no_torch_and_no_build_secrets(container):
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os, sys;"
        "names = sorted(d.metadata['Name'].lower() for d in m.distributions());"
        "print(json.dumps({'names': names, 'torch': u.find_spec('torch') is not None,"
        " 'diffprompt': u.find_spec('diffprompt').origin, 'pip_conf': os.path.exists('/etc/pip.conf'),"
        " 'secrets': os.listdir('/run/secrets') if os.path.isdir('/run/secrets') else [],"
        " 'pip_cache': os.path.exists('/root/.cache/pip')}))"
    )
    found = json.loads(container.exec("python", "-c", probe).stdout)
    found["names"] = [canonicalize_name(n) for n in found["names"]]
    assert found["torch"] is False and "torch" not in found["names"], found
    assert not [n for n in found["names"] if n.startswith("nvidia-") or n == "onnxruntime-gpu"], found["names"]
    assert {"diffprompt", "onnxruntime", "fastapi", "uvicorn", "prometheus-client"} <= set(found["names"])
    assert found["diffprompt"].startswith("/opt/venv/"), "the installed wheel, not a copied folder"
    assert not found["pip_conf"] and found["secrets"] == [] and not found["pip_cache"], found


def test_the_container_runs_as_the_image_user_and_passes_its_healthcheck(container):
    assert container.exec("id", "-u").stdout.strip() == RUNTIME.all("USER")[-1].args.split(":")[0]
    health = json.loads(docker("image", "inspect", "--format", "{{json .Config.Healthcheck}}", SERVING_IMAGE).stdout)
    assert health["Test"][0] == "CMD", health
    assert container.exec(*health["Test"][1:], check=False).returncode == 0, container.logs()


def test_docker_stop_answers_every_request_in_flight_and_exits_0(network):
    """SIGTERM (docker stop, 10 s grace) while requests are in flight: all are answered, the exit code is 0."""
    n = 4
    with Container(SERVING_IMAGE, network, "DIFFPROMPT_ARTIFACT_DIR=/artifacts/diffprompt-25steps") as c:
        c.start().wait_ready()
        results: list[httpx.Response | Exception] = []

        def one() -> None:
            try:
                with httpx.Client(base_url=c.client.base_url, timeout=60) as client:
                    results.append(ground_slowly(client, hold_s=2))  # in flight together, body still arriving
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                results.append(e)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        deadline, in_flight = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline and in_flight < n:
            samples = parse_metrics(c.client.get("/metrics").text)
            in_flight = samples.get(("diffprompt_requests_in_flight", ()), 0.0)
        assert in_flight >= n, f"only {in_flight} of {n} requests were in flight at once"
        t0 = time.monotonic()
        docker("stop", c.name, timeout=60)
        stop_seconds = time.monotonic() - t0
        for t in threads:
            t.join(60)
        assert len(results) == n and all(isinstance(r, httpx.Response) for r in results), results
        for response in results:
            assert_boxes(response)
        state = c.state()
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, c.logs())
        assert "telemetry" not in c.logs().lower(), "onnxruntime telemetry is on (ORT_DISABLE_TELEMETRY)"
        assert stop_seconds < 10, f"docker stop took {stop_seconds:.1f} s: the grace period ran out (SIGKILL)"
        REPORT["docker stop with 4 requests in flight"] = f"{stop_seconds:.1f} s, exit code 0"


# -- compose ---------------------------------------------------------------------------------------------------

def prometheus_query(client: httpx.Client, query: str) -> list:
    body = client.get("/api/v1/query", params={"query": query}).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_compose_stack_prometheus_scrapes_the_replicas_and_answers_histogram_quantile():
    project = unique("dpci").replace("-", "")
    port = free_port()
    env = {"DIFFPROMPT_IMAGE": SERVING_IMAGE, "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE, "PROMETHEUS_PORT": str(port)}
    try:
        compose(project, CPU_COMPOSE, "up", "--detach", "--no-build", env=env)
        prom = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        replicas = docker("ps", "--quiet", "--filter", f"label=com.docker.compose.project={project}",
                          "--filter", "label=com.docker.compose.service=diffprompt").stdout.split()
        assert len(replicas) == 2, "deploy.replicas: 2"

        # Both replicas up as Prometheus targets (found through Docker's DNS), i.e. warmed up and scraped.
        deadline = time.monotonic() + 420
        up: list = []
        while time.monotonic() < deadline:
            try:
                up = prometheus_query(prom, 'up{job="diffprompt"} == 1')
            except httpx.TransportError:
                up = []
            if len(up) == 2 and all(replica_ready(prom, u["metric"]["instance"]) for u in up):
                break
            time.sleep(2)
        assert len(up) == 2, f"targets up: {up}\n{compose(project, CPU_COMPOSE, 'logs', '--tail=40', env=env).stdout}"

        # Traffic on both replicas, straight to their container addresses on the compose network. A labelled
        # series starts with its first request, and rate() needs it to grow after a scrape: one request, wait
        # until Prometheus has the series of both replicas, then the rest.
        instances = [u["metric"]["instance"] for u in up]
        for instance in instances:
            with httpx.Client(base_url=f"http://{instance}", timeout=60) as client:
                assert_boxes(ground(client))
        count = 'diffprompt_request_duration_seconds_count{job="diffprompt",route="/v1/ground"}'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(prometheus_query(prom, count)) < 2:
            time.sleep(2)
        assert len(prometheus_query(prom, count)) == 2, prometheus_query(prom, count)
        for instance in instances:
            with httpx.Client(base_url=f"http://{instance}", timeout=60) as client:
                for _ in range(5):
                    assert_boxes(ground(client))

        query = ('histogram_quantile(0.95, sum by (le) '
                 '(rate(diffprompt_request_duration_seconds_bucket{job="diffprompt",route="/v1/ground"}[1m])))')
        deadline, value = time.monotonic() + 120, math.nan
        while time.monotonic() < deadline:
            result = prometheus_query(prom, query)
            value = float(result[0]["value"][1]) if result else math.nan
            if math.isfinite(value):
                break
            time.sleep(3)
        assert math.isfinite(value) and value > 0, f"{query} -> {value}"
        REPORT["compose: Prometheus p95 of /v1/ground (2 replicas)"] = f"{value:.3f} s"

        rules = prom.get("/api/v1/rules").json()["data"]["groups"]
        assert rules and all(r["health"] != "err" for g in rules for r in g["rules"]), rules
    finally:
        compose(project, CPU_COMPOSE, "down", "--volumes", "--remove-orphans", "--timeout", "60", env=env)
    assert docker("ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={project}").stdout == ""


def replica_ready(prom: httpx.Client, instance: str) -> bool:
    """The replica answers /readyz 200 at the address Prometheus scrapes (the host reaches the compose network)."""
    try:
        return httpx.get(f"http://{instance}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False

