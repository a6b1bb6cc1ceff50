"""Write the train and val shards of ``cfg.data`` into ``cfg.data.shards/{train,val}``.

    python -m pipeline.make_shards data=toy workdir=.
    python -m pipeline.make_shards data=fashion_mnist
    python -m pipeline.make_shards data=folder data.root=/path/to/tree data.num_classes=100
    python -m pipeline.make_shards data=imagenet data.root=/data/imagenet data.max_side=512   # pre-resized JPEGs

``data=published`` reads published WebDataset shards in place (a folder, s3://, http(s)://, hf://datasets/...;
pipeline.data.published) and writes only our manifests, each shard's location, size and hash (docs/data.md)::

    python -m pipeline.make_shards data=published data.root=hf://datasets/<owner>/<repo> data.num_classes=<C>

Beside the splits goes timm's ``_info.json`` (split sizes and shard names): timm opens the shards by name,
``timm.data.create_dataset("wds/<name>", root=<data.shards>, split="train")``.

Re-running with the same input verifies and keeps the shards ("up to date"); a different shard set is refused
unless ``overwrite=true``. Every input image is decoded in full once (folder sources; 16-bit and float images are
stored as 8-bit PNGs, pipeline.data.images), and every split is written and checked before any is installed:
errors (bad input, a corrupt or truncated image, a symlink that does not resolve, an empty class folder or one
missing from val without data.allow_empty_classes=true, a refused overwrite, a full disk) exit with status 2
naming the file, and install nothing.
"""

from __future__ import annotations


from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline import cli
from pipeline.logs import progress


def make_shards(cfg: DictConfig) -> dict:
    import shutil

    from pipeline.data.shard_writer import install_plan, install_shards, stage_shards
    from pipeline.data.sources import SPLITS, from_config
    from pipeline.data.published import index_split
    from pipeline.data.wds_info import write_info

    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    staged = {}  # split -> (temporary directory, destination, manifest)
    published = data["source"] == "published"  # read in place: only our manifest is written
    splits = {} if published else {split: from_config(data, split) for split in SPLITS}  # listed before any decode
    try:
        for split in SPLITS:
            out = storage.as_path(data["shards"]) / split  # a local Path, or s3://bucket/prefix (pipeline.storage)
            if published:
                tmp, new = index_split(data, split, out)
                staged[split] = (tmp, out, new)
                continue
            samples = splits[split]
            bar = progress(len(samples), unit="img", desc=f"{data['name']}/{split}")
            try:
                tmp, new = stage_shards(_counted(samples, bar), out, n=len(samples), split=split,
                                        shard_size=data["shard_size"], num_classes=data["num_classes"],
                                        class_names=samples.class_names, source=samples.source)
            finally:  # closed now, not when the abandoned generator is collected: an error line comes last
                bar.close()
            staged[split] = (tmp, out, new)
        plans = {split: install_plan(out, new, bool(cfg.overwrite)) for split, (_, out, new) in staged.items()}
        done = {split: install_shards(tmp, out, new, bool(cfg.overwrite), plan=plans[split])
                for split, (tmp, out, new) in staged.items()}
        if not published:  # a published set has its own
            write_info(storage.as_path(data["shards"]), data["name"], done)  # timm: create_dataset("wds/<name>")
        return done
    finally:
        for tmp, _, _ in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)


def main(cfg: DictConfig) -> None:

    make_shards(cfg)


def _counted(samples, bar):
    with bar:
        for sample in samples:
            yield sample
            bar.update(1)


KEYS = ('data.name', 'data.source', 'data.root', 'data.train_shards', 'data.val_shards', 'data.shards',
        'data.num_classes', 'data.shard_size', 'data.image_size', 'data.max_side', 'overwrite')

if __name__ == "__main__":
    cli.run("make_shards", main, __doc__, KEYS)
