"""The container image, end to end: build it, run it, call it, stop it.

`scripts/container.sh build` (what `make container` runs) builds the image from this tree: `bentoml build`, then
`bentoml containerize` with the classic Docker builder; where Docker Hub is out of reach it uses the local
Debian base of scripts/base-image.sh. The container then runs as Kubernetes runs it (deploy/deployment.yaml):
non-root, read-only root filesystem with a /tmp volume, no capabilities, configuration from environment
variables only; here on the host network with the server bound to 127.0.0.1 on a free port.

Needs a Docker engine: `.ci/run` installs docker.io + debootstrap and starts one (scripts/docker-engine.sh).
Where none answers, the tests FAIL saying so; they are never skipped.

The models: exported/ when its manifest exists, else the tiny zoo of conftest's `exported_dir` copied into a
temporary copy of the project tree (the same code, bentofile.yaml and requirements).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import encoders
from service_harness import free_port, main_server, start

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "synthgen-service:pytest"
TOKEN = "container-test-token"
MAX_N = 10_000
SIZE_GOAL = 1.2e9  # bytes, BentoML's build tools included


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def engine() -> None:
    """A Docker engine that answers, or a failure that says why there is none."""
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI on PATH: install the engine with `scripts/docker-engine.sh install` "
                    "(apt-get install docker.io debootstrap; .ci/run does it)", pytrace=False)
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("`docker info` hung for 30 s: the engine does not answer", pytrace=False)
    if info.returncode != 0 or not info.stdout.strip():
        log = Path(os.environ.get("SYNTHGEN_DOCKER_STATE", "/tmp/synthgen-docker")) / "dockerd.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else ["(no dockerd log)"]
        tail = "\n".join([l for l in lines if re.search(r"level=(error|fatal)", l)][-8:] or lines[-5:])
        pytest.fail("no Docker engine answers, so the container cannot be built or run. Start one with "
                    f"`scripts/docker-engine.sh start` (root; .ci/run does it).\ndocker info: {info.stderr.strip()}\n"
                    f"dockerd log tail:\n{tail}", pytrace=False)


@pytest.fixture(scope="module")
def project(request, tmp_path_factory) -> Path:
    """The tree to build: this repository when exported/ has a manifest, else a copy with the tiny zoo."""
    if (ROOT / "exported" / "manifest.json").exists():
        return ROOT
    exported_dir = request.getfixturevalue("exported_dir")
    tree = tmp_path_factory.mktemp("container-project")
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in files:
        if not name or name.startswith("exported/") or not (ROOT / name).is_file():
            continue
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(exported_dir, tree / "exported")
    return tree


@pytest.fixture(scope="module")
def image(engine, project, tmp_path_factory) -> dict:
    """`scripts/container.sh build` of `project`; its time and size are recorded in the test output."""
    work = tmp_path_factory.mktemp("container-build")
    log = work / "build.log"
    env = dict(os.environ, SYNTHGEN_PROJECT_DIR=str(project), SYNTHGEN_IMAGE=IMAGE, PY=sys.executable,
               BENTOML_HOME=str(work / "bentoml-home"), BENTOML_DO_NOT_TRACK="true")
    started = time.monotonic()
    with open(log, "wb") as out:
        result = subprocess.run([str(ROOT / "scripts" / "container.sh"), "build"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, timeout=1200)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        noise = re.compile(r"^INFO: +(---> |Removing intermediate|\+ )|Running in [0-9a-f]+$")
        lines = [line for line in log.read_text(errors="replace").splitlines() if not noise.search(line)]
        pytest.fail(f"image build failed ({result.returncode}) after {seconds:.0f} s (full log {log}):\n"
                    + "\n".join(lines[-60:]), pytrace=False)
    inspect = json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    print(f"\ncontainer image {IMAGE}: built in {seconds:.0f} s, {inspect['Size'] / 1e6:.0f} MB")
    return {"seconds": seconds, "size": inspect["Size"], "config": inspect["Config"], "project": project}


@pytest.fixture(scope="module")
def container(image, tmp_path_factory):
    """The image running as deploy/deployment.yaml runs it, on 127.0.0.1:<free port>, ready."""
    port = free_port()
    name = f"synthgen-pytest-{port}"
    docker("run", "-d", "--name", name, "--network", "host",
           "--read-only", "--tmpfs", "/tmp:uid=1034,gid=1034,mode=1777", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--stop-timeout", "60",
           "-e", "BENTOML_HOST=127.0.0.1", "-e", f"BENTOML_PORT={port}", "-e", "BENTOML_HOME=/tmp/bentoml",
           "-e", f"SYNTHGEN_API_TOKEN={TOKEN}", "-e", f"SYNTHGEN_MAX_N={MAX_N}", IMAGE)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            if not state["Running"]:
                pytest.fail(f"container exited ({state['ExitCode']}) before /readyz:\n{logs(name)[-4000:]}",
                            pytrace=False)
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 120:
                pytest.fail(f"container not ready after 120 s:\n{logs(name)[-4000:]}", pytrace=False)
            time.sleep(0.25)
        print(f"container ready in {time.monotonic() - started:.1f} s")
        yield {"name": name, "url": url}
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def http(container):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=container["url"], headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(image, request, tmp_path_factory):
    """`bentoml serve` of the same service code and models, in this process's environment."""
    exported = image["project"] / "exported"
    if image["project"] != ROOT:
        yield main_server(request.getfixturevalue("exported_dir"), tmp_path_factory)
        return
    server = start(tmp_path_factory.mktemp("container-reference"), SYNTHGEN_EXPORTED_DIR=str(exported))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def catalog(http) -> dict:
    response = http.get("/models")
    assert response.status_code == 200, response.text[:500]
    return response.json()


def logs(name: str) -> str:
    result = docker("logs", name, check=False)
    return result.stdout + result.stderr


def in_progress(url: str, endpoint: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = rf'^bentoml_service_request_in_progress\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*\}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, flags=re.M))


def two_datasets(catalog: dict) -> list[str]:
    datasets = sorted(catalog["datasets"])
    assert len(datasets) >= 2, f"the container serves fewer than two datasets: {datasets}"
    return [datasets[0], datasets[-1]]


def test_image_is_the_serving_set_run_by_a_non_root_user_and_sends_no_usage_reports(image):
    assert image["config"]["User"] in {"bentoml", "1034", "1034:1034"}, image["config"]["User"]
    assert "BENTOML_DO_NOT_TRACK=true" in image["config"]["Env"]
    probe = ("import importlib.util as u, pathlib, json; "
             "print(json.dumps({'modules': [m for m in ('torch', 'torchvision', 'medmnist', 'training') "
             "if u.find_spec(m)], 'training_code': pathlib.Path('src/training').exists(), "
             "'uid': __import__('os').getuid()}))")
    result = docker("run", "--rm", "--network", "none", "--entrypoint", "/app/.venv/bin/python", IMAGE, "-c", probe)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["uid"] != 0
    assert found["modules"] == [], f"the image holds training-only packages: {found['modules']}"
    assert found["training_code"] is False, "the bento includes training/"
    models = sum(p.stat().st_size for p in (image["project"] / "exported").rglob("*") if p.is_file())
    breakdown = (f"image {image['size'] / 1e6:.0f} MB, of which exported/ at most {models / 1e6:.0f} MB "
                 "(`scripts/container.sh size` shows the layers)")
    # What this tree controls (base, BentoML's build tools, the Python serving set) must stay under the goal;
    # a model zoo that pushes the whole image over it is reported, not failed: that is the zoo's call.
    assert image["size"] - models < SIZE_GOAL, f"over the {SIZE_GOAL / 1e6:.0f} MB goal without the models: {breakdown}"
    if image["size"] >= SIZE_GOAL:
        warnings.warn(f"the image is over the {SIZE_GOAL / 1e6:.0f} MB goal: {breakdown}")
    print(breakdown)


def test_probes_metrics_auth_and_logs(container, http):
    url = container["url"]
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(url + path, timeout=5).status_code == 200, path  # no token: probes and scrapers
    assert "bentoml_service_request" in httpx.get(f"{url}/metrics", timeout=5).text
    # Configuration comes from the environment: the API token and the request limit.
    assert httpx.post(f"{url}/generate", json={"dataset": "mnist", "n": 1}, timeout=10).status_code == 401
    too_many = http.post("/generate", json={"dataset": "mnist", "n": MAX_N + 1})
    assert too_many.status_code == 400, too_many.text[:300]
    stdout = docker("logs", container["name"]).stdout  # `docker logs` keeps the container's stdout here
    assert "serving" in stdout and "model(s)" in stdout, stdout[-2000:]  # the service's own log line
    assert "path=/generate" in stdout, "request logs must go to stdout"
    output = logs(container["name"])
    assert "ValidationError" in output or "400" in output


def same_response(got: httpx.Response, want: httpx.Response, fmt: str) -> None:
    assert got.status_code == want.status_code == 200, (got.text[:300], want.text[:300])
    assert got.headers["content-type"] == want.headers["content-type"]
    assert got.content == want.content, f"container and bentoml serve give different {fmt} bytes"


def test_generate_matches_the_in_process_service_for_two_datasets(http, reference, catalog):
    for dataset, seed in zip(two_datasets(catalog), (20240611, 7)):
        for fmt, n in (("npz", 16), ("png_grid", 9)):
            body = {"dataset": dataset, "n": n, "seed": seed, "format": fmt}
            got = http.post("/generate", json=body)
            want = httpx.post(f"{reference.url}/generate", json=body, timeout=120)
            same_response(got, want, fmt)
            if fmt == "npz":
                assert len(encoders.decode_npz(got.content).images) == n


def test_sigterm_lets_the_request_in_flight_finish(container, http, reference, catalog):
    """SIGTERM (what `docker stop` and Kubernetes send) while a large request runs: it completes, then exit 0."""
    largest = max(catalog["datasets"], key=lambda d: np.prod(catalog["datasets"][d]["image_shape"]))
    # A request that takes about 3 s on this machine, whatever the zoo (tiny or trained models).
    started = time.monotonic()
    assert http.post("/generate", json={"dataset": largest, "n": 500, "seed": 1}).status_code == 200
    per_image = (time.monotonic() - started) / 500
    n = int(min(MAX_N, max(500, 3.0 / per_image)))
    body = {"dataset": largest, "n": n, "seed": 99, "format": "npz"}
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["response"] = http.post("/generate", json=body, timeout=300)
        except httpx.HTTPError as exc:  # recorded, asserted below
            outcome["error"] = repr(exc)
        outcome["done"] = time.monotonic()

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 30
    while in_progress(container["url"], "/generate") < 1:
        assert "done" not in outcome, "the large request finished before SIGTERM could be sent; make it larger"
        assert time.monotonic() < deadline, "the request never showed up as in progress in /metrics"
        time.sleep(0.02)
    signalled = time.monotonic()
    docker("kill", "--signal", "TERM", container["name"])
    worker.join(timeout=300)
    assert "error" not in outcome, f"in-flight request broken by SIGTERM: {outcome['error']}\n{logs(container['name'])[-3000:]}"
    response = outcome["response"]
    assert response.status_code == 200, response.text[:500]
    assert outcome["done"] > signalled, "the request was not in flight when SIGTERM arrived"
    batch = encoders.decode_npz(response.content)
    assert len(batch.images) == n
    exit_code = int(docker("wait", container["name"], timeout=90).stdout.strip())
    assert exit_code == 0, f"exit code {exit_code} after SIGTERM:\n{logs(container['name'])[-3000:]}"
    want = httpx.post(f"{reference.url}/generate", json=body, timeout=300)
    same_response(response, want, "npz")
