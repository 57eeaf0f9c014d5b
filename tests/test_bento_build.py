"""`bentoml build` from bentofile.yaml, offline, then `bentoml serve <tag>` from the store answers /generate.

The build runs in a temporary project holding the repository's service/, bentofile.yaml and requirements/
with the tiny `exported_dir` zoo as exported/, so it does not depend on the shipped zoo. The served Bento
must find its models through the default SYNTHGEN_EXPORTED_DIR (exported/ next to service/ in the Bento).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from service import encoders
from service_harness import BENTOML, REPO, server_env, start

pytestmark = pytest.mark.slow
FORBIDDEN = ("torch", "torchvision", "medmnist", "onnx", "onnxscript")  # onnxruntime is fine; onnx is not needed


@pytest.fixture(scope="module")
def built(exported_dir, tmp_path_factory):
    """(BENTOML_HOME, tag, bento folder) of a Bento built from a temporary copy of the project."""
    project = tmp_path_factory.mktemp("bento-project")
    shutil.copytree(REPO / "service", project / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "requirements", project / "requirements")
    shutil.copy(REPO / "bentofile.yaml", project / "bentofile.yaml")
    shutil.copytree(exported_dir, project / "exported")
    home = tmp_path_factory.mktemp("bentoml-home")
    result = subprocess.run([BENTOML, "build", "-o", "tag", str(project)], cwd=project, env=server_env(home),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tag = re.search(r"__tag__:(\S+)", result.stdout).group(1)
    name, version = tag.split(":")
    return home, tag, home / "bentos" / name / version


def test_bento_holds_the_service_the_models_and_a_dockerfile(built):
    _, tag, bento = built
    assert tag.startswith("synthgen:")
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "ARG BENTOML_DO_NOT_TRACK=true" in dockerfile and "ENV BENTOML_DO_NOT_TRACK=$BENTOML_DO_NOT_TRACK" in dockerfile
    src = bento / "src"
    assert (src / "service" / "service.py").is_file() and (src / "exported" / "manifest.json").is_file()
    assert sorted(p.name for p in (src / "exported" / "mnist" / "cdcgan").iterdir()) == [
        "card.json", "generator.onnx", "samples.png"]
    assert not (src / "training").exists() and not list(src.rglob("__pycache__"))
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service.service:SyntheticImages" and info["labels"]["project"] == "synthgen"


def test_bento_requirements_have_no_torch_or_medmnist(built):
    _, _, bento = built
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in lines
             if line.strip() and not line.startswith("#")}
    assert {"bentoml", "onnxruntime", "numpy", "pillow", "pydantic"} <= names
    assert not names & set(FORBIDDEN), names


def test_bento_served_from_the_store_generates(built, tmp_path):
    home, tag, _ = built
    server = start(tmp_path, target=tag, cwd=tmp_path, home=home)  # no SYNTHGEN_EXPORTED_DIR: the Bento's own
    try:
        response = httpx.post(f"{server.url}/generate", json={"dataset": "mnist", "n": 5, "seed": 0}, timeout=60)
        assert response.status_code == 200, response.text
        batch = encoders.decode_npz(response.content)
        assert batch.images.shape == (5, 28, 28, 1) and batch.meta["model"] == "cdcgan"
        assert set(httpx.get(f"{server.url}/models").json()["datasets"]) == {"mnist", "bloodmnist_64", "pneumoniamnist"}
    finally:
        server.stop()
