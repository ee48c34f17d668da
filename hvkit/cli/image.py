"""`hvkit image ...`: disk images of real distributions (Debian 12 for now)."""

from __future__ import annotations

import time

import click

from hvkit.cli.output import console, json_option, print_json
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.image import build_debian_image
from hvkit.image.debian import MIRROR, SECURITY_MIRROR

DISTRIBUTIONS = ("debian",)


@click.group()
def image() -> None:
    """Disk images of real distributions, built from their packages into hvkit's cache."""


@image.command()
@click.argument("distribution", default="debian", type=click.Choice(DISTRIBUTIONS))
@click.option("--rebuild", is_flag=True, help="Build again even when the cache has the image.")
@click.option("--mirror", default=MIRROR, show_default=True, metavar="URL", help="The Debian archive.")
@click.option("--security-mirror", default=SECURITY_MIRROR, show_default=True, metavar="URL",
              help="The Debian security archive.")
@json_option
def build(distribution: str, rebuild: bool, mirror: str, security_mirror: str, as_json: bool) -> None:
    """Build a bootable Debian 12 disk image (qcow2) with its kernel, initramfs and an ssh
    key for root (cached; about two minutes the first time)."""
    started = time.monotonic()

    def progress(line: str) -> None:  # plain lines on stderr: stdout stays clean for --json
        click.echo(f"[{time.monotonic() - started:5.0f} s] {line}", err=True)

    built = build_debian_image(Paths.from_env(), rebuild=rebuild, progress=progress,
                               mirror=mirror, security_mirror=security_mirror)
    if not built.exists():  # should not happen: the builder checks what it installs
        raise HvkitError(f"the image in {built.directory} is incomplete", "run again with --rebuild")
    if as_json:
        print_json(built.to_json())
        return
    console().print(
        f"Debian 12 image (kernel {built.release}), built in {built.build_seconds:.0f} s\n"
        f"  image   {built.image}  ({built.size / 2**20:.0f} MiB on disk, "
        f"{built.virtual_size / 2**30:.0f} GiB virtual; boot an overlay of it)\n"
        f"  kernel  {built.kernel}\n  initrd  {built.initrd}\n  append  {built.kernel_args}\n"
        f"  ssh key {built.ssh_key}  (root; host key in {built.known_hosts})")
