"""The systemd unit of the host service (`hvkit share --all --watch`): its text, made for
the hvkit that writes it (`hvkit share --install-unit`), and shipped as
contrib/hvkit-share.service for a system-wide install.

The service is a plain long-running process (Type=exec): it logs one line per event to
stderr, which journald records with each line's priority (the `<N>` prefix, see
service_logging), and ends cleanly on SIGTERM (no VM left paused). It runs as root,
as hvkit's other commands that pause VMs do, with a lower nice value than the guests so
that a pause it takes ends soon on a loaded host.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

UNIT_NAME = "hvkit-share.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
NICE = -5  # the pauses the service takes end sooner when the guests' QEMUs compete for the CPU


def unit_text(hvkit: str, args: list[str], runtime: str, cache: str) -> str:
    """The unit that runs `hvkit share --all ARGS` with the runtime and cache folders given."""
    command = " ".join(shlex.quote(a) for a in [hvkit, "share", "--all", *args])
    return f"""\
# hvkit's host service: gives the free memory of every VM of HVKIT_RUNTIME back to the host
# (hvkit share --all --watch); see docs/share.md. Written by `hvkit share --install-unit`.
[Unit]
Description=hvkit share --all: give the free memory of this host's VMs back
After=local-fs.target

[Service]
Type=exec
Environment=HVKIT_RUNTIME={runtime}
Environment=HVKIT_CACHE={cache}
ExecStart={command}
# SIGTERM ends it between two pauses: no VM is left paused
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5
Nice={NICE}
SyslogIdentifier=hvkit-share

[Install]
WantedBy=multi-user.target
"""


def systemd_runs() -> bool:
    """Whether systemd is this machine's init (sd_booted(3): /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()


def install_unit(text: str, unit_dir: Path = SYSTEM_UNIT_DIR) -> tuple[Path, str]:
    """Writes the unit (atomically) into `unit_dir`; when systemd runs and that is its
    system folder, reloads it. Returns the file and what to do next."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    if unit_dir == SYSTEM_UNIT_DIR and systemd_runs() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        return path, f"start it with: systemctl enable --now {UNIT_NAME}"
    if not systemd_runs():
        return path, "systemd is not this machine's init (no /run/systemd/system): the unit is written, not loaded"
    return path, f"copy it to {SYSTEM_UNIT_DIR} and run: systemctl daemon-reload"
