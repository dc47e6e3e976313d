"""A real S3 API on loopback for tests: moto's server, never a public address.

Import the fixtures into a test module (``from tests.s3server import s3_endpoint, s3_bucket``) or use the
helpers directly. ``moto_subprocess`` runs a separate server process, for tests that change moto's
process-global settings (authentication).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TEST_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_port()


def client(endpoint: str, key: str = "testing", secret: str = "testing") -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret)


def _wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout} s")


@contextlib.contextmanager
def moto_subprocess(env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m moto.server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in a thread of the test process, on 127.0.0.1 and a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Test credentials in the environment, and no stray AWS config from the machine."""
    for key, value in TEST_KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "STADI_CREDENTIALS_DIR"):
        monkeypatch.delenv(key, raising=False)
    return dict(TEST_KEYS)


@pytest.fixture
def s3_bucket(s3_endpoint: str, s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the test server; returns its name."""
    name = f"stadi-test-{uuid.uuid4().hex[:12]}"
    client(s3_endpoint).create_bucket(Bucket=name)
    return name


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix`` in ``bucket``."""
    response = client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in response.get("Contents", []))
