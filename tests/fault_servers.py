"""Misbehaving endpoints for tests/test_faults.py, on 127.0.0.1: a TCP proxy in front of a real S3 server that can
answer every request with 503 (an outage) or go silent (a stalled endpoint: accepts TCP, never answers), and a moto
server in its own process that checks signatures (moto's in-process server of tests/conftest.py checks none)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from procs import free_port

UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Proxy:
    """Forwards to ``upstream`` (host, port) while ``mode`` is "up"; "down": every request answered 503 (each
    connection open at the switch is cut, so a pooled client meets the outage on its next request); "stall":
    connections accepted and never answered. ``upstream=None``: a server that only ever stalls or fails."""

    def __init__(self, upstream: tuple[str, int] | None = None, mode: str = "up"):
        self.upstream, self.mode = upstream, mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode, conns, self._open = mode, self._open, []
        for c in conns:
            _close(c)

    def close(self) -> None:
        self.set_mode("closed")
        _close(self.sock)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self._open.append(conn)
            if mode == "up":
                up = socket.create_connection(self.upstream)
                with self._lock:
                    self._open.append(up)
                for a, b in ((conn, up), (up, conn)):
                    threading.Thread(target=_pump, args=(a, b), daemon=True).start()
            elif mode == "down":
                threading.Thread(target=_refuse, args=(conn,), daemon=True).start()
            # "stall": kept open (in self._open), never read, never answered


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _close(src)
    _close(dst)


def _refuse(conn: socket.socket) -> None:
    """Read one request's head, answer 503 (an S3 front end shedding load), close."""
    try:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.sendall(UNAVAILABLE)
    except OSError:
        pass
    _close(conn)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


SIGNED_MOTO = """
import sys, time, logging, boto3
from moto.server import ThreadedMotoServer
port, bucket = int(sys.argv[1]), sys.argv[2]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server.start()
kw = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="x",
          aws_secret_access_key="x")
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
iam = boto3.client("iam", **kw)
iam.create_user(UserName="pipeline")
iam.put_user_policy(UserName="pipeline", PolicyName="all", PolicyDocument='{"Version": "2012-10-17", '
                    '"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')
key = iam.create_access_key(UserName="pipeline")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"], flush=True)
time.sleep(3600)
"""


class SignedS3:
    """A moto server in its own process that checks every request's signature (its first four actions, which
    create the bucket and the one user with its key, are the unauthenticated ones): ``key_id``, ``secret``."""

    def __init__(self, bucket: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
        self.proc = subprocess.Popen([sys.executable, "-c", SIGNED_MOTO, str(self.port), bucket], env=env,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            self.stop()
            raise RuntimeError("the signing moto server did not start")
        self.key_id, self.secret = line

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def wait_listening(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
