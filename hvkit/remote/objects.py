"""An S3 bucket prefix as hvkit sees it: whole objects in and out, with retries.

Any S3 API will do (AWS S3, Ceph RGW, MinIO, SeaweedFS): boto3 finds the credentials
the standard AWS way (environment, ~/.aws/credentials and config, AWS_PROFILE, an
instance role), and the endpoint from AWS_ENDPOINT_URL (or `endpoint`, hvkit's
--endpoint). A store is named `s3://BUCKET/PREFIX`.

Every failure becomes one HvkitError line: a bad URL, no credentials or refused ones,
a missing bucket. A store that is slow or unreachable (a connection refused or cut, a
timeout, a 5xx answer) is asked again with exponential backoff for `retry_seconds`
(HVKIT_S3_RETRY_SECONDS, default 30), then given up with one line.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from hvkit.errors import HvkitError

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
# answers that a retry cannot change: said once, at once
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
DEFAULT_RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class StoreURL:
    """`s3://BUCKET/PREFIX` (the prefix may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "StoreURL":
        if not url.startswith("s3://"):
            raise HvkitError(f"{url!r} is not a store URL", "give s3://BUCKET/PREFIX")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise HvkitError(f"{bucket!r} in {url!r} is not a valid S3 bucket name",
                             "give s3://BUCKET/PREFIX with a bucket of 3-63 lower-case letters, digits, '.' and '-'")
        if prefix and not all(_SEGMENT.match(s) for s in prefix.split("/")):
            raise HvkitError(f"the prefix {prefix!r} in {url!r} has characters hvkit does not use in keys",
                             "use letters, digits, '.', '_', '-' and '/'")
        return cls(bucket, prefix)

    @classmethod
    def parse_snapshot(cls, url: str) -> tuple["StoreURL", str]:
        """`s3://BUCKET/PREFIX/NAME` -> (store, snapshot name)."""
        rest = url[len("s3://"):].strip("/") if url.startswith("s3://") else ""
        if "/" not in rest:
            raise HvkitError(f"{url!r} is not a snapshot URL", "give s3://BUCKET/PREFIX/NAME")
        head, _, name = rest.rpartition("/")
        head = "s3://" + head
        check_name(name)
        return cls.parse(head), name

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def check_name(name: str) -> str:
    """A snapshot's name in a store: one key segment."""
    if not name or not _SEGMENT.match(name) or name in (".", ".."):
        raise HvkitError(f"invalid snapshot name {name!r}", "use letters, digits, '.', '_' and '-'")
    return name


class NotFound(HvkitError):
    pass


@dataclass
class ObjectStore:
    """Whole-object GET/PUT/LIST/DELETE under one prefix, each retried with backoff."""

    url: StoreURL
    endpoint: str | None = None
    retry_seconds: float = field(default_factory=lambda: float(os.environ.get("HVKIT_S3_RETRY_SECONDS",
                                                                              DEFAULT_RETRY_SECONDS)))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _made: object = field(default=None, repr=False)
    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0

    def _client(self):
        """One boto3 client, made once and shared by every thread (a client is
        thread-safe; making one costs ~0.1-1 s, a session each is what is not safe)."""
        with self._lock:
            if self._made is None:
                import boto3
                from botocore.config import Config

                path_style = bool(self.endpoint or os.environ.get("AWS_ENDPOINT_URL"))
                config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                                read_timeout=20, max_pool_connections=32,
                                s3={"addressing_style": "path"} if path_style else None)
                self._made = boto3.session.Session().client("s3", endpoint_url=self.endpoint or None,
                                                            config=config)
            return self._made

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), again after a transient failure until retry_seconds have passed."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                         NoCredentialsError, PartialCredentialsError, ParamValidationError)

        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            self.requests += 1
            try:
                return fn()
            except (NoCredentialsError, PartialCredentialsError):
                raise HvkitError(f"no credentials for the store {self.url}",
                                 "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
            except ParamValidationError as e:
                raise HvkitError(f"the store {self.url} refused {what}: {e}") from None
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code in _NOT_FOUND:
                    raise NotFound(f"{what}: not found in the store {self.url}") from None
                if code == "NoSuchBucket":
                    raise HvkitError(f"the bucket {self.url.bucket!r} does not exist at {self._where()}",
                                     "create it, or check the URL and AWS_ENDPOINT_URL") from None
                if code in _CREDENTIALS or status == 403:
                    raise HvkitError(f"the store {self.url} at {self._where()} refused the credentials "
                                     f"({code or status})",
                                     "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
                if status and status < 500 and code not in ("RequestTimeout", "SlowDown", "Throttling"):
                    raise HvkitError(f"the store {self.url} refused {what} ({code or status}: "
                                     f"{e.response.get('Error', {}).get('Message', '')})") from None
                reason = f"{code or status}"
            except (BotoConnectionError, BotoCoreError, OSError) as e:
                if isinstance(e, BotoCoreError) and not isinstance(e, BotoConnectionError) \
                        and not any(w in type(e).__name__ for w in ("Timeout", "Read", "Stream")):
                    raise HvkitError(f"the store {self.url} at {self._where()}: {e}") from None
                reason = str(e) if type(e) is OSError else type(e).__name__
            if time.monotonic() + delay > deadline:
                raise HvkitError(f"the store {self.url} at {self._where()} did not answer {what} for "
                                 f"{self.retry_seconds:.0f} s (last: {reason})",
                                 "check that it runs and is reachable, then try again")
            log.info("%s: %s, again in %.1f s", what, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _where(self) -> str:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    # ---- objects ----------------------------------------------------------------------

    def get(self, key: str, check: Callable[[bytes], None] | None = None) -> bytes:
        """The object's bytes. `check` raises ValueError for a body that is not the
        object (cut short or damaged on the way): it is read again, as a transient failure."""
        full = self.url.key(key)

        def once() -> bytes:
            body = self._client().get_object(Bucket=self.url.bucket, Key=full)["Body"].read()
            if check is not None:
                try:
                    check(body)
                except ValueError as e:
                    raise OSError(f"{full}: {e}") from None
            return body

        body = self._call(f"GET {full}", once)
        self.bytes_in += len(body)
        return body

    def put(self, key: str, body: bytes) -> None:
        """Writes an object readable by the bucket's owner only (ACL private)."""
        full = self.url.key(key)
        self._call(f"PUT {full}", lambda: self._client().put_object(
            Bucket=self.url.bucket, Key=full, Body=body, ACL="private"))
        self.bytes_out += len(body)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self.url.key(k)} for k in keys[i:i + 1000]]
            self._call("DELETE", lambda b=batch: self._client().delete_objects(
                Bucket=self.url.bucket, Delete={"Objects": b, "Quiet": True}))

    def list(self, sub: str) -> Iterator[tuple[str, int]]:
        """(key relative to `sub`, size) of every object under PREFIX/sub/."""
        base = self.url.key(sub) + "/"
        token = None
        while True:
            kw = {"Bucket": self.url.bucket, "Prefix": base, **({"ContinuationToken": token} if token else {})}
            page = self._call(f"LIST {base}", lambda kw=kw: self._client().list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base):], int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def create_bucket(self) -> None:
        """The bucket, if it does not exist (private, as S3 makes them by default)."""
        try:
            self._call("HEAD bucket", lambda: self._client().head_bucket(Bucket=self.url.bucket))
        except HvkitError:
            self._call("CREATE bucket", lambda: self._client().create_bucket(Bucket=self.url.bucket,
                                                                                ACL="private"))
