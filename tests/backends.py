"""Real backing services for tests, on the loopback only.

* A throwaway PostgreSQL cluster: Debian's server binaries (``apt-get install postgresql``,
  /usr/lib/postgresql/<version>/bin), ``initdb`` into a temporary directory and ``pg_ctl``
  on a free 127.0.0.1 port, trust authentication, durability off (fsync) for speed. As root
  it runs as ``nobody`` (PostgreSQL refuses to run as root).
* An S3 server: moto in server mode (``ThreadedMotoServer``), reached only through the S3 API
  with boto3, exactly as AWS S3 or MinIO would be.

Without the PostgreSQL binaries the tests that need them are skipped, unless ``CI=true``:
then they fail, so a CI image that lacks the package cannot pass silently.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    explicit = os.environ.get("LIP_SYNC_TEST_PG_BIN")
    candidates = [explicit] if explicit else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def require_postgres() -> Path:
    found = postgres_bin()
    if found is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class PostgresCluster:
    bin: Path
    root: Path
    port: int
    as_user: str | None  # run the server as this user (we are root)

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", timeout=30)


def start_postgres(pg_bin: Path) -> PostgresCluster:
    as_user = "nobody" if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: that is private to root (0700), and the server runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="lipsync-pg-"))
    if as_user:
        shutil.chown(root, user=as_user)
    cluster = PostgresCluster(pg_bin, root, free_port(), as_user)
    init = cluster._run("initdb", "-D", str(root / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions")
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {root} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c log_min_messages=warning")
    for attempt in range(3):  # the port may be taken between free_port() and the bind
        started = cluster._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-w",
                               "-t", "60", "-o", options, "start", timeout=90)
        if started.returncode == 0:
            return cluster
        cluster.port = free_port()
        options = options.replace(options.split(" -p ")[1].split(" ")[0], str(cluster.port), 1)
    log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL did not start:\n{started.stderr}\n{log[-3000:]}")


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = start_postgres(require_postgres())
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ S3

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint_url: str
    server: object
    _client: object = None

    def client(self):
        """One boto3 client for the tests (making a client costs a second or more on a busy machine)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id="testing",
                aws_secret_access_key="testing")
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"lipsync-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server (``python -m moto.server``) in its own process on 127.0.0.1; the AWS_* variables
    point boto3 in this process, and in servers started from it, at fake credentials."""
    import sys

    import httpx

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/moto-api/", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
        yield S3Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------- BentoML processes, deployed apart


def start_bento(workdir: Path, name: str, args: list[str], env: dict[str, str]):
    """``start-http-server service:LipSync <args>`` as a pod runs it (not waited for): a tests.server.Server.

    ``--service-name MuseTalkRunner`` serves the runner as an inner service; ``--service-name LipSync
    --depends MuseTalkRunner=<url>`` the API, reaching that runner through BentoML's dependency map.
    """
    import sys

    from .server import ROOT, Server

    port = free_port()
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server", "service:LipSync", *args,
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env={**env, "LIP_SYNC_DATA_DIR": str(data_dir)}, stdout=log.open("ab"),
        stderr=subprocess.STDOUT, start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc, log, data_dir)


def wait_ready(server, timeout: float = 300):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.url} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=3).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{server.url} not ready after {timeout} s:\n{server.log_tail()}")


def fleet_env(workdir: Path, models_dir: Path, database_url: str, storage_url: str, s3_endpoint: str,
              **extra: str) -> dict[str, str]:
    """The environment of API replicas (and their runner) on one database and one bucket, tiny models."""
    from .server import ROOT

    return {
        **os.environ,  # the AWS_* variables of s3_server()
        "MUSETALK_MODELS_DIR": str(models_dir),
        "LIP_SYNC_DEVICE": "cpu",
        "LIP_SYNC_FREE_SPACE_FLOOR_MB": "0",
        "LIP_SYNC_JOB_WORKERS": "2",
        "LIP_SYNC_CHUNK_FRAMES": "4",
        "LIP_SYNC_DATABASE_URL": database_url,
        "LIP_SYNC_STORAGE_URL": storage_url,
        "LIP_SYNC_S3_ENDPOINT_URL": s3_endpoint,
        "BENTOML_CONFIG": str(ROOT / "configuration.yaml"),
        "BENTOML_HOME": str(workdir / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **extra,
    }
