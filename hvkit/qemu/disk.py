"""A VM's own disk: a qcow2 overlay of a read-only base image, in its runtime folder.

This module owns making that overlay (with `qemu-img`, optionally larger than the
base) and the QEMU arguments that attach it as a virtio-blk disk. The base is never
written: every write of the guest lands in the overlay, which goes with the VM's
folder when the VM stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from hvkit.config import make_private_dir
from hvkit.errors import HvkitError
from hvkit.units import format_size

DRIVE_ID = "disk0"  # QEMU's id of the drive (QMP block commands name it)


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if not found:
        raise HvkitError("qemu-img is not installed", "apt-get install qemu-utils")
    return found


def virtual_size(image: Path) -> int:
    """Bytes of the disk the guest sees in qcow2 file `image`."""
    out = subprocess.run([_qemu_img(), "info", "-U", "--output=json", str(image)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise HvkitError(f"cannot read disk image {image}: {_last_line(out.stderr)}")
    return int(json.loads(out.stdout)["virtual-size"])


def create_overlay(base: Path, path: Path, size: int | None = None) -> Path:
    """A new qcow2 file at `path` over `base` (reads fall through, writes stay in it),
    `size` bytes big (default: the base's size; never smaller, which would cut off the
    end of the base's file system). A full disk is one clear error, nothing left.

    The base may be a layer a running QEMU holds (a VM's disk frozen at a fork): it is
    read with -U and not opened again (-u), since QEMU's lock would refuse that."""
    base_size = virtual_size(base)
    if size is not None and size < base_size:
        raise HvkitError(f"disk size {format_size(size)} is smaller than the image ({format_size(base_size)})",
                         f"give --disk-size {format_size(base_size)} or more")
    cmd = [_qemu_img(), "create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "qcow2", str(path),
           str(size if size is not None else base_size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        path.unlink(missing_ok=True)
        raise _overlay_error(path, out.stderr)
    return path


def _overlay_error(path: Path, stderr: str) -> HvkitError:
    if "No space left" in stderr or _no_space(path.parent):
        return HvkitError(f"cannot create the disk overlay in {path.parent}: the disk is full",
                          "free some space there, or set HVKIT_RUNTIME to another folder")
    return HvkitError(f"cannot create the disk overlay {path}: {_last_line(stderr)}")


def _no_space(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def drive_args(path: Path) -> list[str]:
    """QEMU arguments for `path` as the guest's virtio-blk disk (/dev/vda); freed
    blocks of the guest's file system are given back to the overlay (discard)."""
    return ["-drive", f"file={path},format=qcow2,if=none,id={DRIVE_ID},discard=unmap",
            "-device", f"virtio-blk-pci,drive={DRIVE_ID},id=vda"]


# ---- disks frozen at a fork ----------------------------------------------------------------

FROZEN_FOLDER = ".disks"  # under the runtime folder: frozen layers outlive the VM they came from
KEEP_UNUSED = 120.0  # seconds a frozen layer nobody opens is kept (a fork is starting its children)


def freeze_active_layer(qmp, active: Path, runtime: Path, name: str) -> Path:
    """Freezes the disk of a paused VM at this moment, without stopping its QEMU: its
    overlay `active` moves (by name: QEMU keeps it open) into the runtime folder's
    frozen layers, and QEMU goes on writing to a new, empty overlay at the same path on
    top of it (QMP blockdev-snapshot-sync onto an existing file). Children of a fork
    get overlays of their own over the frozen layer. `qmp(command, args)` talks to
    the VM's QEMU. Returns the frozen layer."""
    folder = make_private_dir(runtime / FROZEN_FOLDER)
    frozen = folder / f"{name}-{time.time_ns()}.qcow2"
    size = virtual_size(active)
    os.rename(active, frozen)
    try:
        create_overlay(frozen, active, size)
        qmp("blockdev-snapshot-sync", {"device": DRIVE_ID, "snapshot-file": str(active), "format": "qcow2",
                                       "mode": "existing"})
    except BaseException:
        active.unlink(missing_ok=True)
        os.rename(frozen, active)  # as it was: QEMU never left it
        raise
    os.chmod(frozen, 0o400)  # nothing writes to it again
    os.utime(frozen)  # its age counts from now (collect_frozen_layers)
    return frozen


def collect_frozen_layers(runtime: Path) -> list[Path]:
    """Removes frozen layers that no process has open (QEMU holds every layer of its
    disk's chain open) and that are not brand new; returns what it removed."""
    folder = runtime / FROZEN_FOLDER
    if not folder.is_dir():
        return []
    layers = {p.resolve() for p in folder.glob("*.qcow2") if time.time() - p.stat().st_mtime > KEEP_UNUSED}
    if not layers:
        return []
    unused = layers - _open_files()
    for layer in unused:
        layer.unlink(missing_ok=True)
    return sorted(unused)


def _open_files() -> set[Path]:
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    found.add(Path(os.readlink(fd)))
        except OSError:
            continue
    return found
