"""The S3 remote, exercised: `dvc push` to and `dvc pull` from a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sh, tool_env, tree_hashes

pytest.importorskip("dvc_s3", reason="the S3 remote needs `pip install -e .[s3]`")
moto_server = pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")

BUCKET = "facedetail-test"
KEY_ID, SECRET = "AKIAFACEDETAILTEST", "facedetail-test-secret-key"


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 (never all interfaces) on a free port, with an empty bucket; stopped at the end."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                     aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def _no_ambient_credentials(empty: Path) -> dict[str, str]:
    """Tool environment in which only DVC's config can supply S3 credentials (no env, files or metadata service)."""
    empty.touch()
    env = {k: v for k, v in tool_env().items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty), AWS_EC2_METADATA_DISABLED="true")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = _no_ambient_credentials(cwd.parent / "empty-aws-config")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(args: list[str], cwd: Path) -> str:
    proc = _run(args, cwd)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _credentials(repo: Path) -> None:
    _ok(["dvc", "remote", "modify", "--local", "s3store", "access_key_id", KEY_ID], repo)
    _ok(["dvc", "remote", "modify", "--local", "s3store", "secret_access_key", SECRET], repo)


def test_push_to_s3_and_pull_into_fresh_clone(tmp_path: Path, s3_endpoint: str) -> None:
    """Outputs pushed to S3 come back byte-identical in a fresh clone; the credentials never reach git."""
    repo = tmp_path / "repo"
    raw = repo / "data" / "raw"
    (raw / "nested").mkdir(parents=True)
    for i in range(12):
        (raw / f"item-{i:02d}.bin").write_bytes(os.urandom(4096 * (i + 1)))
    (raw / "nested" / "notes.txt").write_text("shards and manifests alike\n")
    (repo / "model.bin").write_bytes(os.urandom(300_000))
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["dvc", "config", "core.analytics", "false"], repo)
    _ok(["dvc", "add", "-q", "data/raw", "model.bin"], repo)
    _ok(["dvc", "remote", "add", "-d", "s3store", f"s3://{BUCKET}/facedetail"], repo)
    _ok(["dvc", "remote", "modify", "s3store", "endpointurl", s3_endpoint], repo)
    _credentials(repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data"], repo)

    tracked = sh(["git", "ls-files"], repo).stdout.split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    config = (repo / ".dvc/config").read_text()
    assert KEY_ID not in config and SECRET not in config and s3_endpoint in config
    local = (repo / ".dvc/config.local").read_text()
    assert KEY_ID in local and SECRET in local
    assert "config.local" in (repo / ".dvc/.gitignore").read_text()

    pushed = _ok(["dvc", "push"], repo)
    assert "15 files pushed" in pushed, pushed  # 13 files, the folder's .dir listing and model.bin

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                      aws_secret_access_key=SECRET)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len(keys) == 15 and all(k.startswith("facedetail/files/md5/") for k in keys), keys

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / ".dvc/config.local").exists() and not (clone / "data/raw").exists()
    denied = _run(["dvc", "pull"], clone)  # no credentials anywhere: the pull fails, nothing is pulled
    assert denied.returncode != 0 and not (clone / "model.bin").exists(), denied.stdout + denied.stderr
    _credentials(clone)
    _ok(["dvc", "pull"], clone)
    assert tree_hashes(clone, "data/raw", "model.bin") == tree_hashes(repo, "data/raw", "model.bin")
    assert len(tree_hashes(clone, "data/raw")) == 13
    assert _ok(["dvc", "status", "--cloud"], clone).strip().endswith("Cache and remote 's3store' are in sync.")
