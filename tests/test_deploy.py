"""deploy/ (Kubernetes) against the service: every port, probe path and env var it names must exist.

The manifests are parsed (PyYAML comes with BentoML); probe and metrics paths are checked against the
routes BentoML 1.4 itself registers, env vars against the service source (and BentoML's own), values
against service.config.Settings (the code that reads them at start-up), and the user against the UID
BentoML's generated Dockerfile creates.
"""

from __future__ import annotations

import re
import tomllib
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _docs() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _one(kind: str) -> dict:
    found = [d for d in _docs() if d.get("kind") == kind]
    assert len(found) == 1, f"deploy/ must hold exactly one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _one("Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _bentoml_system_paths() -> set[str]:
    """The paths BentoML 1.4 registers on every HTTP server (livez, healthz, readyz, metrics)."""
    from bentoml._internal.server.base_app import BaseAppFactory

    stub = types.SimpleNamespace(livez=None, readyz=None, metrics=None)
    return {route.path for route in BaseAppFactory.get_system_routes(stub)}


def _source_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*.py"))


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _cpu(value) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _bytes(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def test_all_manifests_parse_and_name_their_kind():
    docs = _docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds, kinds
    for d in docs:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), d


def test_image_is_the_one_make_container_builds(container):
    name, _, tag = container["image"].partition(":")
    assert name == "synthgen-service"
    assert tag == _version(), "deployment.yaml's image tag must be pyproject.toml's version"
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == listed, "kustomization.yaml must list every manifest"
    images = {i["name"]: i for i in kustomization.get("images", [])}
    assert images["synthgen-service"]["newTag"] == _version()


def test_port_is_bentomls_http_port(container):
    from bentoml._internal.configuration.containers import BentoMLContainer

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": BentoMLContainer.http.port.get()}  # 3000; the image EXPOSEs it
    env = _env(container)
    if "BENTOML_PORT" in env:
        assert int(env["BENTOML_PORT"]["value"]) == ports["http"]


def test_probes_use_bentoml_paths_and_the_named_port(container):
    paths = _bentoml_system_paths()
    assert {"/livez", "/readyz", "/metrics"} <= paths, paths
    port_names = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        assert probe["httpGet"]["path"] in paths, f"{kind} path is not a BentoML route"
        assert probe["httpGet"]["port"] in port_names, f"{kind} port is not a declared container port"


def test_probe_and_scrape_paths_need_no_token(deployment, container):
    """The API token comes from a Secret, so auth is on: kubelet probes and Prometheus carry no token."""
    from service.middleware import OPEN_PATHS

    paths = {container[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in container}
    paths.add(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    assert paths <= OPEN_PATHS, f"{sorted(paths - OPEN_PATHS)} would answer 401 to probes/scrapers"


def test_service_config_does_not_move_the_probe_endpoints():
    """SyntheticImages may rename livez/readyz through BentoML's `endpoints` config; the probes assume it does not."""
    source = _source_text(ROOT / "service")
    assert not re.search(r"""["']endpoints["']\s*:""", source), "service config sets endpoints: update the probes"


def test_prometheus_scrape_annotations_point_at_metrics(deployment, container):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in _bentoml_system_paths()
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}


def test_every_env_var_exists_in_the_service_or_bentoml(container):
    service_source = _source_text(ROOT / "service")
    import bentoml
    import bentoml_cli

    bentoml_source = _source_text(Path(bentoml.__file__).parent) + _source_text(Path(bentoml_cli.__file__).parent)
    for name in _env(container):
        if name.startswith("SYNTHGEN_"):
            assert f'"{name}"' in service_source, f"{name} is not read anywhere in service/"
        else:
            assert name.startswith("BENTOML_"), f"{name}: neither the service's nor BentoML's"
            assert f'"{name}"' in bentoml_source, f"{name} is not an environment variable BentoML reads"


def test_env_values_are_accepted_by_the_service_settings(container):
    """The literal values start the service: Settings.from_env is what the service runs at start-up."""
    from service.config import Settings

    env = {}
    for name, item in _env(container).items():
        if "value" in item:
            env[name] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], item
            env[name] = "token-from-secret"
    settings = Settings.from_env(env)
    assert settings.api_token == "token-from-secret", "the API token must come from a Secret"
    limit_cpu = _cpu(container["resources"]["limits"]["cpu"])
    assert settings.workers <= limit_cpu, "more workers than CPUs: their HTTP stacks would share cores"
    assert settings.ort_threads <= limit_cpu, "SYNTHGEN_ORT_THREADS above the CPU limit oversubscribes one call"
    limit_mem = _bytes(container["resources"]["limits"]["memory"])
    worker_rss = 256 << 20  # one worker with every shipped model loaded (README, Memory: 219 MiB after n=1024 from each)
    assert settings.workers * (settings.memory_budget_bytes + worker_rss) < limit_mem, (
        "the workers' request memory budgets and models must fit under the memory limit")


def test_runs_as_bentomls_non_root_user_read_only(deployment, container):
    from bentoml._internal.container.generate import BENTO_UID_GID

    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == BENTO_UID_GID != 0
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["readOnlyRootFilesystem"] is True
    # BentoML writes its home (store, Prometheus multiprocess files): it must sit on a mounted volume.
    home = _env(container)["BENTOML_HOME"]["value"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(home == m or home.startswith(m.rstrip("/") + "/") for m in mounts), (home, mounts)
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_resources_and_shutdown(deployment, container):
    res = container["resources"]
    assert _cpu(res["requests"]["cpu"]) <= _cpu(res["limits"]["cpu"])
    assert _bytes(res["requests"]["memory"]) <= _bytes(res["limits"]["memory"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) < grace
    from service.service import SyntheticImages

    timeout = SyntheticImages.config.get("traffic", {}).get("timeout")
    assert timeout is None or grace >= timeout + int(pre_stop[1]), (
        f"terminationGracePeriodSeconds {grace} would kill requests the service still allows ({timeout} s)")


def test_service_and_hpa_target_the_deployment(deployment, container):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = _one("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container["ports"]}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in port_names or port["targetPort"] in {p["containerPort"] for p in container["ports"]}
    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            # Utilization targets are relative to requests: the container must request that resource.
            assert metric["resource"]["name"] in container["resources"]["requests"]
    for pdb in (d for d in _docs() if d["kind"] == "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB must allow a voluntary eviction"
