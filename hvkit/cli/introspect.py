"""`hvkit ps` and `hvkit identify`: look into a Linux guest from outside it."""

from __future__ import annotations

from pathlib import Path

import click

from hvkit import api
from hvkit.cli.output import console, json_option, print_json, print_table, status_console
from hvkit.introspect import PageClass, PageMap, TaskWalk, list_tasks
from hvkit.introspect.pages import SHARED_OWNER
from hvkit.introspect.source import open_guest
from hvkit.memory import PAGE_SIZE

source_argument = click.argument("source")
kernel_option = click.option("--kernel", type=click.Path(path_type=Path),
                             help="The guest's kernel (bzImage or vmlinux); known for hvkit VMs.")
headers_option = click.option("--headers", type=click.Path(path_type=Path),
                              help="A prepared kernel tree of that kernel (default: Debian's headers package).")


@click.command()
@source_argument
@kernel_option
@headers_option
@json_option
def ps(source: str, kernel: Path | None, headers: Path | None, as_json: bool) -> None:
    """List the processes of a Linux guest from outside it.

    SOURCE is an hvkit VM name (paused while it is read), a raw RAM file (a NUMA
    guest's: its node files in node order, joined by commas) or a QEMU
    dump-guest-memory ELF core. Structure layouts come from compiling hvkit's interface
    against the headers of the guest's exact kernel; no agent runs in the guest.
    """
    with status_console().status("reading the guest"):
        with open_guest(source, kernel, headers, op="ps") as guest:
            walk = list_tasks(guest.kernel, guest.layout)
    if as_json:
        print_json({"processes": [t.__dict__ for t in walk.tasks], "errors": walk.errors,
                    "paused_seconds": round(guest.paused_for, 4)})
    else:
        print_table(["pid", "ppid", "name", "user pages"],
                    [[t.pid, t.ppid, t.name + ("" if t.mm else " (kernel)"), t.pages or ""]
                     for t in walk.tasks])
        if guest.paused_for:
            console().print(f"[dim]VM paused for {guest.paused_for * 1000:.0f} ms while read[/]")
    for line in walk.errors:
        click.echo(f"hvkit: warning: {line}", err=True)


def _mib(pages: int) -> float:
    return round(pages * PAGE_SIZE / (1 << 20), 2)


def identify_document(pm: PageMap, walk: TaskWalk, release: str) -> dict:
    """What `identify --json` prints: counts per class, free blocks per order, owners of
    anonymous pages, and every run of same-class pages as [first pfn, pages, class]."""
    names = {t.pid: t.name for t in walk.tasks}
    names[SHARED_OWNER] = "(several processes)"
    counts = pm.counts()
    starts, lengths, kinds = pm.runs()
    labels = [c.label for c in PageClass]
    return {
        "kernel": release,
        "page_size": PAGE_SIZE,
        "pages": pm.pages,
        "classes": {c.label: {"pages": n, "mib": _mib(n)} for c, n in counts.items()},
        "free_blocks_by_order": pm.free_blocks_by_order(),
        "anonymous_owners": [{"pid": pid, "name": names.get(pid, "?"), "pages": n}
                             for pid, n in sorted(pm.anonymous_by_owner().items(), key=lambda kv: -kv[1])],
        "runs": [[int(a), int(b), labels[k]] for a, b, k in zip(starts, lengths, kinds)],
        "errors": walk.errors + pm.errors,
    }


@click.command()
@source_argument
@kernel_option
@headers_option
@json_option
@click.option("--map", "map_path", type=click.Path(path_type=Path),
              help="Also draw physical memory coloured by class into this picture (.png, .svg).")
def identify(source: str, kernel: Path | None, headers: Path | None, as_json: bool, map_path: Path | None) -> None:
    """Identify every page of a Linux guest's physical memory from outside it.

    Each page frame gets one class: free (with its buddy order), page table, slab,
    kernel image, reserved, anonymous (with the process that maps it), page cache,
    kernel other (stacks, vmalloc, per-CPU lists, ...) or not present. The classes come
    from the guest kernel's own struct page array, decoded with layouts compiled
    against the headers of its exact version. SOURCE is an hvkit VM name (paused while
    it is read), a raw RAM file (a NUMA guest's: its node files in node order, joined
    by commas) or a QEMU dump-guest-memory ELF core.

    --json prints counts, free blocks per order, the owners of anonymous pages and every
    run of pages of one class as [first pfn, pages, class].
    """
    with status_console().status("reading the guest"):
        found = api.identify(source, kernel=kernel, headers=headers)
    pm = found.pages
    doc = identify_document(pm, found.tasks, found.kernel)
    doc["seconds"] = round(found.seconds, 4)
    doc["paused_seconds"] = round(found.paused_seconds, 4)
    if map_path:
        from hvkit.cli.pictures import page_map_picture

        doc["map"] = str(page_map_picture(pm, map_path, f"{source}: {_mib(pm.pages):.0f} MiB by page class"))
    if as_json:
        print_json(doc)
    else:
        _print_identify(doc)
    for line in doc["errors"]:
        click.echo(f"hvkit: warning: {line}", err=True)


def _print_identify(doc: dict) -> None:
    total = doc["pages"]
    console().print(f"[bold]{total} page frames ({_mib(total):.0f} MiB), kernel {doc['kernel']}[/]")
    print_table(["class", "pages", "MiB", "% of frames"],
                [[label, c["pages"], f"{c['mib']:.1f}", f"{100 * c['pages'] / total:.1f}"]
                 for label, c in doc["classes"].items() if c["pages"]])
    orders = doc["free_blocks_by_order"]
    if orders:
        console().print("free blocks by order: " + "  ".join(f"{o}:{n}" for o, n in enumerate(orders)))
    owners = doc["anonymous_owners"][:8]
    if owners:
        print_table(["pid", "process", "anonymous MiB"],
                    [[o["pid"] if o["pid"] > 0 else "", o["name"], f"{_mib(o['pages']):.1f}"] for o in owners])
    note = f"classified in {doc['seconds'] * 1000:.0f} ms"
    if doc["paused_seconds"]:
        note += f"; VM paused for {doc['paused_seconds'] * 1000:.0f} ms"
    if "map" in doc:
        note += f"; map written to {doc['map']}"
    console().print(f"[dim]{note}[/]")
