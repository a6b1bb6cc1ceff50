"""`python -m pipeline.push_cache push.repo=<owner>/<name>`: share a finished cache store like a dataset. Checks
that the store at cache.path is complete and intact (every unit, as verify_cache does) and belongs to this
configuration (provenance, pixels, the train manifest's shards), then pushes it and the manifests of its shards to
a Hugging Face Hub dataset repo in one commit (pipeline.cache.publish), and prints the overrides stage two reads it
with, read-only and in place:

    python -m pipeline.push_cache push.repo=<owner>/<name>                    # the store and the manifests
    python -m pipeline.push_cache push.repo=<owner>/<name> push.shards=true   # our own shards too
    python -m pipeline.train_student cache.path=hf://datasets/<owner>/<name>/<store>.zarr \\
        data.shards=hf://datasets/<owner>/<name>/shards/<data.name>          # stage two, from the Hub

Needs a login with write access (HF_TOKEN or `hf auth login`); HF_ENDPOINT points it at another Hub.
"""

from omegaconf import DictConfig

from pipeline import cli


def main(cfg: DictConfig) -> None:
    from pipeline.cache.publish import push_cache

    out = push_cache(cfg)
    print(f"pushed {out['files']} files ({out['bytes'] / 1e6:.1f} MB) to hf://datasets/{out['repo']}")
    print(f"cache.path={out['cache.path']} data.shards={out['data.shards']}")


KEYS = ('cache.path', 'data.shards', 'push.repo', 'push.shards')

if __name__ == "__main__":
    cli.run("push_cache", main, __doc__, KEYS)
