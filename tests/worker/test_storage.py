"""Storage: local and S3 (a real moto server on loopback) stores, atomic writes, clear errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from stadi_worker.job import storage
from stadi_worker.job.storage import LocalStore, S3Store, StorageError, download_prefix, open_store

from tests import s3server
from tests.s3server import client, closed_port, list_keys, moto_subprocess

# the shared S3 fixtures (tests/conftest.py belongs to the core; these live in tests/s3server.py)
s3_endpoint, s3_bucket, s3_env = s3server.s3_endpoint, s3server.s3_bucket, s3server.s3_env

# --- local ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file"])
def test_local_store_roundtrip(tmp_path: Path, form: str) -> None:
    root = tmp_path / "out" / "sub"
    store = open_store(str(root) if form == "path" else root.as_uri())
    assert isinstance(store, LocalStore)
    assert not store.exists("a.png")
    uri = store.put("a.png", b"\x89PNG data")
    assert uri == (root / "a.png").as_uri() == store.uri("a.png")
    assert store.exists("a.png")
    assert store.get("a.png") == b"\x89PNG data"
    assert store.base_uri == root.as_uri()
    assert oct((root / "a.png").stat().st_mode & 0o777) == oct(0o644)


def test_local_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves the previous object intact and no temporary file behind."""
    store = LocalStore(tmp_path)
    store.put("image-0000.png", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(StorageError, match=r"cannot write file://.*image-0000\.png: No space left"):
        store.put("image-0000.png", b"new")
    assert (tmp_path / "image-0000.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-0000.png"]


def test_local_put_writes_through_a_temporary_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((Path(src).name, Path(dst).name))
        assert Path(src).read_bytes() == b"data"  # complete before it gets its final name
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    LocalStore(tmp_path).put("x.png", b"data")
    assert len(seen) == 1 and seen[0][1] == "x.png" and seen[0][0] != "x.png"


@pytest.mark.parametrize("name", ["", "..", "a/b", "../x"])
def test_names_stay_inside_the_prefix(tmp_path: Path, name: str) -> None:
    with pytest.raises(StorageError, match="invalid object name"):
        LocalStore(tmp_path).put(name, b"")


def test_local_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot write"):
        open_store(str(tmp_path / "file" / "out")).put("a.png", b"x")


def test_unsupported_scheme() -> None:
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


def test_download_prefix_local_dir_is_used_in_place(tmp_path: Path) -> None:
    assert download_prefix(tmp_path.as_uri(), tmp_path / "cache") == tmp_path
    with pytest.raises(StorageError, match="does not exist"):
        download_prefix((tmp_path / "missing").as_uri(), tmp_path / "cache")


# --- S3 -------------------------------------------------------------------------------------------------


def test_s3_store_roundtrip(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/jobs/one", s3_endpoint)
    assert isinstance(store, S3Store)
    assert not store.exists("image-0000.png")
    uri = store.put("image-0000.png", b"png-bytes")
    assert uri == f"s3://{s3_bucket}/jobs/one/image-0000.png" == store.uri("image-0000.png")
    assert store.exists("image-0000.png")
    assert store.get("image-0000.png") == b"png-bytes"
    head = client(s3_endpoint).head_object(Bucket=s3_bucket, Key="jobs/one/image-0000.png")
    assert head["ContentType"] == "image/png"
    # one PutObject: no temporary keys are ever created
    assert list_keys(s3_endpoint, s3_bucket) == ["jobs/one/image-0000.png"]


def test_s3_bucket_root_prefix(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}", s3_endpoint)
    store.put("manifest.json", b"{}")
    assert store.uri("manifest.json") == f"s3://{s3_bucket}/manifest.json"
    assert list_keys(s3_endpoint, s3_bucket) == ["manifest.json"]


def test_s3_missing_bucket_is_a_clear_error(s3_endpoint: str, s3_env: dict[str, str]) -> None:
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket-here/out", s3_endpoint)
    message = str(info.value)
    assert "\n" not in message
    assert "s3://no-such-bucket-here/out" in message and s3_endpoint in message
    assert "bucket does not exist" in message


def test_s3_unreachable_endpoint_fails_fast_and_keeps_written_images(
    s3_endpoint: str, s3_bucket: str
) -> None:
    good = open_store(f"s3://{s3_bucket}/run", s3_endpoint)
    good.put("image-0000.png", b"first")
    dead = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_store(f"s3://{s3_bucket}/run", dead)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "\n" not in message and dead in message and f"s3://{s3_bucket}/run" in message
    assert "endpoint unreachable" in message
    # A store that loses its endpoint mid-job: the put fails with the same clear error ...
    good.client = storage.s3_client(dead)
    good.endpoint = dead
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot write s3://.*image-0001\.png .*endpoint unreachable"):
        good.put("image-0001.png", b"second")
    assert time.monotonic() - started < 10
    # ... and what was written before stays.
    assert list_keys(s3_endpoint, s3_bucket) == ["run/image-0000.png"]


def test_s3_secret_dir_credentials(s3_endpoint: str, s3_bucket: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys from a mounted Secret (files named like the env vars) are used when the env has none."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("from-secret-too\n")
    store = open_store(f"s3://{s3_bucket}/s", s3_endpoint, credentials_dir=secret)
    creds = store.client._request_signer._credentials  # the keys actually used to sign
    assert (creds.access_key, creds.secret_key) == ("from-secret", "from-secret-too")
    store.put("a.png", b"x")
    assert store.exists("a.png")
    # and through the environment variable that points at the mount (a rank's settings)
    from stadi_worker.settings import WorkerSettings

    monkeypatch.setenv("STADI_CREDENTIALS_DIR", str(secret))
    assert open_store(f"s3://{s3_bucket}/s", s3_endpoint, WorkerSettings().output_credentials()).exists("a.png")


def test_s3_secret_dir_problems(tmp_path: Path, s3_env: dict[str, str]) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        storage.s3_client("http://127.0.0.1:1", tmp_path / "nope")
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("only-half")
    with pytest.raises(StorageError, match="needs both"):
        storage.s3_client("http://127.0.0.1:1", tmp_path)


def test_s3_denied_bucket_is_a_clear_error(tmp_path: Path, s3_env: dict[str, str]) -> None:
    """With authentication on, unknown keys and a user without rights on the bucket both fail clearly."""
    import json

    # A separate server process: moto's authentication switch is process-global. The first 4 requests
    # are unauthenticated (the setup below); everything after is checked against IAM.
    with moto_subprocess({"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as endpoint:
        import boto3

        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing")
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::other", "arn:aws:s3:::other/*"]}]}
        iam.put_user_policy(UserName="reader", PolicyName="other-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]

        with pytest.raises(StorageError, match=r"cannot open s3://locked/out .*access denied"):
            open_store("s3://locked/out", endpoint)  # the env's keys are unknown to this server

        secret = tmp_path / "secret"
        secret.mkdir()
        (secret / "AWS_ACCESS_KEY_ID").write_text(key["AccessKeyId"])
        (secret / "AWS_SECRET_ACCESS_KEY").write_text(key["SecretAccessKey"])
        with pytest.raises(StorageError) as info:
            open_store("s3://locked/out", endpoint, credentials_dir=secret)
        assert "access denied" in str(info.value) and endpoint in str(info.value)
        store = open_store("s3://locked/out", endpoint, credentials_dir=secret, check=False)
        with pytest.raises(StorageError, match=r"cannot write s3://locked/out/a\.png .*access denied"):
            store.put("a.png", b"x")


def test_download_prefix_from_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    c = client(s3_endpoint)
    files = {"model_index.json": b"{}", "unet/config.json": b"{\"a\": 1}", "unet/w.safetensors": b"w" * 1000}
    for rel, data in files.items():
        c.put_object(Bucket=s3_bucket, Key=f"models/tiny/{rel}", Body=data)
    c.put_object(Bucket=s3_bucket, Key="models/tiny-other/x", Body=b"not mine")
    dest = tmp_path / "cache"
    assert download_prefix(f"s3://{s3_bucket}/models/tiny", dest, s3_endpoint) == dest
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    # a second call is a cache hit: same-size files are not fetched again
    (dest / "unet" / "w.safetensors").write_bytes(b"x" * 1000)
    download_prefix(f"s3://{s3_bucket}/models/tiny/", dest, s3_endpoint)
    assert (dest / "unet" / "w.safetensors").read_bytes() == b"x" * 1000
    with pytest.raises(StorageError, match="no objects under"):
        download_prefix(f"s3://{s3_bucket}/models/none", tmp_path / "c2", s3_endpoint)
    with pytest.raises(StorageError, match="endpoint unreachable"):
        download_prefix(f"s3://{s3_bucket}/models/tiny", tmp_path / "c3", f"http://127.0.0.1:{closed_port()}")
