"""`hvkit guest ...`: the default guest (Debian cloud kernel + busybox initramfs), or a
guest of any Debian kernel package."""

from __future__ import annotations

import click

from hvkit.cli.output import console, json_option, print_json, status_console
from hvkit.config import Paths
from hvkit.guest import build_default_guest, build_kernel_guest


@click.group()
def guest() -> None:
    """hvkit's guests, built from Debian packages into hvkit's cache."""


@guest.command()
@click.option("--refresh", is_flag=True,
              help="Ask apt again which kernel the name means (the archive's newest cloud kernel by default).")
@click.option("--kernel-package", "kernel_package", metavar="NAME",
              help="A guest of this Debian kernel package instead of the default guest: e.g. "
                   "linux-image-6.12-cloud-amd64, linux-image-<release>, or NAME/SUITE. Fetched from any "
                   "suite (bookworm, -security, -backports, trixie, sid) with hvkit's own apt configuration.")
@json_option
def build(refresh: bool, kernel_package: str | None, as_json: bool) -> None:
    """Fetch and build a guest (cached; quick when nothing changed)."""
    paths = Paths.from_env()
    if kernel_package:
        with status_console().status(f"preparing a guest of {kernel_package} (first time: downloads about 40 MB)"):
            artifacts = build_kernel_guest(paths, kernel_package, refresh=refresh)
        label = f"guest of {kernel_package}"
    else:
        with status_console().status("preparing the default guest (first time: downloads about 30 MB)"):
            artifacts = build_default_guest(paths, refresh=refresh)
        label = "default guest"
    if as_json:
        print_json(artifacts.to_json())
        return
    console().print(f"{label}: kernel {artifacts.release} ({artifacts.kernel_package})\n"
                    f"  kernel  {artifacts.kernel}\n  initrd  {artifacts.initrd}")
