"""`hvkit snapshot push|ls|rm` (snapshots in an S3 store) and `hvkit store serve` (a
local SeaweedFS S3 server to try them with). `hvkit fork --snapshot s3://...` is in fork.py."""

from __future__ import annotations

import time
from pathlib import Path

import click

from hvkit.cli.output import console, json_option, print_json, print_table
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.remote import list_snapshots, push, remove_snapshot
from hvkit.remote.layout import DEFAULT_CHUNK_BYTES
from hvkit.remote.seaweed import SeaweedServer, running_pid
from hvkit.units import mib

store_option = click.option("--store", "url", required=True, metavar="s3://BUCKET/PREFIX",
                            help="The object store (credentials the standard AWS way; "
                                 "endpoint from AWS_ENDPOINT_URL or --endpoint).")
endpoint_option = click.option("--endpoint", metavar="URL", default=None,
                               help="The S3 endpoint (default: AWS_ENDPOINT_URL, else AWS S3).")


@click.group()
def snapshot() -> None:
    """Snapshots in an S3 object store (AWS S3, Ceph RGW, MinIO, SeaweedFS): push a
    memory-server snapshot there, list and remove them; start children of one on any
    host with 'hvkit fork --snapshot s3://BUCKET/PREFIX/NAME'."""


@snapshot.command("push")
@click.argument("name")
@store_option
@endpoint_option
@click.option("--as", "as_name", metavar="NAME", help="Its name in the store (default: NAME).")
@click.option("--chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES // 1024, show_default=True,
              help="Chunk size (a power of two, 4 to 4096).")
@click.option("--working-set/--no-working-set", default=True, show_default=True,
              help="Push the chunks its first children read in their first seconds (recorded by the "
                   "memory server), for remote forks to prefetch.")
@json_option
def push_command(name: str, url: str, endpoint: str | None, as_name: str | None, chunk_kib: int,
                 working_set: bool, as_json: bool) -> None:
    """Push memory-server snapshot NAME (see 'hvkit memserver status') to the store.
    Uploads only the chunks and tables the store lacks; the manifest goes last."""
    report = push(Paths.from_env(), name, url, as_name, endpoint, chunk_kib * 1024, working_set)
    if as_json:
        print_json(report.to_json())
        return
    console().print(
        f"pushed {name} to {report.store}/{report.name}: {report.chunks} chunks, {report.chunks_zero} zero "
        f"(not stored), {report.chunks_uploaded} uploaded ({report.pages_uploaded} pages), the rest already "
        f"there; {report.tables_uploaded} tables, {report.blobs_uploaded} files; working set "
        f"{report.working_set_chunks or 'not recorded'}{' chunks' if report.working_set_chunks else ''}; "
        f"{mib(report.bytes_uploaded):.1f} MiB sent in {report.seconds:.1f} s")


@snapshot.command("ls")
@store_option
@endpoint_option
@json_option
def ls_command(url: str, endpoint: str | None, as_json: bool) -> None:
    """The snapshots in the store (only whole ones: a push cut short shows nothing)."""
    manifests = list_snapshots(url, endpoint)
    if as_json:
        print_json([{"name": m.name, "vm": m.vm, "parent": m.parent, "size": m.size, "chunks": m.chunks,
                     "chunks_stored": m.chunks_nonzero, "stored_bytes": m.stored_bytes,
                     "chunk_bytes": m.chunk_bytes, "created": m.created, "pushed": m.pushed}
                    for m in manifests])
        return
    if not manifests:
        console().print(f"no snapshots in {url}")
        return
    print_table(["snapshot", "of VM", "parent", "memory MiB", "chunks", "stored", "stored MiB (zstd)",
                 "pushed"],
                [[m.name, m.vm, m.parent or "", f"{mib(m.size):.0f}", m.chunks, m.chunks_nonzero,
                  f"{mib(m.stored_bytes):.1f}", time.strftime("%Y-%m-%d %H:%M", time.gmtime(m.pushed))]
                 for m in manifests])


@snapshot.command("rm")
@click.argument("name")
@store_option
@endpoint_option
@json_option
def rm_command(name: str, url: str, endpoint: str | None, as_json: bool) -> None:
    """Remove snapshot NAME from the store, and the chunks no other snapshot there uses.
    Not while a push to the same store runs."""
    result = remove_snapshot(url, name, endpoint)
    if as_json:
        print_json(result)
        return
    console().print(f"removed {name}: {result['chunks_deleted']} chunks, {result['tables_deleted']} tables and "
                    f"{result['blobs_deleted']} files no other snapshot used")


@click.group()
def store() -> None:
    """A local S3 object store to try remote snapshots with."""


@store.command("serve")
@click.option("--dir", "folder", type=click.Path(path_type=Path), required=True,
              help="Where it keeps its objects and keys (made if missing; reused next time).")
@click.option("--bucket", default="hvkit", show_default=True, help="A bucket to create in it.")
def serve(folder: Path, bucket: str) -> None:
    """Run SeaweedFS's S3 server on 127.0.0.1 until Ctrl-C, and print how to use it."""
    folder = folder.absolute()
    pid = running_pid(folder)
    if pid:
        raise HvkitError(f"a store already runs from {folder} (pid {pid})", "use it, or stop it first")
    server = SeaweedServer(folder)
    server.start(bucket)
    try:
        console().print(f"SeaweedFS S3 at {server.endpoint} (pid {server.proc.pid}), data in {folder}; "
                        "in another shell:")
        for k, v in server.env().items():
            click.echo(f"export {k}={v}")
        click.echo(f"hvkit snapshot push NAME --store s3://{bucket}/snapshots")
        _wait(server)
    finally:
        server.stop()
        console().print("store stopped")


def _wait(server: SeaweedServer) -> None:
    """Until the server ends, or Ctrl-C/SIGTERM (hvkit turns SIGTERM into an interrupt)."""
    while server.alive():
        time.sleep(0.5)
    raise HvkitError(f"SeaweedFS ended on its own; see {server.dir / 'weed.log'}")
