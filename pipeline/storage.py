"""Object storage (``s3://bucket/prefix``, ``gs://...``): the one place that knows about URLs.

``data.shards`` and ``cache.path`` accept a URL; :func:`as_path` turns any location into a ``pathlib.Path``
(local, unchanged) or an :class:`ObjectPath`, which offers the few ``Path`` methods the pipeline uses
(``/``, ``name``, ``parent``, ``is_file``, ``is_dir``, ``iterdir``, ``read_text``, ``stat`` ...) on top of
`obstore <https://developmentseed.org/obstore/>`_ (one Rust wheel, no aiobotocore). The Zarr cache store goes
through ``zarr.storage.ObjectStore`` on the same client (:func:`zarr_store`).

Endpoint and credentials: the standard AWS variables ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (an ``http://`` endpoint is allowed, e.g. a
local MinIO/moto). ``gs://`` uses obstore's GCS backend with its own environment (``GOOGLE_SERVICE_ACCOUNT`` ...):
supported by the library, untested here. ``http(s)://`` and ``hf://datasets/...`` are read-only
(:class:`pipeline.web.WebPath`: published shards and manifests, read in place).

Errors (pipeline.storage_faults): a missing object is ``FileNotFoundError``; no credentials, no such bucket, access
denied, an endpoint that fails or stays silent past the retry budget (the config's ``storage`` keys) a
``StorageError`` naming the URL and the fix, which is also an ``OSError``: callers' existing ``except OSError``
paths (a unit that stays pending, a WriteError) hold for object storage too. Zarr's requests go through the same
translation (:class:`_ZarrObjectStore`).
"""

from __future__ import annotations

import io
import shutil
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from pipeline import storage_faults
from pipeline.errors import ConfigError, StorageError
from pipeline.web import SCHEMES as WEB_SCHEMES, RemotePath, WebPath, is_web

SCHEMES = ("s3", "gs")
_STORES: dict = {}  # (pid, location, settings, endpoint + credentials) -> obstore store (rebuilt after a fork)
_LOCK = threading.Lock()
_USED: set[int] = set()  # pids that started obstore's (tokio) runtime, which does not survive a fork


def worker_context(*locations, num_workers: int = 1) -> str | None:
    """DataLoader ``multiprocessing_context`` for workers that read ``locations``: None (the default, fork) unless
    one is a URL and this process has used object storage, whose (tokio) runtime hangs in a forked child: then
    "forkserver" (workers forked from a clean server process; each imports the modules it unpickles)."""
    urls = any(loc is not None and is_url(loc) for loc in locations)
    return "forkserver" if num_workers and urls and os.getpid() in _USED else None


def is_url(p) -> bool:
    if isinstance(p, RemotePath):
        return True
    s = os.fspath(p) if isinstance(p, os.PathLike) else p
    return isinstance(s, str) and "://" in s and s.split("://", 1)[0].lower() in SCHEMES + WEB_SCHEMES


def as_path(p) -> Path | ObjectPath:
    """A local ``Path`` (exactly as before) or an :class:`ObjectPath` for a URL."""
    if isinstance(p, RemotePath):
        return p
    if is_web(str(p)):
        return WebPath(str(p))
    return ObjectPath(str(p)) if is_url(p) else Path(p)


def _config(scheme: str) -> tuple[dict, dict]:
    if scheme != "s3":
        return {}, {}
    env = os.environ
    cfg = {k: env[v] for k, v in (("endpoint", "AWS_ENDPOINT_URL"), ("access_key_id", "AWS_ACCESS_KEY_ID"),
                                  ("secret_access_key", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN"),
                                  ("region", "AWS_REGION")) if env.get(v)}
    cfg.setdefault("region", env.get("AWS_DEFAULT_REGION", "us-east-1"))
    client = {"allow_http": True} if cfg.get("endpoint", "").startswith("http://") else {}
    return cfg, client


def obstore_store(scheme: str, bucket: str, prefix: str = ""):
    """The obstore client of ``scheme://bucket/prefix`` (one per process and location), with the ``storage``
    settings in force when it is first asked for."""
    from obstore.store import from_url

    settings = storage_faults.settings()
    cfg, client = _config(scheme)
    # the endpoint and credentials too: a client of another server must not serve this one
    key = (os.getpid(), scheme, bucket, prefix, tuple(settings.values()), tuple(sorted(cfg.items())))
    _USED.add(os.getpid())
    with _LOCK:
        if key not in _STORES:
            url = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
            if scheme == "s3":
                storage_faults.check_credentials(url, cfg)
            options, retry = storage_faults.client_options(settings)
            _STORES[key] = from_url(url, config=cfg, client_options={**client, **options}, retry_config=retry)
        return _STORES[key]


def _oserror(e: Exception, url: str) -> OSError:
    return storage_faults.translate(e, url)


class ObjectPath(RemotePath):
    """A location in a bucket, with the subset of ``pathlib.Path`` the pipeline uses. Picklable."""

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        scheme = scheme.lower()
        if scheme == "hf":
            raise ConfigError(f"{url}: hf:// is not supported for shards or the cache (obstore has no Hugging Face "
                             f"backend); use s3:// or gs://")
        bucket, _, key = rest.partition("/")
        if scheme not in SCHEMES or not bucket:
            raise ConfigError(f"{url}: not an object-storage URL (s3://bucket/prefix or gs://bucket/prefix)")
        self.scheme, self.bucket, self.key = scheme, bucket, "/".join(p for p in key.split("/") if p)

    # -- names
    def __str__(self):
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __truediv__(self, name) -> ObjectPath:
        return ObjectPath(f"{self}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{self.bucket}/{self.key.rpartition('/')[0]}")

    @property
    def store(self):
        return obstore_store(self.scheme, self.bucket)

    # -- queries
    def stat(self):
        import obstore

        try:
            size = obstore.head(self.store, self.key)["size"]
        except Exception as e:  # noqa: BLE001 - obstore's errors, as OSError
            raise _oserror(e, str(self)) from None
        return SimpleNamespace(st_size=size, st_blocks=-(-size // 512))

    def iterdir(self):
        import obstore

        try:
            res = obstore.list_with_delimiter(self.store, self.key + "/" if self.key else None)
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, str(self)) from None
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"]]
        names += [o["path"].rsplit("/", 1)[-1] for o in res["objects"]]
        return iter([self / n for n in names])

    def is_dir(self) -> bool:
        return any(True for _ in self.iterdir())

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def walk_objects(self):
        """(key, size) of every object under this prefix."""
        import obstore

        try:
            for batch in obstore.list(self.store, self.key + "/" if self.key else None):
                for o in batch:
                    yield o["path"], o["size"]
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, str(self)) from None

    # -- data
    def read_bytes(self) -> bytes:
        import obstore

        try:
            return obstore.get(self.store, self.key).bytes().to_bytes()
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, str(self)) from None

    def write_bytes(self, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.store, self.key, bytes(data))
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, str(self)) from None

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb"):
        """The whole object in memory (one GET: latency paid once per object, see :class:`ReadAhead`)."""
        if mode != "rb":
            raise ValueError(f"{self}: object storage opens read-only ('rb'), got {mode!r}")
        return io.BytesIO(self.read_bytes())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Prefixes need no creation."""

    def rmtree(self) -> None:
        import obstore

        keys = [k for k, _ in self.walk_objects()]
        try:
            for i in range(0, len(keys), 1000):
                obstore.delete(self.store, keys[i:i + 1000])
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, str(self)) from None


def open_binary(path, siblings=()):
    """``open(path, "rb")`` for a local path or an object: the whole object, taken from the read-ahead when it was
    fetched already. ``siblings``: the ordered objects ``path`` is one of (a split's shards); when this process
    reads them with a regular stride (1 in stage one's single process, the world size across its ranks), the
    next ones along that stride are fetched in background threads meanwhile; an irregular order (stage two's
    shuffled shards) fetches nothing ahead rather than fetching what will not be read."""
    if not isinstance(path, RemotePath):
        return open(path, "rb")
    data = READ_AHEAD.take(path)
    READ_AHEAD.schedule(READ_AHEAD.next_along(path, list(siblings)))
    if isinstance(path, WebPath):  # with its ETag (checked against the manifest's)
        return path.fetch() if data is None else data
    return io.BytesIO(path.read_bytes() if data is None else data)


def rmtree(path) -> None:
    path.rmtree() if isinstance(path, ObjectPath) else shutil.rmtree(path)


def tree_size(path, allocated: bool = False) -> int:
    """Bytes under a directory or prefix (file sizes; ``allocated``: filesystem blocks, local only)."""
    if isinstance(path, ObjectPath):
        return sum(size for _, size in path.walk_objects())
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            total += st.st_blocks * 512 if allocated else st.st_size
    return total


def relative_files(path) -> set[str]:
    """Every file (object) under a directory or prefix, as "/"-separated paths relative to it (one listing)."""
    if isinstance(path, ObjectPath):
        prefix = path.key + "/" if path.key else ""
        return {key[len(prefix):] for key, _ in path.walk_objects()}
    root = os.path.join(str(path), "")  # with its separator, cut off each directory os.walk yields below it
    out = set()
    for d, _, fs in os.walk(root):
        rel = d[len(root):].replace(os.sep, "/")
        out.update(f"{rel}/{f}" if rel else f for f in fs)
    return out


def zarr_store(path, mode: str):
    """What ``zarr.open_group(store=...)`` gets: the local path as a string (as before) or an ObjectStore; at an
    ``http(s)://`` or ``hf://`` URL a read-only one (GET with byte ranges, HEAD: no listing), other modes refused."""
    if isinstance(path, WebPath):
        if mode != "r":
            raise ConfigError(f"{path}: a cache store at an http(s):// or hf:// location opens read-only (stage two, "
                              f"verify_cache), not mode={mode!r}: write units into a local or s3:// store")
        _USED.add(os.getpid())  # obstore's runtime: DataLoader workers then start by forkserver (worker_context)
        return _zarr_class()(path.obstore(), read_only=True, root=str(path))
    if not isinstance(path, ObjectPath):
        return str(path)
    return _zarr_object_store(path, read_only=mode == "r")


def _zarr_object_store(path: ObjectPath, read_only: bool):
    return _zarr_class()(obstore_store(path.scheme, path.bucket, path.key), read_only=read_only, root=str(path))


def _zarr_class():
    """zarr's ObjectStore on our client, its requests' failures translated as ObjectPath's (naming the object).
    Built on first use (zarr imported only then); found by name in this module, so a pickled store unpickles."""
    if "_ZarrObjectStore" in globals():
        return globals()["_ZarrObjectStore"]
    from zarr.storage import ObjectStore

    class _ZarrObjectStore(ObjectStore):
        def __init__(self, store, *, read_only: bool = False, root: str = ""):
            super().__init__(store, read_only=read_only)
            self.root = root

        def with_read_only(self, read_only: bool = False):
            return type(self)(self.store, read_only=read_only, root=self.root)

    for name in ("get", "get_partial_values", "exists", "set", "set_if_not_exists", "delete", "getsize"):
        setattr(_ZarrObjectStore, name, _translated(getattr(ObjectStore, name)))
    for name in ("list", "list_prefix", "list_dir"):
        setattr(_ZarrObjectStore, name, _translated_gen(getattr(ObjectStore, name)))
    _ZarrObjectStore.__module__, _ZarrObjectStore.__qualname__ = __name__, "_ZarrObjectStore"
    globals()["_ZarrObjectStore"] = _ZarrObjectStore
    return _ZarrObjectStore


def __getattr__(name: str):
    if name == "_ZarrObjectStore":  # unpickling a zarr store in a fresh process
        return _zarr_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _translated(method):
    async def call(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (StorageError, FileNotFoundError, ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - obstore's errors, as ObjectPath raises them
            key = args[0] if args and isinstance(args[0], str) else ""
            raise _oserror(e, f"{self.root}/{key}" if key else self.root) from None
    return call


def _translated_gen(method):
    async def call(self, *args, **kwargs):
        try:
            async for item in method(self, *args, **kwargs):
                yield item
        except Exception as e:  # noqa: BLE001
            raise _oserror(e, self.root) from None
    return call


def upload_tree(local: Path, dest: ObjectPath, last: str | None = None) -> None:
    """Upload every file under ``local`` to ``dest``; ``last`` (a relative name, e.g. the manifest) goes last,
    after every other object is in place: it is the commit point a reader looks for."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    rel = [p.relative_to(local).as_posix() for p in files]
    order = [r for r in rel if r != last] + ([last] if last in rel else [])
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda r: (dest / r).write_bytes((Path(local) / r).read_bytes()),
                    [r for r in order if r != last]))
    if last in rel:
        (dest / last).write_bytes((Path(local) / last).read_bytes())


class ReadAhead:
    """Whole shard objects fetched ahead in background threads: :meth:`schedule` the shards a reader will open
    next, :meth:`take` hands over the bytes (waiting for a fetch under way). Bounded by ``depth`` objects."""

    def __init__(self, depth: int = 4, threads: int = 4):
        self.depth, self.threads = depth, threads
        self._pending: dict = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pid = None
        self._last = (None, None, None, None)  # (pid, first sibling, index of the last open, its stride)

    def schedule(self, paths) -> None:
        paths = [p for p in paths if isinstance(p, RemotePath)]
        if not paths:
            return
        with _LOCK:
            if self._pool is None or self._pid != os.getpid():
                self._pool, self._pid, self._pending = ThreadPoolExecutor(self.threads), os.getpid(), {}
            for p in paths[:self.depth]:
                if p not in self._pending:
                    while len(self._pending) >= self.depth:  # a guess that was never read: drop the oldest
                        self._pending.pop(next(iter(self._pending))).cancel()
                    self._pending[p] = self._pool.submit(p.fetch if isinstance(p, WebPath) else p.read_bytes)

    def next_along(self, path: ObjectPath, siblings: list) -> list:
        """The siblings after ``path`` along this process's stride, once two consecutive opens agree on it."""
        if path not in siblings:
            return []
        i = siblings.index(path)
        pid, first, last, stride = self._last
        if pid != os.getpid() or first != siblings[0]:
            last = stride = None
        step = i - last if last is not None else None
        self._last = (os.getpid(), siblings[0], i, step)
        if step is None or step <= 0 or (step != 1 and step != stride):
            return []
        return siblings[i + step::step][:self.depth]

    def take(self, path: ObjectPath) -> bytes | None:
        with _LOCK:
            fut = self._pending.pop(path, None) if self._pid == os.getpid() else None
        try:
            return None if fut is None else fut.result()
        except OSError:
            return None  # read again in the caller, which names the error


READ_AHEAD = ReadAhead(depth=int(os.environ.get("PIPELINE_READ_AHEAD", "4")))


def publish_zarr(build, dest: ObjectPath) -> None:
    """Create a Zarr group at ``dest`` without a rename: ``build(store)`` writes it into memory (metadata only),
    then every array's metadata is uploaded and the group's own ``zarr.json`` last: a reader or a resuming writer
    sees a group only once it is complete (a creation killed earlier leaves only metadata, see
    :func:`partial_zarr`)."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    build(mem)

    async def items():
        proto = default_buffer_prototype()
        return {k: (await mem.get(k, proto)).to_bytes() async for k in mem.list()}

    data = asyncio.run(items())
    for k in sorted(data, key=lambda k: k == "zarr.json"):
        (dest / k).write_bytes(data[k])


def partial_zarr(path) -> bool:
    """An object-storage prefix holding only Zarr metadata and no group ``zarr.json``: a creation that died before
    :func:`publish_zarr` committed it (safe to create again)."""
    if not isinstance(path, ObjectPath) or (path / "zarr.json").is_file():
        return False
    return all(k.endswith("/zarr.json") for k, _ in path.walk_objects())


def sha256(path) -> str:
    """sha256 of a local file or an object."""
    import hashlib

    h = hashlib.sha256()
    with open_binary(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
