"""Object-storage settings (the config's ``storage`` keys) and failures as one line: what a request to a bucket
may meet (no credentials, no such bucket, access denied, an endpoint that fails or stays silent after the retry
budget) becomes a :class:`~pipeline.errors.StorageError` naming the URL and what to do; a missing object stays a
``FileNotFoundError`` for the caller to handle.

The settings travel in the environment (``PIPELINE_STORAGE_*``), so DataLoader workers and ranks started from a
stage build their clients with the stage's settings. Their defaults are obstore's own (``object_store``'s):
10 retries, 180 s for one request and its retries together, 30 s for one attempt.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

from pipeline.errors import StorageError

DEFAULTS = {"retries": 10, "retry_timeout": 180.0, "timeout": 30.0}
_ENV = {k: f"PIPELINE_STORAGE_{k.upper()}" for k in DEFAULTS}
_IMDS = ("169.254.169.254", "/latest/api/token", "/latest/meta-data")


def configure(retries=None, timeout=None, retry_timeout=None) -> None:
    """Set this process's (and its children's) storage settings (ranges: pipeline.config_rules); None keeps the
    default. A client is built per location and settings (pipeline.storage): one built before keeps its own."""
    for key, value in (("retries", retries), ("timeout", timeout), ("retry_timeout", retry_timeout)):
        if value is None:
            os.environ.pop(_ENV[key], None)
            continue
        os.environ[_ENV[key]] = str(value)


def settings() -> dict:
    """{"retries": int, "timeout": seconds, "retry_timeout": seconds} in force in this process."""
    out = {}
    for key, default in DEFAULTS.items():
        raw = os.environ.get(_ENV[key])
        out[key] = type(default)(float(raw)) if raw else default
    return out


def client_options(s: dict) -> tuple[dict, dict]:
    """(client_options, retry_config) for obstore's ``from_url`` under settings ``s``."""
    return ({"timeout": timedelta(seconds=s["timeout"])},
            {"max_retries": s["retries"], "retry_timeout": timedelta(seconds=s["retry_timeout"])})


def check_credentials(url: str, cfg: dict) -> None:
    """Refuse ``s3://`` with no credentials at all when the instance-metadata endpoint is ruled out
    (``AWS_EC2_METADATA_DISABLED=true``, the AWS SDKs' variable): no request would be signed."""
    env = os.environ
    sources = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if cfg.get("access_key_id") or cfg.get("token") or any(env.get(v) for v in sources):
        return
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        raise StorageError(f"{url}: no credentials for object storage: set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY (AWS_EC2_METADATA_DISABLED=true rules out an instance role)")


def translate(e: BaseException, url: str) -> OSError:
    """The exception to raise for obstore's ``e`` on ``url``: a StorageError for a fault the user fixes or waits
    out, ``FileNotFoundError`` for a missing object, else an OSError naming the URL."""
    if isinstance(e, StorageError) or isinstance(e, FileNotFoundError) and str(url) in str(e):
        return e
    text = str(e)
    code = _s3_code(text)
    first = text.splitlines()[0] if text else type(e).__name__
    bucket = _bucket(url)
    if any(m in text for m in _IMDS):
        return StorageError(f"{url}: no credentials for object storage (the instance-metadata endpoint gave none: "
                            f"{_status(first) or 'no answer'}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if "Missing SecretAccessKey" in text or "Missing AccessKeyId" in text:
        return StorageError(f"{url}: incomplete credentials ({first.split(': ')[-1]}): set both AWS_ACCESS_KEY_ID "
                            f"and AWS_SECRET_ACCESS_KEY")
    if code == "NoSuchBucket":
        return StorageError(f"{url}: bucket '{bucket}' does not exist{_at()}: create it, or fix the bucket name")
    if type(e).__name__ in ("PermissionDeniedError", "UnauthenticatedError") or re.search(r"\b40[13] ", first):
        why = code or _status(first) or "403 Forbidden"
        return StorageError(f"{url}: access denied ({why}){_at()}: check AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, and that they may use bucket '{bucket}'")
    if type(e).__name__ in ("NotFoundError",) or isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{url}: no such object")
    s = settings()
    if re.search(r"kind: Timeout|TimedOut|timed out", text):
        return StorageError(f"{url}: no answer{_at()} within storage.timeout={s['timeout']:g}s, "
                            f"storage.retries={s['retries']} retries: check the endpoint; a re-run resumes")
    if re.search(r"after \d+ retries", first) or _status(first).startswith("5") or "error sending request" in text:
        return StorageError(f"{url}: object storage unavailable{_at()} after storage.retries={s['retries']} "
                            f"retries ({_status(first) or first[-120:].strip()}); a re-run resumes once it is back")
    return OSError(f"{url}: {type(e).__name__}: {first}")


def _s3_code(text: str) -> str | None:
    m = re.search(r"<Code>(\w+)</Code>", text)
    return m.group(1) if m else None


def _status(line: str) -> str:
    m = re.search(r"status code: (\d{3} [A-Za-z ]+?)(?::|$)", line)
    if m:
        return m.group(1).strip()
    return "error sending request" if "error sending request" in line else ""


def _bucket(url: str) -> str:
    return str(url).partition("://")[2].partition("/")[0]


def _at() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint else ""
