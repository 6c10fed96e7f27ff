"""Benchmark: ``dvc push`` / ``dvc pull`` of this repository's data through an S3 API and a local folder.

    python bench/remote.py [--repo .] [--work DIR] [--jobs N] [--json PATH]

What is moved is what ``HEAD``'s ``dvc.lock`` names (the default profile's outputs when run on this
repository). The repository itself is never changed: it is cloned with git into ``--work`` (a
temporary folder by default), the clone's cache is a hard-linked copy of the repository's cache
(``cp -al``: no bytes copied, and DVC never writes a cache file in place), and every remote is set
in the clone's ``.dvc/config.local``.

Remotes: moto's S3 server (``ThreadedMotoServer`` on 127.0.0.1, in this process, objects in memory)
and, as the baseline measured in the same run, a plain folder remote. Each ``dvc pull`` goes into a
fresh clone with an empty cache (download + checkout), and the pulled files are compared byte for
byte (sha256) with the outputs checked out from the original cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUCKET = "facedetail-bench"
KEY_ID, SECRET = "AKIAFACEDETAILBENCH", "facedetail-bench-secret"


def run(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds ``args`` took; raises with its output when it fails."""
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t


def tree_sha(root: Path, parts: list[str]) -> dict[str, str]:
    out = {}
    for part in parts:
        for p in sorted((root / part).rglob("*")) if (root / part).is_dir() else [root / part]:
            if p.is_file():
                h = hashlib.sha256()
                with p.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository whose HEAD data to move")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--jobs", type=int, help="dvc push/pull --jobs (default DVC's: 4 x cores)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    repo = args.repo.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-remote-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               AWS_EC2_METADATA_DISABLED="true")
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    results: dict[str, Any] = {}
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                     aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)

        def remotes(clone: Path) -> None:
            for line in (["remote", "add", "--local", "s3store", f"s3://{BUCKET}/facedetail"],
                         ["remote", "modify", "--local", "s3store", "endpointurl", endpoint],
                         ["remote", "modify", "--local", "s3store", "access_key_id", KEY_ID],
                         ["remote", "modify", "--local", "s3store", "secret_access_key", SECRET],
                         ["remote", "add", "--local", "folder", str(work / "folder-remote")]):
                run(["dvc", *line], clone, env)

        source = work / "source"
        run(["git", "clone", "-q", str(repo), str(source)], work, env)
        run(["cp", "-al", str(repo / ".dvc" / "cache"), str(work / "source-cache")], work, env)
        run(["dvc", "cache", "dir", "--local", str(work / "source-cache")], source, env)
        remotes(source)
        run(["dvc", "checkout", "-q"], source, env)  # the reference bytes, from the original cache
        outs = sorted(p.name for p in (source / "data").iterdir() if p.is_dir() and p.name != "external")
        reference = tree_sha(source, [f"data/{o}" for o in outs])
        size = sum((source / p).stat().st_size for p in reference)
        results.update(files=len(reference), bytes=size, outputs=outs)
        print(f"{len(reference):,} files, {size / 1e9:.3f} GB in {len(outs)} outputs of HEAD's dvc.lock", flush=True)

        for remote in ("folder", "s3store"):
            push = run(["dvc", "push", "-q", "-r", remote, *jobs], source, env)
            clone = work / f"pull-{remote}"
            run(["git", "clone", "-q", str(source), str(clone)], work, env)
            remotes(clone)
            pull = run(["dvc", "pull", "-q", "-r", remote, *jobs], clone, env)
            same = tree_sha(clone, [f"data/{o}" for o in outs]) == reference
            results[remote] = {"push_s": round(push, 2), "pull_s": round(pull, 2), "identical": same,
                               "push_MB_s": round(size / 1e6 / push, 1), "pull_MB_s": round(size / 1e6 / pull, 1)}
            print(f"{remote}: push {push:.1f} s ({size / 1e6 / push:.0f} MB/s), pull into a fresh clone {pull:.1f} s "
                  f"({size / 1e6 / pull:.0f} MB/s), byte-identical: {same}", flush=True)
            shutil.rmtree(clone)
        for step in ("push_s", "pull_s"):
            results[f"s3_vs_folder_{step}"] = round(results["s3store"][step] / results["folder"][step], 2)
        print(f"S3 (moto) / folder time: push {results['s3_vs_folder_push_s']}x, "
              f"pull {results['s3_vs_folder_pull_s']}x")
    finally:
        server.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(results[r]["identical"] for r in ("folder", "s3store")) else 1


if __name__ == "__main__":
    sys.exit(main())
