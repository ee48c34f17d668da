"""This host's cache of a store's objects, by hash: every fork here, and the memory
server's lazy reads (lazy.py), go through it, so an object is fetched once per host.

    $HVKIT_CACHE/remote/objects/<sha256>   the object as stored (zstd), checked against
                                           its hash each time it is read
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from hvkit.config import Paths, make_private_dir
from hvkit.leftovers import process_tag
from hvkit.remote.layout import decompress_checked
from hvkit.remote.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class ObjectCache:
    """This host's cache of a store's objects, by hash (shared by every fork here)."""

    root: Path

    @classmethod
    def of(cls, paths: Paths) -> "ObjectCache":
        return cls(make_private_dir(paths.cache / "remote" / "objects"))

    def path(self, hexname: str) -> Path:
        return self.root / hexname

    def get(self, objects: ObjectStore, key: str, hexname: str, limit: int) -> tuple[bytes, bool]:
        """(the object's uncompressed bytes, whether it was fetched from the store)."""
        cached = self.path(hexname)
        try:
            return decompress_checked(cached.read_bytes(), hexname, limit), False
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warning("cached %s is damaged (%s): fetched again", cached, e)
            cached.unlink(missing_ok=True)
        got: list[bytes] = []
        body = objects.get(key, check=lambda b: got.append(decompress_checked(b, hexname, limit)))
        # a name of this thread's own (two threads may fetch the same chunk), ending in
        # the process's tag (hvkit.leftovers removes it once the process is gone)
        tmp = cached.with_name(f".{hexname}-{threading.get_ident()}.{process_tag()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        tmp.replace(cached)  # whole or not there
        return got[-1], True
