"""`hvkit isf` and `hvkit vol`: Volatility 3 on a guest whose kernel has no debug
package, with the symbol table hvkit makes from the kernel's own headers, kallsyms and BTF.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Iterator

import click

from hvkit.cli.output import console, json_option, print_json, status_console
from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.kernel.headers import debian_tree, prepared_tree
from hvkit.kernel.image import read_kernel_image
from hvkit.kernel.isf import IsfReport, make_isf, volatility_symbol_dir
from hvkit.leftovers import VOL_PREFIX, maker_gone, process_tag, remove_vol_leftovers
from hvkit.qemu.ownership import fault_point
from hvkit.qemu.qmp import QMPUnreachable, qmp_with_fd

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


# plugins hvkit runs in its own version (hvkit/forensics/volplugins; see the reason there)
REPLACED_PLUGINS = {name: "hvkit.hidden_modules.Hidden_modules" for name in (
    "linux.malware.hidden_modules", "linux.malware.hidden_modules.Hidden_modules",
    "linux.hidden_modules", "linux.hidden_modules.Hidden_modules")}


def volatility_plugin_dir() -> Path:
    """hvkit's own Volatility plugins, for `vol -p`."""
    return Path(str(resources.files("hvkit.forensics").joinpath("volplugins")))


def _volatility() -> Path:
    vol = Path(sys.executable).with_name("vol")
    if not vol.exists():
        raise HvkitError("Volatility 3 is not installed", ".venv/bin/pip install volatility3 "
                         "(./setup.sh installs it with hvkit's optional forensics tools)")
    return vol


def anonymous_file(folder: Path) -> int:
    """A file descriptor of a new, empty file in `folder` (0600) that has no name: the
    kernel removes its data when its last descriptor closes, so a copy of guest memory
    in it never outlives its owner, not even a SIGKILL. Where the file system has no
    O_TMPFILE, a file whose name lasts an instant (named after this process, which
    the next hvkit command removes if it died in that instant)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise HvkitError(f"cannot make a file in {folder}: {e.strerror}") from None
    path = folder / f"{VOL_PREFIX}{process_tag()}-{secrets.token_hex(4)}.core"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    path.unlink()
    return fd


def dump_into(vm, fd: int, timeout: float = 600.0) -> None:
    """The paused VM's memory as an ELF core (QEMU's dump-guest-memory, as `vm dump`
    writes it) into the file of `fd`, which QEMU gets over QMP (getfd)."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            qmp_with_fd(vm.qmp_path, fd, "hvkit-vol", "dump-guest-memory",
                        {"paging": False, "protocol": "fd:hvkit-vol"}, timeout=timeout)
            return
        except QMPUnreachable:  # another command talks to it: the socket takes one client at a time
            vm.raise_if_dead("while its memory was copied")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def write_core(vm, path: Path) -> Path:
    """`vm.dump_core(path)` (the paused VM's memory as an ELF core), but the core has no
    name until it is whole: QEMU writes it into a file with no name in `path`'s folder
    (O_TMPFILE), which is then linked in and renamed into place. A dump killed at any
    moment leaves no copy of guest memory behind (a link killed before its rename: a
    hidden name with the dead process's pid, which the next dump into that folder
    removes). Where the folder's file system has no O_TMPFILE, and for a libvirt
    domain (no descriptor passes through virsh), vm.dump_core as it is."""
    path = Path(path).resolve()
    if vm.spec.libvirt_domain:
        return vm.dump_core(path)
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return vm.dump_core(path)
        raise HvkitError(f"cannot write a core in {path.parent}: {e.strerror}") from None
    try:
        for stale in path.parent.glob(".*.partial"):
            if maker_gone(stale.name.rsplit(".", 2)[-2]):
                stale.unlink(missing_ok=True)
        dump_into(vm, fd)
        fault_point("dump written")
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        _link_fd(fd, partial)
        partial.replace(path)
    finally:
        os.close(fd)
    return path


def _link_fd(fd: int, path: Path) -> None:
    """The file of `fd` (made with O_TMPFILE, no name yet) gets the name `path`:
    linkat(AT_SYMLINK_FOLLOW) through /proc (Python calls linkat only when given a
    folder's descriptor; the absolute source name ignores it)."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


@contextlib.contextmanager
def memory_image(source: str, paths: Paths) -> Iterator[tuple[Path, tuple[int, ...]]]:
    """A file Volatility can read for SOURCE, with the descriptors it must inherit: the
    file itself, or for an hvkit VM a core dumped while it is paused (it runs on while
    Volatility reads the copy) into a file with no name (anonymous_file), which
    Volatility opens as /proc/self/fd/N."""
    path = Path(source)
    if path.exists() or "/" in source:
        if not path.is_file():
            raise HvkitError(f"{source} is not a memory file", "give a VM name, a RAM file or an ELF core")
        yield path, ()
        return
    from hvkit.qemu import find_vm

    vm = find_vm(source, paths)
    t0 = time.monotonic()
    if vm.spec.libvirt_domain:  # libvirt holds its QMP socket: no descriptor passes through virsh
        with tempfile.TemporaryDirectory(prefix=f"{VOL_PREFIX}{process_tag()}-", dir=paths.cache) as tmp:
            core = Path(tmp) / f"{vm.name}.core"
            with status_console().status(f"copying the memory of VM {vm.name} (paused meanwhile)"), \
                    vm.paused("vol"):
                vm.dump_core(core)
            click.echo(f"hvkit: VM {vm.name} paused {time.monotonic() - t0:.1f} s for a copy of its memory", err=True)
            yield core, ()
        return
    fd = anonymous_file(paths.cache)
    try:
        with status_console().status(f"copying the memory of VM {vm.name} (paused meanwhile)"), vm.paused("vol"):
            dump_into(vm, fd)
        fault_point("vol copied")
        click.echo(f"hvkit: VM {vm.name} paused {time.monotonic() - t0:.1f} s for a copy of its memory", err=True)
        yield Path(f"/proc/self/fd/{fd}"), (fd,)
    finally:
        os.close(fd)


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
    remove_vol_leftovers(paths.cache)  # the CLI did already; the function may be called alone
    program = _volatility()
    kernel_file = kernel_file_of(source, kernel, paths)
    with status_console().status(f"making the symbol table of {kernel_file.name}"):
        report = isf_report(kernel_file, headers, paths)
    # Volatility's symbols and cache (no guest data): named after this process, so the
    # next hvkit command removes a folder a killed run left (hvkit.leftovers)
    with tempfile.TemporaryDirectory(prefix=f"{VOL_PREFIX}{process_tag()}-") as tmp, \
            memory_image(source, paths) as (image, fds):
        symbols = volatility_symbol_dir(report.path, Path(tmp) / "symbols")
        (Path(tmp) / "cache").mkdir()
        if plugin in REPLACED_PLUGINS:
            click.echo(f"hvkit: running {plugin} as {REPLACED_PLUGINS[plugin]}: the same plugin with the "
                       "table check it means (docs/forensics.md)", err=True)
            plugin = REPLACED_PLUGINS[plugin]
        cmd = [str(program), "-q", "--offline", "--cache-path", str(Path(tmp) / "cache"),
               "-p", str(volatility_plugin_dir()), "-s", str(symbols), "-f", str(image),
               *(["-r", "json"] if as_json else []), plugin, *args]
        code = subprocess.run(cmd, pass_fds=fds).returncode
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
