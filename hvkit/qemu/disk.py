"""A VM's own disk: a qcow2 overlay of a read-only base image, in its runtime folder.

This module owns making that overlay (with `qemu-img`, optionally larger than the
base) and the QEMU arguments that attach it as a virtio-blk disk. The base is never
written: every write of the guest lands in the overlay, which goes with the VM's
folder when the VM stops. It also owns freezing a disk at a fork (a read-only layer
in the memory server's store that children start from) and removing layers nothing
needs any more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

from hvkit.config import make_private_dir
from hvkit.errors import HvkitError
from hvkit.qemu.ownership import fault_point
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
    # disk data: its owner's alone (0600) from the moment it exists (qemu-img makes 0644)
    out = subprocess.run(cmd, capture_output=True, text=True, umask=0o077)
    if out.returncode != 0:
        path.unlink(missing_ok=True)
        raise _overlay_error(path, out.stderr)
    os.chmod(path, 0o600)  # a file that was there already keeps its mode otherwise
    return path


def overlay_once(base: Path, path: Path, size: int | None = None) -> Path:
    """create_overlay, done at most once for `path`: made at a temporary name and
    renamed when whole, so a `path` that exists is whole (an earlier attempt, cut short
    after it, made it) and is kept. A temporary file a killed attempt left is made anew."""
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    try:
        create_overlay(base, partial, size)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
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
#
# A fork freezes the VM's disk with its memory: the active overlay becomes a read-only
# layer that the snapshot's children start from, and the VM goes on writing to a new
# overlay above it. The layer lives beside the snapshot in the memory server's store
# (hvkit.memserver), and it is kept as long as anything needs it: a snapshot, a VM's
# disk chain, a fork in progress, or an open file (collect_frozen_layers).

KEEP_NEW = 120.0  # seconds a layer nothing names yet is kept (a fork between freezing and sealing)
_QCOW2_MAGIC = b"QFI\xfb"


def active_layer(qmp) -> Path:
    """The file QEMU writes the guest's disk to now, as QEMU itself says (not as a
    record says: a fork cut short may have switched it without recording it)."""
    for dev in qmp("query-block"):
        if dev.get("device") == DRIVE_ID and dev.get("inserted"):
            return Path(_plain_file_name(dev["inserted"]["file"]))
    raise HvkitError(f"QEMU has no drive {DRIVE_ID!r}: this VM has no disk hvkit can freeze")


def _plain_file_name(name: str) -> str:
    """The host file of QEMU's name for an image. QEMU names a node `json:{...}` when
    its options say more than its file name (after a fork: it reads its backing layer
    by another name than its header gives); the protocol node under it is the file."""
    if not name.startswith("json:"):
        return name
    try:
        options = json.loads(name[len("json:"):])
        while isinstance(options, dict) and "filename" not in options:
            options = options["file"]
        return options if isinstance(options, str) else options["filename"]
    except (ValueError, KeyError, TypeError):
        raise HvkitError(f"cannot tell which file QEMU writes the disk to (it says {name[:200]})") from None


def link_layer(active: Path, layer: Path) -> Path:
    """`layer` made one more name of the overlay `active` (a hard link, never a move or a
    copy: whatever instant a process dies at, the data keeps the name QEMU opened it by).
    Done again, a link that is there already is kept."""
    make_private_dir(layer.parent)
    try:
        os.link(active, layer)
    except FileExistsError:
        if _inode(active) != _inode(layer):
            raise HvkitError(f"cannot freeze the disk {active} as {layer}: another file has that name") from None
    except OSError as e:
        raise HvkitError(f"cannot freeze the disk {active} as {layer}: {e.strerror}",
                         "keep HVKIT_RUNTIME on one file system") from None
    return layer


def seal_layer(layer: Path) -> None:
    """A frozen layer is read-only from now on; its age counts from now (collect_frozen_layers)."""
    os.chmod(layer, 0o400)
    os.utime(layer)


def freeze_stopped_disk(old: Path, layer: Path, new: Path) -> None:
    """Freezes the disk of a VM whose QEMU ended (paused first: QEMU flushed the disk
    when it stopped, so `old` is whole): `old` gets the frozen layer's name `layer`,
    `new` is an empty overlay over it for the VM's next QEMU, and the VM folder's name
    of `old` goes. Each step can be done again: a fork's recovery finishes what a
    killed fork started. No QEMU ever switches disks on the way, so a fork that is
    undone (before its QEMU ended) leaves the disk chain as it was."""
    if not layer.exists():
        link_layer(old, layer)
    fault_point("disk linked")
    overlay_once(layer, new, virtual_size(layer))
    seal_layer(layer)
    fault_point("disk switched")
    if old.exists() and old != new and old.parent == new.parent:
        old.unlink()  # one name less: the layer's name holds the data


def switch_running_disk(qmp, old: Path, layer: Path, new: Path) -> None:
    """Freezes the disk of a paused VM whose QEMU goes on (a VM that runs from a
    snapshot): `old` (the overlay QEMU writes now) gets the frozen layer's name
    `layer`, and QEMU goes on writing to a new, empty overlay `new` over it (QMP
    blockdev-snapshot-sync onto an existing file). Done again (a recovery), it
    finishes what was not done: QEMU itself says whether it switched already.
    `qmp(command, args)` talks to the VM's QEMU; the VM stays paused meanwhile."""
    if active_layer(qmp) != new:
        link_layer(old, layer)
        try:
            overlay_once(layer, new, virtual_size(layer))
            fault_point("disk linked")
            qmp("blockdev-snapshot-sync", {"device": DRIVE_ID, "snapshot-file": str(new), "format": "qcow2",
                                           "mode": "existing"})
        except HvkitError:
            new.unlink(missing_ok=True)
            layer.unlink(missing_ok=True)  # one name less: QEMU never left `old`
            raise
    seal_layer(layer)
    fault_point("disk switched")
    if old.exists() and old != new and old.parent == new.parent:
        old.unlink()


def backing_file(image: Path) -> Path | None:
    """The file a qcow2 image reads through to (its header says), or None."""
    try:
        with open(image, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    return image.parent / name  # an absolute name stays itself


def chain_of(image: Path) -> list[Path]:
    """`image` and every file under it, top first (bounded: a loop ends it)."""
    chain: list[Path] = []
    current: Path | None = image
    while current is not None and current not in chain and len(chain) < 256:
        chain.append(current)
        current = backing_file(current)
    return chain


def collect_frozen_layers(folder: Path, needed: list[Path]) -> list[Path]:
    """Removes the layers in `folder` that nothing needs: not on the chain of any
    file of `needed` (snapshots' layers, VMs' disks, forks in progress), not open in
    any process, not brand new. Returns what it removed."""
    if not folder.is_dir():
        return []
    keep = {p.resolve() for image in needed for p in chain_of(Path(image))}
    for layer in layers_in_use(folder):  # a layer some process holds keeps what is under it
        keep.update(p.resolve() for p in chain_of(layer))
    removed = []
    for layer in folder.glob("*.qcow2"):
        try:
            young = time.time() - layer.stat().st_mtime < KEEP_NEW
        except OSError:
            continue
        if not young and layer.resolve() not in keep:
            layer.unlink(missing_ok=True)
            removed.append(layer)
    return sorted(removed)


def layers_in_use(folder: Path) -> list[Path]:
    """The layers in `folder` that a running process (a QEMU) has open."""
    open_now = _open_inodes()
    found = []
    for layer in folder.glob("*.qcow2"):
        with contextlib.suppress(OSError):
            if _inode(layer) in open_now:
                found.append(layer)
    return sorted(found)


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _open_inodes() -> set[tuple[int, int]]:
    """(device, inode) of every qcow2 file open in any process: a hard-linked layer is
    open under whichever name QEMU opened it by. Only names of disk images are looked
    at (a stat of other files, say one on a FUSE mount, could wait on their server)."""
    found = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if ".qcow2" in os.readlink(fd):
                        found.add(_inode(fd))
        except OSError:
            continue
    return found
