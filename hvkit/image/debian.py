"""A bootable Debian 12 (bookworm) disk image, built from Debian packages into the cache.

How, and why this way:

1. `mmdebstrap --mode=unshare --variant=minbase` installs systemd, udev, dbus, the
   bookworm cloud kernel (`linux-image-cloud-amd64`, so `hvkit identify` finds its
   headers like the default guest's), openssh-server and qemu-guest-agent into a
   directory. Unshare mode keeps every mount it needs (/proc, /sys, /dev of the
   chroot) in a private mount namespace: a killed build leaves no mount on the host.
   As root the files get their true owners; as another user mmdebstrap maps them to
   subordinate ids and the steps that read or remove the tree run through
   `mmdebstrap --unshare-helper`, which sees them as root's again.
2. Customize hooks put hvkit's files in (files/ of this package plus generated ones:
   hostname, fstab, root's authorized_keys, the ssh host key, the static `hvkit-mem`),
   enable systemd-networkd and hvkit's control port, mask timers and units a short-lived
   test VM does not want, and move the kernel and initramfs out beside the image.
3. `mke2fs -t ext4 -d ROOT` writes the tree into a sparse raw file (no loop device,
   no mount), and `qemu-img convert -O qcow2 -c` makes the compressed, read-only base.

The guest boots with QEMU's `-kernel`/`-initrd` and `root=/dev/vda rw console=ttyS0`
(no partition table, no boot loader), each VM on its own qcow2 overlay of the base.

Everything is built in `images/.debian-12.build-<pid>/` and renamed to
`images/debian-12/` when complete, under an flock: a build that is killed leaves a
folder the next build removes, never a half-made image in place. The lock's file
descriptor is passed to mmdebstrap too, so a build whose Python process died keeps
the lock until its mmdebstrap has gone as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from hvkit.config import Paths
from hvkit.errors import HvkitError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

NAME = "debian-12"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
HOSTNAME = "hvkit-debian"
FS_LABEL = "hvkit-root"
DISK_SIZE = 2 << 30  # the file system's size; the qcow2 file holds only what is used
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0"
MIN_FREE_BYTES = 2 << 30  # the root tree (~350 MB), the sparse raw file and the qcow2 copy

PACKAGES = (
    "systemd-sysv", "udev", "dbus",  # a real init, device events, the system bus
    "linux-image-cloud-amd64",  # bookworm's cloud kernel (virtio, no sound or GPUs)
    "openssh-server", "qemu-guest-agent",
    "iproute2", "procps",  # `ip` and `ps` for whoever logs in
)

# Quiet and quick under TCG: nothing runs at odd times (measurements stay steady), no
# waiting for "online" (nothing here needs it), no getty on a VGA console there is not,
# no modules loaded ahead of need (each costs seconds when instructions are emulated;
# the kernel still loads them on first use). Masked, not disabled: presets cannot undo it.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "fstrim.timer", "e2scrub_reap.service", "systemd-networkd-wait-online.service",
    "getty@tty1.service", "modprobe@dm_mod.service", "modprobe@loop.service",
    "modprobe@drm.service", "modprobe@efi_pstore.service",
)
ENABLED_UNITS = ("systemd-networkd.service", "hvkit-control.service")

TOOLS = {  # command -> the Debian packages it needs
    "mmdebstrap": ("mmdebstrap",), "mke2fs": ("e2fsprogs",), "qemu-img": ("qemu-utils",),
    "ssh-keygen": ("openssh-client",), "gcc": ("gcc", "libc6-dev"),  # the static hvkit-mem
}

# What the build leaves in images/<NAME>/ (the manifest names them too).
DISK, KERNEL, INITRD, CONFIG = "disk.qcow2", "vmlinuz", "initrd.img", "config"
SSH_KEY, KNOWN_HOSTS, MANIFEST = "id_ed25519", "known_hosts", "image.json"


@dataclass(frozen=True)
class DebianImage:
    """A built image: boot `kernel` + `initrd` with `kernel_args` on an overlay of
    `image` (never on `image` itself), then `ssh -i ssh_key root@...`."""

    directory: Path
    image: Path  # the qcow2 base, read-only
    kernel: Path
    initrd: Path
    config: Path  # the kernel's .config
    ssh_key: Path  # root's private key (ed25519); ssh_key + ".pub" is the public half
    known_hosts: Path  # the guest's ssh host key, for StrictHostKeyChecking=yes
    release: str  # `uname -r` of the image's kernel
    kernel_args: str
    build_seconds: float
    size: int  # bytes the qcow2 file takes on disk
    virtual_size: int  # bytes of the guest's disk
    sha256: str  # of the qcow2 file as built
    built_at: str

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def load(cls, directory: Path) -> "DebianImage":
        data = json.loads((directory / MANIFEST).read_text())
        files = {k: directory / data[k] for k in ("image", "kernel", "initrd", "config", "ssh_key", "known_hosts")}
        rest = {k: data[k] for k in ("release", "kernel_args", "build_seconds", "size", "virtual_size",
                                      "sha256", "built_at")}
        return cls(directory=directory, **files, **rest)

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.image, self.kernel, self.initrd, self.ssh_key, self.known_hosts))

    def overlay(self, path: Path) -> Path:
        """A new qcow2 file at `path` whose reads fall through to the base image and
        whose writes stay in it: one per VM, so the base never changes."""
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image), "-F", "qcow2", str(path)],
             "creating an overlay of the Debian image")
        return path

    def qemu_boot_args(self, disk: Path, append: str = "") -> list[str]:
        """QEMU arguments that boot this image's kernel on `disk` (an overlay)."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", " ".join(filter(None, [self.kernel_args, append])),
                "-drive", f"file={disk},format=qcow2,if=virtio,discard=unmap"]

    def ssh_command(self, port: int, *command: str, host: str = "127.0.0.1") -> list[str]:
        """ssh as root into a guest of this image whose port 22 is forwarded to `port`,
        checking the host key hvkit made (no prompts, no agent, no other keys)."""
        return ["ssh", "-i", str(self.ssh_key), "-p", str(port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-o", "LogLevel=ERROR", f"root@{host}", *command]


def image_dir(paths: Paths) -> Path:
    return paths.cache / "images" / NAME


def cached_debian_image(paths: Paths | None = None) -> DebianImage | None:
    """The image built before, if a complete one is in the cache."""
    directory = image_dir(paths or Paths.from_env())
    try:
        image = DebianImage.load(directory)
    except (OSError, ValueError, KeyError):
        return None
    return image if image.exists() else None


def build_debian_image(paths: Paths | None = None, rebuild: bool = False,
                       progress: Progress | None = None, mirror: str = MIRROR,
                       security_mirror: str = SECURITY_MIRROR) -> DebianImage:
    """The Debian 12 image from the cache, built first when there is none (or when
    `rebuild`). `progress` gets one line per step. Takes about two minutes cold."""
    paths = paths or Paths.from_env()
    say = progress or log.info
    final = image_dir(paths)
    if not rebuild and (image := cached_debian_image(paths)) is not None:
        return image
    _require_tools()
    if any(c.isspace() for c in str(final)):  # mmdebstrap's special hooks split on blanks
        raise HvkitError(f"cannot build in {final}: the path has a blank", "set HVKIT_CACHE to a path without one")
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final, say) as lock_fd:
        if not rebuild and (image := cached_debian_image(paths)) is not None:
            return image  # another process built it while we waited
        _remove_leftovers(final, say)
        _check_free_space(final.parent)
        _check_network(mirror)
        work = final.parent / f".{NAME}.build-{os.getpid()}"
        started = time.monotonic()
        try:
            work.mkdir(mode=0o700)
            release = _build_into(work, say, lock_fd, mirror, security_mirror)
            _write_manifest(work, release, time.monotonic() - started)
            _install(work, final)
        except OSError as e:
            raise _disk_error(e) from None
        finally:
            _remove_tree(work)
    image = DebianImage.load(final)
    say(f"built {final} in {image.build_seconds:.0f} s: {image.size / 2**20:.0f} MiB on disk, "
        f"kernel {image.release}")
    return image


# ---- the steps ---------------------------------------------------------------------------

def _build_into(work: Path, say: Progress, lock_fd: int, mirror: str, security_mirror: str) -> str:
    """Everything of the image in `work` (what is left there at the end is the
    image); returns the kernel's release."""
    early, overlay, boot, root = work / "early", work / "overlay", work / "boot", work / "root"
    boot.mkdir()
    say("generating ssh keys (root's key pair, the guest's host key)")
    _make_keys(work, overlay)
    say("building the guest helper hvkit-mem (static)")
    _write_overlay(overlay, work / f"{SSH_KEY}.pub", boot)
    _write_early_overlay(early)
    say(f"installing Debian {SUITE} with mmdebstrap (downloads about 90 MB)")
    _mmdebstrap(root, early, overlay, boot, say, lock_fd, mirror, security_mirror)
    release = _one(boot, "vmlinuz-*").name.removeprefix("vmlinuz-")
    for pattern, name in (("vmlinuz-*", KERNEL), ("initrd.img-*", INITRD), ("config-*", CONFIG)):
        _one(boot, pattern).rename(work / name)
    say(f"writing the ext4 file system ({DISK_SIZE >> 30} GiB, sparse)")
    raw = work / "disk.raw"
    _as_owner(["mke2fs", "-q", "-F", "-t", "ext4", "-L", FS_LABEL, "-m", "1",
               "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(root), str(raw),
               str(DISK_SIZE >> 10) + "k"], "writing the file system")
    _remove_tree(root)
    say("converting to a compressed qcow2")
    _run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(work / DISK)], "converting to qcow2")
    raw.unlink()
    os.chmod(work / DISK, 0o444)  # the base of every overlay: nothing writes to it again
    for leftover in (early, overlay, boot):
        shutil.rmtree(leftover)
    return release


def _make_keys(work: Path, overlay: Path) -> None:
    """Root's key pair (hvkit keeps the private half) and the guest's ed25519 host key
    (its public half becomes known_hosts, so ssh can check whom it talks to)."""
    host_key = overlay / "etc/ssh/ssh_host_ed25519_key"
    host_key.parent.mkdir(parents=True, mode=0o755)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hvkit@{socket.gethostname()}",
          "-f", str(work / SSH_KEY)], "generating root's ssh key")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{HOSTNAME}", "-f", str(host_key)],
         "generating the guest's ssh host key")
    key_type, key = Path(f"{host_key}.pub").read_text().split()[:2]
    # "*": this file serves this image alone, whatever host name and port it is reached by
    (work / KNOWN_HOSTS).write_text(f"* {key_type} {key}\n")


def _write_overlay(overlay: Path, authorized_key: Path, scratch: Path) -> None:
    """The files hvkit adds to the image, laid out as in the guest (copied over its
    root by mmdebstrap's `sync-in`, which keeps these modes)."""
    files: dict[str, tuple[bytes, int]] = {
        "etc/hostname": (f"{HOSTNAME}\n".encode(), 0o644),
        "etc/hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost\n".encode(), 0o644),
        "etc/fstab": (f"LABEL={FS_LABEL}\t/\text4\trw,relatime,errors=remount-ro\t0 0\n".encode(), 0o644),
        "etc/resolv.conf": (b"nameserver 10.0.2.3\n", 0o644),  # QEMU user networking's DNS
        "etc/systemd/network/80-hvkit-dhcp.network": (_file("80-hvkit-dhcp.network"), 0o644),
        "etc/systemd/journald.conf.d/hvkit.conf": (_file("journald-hvkit.conf"), 0o644),
        "etc/ssh/sshd_config.d/hvkit.conf": (_file("sshd-hvkit.conf"), 0o644),
        "etc/modprobe.d/hvkit.conf": (_file("modprobe-hvkit.conf"), 0o644),
        "etc/systemd/system/hvkit-control.service": (_file("hvkit-control.service"), 0o644),
        "usr/local/lib/hvkit/hvkit-control": (_file("hvkit-control"), 0o755),
        "root/.ssh/authorized_keys": (authorized_key.read_bytes(), 0o600),
    }
    for rel, (data, mode) in files.items():
        _put(overlay, rel, data, mode)
    helper = scratch / "hvkit-mem"  # its source lands beside it: not in the image
    _compile_helper(helper)
    _put(overlay, "usr/local/bin/hvkit-mem", helper.read_bytes(), 0o755)
    for built in scratch.glob("hvkit-mem*"):
        built.unlink()
    for d in [overlay, *(p for p in overlay.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)  # sync-in copies directory modes too: "/" must stay 0755
    os.chmod(overlay / "root", 0o700)
    os.chmod(overlay / "root/.ssh", 0o700)


def _write_early_overlay(early: Path) -> None:
    """Files that must be there before the kernel package is installed (its postinst
    builds the initramfs): copied in by an essential hook."""
    _put(early, "etc/initramfs-tools/conf.d/hvkit", _file("initramfs-hvkit.conf"), 0o644)
    _put(early, "usr/share/initramfs-tools/modules.d/hvkit", _file("initramfs-modules"), 0o644)
    for d in [early, *(p for p in early.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)


def _mmdebstrap(root: Path, early: Path, overlay: Path, boot: Path, say: Progress, lock_fd: int,
                mirror: str, security_mirror: str) -> None:
    sources = [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main",
               f"deb {security_mirror} {SUITE}-security main"]
    hooks = [
        'rm -f "$1"/etc/ssh/ssh_host_*',  # made by openssh-server's postinst; ours comes next
        f"sync-in {overlay} /",
        f'chroot "$1" systemctl enable --quiet {" ".join(ENABLED_UNITS)}',
        f'chroot "$1" systemctl mask --quiet {" ".join(MASKED_UNITS)}',
        # the kernel and initramfs boot from beside the image, not from inside it
        f'mv "$1"/boot/vmlinuz-* "$1"/boot/initrd.img-* {shlex.quote(str(boot))}/'
        f' && cp "$1"/boot/config-* {shlex.quote(str(boot))}/ && rm -f "$1"/vmlinuz* "$1"/initrd.img*',
    ]
    cmd = ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
           "--aptopt=Acquire::Check-Valid-Until \"false\"",  # the archive here is a frozen snapshot
           "--aptopt=Acquire::Retries \"3\"",
           f"--dpkgopt={_file_path('dpkg-nodoc')}",
           "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",  # not usrmerge (it pulls in perl)
           f"--include={','.join(PACKAGES)}",
           f"--essential-hook=sync-in {early} /",
           *(f"--customize-hook={h}" for h in hooks),
           SUITE, str(root), *sources]
    _run(cmd, "installing Debian with mmdebstrap", say=say, pass_fds=(lock_fd,))


def _write_manifest(work: Path, release: str, seconds: float) -> None:
    disk = work / DISK
    info = json.loads(_run(["qemu-img", "info", "--output=json", str(disk)], "reading the image"))
    manifest = {
        "image": DISK, "kernel": KERNEL, "initrd": INITRD, "config": CONFIG, "ssh_key": SSH_KEY,
        "known_hosts": KNOWN_HOSTS, "release": release,
        "kernel_args": KERNEL_ARGS, "build_seconds": round(seconds, 1),
        "size": disk.stat().st_blocks * 512, "virtual_size": info["virtual-size"],
        "sha256": _sha256(disk), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "suite": SUITE, "packages": list(PACKAGES),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _install(work: Path, final: Path) -> None:
    """Renames the finished build into place; an image there before is moved aside
    first and removed after, so `final` is always either complete or absent."""
    old = final.parent / f".{NAME}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    work.rename(final)
    _remove_tree(old)


# ---- locking, leftovers, checks -----------------------------------------------------------

@contextlib.contextmanager
def _build_lock(final: Path, say: Progress) -> Iterator[int]:
    """An exclusive flock for building `final`; yields its file descriptor."""
    fd = os.open(final.parent / f".{final.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another build of this image is running; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _remove_leftovers(final: Path, say: Progress) -> None:
    """Folders of builds that were killed (we hold the lock: none is running)."""
    for leftover in final.parent.glob(f".{final.name}.*-*"):
        if leftover.is_dir():
            say(f"removing {leftover.name}, left by a build that did not finish")
            _remove_tree(leftover)


def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(p for tool in missing for p in TOOLS[tool])
        raise HvkitError(f"building the Debian image needs {', '.join(missing)}",
                         f"install them: apt-get install {packages}")


def _check_free_space(folder: Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise HvkitError(f"only {free >> 20} MiB free in {folder}; building the Debian image needs "
                         f"{MIN_FREE_BYTES >> 20} MiB", "free some space or point HVKIT_CACHE elsewhere")


def _check_network(mirror: str) -> None:
    """Fails in seconds, with one clear line, where mmdebstrap would retry for minutes."""
    host = mirror.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 80)), timeout=15).close()
    except OSError as e:
        raise HvkitError(f"cannot reach the Debian archive {mirror} ({e.strerror or e})",
                         "check the network (or give another mirror)") from None


# ---- running commands ---------------------------------------------------------------------

def _run(cmd: list[str], what: str, say: Progress | None = None, pass_fds: tuple[int, ...] = ()) -> str:
    """Runs `cmd`, returns its output; mmdebstrap's "I:" lines go to `say` as they come.
    A failure becomes one HvkitError line saying what failed and, where it can tell,
    why (no network, a full disk)."""
    tail: deque[str] = deque(maxlen=40)
    out: list[str] = []
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", pass_fds=pass_fds, preexec_fn=_die_with_parent) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            tail.append(line.rstrip())
            if say and line.startswith("I: ") and not line.startswith(("I: running --", "I: running special")):
                say(f"  {line[3:].strip()}")  # mmdebstrap's steps (not each hook's command line)
        rc = proc.wait()
    if rc != 0:
        raise _explain(what, rc, list(tail))
    return "".join(out)


def _as_owner(cmd: list[str], what: str) -> str:
    """Runs `cmd` where the root tree's files look owned by root: directly as root,
    otherwise in mmdebstrap's user namespace (see the module docstring)."""
    return _run(cmd if os.geteuid() == 0 else ["mmdebstrap", "--unshare-helper", *cmd], what)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when hvkit dies, so mmdebstrap cleans up and
    stops instead of writing on into a folder the next build will remove."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _explain(what: str, rc: int, tail: list[str]) -> HvkitError:
    text = "\n".join(tail)
    if "No space left on device" in text:
        return HvkitError(f"{what} failed: the disk is full", "free some space or point HVKIT_CACHE elsewhere")
    if any(s in text for s in ("Temporary failure resolving", "Could not resolve", "Failed to fetch",
                               "Could not connect", "Connection timed out", "Unable to connect")):
        return HvkitError(f"{what} failed: the Debian archive cannot be reached",
                          "check the network (or give another mirror)")
    errors = [line for line in tail if line.startswith("E: ")] or [line for line in tail if line.strip()]
    last = errors[-1] if errors else f"exit status {rc}"
    return HvkitError(f"{what} failed: {last.removeprefix('E: ')[:300]}")


def _disk_error(e: OSError) -> HvkitError:
    if e.errno == errno.ENOSPC:
        return HvkitError("building the Debian image failed: the disk is full",
                          "free some space or point HVKIT_CACHE elsewhere")
    return HvkitError(f"building the Debian image failed: {e}")


def _remove_tree(path: Path) -> None:
    """Removes a build folder. Its root tree may hold files of subordinate ids when not
    built as root: those go through mmdebstrap's namespace."""
    if not path.exists():
        return
    if os.geteuid() != 0:
        with contextlib.suppress(HvkitError):
            _as_owner(["rm", "-rf", str(path)], "removing a build folder")
    shutil.rmtree(path, ignore_errors=True)


# ---- small helpers ------------------------------------------------------------------------

def _file_path(name: str) -> Path:
    return Path(str(resources.files("hvkit.image").joinpath("files", name)))


def _file(name: str) -> bytes:
    return resources.files("hvkit.image").joinpath("files", name).read_bytes()


def _put(top: Path, rel: str, data: bytes, mode: int) -> None:
    path = top / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise HvkitError(f"expected one {pattern} from the kernel package, found {len(found)}")
    return found[0]


def _compile_helper(out: Path) -> None:
    """The default guest's static hvkit-mem (the same source, the same build)."""
    from hvkit.guest.build import _compile_helper as compile_helper
    compile_helper(out)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
