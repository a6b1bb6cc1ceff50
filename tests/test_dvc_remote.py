"""The pipeline's artefacts through a DVC remote on S3 (dvc-s3), against a real S3 server (moto's, the `s3` fixture
of tests/conftest.py): `dvc repro` in a temporary git repo, `dvc push`, then the outputs and the local DVC cache
deleted and `dvc pull` bringing every file back byte for byte (nothing to re-run); a wrong secret key is refused."""

import hashlib
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dvc_s3")
pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from test_dvc import DVC, _run, _stages_run, small_repo  # noqa: E402  (tests/ is on sys.path: rootdir)

from pipeline.cache import integrity  # noqa: E402
from pipeline.cache.store import CacheStore  # noqa: E402

OUTS = ("data", "cache", "runs")  # every DVC-cached out of dvc.yaml lives under these (metrics/ is git's)
PREFIX = "dvc"


def _outputs(work: Path) -> dict:
    """{path: sha256} of every file of every DVC-cached out (dvc.lock's outs under data/, cache/, runs/)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    outs = [work / o["path"] for st in lock["stages"].values() for o in st.get("outs", [])
            if Path(o["path"]).parts[0] in OUTS]  # not metrics/ (cache: false, git-tracked)
    files = [p for o in outs for p in ([o] if o.is_file() else sorted(o.rglob("*"))) if p.is_file()]
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _files(work: Path) -> set:
    return {str(p.relative_to(work)) for d in OUTS for p in (work / d).rglob("*") if p.is_file()}


def _json(cmd, work):
    proc = _run(cmd, work, check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def _remote_keys(bucket: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _enforce_auth(endpoint: str, on: bool):
    """moto accepts any credentials unless told to check them (then only IAM users' keys pass): process-wide."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                 headers={"Content-Type": "text/plain"})  # not a form: moto reads the raw body
    urllib.request.urlopen(req).read()


@pytest.mark.slow
def test_dvc_push_and_pull_through_an_s3_remote(s3, tmp_path):
    assert DVC, "dvc is not installed (pip install -e '.[dev]')"
    t0 = time.time()
    endpoint, bucket = os.environ["AWS_ENDPOINT_URL"], s3.removeprefix("s3://")
    work = small_repo(tmp_path / "repo")
    _run([DVC, "repro"], work)
    t_repro = time.time() - t0
    before = _outputs(work)
    # Under data/, cache/, runs/ only the stage-one lease file (beside the store, empty after a clean build) is
    # not an out: DVC neither pushes nor pulls it.
    assert {Path(p).suffix for p in _files(work) - set(before)} <= {".lease"}, _files(work) - set(before)
    params = yaml.safe_load((work / "params.yaml").read_text())
    store, student = (work / params["cache"]["path"]).resolve(), (work / params["export"]["checkpoint"]).resolve()
    assert student.is_file() and any(p.startswith(str(store.relative_to(work))) for p in before)

    # The remote: a prefix of the bucket; endpointurl for an S3-compatible server (credentials: the AWS_* env).
    _run([DVC, "remote", "add", "-d", "storage", f"{s3}/{PREFIX}"], work)
    _run([DVC, "remote", "modify", "storage", "endpointurl", endpoint], work)
    t1 = time.time()
    _run([DVC, "push"], work)
    t_push = time.time() - t1
    keys = _remote_keys(bucket, endpoint)
    assert all(k.startswith(f"{PREFIX}/files/md5/") for k in keys), keys[:5]  # DVC 3's content-addressed layout
    assert len(keys) >= len(set(before.values())), (len(keys), len(set(before.values())))  # + one .dir per out dir
    assert _json([DVC, "status", "-c", "--json"], work) == {}

    # A fresh machine in all but the git checkout: no outputs, no local DVC cache; `dvc pull` brings both back.
    for d in OUTS:
        shutil.rmtree(work / d)
    shutil.rmtree(work / ".dvc" / "cache")
    assert _json([DVC, "status", "--json"], work)  # every stage's outs are missing now
    t1 = time.time()
    _run([DVC, "pull"], work)
    t_pull = time.time() - t1
    assert _outputs(work) == before and _files(work) == set(before)
    assert _json([DVC, "status", "--json"], work) == {}
    assert _json([DVC, "status", "-c", "--json"], work) == {}
    assert _stages_run(_run([DVC, "repro"], work)) == set()
    cache = CacheStore.open(store)
    assert cache.done_mask().all() and integrity.check_store(cache)["ok"]
    assert student.is_file() and (work / params["export"]["out"] / "model.safetensors").is_file()

    # Credentials are checked: the key of an IAM user with a wrong secret fails, the right secret works.
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="dvc")
    iam.put_user_policy(UserName="dvc", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="dvc")["AccessKey"]
    _run([DVC, "remote", "modify", "--local", "storage", "access_key_id", key["AccessKeyId"]], work)
    _run([DVC, "remote", "modify", "--local", "storage", "secret_access_key", "wrong"], work)
    _enforce_auth(endpoint, True)
    try:
        bad = _run([DVC, "push"], work, check=False)
        assert bad.returncode != 0 and "Forbidden" in bad.stderr, bad.stdout + bad.stderr  # a 403, not retried
        _run([DVC, "remote", "modify", "--local", "storage", "secret_access_key", key["SecretAccessKey"]], work)
        _run([DVC, "push"], work)
    finally:
        _enforce_auth(endpoint, False)
    print(f"test_dvc_remote: repro {t_repro:.0f} s, push {t_push:.1f} s, pull {t_pull:.1f} s, "
          f"{len(keys)} objects, total {time.time() - t0:.0f} s")

