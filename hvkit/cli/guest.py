"""`hvkit guest ...`: the default guest (Debian cloud kernel + busybox initramfs)."""

from __future__ import annotations

import click

from hvkit.cli.output import console, json_option, print_json, status_console
from hvkit.config import Paths
from hvkit.guest import build_default_guest


@click.group()
def guest() -> None:
    """The default guest, built from Debian packages into hvkit's cache."""


@guest.command()
@click.option("--refresh", is_flag=True, help="Ask apt for the archive's newest cloud kernel again.")
@json_option
def build(refresh: bool, as_json: bool) -> None:
    """Fetch and build the default guest (cached; quick when nothing changed)."""
    with status_console().status("preparing the default guest (first time: downloads about 30 MB)"):
        artifacts = build_default_guest(Paths.from_env(), refresh=refresh)
    if as_json:
        print_json(artifacts.to_json())
        return
    console().print(f"default guest: kernel {artifacts.release} ({artifacts.kernel_package})\n"
                    f"  kernel  {artifacts.kernel}\n  initrd  {artifacts.initrd}")
