"""Chooses QEMU's accelerator by a real probe, not by the presence of /dev/kvm.

A host can have /dev/kvm and still be a bad place for `-accel kvm`: here KVM emulates
every guest instruction, so a Linux guest that boots in 3 s under TCG does not boot in
minutes. The probe boots a 64 KiB "BIOS" that counts down a register from 20 million and
writes to the isa-debug-exit port; an accelerator works when QEMU exits with the code that
write asks for, and KVM is chosen only when it finishes the same loop faster than TCG.
Results are cached per QEMU binary and host boot in the runtime folder.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x31  # isa-debug-exit turns a write of v into exit status (v << 1) | 1
_LOOPS = 20_000_000


def probe_bios() -> bytes:
    """A 64 KiB BIOS image: the reset vector jumps to a countdown loop, then exits QEMU."""
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere
    loop = (b"\x66\xb9" + struct.pack("<I", _LOOPS)  # mov ecx, LOOPS
            + b"\x66\x49\x75\xfc"  # 1: dec ecx; jnz 1b
            + bytes([0xB0, _EXIT_VALUE, 0xE6, _EXIT_PORT])  # mov al, v; out port, al
            + b"\xf4\xeb\xfe")  # hlt; jmp .
    start = 0xFFF0 - 32
    image[start : start + len(loop)] = loop
    image[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<h", start - 0xFFF3)  # jmp start
    return bytes(image)


def probe(qemu: str, accel: str, timeout: float) -> float | None:
    """Seconds QEMU with `accel` took to run the probe, or None if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as bios:
        bios.write(probe_bios())
        bios.flush()
        cmd = [qemu, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults",
               "-display", "none", "-no-user-config", "-bios", bios.name,
               "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.info("accelerator %s: probe did not finish in %.1f s", accel, timeout)
            return None
        elapsed = time.monotonic() - t0
    if proc.returncode != (_EXIT_VALUE << 1) | 1:
        log.info("accelerator %s: probe failed (%s)", accel,
                 proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or proc.returncode)
        return None
    return elapsed


def _cache_key(qemu: str) -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown"
    return f"{os.path.realpath(qemu)}:{os.stat(qemu).st_mtime_ns}:{boot}"


def best_accel(qemu: str, cache_dir: Path) -> str:
    """'kvm' when KVM runs guest code and beats TCG at it, else 'tcg'."""
    cache = cache_dir / "accel.json"
    key = _cache_key(qemu)
    try:
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            return known["accel"]
    except (OSError, ValueError, KeyError):
        pass
    tcg = probe(qemu, "tcg", timeout=30) or 30.0
    kvm = probe(qemu, "kvm", timeout=tcg * 1.5 + 0.5) if os.access("/dev/kvm", os.R_OK | os.W_OK) else None
    accel = "kvm" if kvm is not None and kvm < tcg else "tcg"
    log.info("accelerator probe: tcg %.2fs, kvm %s -> %s", tcg,
             f"{kvm:.2f}s" if kvm is not None else "failed or too slow", accel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel, "tcg_s": tcg, "kvm_s": kvm}))
    return accel
