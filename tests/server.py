"""Start the real BentoML server (`bentoml serve service:LipSync`) for tests, with tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    data_dir: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def processes(self) -> list[psutil.Process]:
        """The server and every process it started (BentoML's workers leave its process group)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the server and all its workers at once: a crash, not a shutdown."""
        for p in self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        psutil.wait_procs(self.processes(), timeout=30)


def start_server(workdir: Path, models_dir: Path | str, *, ready: bool = True, timeout: float = 180,
                 **env: str) -> Server:
    port = free_port()
    data_dir = workdir / "data"
    environment = {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(models_dir),
        "LIP_SYNC_DEVICE": "cpu",
        "LIP_SYNC_DATA_DIR": str(data_dir),
        "LIP_SYNC_FREE_SPACE_FLOOR_MB": "0",
        "LIP_SYNC_JOB_WORKERS": "4",
        "LIP_SYNC_CHUNK_FRAMES": "4",
        "BENTOML_CONFIG": str(ROOT / "configuration.yaml"),
        "BENTOML_HOME": str(workdir / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **env,
    }
    log = workdir / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:LipSync", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=environment, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, data_dir)
    deadline = time.monotonic() + timeout
    probe = "/readyz" if ready else "/livez"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + probe, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"server not {'ready' if ready else 'alive'} after {timeout} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    children = server.processes()[1:]
    if server.proc.poll() is None:
        try:
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:  # never leave a worker behind for the next test
        p.kill()


@contextmanager
def running_server(workdir: Path, models_dir: Path | str, **kwargs) -> Iterator[Server]:
    server = start_server(workdir, models_dir, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)
