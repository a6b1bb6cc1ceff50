"""Shared fixtures. ``toy_shards``: small toy train/val shards written once per test session. ``s3``: a real S3
server (moto's) on localhost, for tests/test_object_storage.py and tests/test_dvc_remote.py."""

import logging
import os
import socket
import urllib.request
from types import SimpleNamespace

import pytest

from pipeline.data import shard_writer, sources

# No test may reach a real instance-metadata endpoint for credentials: the AWS SDKs' switch (which
# pipeline.storage_faults honours), and obstore's endpoint pointed at a closed local port should anything ask.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_METADATA_ENDPOINT"] = "http://127.0.0.1:9"

TOY_SEED = 0
TOY_TRAIN, TOY_VAL, TOY_SHARD_SIZE = 512, 128, 64  # 8 train shards, 2 val shards
BUCKET = "pipeline"


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """Namespace: root (dir with train/ and val/), train/val (Manifests), sizes, shard_size, num_classes, seed.

    Read-only: tests that tamper with shards must copy them first.
    """
    root = tmp_path_factory.mktemp("toy_shards")
    manifests = {}
    for split, n in (("train", TOY_TRAIN), ("val", TOY_VAL)):
        s = sources.toy(TOY_SEED, n, split)
        manifests[split] = shard_writer.write_shards(
            s, root / split, shard_size=TOY_SHARD_SIZE, num_classes=len(s.class_names),
            class_names=s.class_names, source=s.source,
        )
    return SimpleNamespace(
        root=root, train=manifests["train"], val=manifests["val"], train_size=TOY_TRAIN, val_size=TOY_VAL,
        shard_size=TOY_SHARD_SIZE, num_classes=len(sources.TOY_CLASSES), class_names=list(sources.TOY_CLASSES),
        seed=TOY_SEED,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto, threaded, in this process) on a free port with one bucket, ``BUCKET``; yields
    ``s3://BUCKET``. The AWS_* variables point at it (for this process and every process started from it)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    # moto's state is per process, not per server: empty it for the next module's server (and its bucket).
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
