"""Start real `bentoml serve` processes for the service tests, on 127.0.0.1 only, and stop them at exit.

`shared(key, start)` returns one server per key for the whole pytest session, so test modules that need the
same configuration (the healthy tiny zoo, auth off) share one process instead of each paying a start-up.
Every server gets its own BENTOML_HOME, BENTOML_DO_NOT_TRACK=true and only the SYNTHGEN_* variables given.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).parent / "bentoml")
TARGET = "service.service:SyntheticImages"
_SERVERS: dict[str, Server] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path, **synthgen: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHGEN_")}
    env.update(BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(home), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in synthgen.items()})
    return env


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def log_text(self, since: int = 0) -> str:
        """The server log from character `since` on (`len(log_text())` marks where a test's own lines begin)."""
        return self.log.read_text(errors="replace")[since:] if self.log.exists() else ""

    def wait_for_log(self, done: Callable[[str], bool], since: int = 0, timeout_s: float = 10) -> str:
        """The log from `since` once `done(text)` holds, or as it stands after `timeout_s`: BentoML writes a
        request's log lines after its response, so a test that has its answer waits here for the lines."""
        deadline = time.monotonic() + timeout_s
        while not done(text := self.log_text(since)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return text

    def worker_processes(self) -> list[psutil.Process]:
        """The server's BentoML worker processes (SYNTHGEN_WORKERS of them; each loads every model)."""
        return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]

    def worker_rss(self) -> int:
        """Bytes resident in the server's worker processes."""
        workers = self.worker_processes()
        if not workers:
            raise RuntimeError(f"no BentoML worker process under pid {self.process.pid}")
        return sum(p.memory_info().rss for p in workers)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the arbiter and its workers
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


def start(workdir: Path, wait_s: float = 90, target: str = TARGET, cwd: Path = REPO, home: Path | None = None,
          **synthgen: str) -> Server:
    """`bentoml serve target` on a free loopback port; returns once /readyz answers 200.

    `target` is an import path (served from `cwd`) or a Bento tag (served from the store in `home`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / f"serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd, env=server_env(home or workdir / "bentoml-home", **synthgen), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"bentoml serve not ready after {wait_s} s:\n{server.log_tail()}")


def shared(key: str, starter) -> Server:
    server = _SERVERS.get(key)
    if server is None or server.process.poll() is not None:
        server = _SERVERS[key] = starter()
    return server


@atexit.register
def _stop_all() -> None:
    for server in _SERVERS.values():
        server.stop()


def main_server(exported_dir: Path, tmp_path_factory) -> Server:
    """The healthy tiny zoo with default settings (auth off): shared by every module that needs it."""
    return shared("main", lambda: start(tmp_path_factory.mktemp("serve-main"), SYNTHGEN_EXPORTED_DIR=str(exported_dir)))


def run_serve_expecting_failure(workdir: Path, timeout_s: float = 60, **synthgen: str) -> tuple[int | None, str]:
    """`bentoml serve` that should refuse to start: (exit code, or None if still running at timeout; output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [BENTOML, "serve", TARGET, "--host", "127.0.0.1", "--port", str(free_port())],
            cwd=REPO, env=server_env(workdir / "bentoml-home", **synthgen), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(url="", process=process, log=log)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    server.stop()
    return code, server.log_tail(20_000)
