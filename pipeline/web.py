"""Read-only files over HTTP: ``http(s)://`` URLs and ``hf://datasets/<owner>/<repo>[@<rev>]/<path>`` (the
Hugging Face Hub, through huggingface_hub's own URL and headers: ``HF_ENDPOINT`` points it at another server,
``HF_TOKEN`` or a login authorises it, ``HF_HUB_OFFLINE=1`` refuses it by name).

:class:`WebPath` offers the few ``pathlib.Path`` methods the shard reader uses (``/``, ``name``, ``parent``,
``is_file``, ``stat``, ``read_bytes``, ``read_text``, ``open``); a file is fetched whole (one GET, as
pipeline.storage does for objects), with its ``ETag``. Writing is refused by name. Errors: a missing file is
``FileNotFoundError``, any other failure a ``StorageError`` (an ``OSError``) naming the URL. A cache store at such
a URL is read through Zarr on obstore's ``HTTPStore`` (:meth:`WebPath.obstore`: byte ranges, the resolved URL and
headers).
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from types import SimpleNamespace

from pipeline.errors import ConfigError, StorageError

SCHEMES = ("http", "https", "hf")
_TIMEOUT = float(os.environ.get("PIPELINE_HTTP_TIMEOUT", "60"))


def is_web(p) -> bool:
    if isinstance(p, WebPath):
        return True
    return isinstance(p, str) and "://" in p and p.split("://", 1)[0].lower() in SCHEMES


class Fetched(io.BytesIO):
    """A fetched file's bytes, with the server's ETag (None when it sends none)."""

    def __init__(self, data: bytes, etag: str | None):
        super().__init__(data)
        self.etag = etag


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


class RemotePath:
    """What a location at a URL offers alike, on its subclass's ``__str__``, ``stat`` and ``read_bytes``: equality by
    URL, ``is_file``, ``read_text``. :class:`WebPath` here, ``pipeline.storage.ObjectPath`` for s3:// and gs://."""

    def __repr__(self):
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other):
        return type(other) is type(self) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def is_file(self) -> bool:
        try:
            self.stat()
            return True
        except FileNotFoundError:
            return False

    def is_symlink(self) -> bool:
        return False

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


class WebPath(RemotePath):
    """A file (or folder prefix) at an ``http(s)://`` or ``hf://datasets/...`` URL. Picklable, no I/O until read."""

    def __init__(self, url: str):
        url = str(url)
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"{url}: not an http(s):// or hf:// URL")
        if scheme == "hf":
            _hf_parts(url)  # a malformed hf:// URL is refused where it is named, not at the first read
        self.url = url.rstrip("/")

    def __str__(self):
        return self.url

    def __truediv__(self, name) -> WebPath:
        return WebPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> WebPath:
        return WebPath(self.url.rsplit("/", 1)[0])

    # -- reading
    def resolved(self) -> tuple[str, dict]:
        """(the http(s) URL to request, its headers): an hf:// URL through huggingface_hub (refused by name while
        HF_HUB_OFFLINE is set)."""
        if not self.url.lower().startswith("hf://"):
            return self.url, {}
        if hub_offline():
            raise ConfigError(f"{self.url}: HF_HUB_OFFLINE is set; unset it to read from the Hub")
        return _hf_resolve(self.url)

    def obstore(self):
        """obstore's ``HTTPStore`` at this URL (a cache store's Zarr reads, pipeline.storage.zarr_store), with the
        ``storage`` settings' timeouts and retries."""
        from obstore.store import HTTPStore

        from pipeline import storage_faults

        url, headers = self.resolved()
        options, retry = storage_faults.client_options(storage_faults.settings())
        client = {**options, "allow_http": url.lower().startswith("http://"), "default_headers": headers}
        return HTTPStore.from_url(url, client_options=client, retry_config=retry)

    def _request(self, method: str):
        url, headers = self.resolved()
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method),
                                          timeout=_TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{self.url}: no such file (HTTP 404)") from None
            raise StorageError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise StorageError(f"{self.url}: cannot reach the server: {getattr(e, 'reason', e)}") from None

    def stat(self):
        with self._request("HEAD") as r:
            size = int(r.headers.get("Content-Length", -1))
            return SimpleNamespace(st_size=size, etag=r.headers.get("ETag"))

    def is_dir(self) -> bool:
        return False  # HTTP has no listing: a split is found through its manifest or _info.json

    def fetch(self) -> Fetched:
        with self._request("GET") as r:
            try:
                return Fetched(r.read(), r.headers.get("ETag"))
            except OSError as e:
                raise StorageError(f"{self.url}: read failed: {e}") from None

    def read_bytes(self) -> bytes:
        return self.fetch().getvalue()

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise ValueError(f"{self}: an http(s):// or hf:// file opens read-only ('rb'), got {mode!r}")
        return self.fetch()

    def _read_only(self, *_, **__):
        raise ConfigError(f"{self.url}: http(s):// and hf:// are read-only locations for published shards and cache "
                          f"stores; write shards or a cache store to a local folder or s3:// (python -m "
                          f"pipeline.push_cache publishes a finished store)")

    # exists(): asked only before writing (a store, a split folder); answered without a request
    mkdir = write_bytes = write_text = rmtree = exists = _read_only


def _hf_parts(url: str) -> tuple[str, str, str]:
    """``hf://datasets/<owner>/<repo>[@<rev>]/<path>`` -> (repo_id, revision, path)."""
    parts = url.split("://", 1)[1].strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets":
        raise ConfigError(f"{url}: expected hf://datasets/<owner>/<repo>[@<revision>]/<path>")
    repo, _, rev = parts[2].partition("@")
    return f"{parts[1]}/{repo}", rev or "main", "/".join(parts[3:])


def _hf_resolve(url: str) -> tuple[str, dict]:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    repo_id, rev, path = _hf_parts(url)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at import: a test or a shell may set it
    return (hf_hub_url(repo_id, path, repo_type="dataset", revision=rev, endpoint=endpoint),
            build_hf_headers(library_name="pipeline"))
