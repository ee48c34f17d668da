"""Snapshots in an S3 object store, and children on any host (issue 23).

objects.py  an S3 bucket prefix through boto3: URLs, retries with backoff, one-line errors
layout.py   content-addressed chunks and tables, the manifest (written last)
push.py     `hvkit snapshot push|ls|rm`: a memory-server snapshot into the store, listed, removed
fetch.py    `hvkit fork --snapshot s3://...`: a pushed snapshot fetched into this host's cache
            and memory server, and children started from it
seaweed.py  a local SeaweedFS S3 server (`hvkit store serve`, and the tests')

An operation over the memory server and forking: the engine and the memory server
never import it.
"""

from hvkit.remote.fetch import FetchReport, fork_remote, import_snapshot
from hvkit.remote.push import PushReport, list_snapshots, push, remove_snapshot

__all__ = ["FetchReport", "PushReport", "fork_remote", "import_snapshot", "list_snapshots", "push",
           "remove_snapshot"]
