"""The data room: sample sources, checked image bytes, WebDataset shards with a manifest, the replay loader."""
