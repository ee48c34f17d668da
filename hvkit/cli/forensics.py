"""`hvkit isf` and `hvkit vol`: Volatility 3 on a guest whose kernel has no debug
package, with the symbol table hvkit makes from the kernel's own headers, kallsyms and BTF.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import click

from hvkit.cli.output import console, json_option, print_json, status_console
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.isf import IsfReport, make_isf, volatility_symbol_dir
from hvkit.procs import left_by_dead_process

headers_option = click.option("--headers", type=click.Path(path_type=Path),
                              help="A prepared kernel tree of that kernel (default: Debian's headers package).")


def _vm_kernel(name: str, paths: Paths) -> Path:
    from hvkit.qemu import find_vm

    return Path(find_vm(name, paths).spec.kernel)


def kernel_file_of(source: str, kernel: Path | None, paths: Paths) -> Path:
    """The kernel file for SOURCE: --kernel; else an hvkit VM's own kernel; else, for an
    ELF core with VMCOREINFO, Debian's kernel of the release it names."""
    if kernel is not None:
        return kernel
    path = Path(source)
    if not path.exists() and "/" not in source:
        return _vm_kernel(source, paths)
    if path.is_file():
        from hvkit.introspect.source import kernel_named_by_core

        found = kernel_named_by_core(path, paths)
        if found is not None:
            return found
    raise HvkitError(f"which kernel {source} runs is unknown",
                     "pass --kernel FILE (its bzImage or vmlinux); a core from 'hvkit vm dump' names it itself")


def isf_report(kernel_file: Path, headers: Path | None, paths: Paths) -> IsfReport:
    release = read_kernel_image(kernel_file).release
    tree = prepared_tree(headers, release) if headers else debian_tree(release, paths.cache)
    return make_isf(kernel_file, tree, paths.cache)


@click.command()
@click.argument("kernel")
@headers_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also copy the table here (.json.xz, as Volatility reads it).")
@json_option
def isf(kernel: str, headers: Path | None, output: Path | None, as_json: bool) -> None:
    """Make a Volatility 3 symbol table (ISF) for a kernel, with no debug package.

    KERNEL is a kernel file (bzImage or vmlinux) or an hvkit VM's name (its kernel). Types
    come from hvkit's interface compiled against the kernel's own headers (DWARF), and
    from the kernel's own BTF for types private to its sources (checked against each
    other where both have them); symbols from its kallsyms, with linux_banner's bytes so
    Volatility matches the table to a memory image. Cached: a second call is instant.
    Use it with 'vol -s DIR' (DIR/linux/ holding the table) or with 'hvkit vol'.
    """
    paths = Paths.from_env()
    path = Path(kernel)
    kernel_file = path if path.exists() or "/" in kernel else _vm_kernel(kernel, paths)
    with status_console().status(f"making the symbol table of {kernel_file.name}"):
        report = isf_report(kernel_file, headers, paths)
    if output:
        shutil.copyfile(report.path, output)
    doc = {**report.to_json(), "table": str(output or report.path)}
    if as_json:
        print_json(doc)
        return
    console().print(
        f"{report.release}: {doc['table']} ({'from the cache' if report.cached else f'made in {report.seconds:.1f} s'}); "
        f"{report.user_types_dwarf} structures and unions from the headers' DWARF, {report.user_types_btf} more "
        f"from the kernel's BTF, {report.symbols} symbols "
        f"({sum(n for k, n in report.typed_symbols.items() if k != 'void')} with a type); "
        f"{report.checked} types in both checked, {len(report.disagreements)} disagree")
    for line in report.disagreements[:10]:
        console().print(f"  [yellow]differs[/]: {line}")


def _volatility() -> Path:
    vol = Path(sys.executable).with_name("vol")
    if not vol.exists():
        raise HvkitError("Volatility 3 is not installed", ".venv/bin/pip install volatility3 "
                         "(./setup.sh installs it with hvkit's optional forensics tools)")
    return vol


VOL_COPY_PREFIX = "hvkit-vol-"  # + the pid of the run that copies a VM's memory there


def remove_copies_of_dead_runs(cache: Path) -> None:
    """Copies of guest memory that a killed `hvkit vol` left in the cache (its
    temporary folder outlives a SIGKILL) are removed by the next run: guest memory must
    not stay behind on the host."""
    for folder in cache.glob(f"{VOL_COPY_PREFIX}*-*"):
        if left_by_dead_process(folder.name[len(VOL_COPY_PREFIX):].split("-", 1)[0]):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def memory_image(source: str, paths: Paths) -> Iterator[Path]:
    """A file Volatility can read for SOURCE: the file itself, or for an hvkit VM a core
    dumped while it is paused (it runs on while Volatility reads the copy)."""
    path = Path(source)
    if path.exists() or "/" in source:
        if not path.is_file():
            raise HvkitError(f"{source} is not a memory file", "give a VM name, a RAM file or an ELF core")
        yield path
        return
    from hvkit.qemu import find_vm

    vm = find_vm(source, paths)
    with tempfile.TemporaryDirectory(prefix=f"{VOL_COPY_PREFIX}{os.getpid()}-", dir=paths.cache) as tmp:
        core = Path(tmp) / f"{vm.name}.core"
        t0 = time.monotonic()
        with status_console().status(f"copying the memory of VM {vm.name} (paused meanwhile)"), vm.paused("vol"):
            vm.dump_core(core)
        click.echo(f"hvkit: VM {vm.name} paused {time.monotonic() - t0:.1f} s for a copy of its memory", err=True)
        yield core


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("plugin")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--kernel", type=click.Path(path_type=Path), help="The guest's kernel (known for hvkit VMs and hvkit cores).")
@headers_option
@click.option("--json", "as_json", is_flag=True, help="Volatility's JSON renderer.")
def vol(source: str, plugin: str, args: tuple[str, ...], kernel: Path | None, headers: Path | None,
        as_json: bool) -> None:
    """Run a Volatility 3 plugin on a guest, with hvkit's symbol table for its kernel.

    SOURCE is an hvkit VM name (its memory is copied while it is paused), a raw RAM file
    or an ELF core; PLUGIN a Volatility plugin (e.g. linux.pslist, linux.lsof); ARGS go
    to the plugin. The symbol table is made on the way, or taken from the cache.
    """
    paths = Paths.from_env()
    remove_copies_of_dead_runs(paths.cache)
    program = _volatility()
    kernel_file = kernel_file_of(source, kernel, paths)
    with status_console().status(f"making the symbol table of {kernel_file.name}"):
        report = isf_report(kernel_file, headers, paths)
    with tempfile.TemporaryDirectory(prefix="hvkit-vol-") as tmp, memory_image(source, paths) as image:
        symbols = volatility_symbol_dir(report.path, Path(tmp) / "symbols")
        (Path(tmp) / "cache").mkdir()
        cmd = [str(program), "-q", "--offline", "--cache-path", str(Path(tmp) / "cache"),
               "-s", str(symbols), "-f", str(image), *(["-r", "json"] if as_json else []), plugin, *args]
        code = subprocess.run(cmd).returncode
    sys.exit(code)


@click.command(name="drgn")
@click.argument("core", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("script", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kernel", type=click.Path(path_type=Path), help="The guest's kernel (a core from 'hvkit vm dump' names it).")
@headers_option
def drgn_command(core: Path, script: Path | None, kernel: Path | None, headers: Path | None) -> None:
    """Open an ELF core in drgn with hvkit's types, with no debug package.

    CORE is a core with VMCOREINFO ('hvkit vm dump' writes one). drgn finds the kernel
    and its symbols (kallsyms) in it; hvkit gives it the types, compiled from the
    kernel's own headers, and the types of its global variables. With SCRIPT, runs it
    with `prog` and drgn's Linux helpers in scope; without, drgn's interactive shell.
    """
    from hvkit.forensics.drgn_support import open_core
    from hvkit.kernel.isf import interface_object

    paths = Paths.from_env()
    kernel_file = kernel_file_of(str(core), kernel, paths)
    release = read_kernel_image(kernel_file).release
    tree = prepared_tree(headers, release) if headers else debian_tree(release, paths.cache)
    with status_console().status(f"compiling hvkit's types for {release}"):
        types = interface_object(tree, paths.cache)
    prog = open_core(core, types)
    if script is None:
        import drgn.cli

        drgn.cli.run_interactive(prog)
        return
    import drgn.helpers.linux as linux_helpers

    scope = {name: getattr(linux_helpers, name) for name in getattr(linux_helpers, "__all__", [])}
    scope.update({"prog": prog, "__name__": "__main__", "__file__": str(script)})
    exec(compile(script.read_text(), str(script), "exec"), scope)
