"""The `hvkit` command. Each concern has its own module of subcommands; this one wires
them together and turns every HvkitError into one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys

import click

from hvkit import __version__
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.leftovers import sweep
from hvkit.signals import Terminated, terminate_as_interrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvkit")
@click.option("-v", "--verbose", count=True, help="Log what hvkit does (-vv: also QMP traffic).")
def cli(verbose: int) -> None:
    """hvkit: fork, hypercalls, identification and sharing for the memory of real VMs.

    Start with 'hvkit demo'. Every command takes --help; commands whose output is data
    take --json. Set HVKIT_CACHE and HVKIT_RUNTIME to move hvkit's cache
    (default ~/.cache/hvkit) and its VMs' runtime folders (default /dev/shm/hvkit).
    """
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 1), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)
    paths = Paths.from_env()
    sweep(paths.runtime, paths.cache)  # what killed hvkit commands left (leftovers.py)


def _register() -> None:
    from hvkit.cli import demo, forensics, fork, guest, hv, image, introspect, remote, share, vm

    cli.add_command(vm.vm)
    cli.add_command(guest.guest)
    cli.add_command(image.image)
    cli.add_command(introspect.ps)
    cli.add_command(introspect.identify)
    cli.add_command(forensics.isf)
    cli.add_command(forensics.vol)
    cli.add_command(forensics.drgn_command)
    cli.add_command(share.share)
    cli.add_command(hv.hv)
    cli.add_command(fork.fork)
    cli.add_command(fork.memserver)
    cli.add_command(fork.pool)
    cli.add_command(remote.snapshot)
    cli.add_command(remote.store)
    cli.add_command(demo.demo)


_register()


def main() -> None:
    terminate_as_interrupt()  # SIGTERM cleans up as Ctrl-C does
    try:
        cli.main(standalone_mode=False)
    except HvkitError as e:
        click.echo(f"hvkit: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort as e:  # click's wrapping of KeyboardInterrupt
        if isinstance(e.__cause__, Terminated):
            click.echo("hvkit: terminated", err=True)
            sys.exit(143)
        click.echo("hvkit: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Terminated:
        click.echo("hvkit: terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("hvkit: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:  # the walks over guest memory are bounded; a host short of memory is not
        click.echo("hvkit: error: this host ran out of memory; free some, or read a smaller guest", err=True)
        sys.exit(1)
