"""The cache store's format: its name and version (the files, arrays, chunks and codecs of pipeline.cache.layout,
the attributes pipeline.cache.store and pipeline.cache.provenance write).

Bump FORMAT_VERSION whenever a store written before cannot be read as it was written; stores of other versions are
refused by name (``overwrite=true`` rebuilds them). dvc.yaml's stages depend on this file, not on the layout's
code: a change that keeps the store's bytes re-runs nothing.
"""

FORMAT = "deit-teacher-cache"
FORMAT_VERSION = 4
