"""The memory server: snapshots of guest memory served as files over FUSE.

table.py   a snapshot's guest-physical map (multi-level, copy-on-write tables)
store.py   snapshots, tables and frames on disk (frozen RAM files, a deduplicated pool)
server.py  the FUSE file system that serves each snapshot as <mount>/<name>.ram
daemon.py  starting, finding and stopping the server process
"""

from hvkit.memserver.daemon import MemServer, fuse_unavailable_reason
from hvkit.memserver.store import Counters, Snapshot, Store

__all__ = ["MemServer", "Store", "Snapshot", "Counters", "fuse_unavailable_reason"]
