"""A Hub-shaped HTTP server on 127.0.0.1 for tests: it serves a tree as ``/datasets/<repo>/resolve/<rev>/<path>``
(any other path as it lies under the tree, for plain http:// URLs) with an ETag per file and byte ranges (Zarr's
sharding codec reads a file's index at its end, then chunk ranges), and it takes the uploads huggingface_hub makes
(``HfApi.create_repo``, ``create_commit``/``upload_folder``: preupload answers "regular" for every file, the commit
carries the files base64-encoded in ndjson) into that same tree, from a token in ``write_tokens`` only (as the Hub:
401 without a token, 403 with one that may not write). ``HF_ENDPOINT`` points huggingface_hub at it."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import threading
from pathlib import Path

_API = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/(?P<what>preupload|commit)/(?P<rev>[^/?]+)")


class _Handler(http.server.SimpleHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args):
        pass

    def end_headers(self):
        p = Path(self.translate_path(self.path))
        if self.command in ("GET", "HEAD") and p.is_file():
            st = p.stat()
            self.send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')  # size and mtime, as common servers
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self):
        """SimpleHTTPRequestHandler's, plus one ``Range: bytes=a-b | a- | -n`` (206 with its Content-Range)."""
        self.hub.requests.append((self.command, self.path))
        rng = self.headers.get("Range")
        p = Path(self.translate_path(self.path))
        if not rng or not p.is_file():
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        size = p.stat().st_size
        if not m or (m.group(1) == "" and m.group(2) == ""):
            self.send_error(416)
            return None
        if m.group(1) == "":
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start, end = int(m.group(1)), min(size - 1, int(m.group(2)) if m.group(2) else size - 1)
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(p, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", self.date_time_string(int(p.stat().st_mtime)))
        self.end_headers()
        import io

        return io.BytesIO(body)

    # -- uploads
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        self.hub.requests.append(("POST", path))
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if token not in self.hub.write_tokens:
            return self._json(403 if token else 401,
                              {"error": "You don't have the rights to write to this namespace" if token
                               else "Invalid username or password."})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            created = repo not in self.hub.repos
            self.hub.repos.add(repo)
            return self._json(200 if created else 409, {"url": f"{self.hub.endpoint}/datasets/{repo}",
                                                        **({} if created else {"error": "already exists"})})
        m = _API.match(path)
        if not m or m.group("repo") not in self.hub.repos:
            return self._json(404, {"error": "Repository not found"})
        if m.group("what") == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        root = self.hub.top / "datasets" / m.group("repo") / "resolve" / m.group("rev")
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                dest = root / item["value"]["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(base64.b64decode(item["value"]["content"]))
        oid = hashlib.sha1(body).hexdigest()
        return self._json(200, {"commitUrl": f"{self.hub.endpoint}/datasets/{m.group('repo')}/commit/{oid}",
                                "commitOid": oid})

    def _json(self, code: int, data: dict):
        raw = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if "error" in data:
            self.send_header("X-Error-Message", data["error"])  # where huggingface_hub reads the Hub's reason
        self.end_headers()
        self.wfile.write(raw)


class Hub:
    """The server, started on a free port of 127.0.0.1 over the folder ``top``; ``stop()`` ends it."""

    def __init__(self, top):
        self.top = Path(top)
        self.top.mkdir(parents=True, exist_ok=True)
        self.repos: set[str] = set()
        self.write_tokens = {"hf_test_token"}  # env()'s token
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(handler, directory=str(self.top)))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict:
        """This environment with HF_ENDPOINT at this server and HF_HUB_OFFLINE unset (for the stages it runs)."""
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        return {**env, "HF_ENDPOINT": self.endpoint, "HF_TOKEN": "hf_test_token", "OMP_NUM_THREADS": "1"}

    def resolved(self, repo: str, rev: str = "main") -> Path:
        """Where the files of ``repo`` at ``rev`` lie on this server's disk."""
        return self.top / "datasets" / repo / "resolve" / rev

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
