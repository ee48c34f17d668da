"""`hvkit ps`: look into a Linux guest from outside it."""

from __future__ import annotations

from pathlib import Path

import click

from hvkit.cli.output import console, json_option, print_json, print_table, status_console
from hvkit.introspect import list_tasks
from hvkit.introspect.source import open_guest

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

    SOURCE is an hvkit VM name (paused while it is read), a raw RAM file or a QEMU
    dump-guest-memory ELF core. Structure layouts come from compiling hvkit's interface
    against the headers of the guest's exact kernel; no agent runs in the guest.
    """
    with status_console().status("reading the guest"):
        with open_guest(source, kernel, headers) as guest:
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
