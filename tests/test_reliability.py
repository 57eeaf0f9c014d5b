"""Faults, limits and auth, through a real server on a deliberately damaged copy of the tiny zoo.

The damaged zoo: mnist/mlp_vae's ONNX file truncated, pneumoniamnist/cvae's with one byte flipped, and a
manifest entry whose card points outside the folder. The server runs with a bearer token, SYNTHGEN_MAX_N=100
and a 4 KiB body limit. The healthy models must keep working; a manifest that cannot be used must stop
`bentoml serve` with one clear error instead of a server that never becomes ready.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import httpx
import pytest

from service import encoders
from service_harness import REPO, run_serve_expecting_failure, start

pytestmark = pytest.mark.slow  # every test here starts `bentoml serve`
TOKEN = "test-token-3f9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def damage(root) -> None:
    onnx = root / "mnist" / "mlp_vae" / "generator.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    onnx = root / "pneumoniamnist" / "cvae" / "generator.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["models"].append({"dataset": "evil", "model": "escape", "dir": "..",
                               "files": {"card": {"path": "../../etc/passwd", "sha256": "0" * 64}}})
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def damaged_zoo(exported_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged") / "exported"
    shutil.copytree(exported_dir, root)
    damage(root)
    return root


@pytest.fixture(scope="module")
def server(damaged_zoo, tmp_path_factory):
    server = start(tmp_path_factory.mktemp("serve-faults"), SYNTHGEN_EXPORTED_DIR=str(damaged_zoo),
                   SYNTHGEN_API_TOKEN=TOKEN, SYNTHGEN_MAX_N="100", SYNTHGEN_MAX_BODY_BYTES="4096")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        yield client


# --- damaged files ------------------------------------------------------------------------------------------

def test_damaged_models_are_listed_as_failed_with_the_reason(http, server):
    catalog = http.get("/models").json()
    failed = {(f["dataset"], f["model"]): f["reason"] for f in catalog["failed"]}
    assert "sha256" in failed[("mnist", "mlp_vae")] and "mnist/mlp_vae/generator.onnx" in failed[("mnist", "mlp_vae")]
    assert "sha256" in failed[("pneumoniamnist", "cvae")]
    assert "leaves the exported folder" in failed[("evil", "escape")]
    assert set(catalog["datasets"]) == {"mnist", "bloodmnist_64"}
    assert "mnist/mlp_vae/generator.onnx" in server.log_tail(200_000)  # the log names the file too


def test_healthy_models_keep_working_beside_damaged_ones(http):
    response = http.post("/generate", json={"dataset": "mnist", "model": "cdcgan", "n": 4, "seed": 0})
    assert response.status_code == 200 and encoders.decode_npz(response.content).images.shape == (4, 28, 28, 1)
    assert http.get("/readyz").status_code == 200


def test_a_damaged_model_gives_503_saying_why_at_model_without_retry_after(http):
    """It lasts until a restart, so no Retry-After: the client raises it at once instead of retrying."""
    response = http.post("/generate", json={"dataset": "mnist", "model": "mlp_vae", "n": 1})
    assert response.status_code == 503 and "sha256" in response.json()["error"]
    assert "retry-after" not in response.headers and response.json()["detail"][0]["loc"] == ["model"]


def test_a_dataset_whose_only_model_is_damaged_gives_503_saying_why(http):
    for path in ("/generate", "/interpolate"):
        response = http.post(path, json={"dataset": "pneumoniamnist"})
        body = response.json()
        assert response.status_code == 503 and "not served" in body["error"] and "cvae" in body["error"]
        assert "retry-after" not in response.headers
        assert "sha256" in body["error"] and "pneumoniamnist" not in body["datasets"]


# --- limits -------------------------------------------------------------------------------------------------

def test_n_above_the_configured_max_gives_400_naming_n(http):
    response = http.post("/generate", json={"dataset": "mnist", "n": 101})
    assert response.status_code == 400 and response.json()["detail"][0]["loc"] == ["n"]
    assert "100" in response.json()["detail"][0]["msg"]


def test_a_body_over_the_configured_limit_gives_413_before_parsing(http):
    started = time.perf_counter()
    response = http.post("/generate", json={"dataset": "mnist", "n": 2, "labels": ["0"] * 2000})
    assert response.status_code == 413 and "4096" in response.json()["error"]
    assert time.perf_counter() - started < 2


def test_a_chunked_body_over_the_limit_gives_413(http):
    def chunks():
        yield b'{"dataset": "mnist", "model": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = http.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_a_small_chunked_body_is_served(http):
    response = http.post("/generate", content=iter([b'{"dataset": "mnist",', b' "n": 2}']),
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 200


# --- auth ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer{TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_missing_or_wrong_token_gives_401(server, headers):
    for method, path in (("POST", "/generate"), ("POST", "/models"), ("GET", "/models"), ("POST", "/interpolate")):
        response = httpx.request(method, server.url + path, json={"dataset": "mnist"}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        assert "token" in response.json()["error"] and TOKEN not in response.text


def test_the_auth_scheme_name_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER"):
        response = httpx.post(server.url + "/generate", json={"dataset": "mnist", "n": 1},
                              headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200


def test_the_openapi_document_declares_the_bearer_token_on_the_api_routes(server):
    spec = httpx.get(server.url + "/docs.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method in (("/generate", "post"), ("/interpolate", "post"), ("/models", "get"), ("/models", "post")):
        assert spec["paths"][path][method]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/livez"]["get"]


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics", "/docs.json"])
def test_health_metrics_and_docs_need_no_token(server, path):
    assert httpx.get(server.url + path).status_code == 200


# --- disconnects --------------------------------------------------------------------------------------------

def test_client_disconnecting_mid_response_leaves_the_service_healthy(server, http):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"dataset": "bloodmnist_64", "n": 100, "format": "npz"}).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for read_bytes in (0, 4096):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head + body)
            if read_bytes:
                s.recv(read_bytes)
    time.sleep(0.5)
    assert http.get("/readyz").status_code == 200
    response = http.post("/generate", json={"dataset": "bloodmnist_64", "n": 100, "seed": 1})
    assert response.status_code == 200 and len(encoders.decode_npz(response.content).images) == 100


def test_a_client_that_stops_reading_holds_only_its_body_and_is_dropped_after_the_send_timeout(exported_dir,
                                                                                                 tmp_path):
    """Answers waiting on clients that did not read were outside the memory budget and never timed out: 60 of
    them took a worker from 207 MB to 1.6 GB. Now the body's share of the budget is held until sent, a client
    must take each MiB within SYNTHGEN_SEND_TIMEOUT_S, and other requests go on meanwhile."""
    slow = start(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir), SYNTHGEN_MEMORY_BUDGET_MB="64",
                 SYNTHGEN_SEND_TIMEOUT_S="2")
    try:
        host, port = slow.url.removeprefix("http://").split(":")
        body = json.dumps({"dataset": "bloodmnist_64", "n": 2000, "seed": 0}).encode()  # 24.6 MB of npz
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            started = time.perf_counter()
            answer = httpx.post(f"{slow.url}/generate", json={"dataset": "mnist", "n": 4, "seed": 0}, timeout=60)
            assert answer.status_code == 200 and time.perf_counter() - started < 10  # not queued behind the stall
            log = slow.wait_for_log(lambda text: "Client too slow" in text, timeout_s=60)
            assert "Client too slow: dropped the answer to /generate [POST]" in log
            assert time.perf_counter() - started < 30
        assert httpx.get(f"{slow.url}/readyz").status_code == 200
    finally:
        slow.stop()


# --- start-up refusal ---------------------------------------------------------------------------------------

def one_error_line(output: str) -> str:
    """The start-up refusal: one "error: ..." line and no traceback (the log lines before it aside)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_malformed_manifest_stops_serve_with_one_clear_error(tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "manifest.json").write_text('{"format": "synthgen-manifest/1", "models": 3}')
    code, output = run_serve_expecting_failure(tmp_path, SYNTHGEN_EXPORTED_DIR=str(tmp_path / "exported"))
    assert code == 1 and "'models' must be a list" in one_error_line(output)


def test_a_zoo_with_nothing_loadable_stops_serve(exported_dir, tmp_path):
    root = tmp_path / "exported"
    shutil.copytree(exported_dir, root)
    for onnx in root.glob("*/*/generator.onnx"):
        onnx.write_bytes(b"")
    code, output = run_serve_expecting_failure(tmp_path, SYNTHGEN_EXPORTED_DIR=str(root))
    assert code == 1 and "can be served" in one_error_line(output) and "sha256" in output


def test_files_that_pass_their_checksums_but_do_not_load_stop_serve_instead_of_restarting_workers(exported_dir,
                                                                                                     tmp_path):
    """A manifest written over damaged files: the checksums match, ONNX Runtime cannot parse them. Workers
    failed on them and were restarted every few seconds, the port refusing connections, without end."""
    from training.manifest import write_manifest

    root = tmp_path / "exported"
    shutil.copytree(exported_dir, root)
    for onnx in root.glob("*/*/generator.onnx"):
        onnx.write_bytes(onnx.read_bytes()[:1000])
    write_manifest(root)
    code, output = run_serve_expecting_failure(tmp_path, SYNTHGEN_EXPORTED_DIR=str(root))
    assert code == 1 and "can be served" in one_error_line(output) and "ONNX Runtime cannot load" in output


def test_a_device_the_host_lacks_stops_serve_naming_it(exported_dir, tmp_path):
    code, output = run_serve_expecting_failure(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir),
                                               SYNTHGEN_BACKEND="torchscript", SYNTHGEN_DEVICE="cuda:63")
    assert code == 1 and "SYNTHGEN_DEVICE=cuda:63" in one_error_line(output)


def test_a_bad_setting_stops_serve_naming_the_variable(exported_dir, tmp_path):
    code, output = run_serve_expecting_failure(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir),
                                               SYNTHGEN_MAX_N="lots")
    assert code == 1 and "SYNTHGEN_MAX_N" in one_error_line(output)


def test_the_readme_override_turns_off_bentomls_access_log_and_the_default_keeps_it(server, http, exported_dir,
                                                                                   tmp_path):
    override = re.search(r"BENTOML_CONFIG_OVERRIDES='([^']+)'", (REPO / "README.md").read_text()).group(1)
    body = {"dataset": "mnist", "model": "cdcgan", "n": 1, "seed": 1}
    assert http.post("/generate", json=body).status_code == 200
    assert "path=/generate" in server.wait_for_log(lambda text: "path=/generate" in text)  # on by default
    quiet = start(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir), BENTOML_CONFIG_OVERRIDES=override)
    try:
        for _ in range(3):
            assert httpx.post(f"{quiet.url}/generate", json=body, timeout=60).status_code == 200
        # a rejected body is logged after its answer whatever the access log does: once its line is written,
        # an access line of the requests before it would be too
        assert httpx.post(f"{quiet.url}/generate", json={**body, "n": 0}, timeout=60).status_code == 400
        written = quiet.wait_for_log(lambda text: "Rejected /generate [POST]" in text)
        assert "Rejected /generate [POST]" in written and "path=/generate" not in written
    finally:
        quiet.stop()


def test_two_workers_give_the_same_bytes_and_count_their_images_together(exported_dir, tmp_path):
    """deploy/ runs SYNTHGEN_WORKERS=2: both workers serve, a seed's bytes do not depend on which one answers,
    and /metrics adds up the images of both."""
    import concurrent.futures

    server = start(tmp_path, SYNTHGEN_EXPORTED_DIR=str(exported_dir), SYNTHGEN_WORKERS="2")
    try:
        assert len(server.worker_processes()) == 2
        body = {"dataset": "mnist", "model": "cdcgan", "n": 3, "seed": 11}

        def fetch(_):
            with httpx.Client(base_url=server.url, timeout=60) as client:  # a connection each: both workers answer
                response = client.post("/generate", json=body)
                assert response.status_code == 200, response.text[:300]
                return response.content

        answers = []
        for _ in range(10):  # new connections until the access log shows both workers answering
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers += pool.map(fetch, range(16))
            time.sleep(0.5)
            answered = set(re.findall(r"entry_service:synthgen:(\d+)\] \S+ \(scheme=http,method=POST,path=/generate",
                                      server.log_text()))
            if len(answered) == 2:
                break
        assert answered == {"1", "2"} and len(set(answers)) == 1
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        line = next(line for line in metrics.splitlines()
                    if line.startswith('synthgen_images_total{dataset="mnist",model="cdcgan"}'))
        assert float(line.split()[-1]) == len(answers) * 3
    finally:
        server.stop()
