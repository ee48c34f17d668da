"""`hvkit share --all --watch SECONDS` (the host service) and `--install-unit` (its
systemd unit): the command-line side of hvkit.sharing.service."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import click

from hvkit.config import Paths
from hvkit.errors import HvkitError
from hvkit.sharing.service import Policy, Service
from hvkit.sharing.sharer import MAX_PAUSE, ShareResult
from hvkit.sharing.unit import SYSTEM_UNIT_DIR, install_unit, unit_text

# syslog priorities that journald reads from a "<N>" line prefix (sd-daemon(3))
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """'<6>svc-a: gave back ...': journald adds the time and reads the priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


def to_journal() -> bool:
    """Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM to its
    device:inode; a redirect in between changes them)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def service_logging(verbose: bool) -> None:
    """One plain line per event on stderr: no colour, no spinner; the time and level
    when a person or a file reads it, the priority prefix when the journal does."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter() if to_journal() else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("hvkit.share.service")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _json_line(vm: str, r: ShareResult, start: float) -> None:
    sys.stdout.write(json.dumps({"t": round(time.monotonic() - start, 3), "vm": vm, **r.to_json()}) + "\n")
    sys.stdout.flush()


def serve(watch: float, max_pause: float, dry_run: bool, metrics_at: str | None, below: int | None,
          keep: int, as_json: bool) -> None:
    """Runs the service until SIGTERM or Ctrl-C."""
    service_logging(logging.getLogger().level <= logging.INFO)
    metrics = None
    if metrics_at:
        from hvkit.sharing.metrics import ShareMetrics

        metrics = ShareMetrics()
        host, port = metrics.serve(metrics_at)
        logging.getLogger("hvkit.share.service").info("metrics at http://%s:%d/metrics", host, port)
    start = time.monotonic()
    service = Service(Policy(watch, max_pause, below, keep, dry_run), observer=metrics,
                      on_result=(lambda vm, r: _json_line(vm, r, start)) if as_json else None)
    service.install_signal_handlers()
    try:
        service.run()
    finally:
        if metrics:
            metrics.close()


def install(unit_dir: Path | None, watch: float, max_pause: float, dry_run: bool, metrics_at: str | None,
            below: int | None, keep: int, as_json: bool) -> None:
    """Writes the unit for this hvkit, with the options given."""
    hvkit = shutil.which("hvkit") if Path(sys.argv[0]).name != "hvkit" else str(Path(sys.argv[0]).resolve())
    hvkit = hvkit or str(Path(sys.executable).parent / "hvkit")
    if not Path(hvkit).exists():
        raise HvkitError("cannot find the hvkit program to put in the unit", "run --install-unit as 'hvkit share ...'")
    args = ["--watch", f"{watch:g}"]
    if max_pause != MAX_PAUSE:
        args += ["--max-pause", f"{max_pause:g}"]
    if metrics_at:
        args += ["--metrics", metrics_at]
    if below:
        args += ["--mem-available-below", f"{below >> 20}M"]
    if keep:
        args += ["--keep-free", f"{keep >> 20}M"]
    if dry_run:
        args.append("--dry-run")
    paths = Paths.from_env()
    path, next_step = install_unit(unit_text(hvkit, args, str(paths.runtime), str(paths.cache)),
                                   unit_dir or SYSTEM_UNIT_DIR)
    click.echo(f"wrote {path}; {next_step}")
