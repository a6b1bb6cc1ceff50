"""Shared fixtures, each built once per test session and read-only for the tests (copy before changing):
``toy_shards``: small toy train/val shards; ``random_teacher``: a seeded random regnety_002 checkpoint; ``env``:
stage one's overrides and the reference store of the cache-trust tests (tests/store_env.py); ``foreign``: a store
of another teacher. ``s3`` (per module): a real S3 server (moto's) on localhost."""

import logging
import os
import urllib.request
from types import SimpleNamespace

import pytest

from pipeline.data import sources
from procs import free_port
from toy_data import write_toy

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
    manifests = write_toy(root, TOY_TRAIN, TOY_VAL, TOY_SHARD_SIZE, seed=TOY_SEED)
    return SimpleNamespace(
        root=root, train=manifests["train"], val=manifests["val"], train_size=TOY_TRAIN, val_size=TOY_VAL,
        shard_size=TOY_SHARD_SIZE, num_classes=len(sources.TOY_CLASSES), class_names=list(sources.TOY_CLASSES),
        seed=TOY_SEED,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core machine, intra-op threads spin-wait and run ~10x
    slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A fixed (seeded random) regnety_002 with 10 classes, as a state dict: stage one's mechanics need no good
    teacher."""
    import timm
    import torch

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def env(toy_shards, random_teacher, tmp_path_factory):
    from store_env import trust_env

    return trust_env(toy_shards, random_teacher, tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="session")
def foreign(env):
    from store_env import foreign_store

    return foreign_store(env)


@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto, threaded, in this process) on a free port with one bucket, ``BUCKET``; yields
    ``s3://BUCKET``. The AWS_* variables point at it (for this process and every process started from it)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")

    port = free_port()
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
