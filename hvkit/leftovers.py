"""What a killed hvkit process can leave behind, and its removal by the next hvkit
command of any kind (the CLI calls `sweep` before each command; forks and the memory
server's stop call the parts they see).

A file or folder that only its maker needs carries its maker's pid (and, where the
name has room, the process's start time, so a reused pid does not keep it alive):

    <store>/snapshots/.<time_ns>-<pid>.state   a fork's staged device state (store.py)
    <cache>/hvkit-vol-<pid>-*                  folders of older `hvkit vol` runs (the
                                               guest-memory copy now has no name at all)
    <tmp>/hvkit-vol-<pid>.<start>-*            `hvkit vol`'s symbol and cache folder
    <store>/frames/.import-<pid>.<start>.ram   a remote snapshot being fetched (hvkit.remote.fetch)
    <cache>/remote/*/.<sha256>.<pid>.<start>   an object or file of a store being cached
    <store>/frames/remote-<hash>.*             a fetched RAM file (and its source and presence
                                               files) no snapshot was sealed over (its fetch
                                               was killed in between)

Each is removed once its maker is gone and no intent record (ownership.py) of a dead
owner names it: a fork's journal keeps its staged state until the fork's recovery,
which finishes or undoes the fork, is done with it. Only the standard library here:
every command imports this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

STAGED_SUFFIX = ".state"
VOL_PREFIX = "hvkit-vol-"
IMPORT_PREFIX = ".import-"
KEEP_UNNAMED = 600.0  # seconds a staged state whose name has no pid is kept (an older hvkit's fork)


def process_tag(pid: int | None = None) -> str:
    """'<pid>.<start time>' of a process (this one by default): names its leftovers."""
    pid = pid or os.getpid()
    return f"{pid}.{_start_time(pid) or 0}"


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def maker_gone(tag: str) -> bool:
    """Whether the process named by `tag` ('<pid>' or '<pid>.<start time>') is gone; an
    unreadable tag is not a pid, so nothing is said to be gone."""
    pid, _, start = tag.partition(".")
    if not pid.isdigit():
        return False
    now = _start_time(int(pid))
    if now is None:
        return True
    return bool(start) and start != "0" and start != now


def store_path(runtime: Path) -> Path:
    """The memory server's store in runtime folder `runtime` (hvkit.memserver.daemon)."""
    return runtime / "memserver" / "store"


def staged_state_pid(path: Path) -> str | None:
    """The pid in a staged state's name ('.<time_ns>-<pid>.state'), or None."""
    stem = path.name[1:-len(STAGED_SUFFIX)] if path.name.endswith(STAGED_SUFFIX) else ""
    parts = stem.split("-")
    return parts[1] if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() else None


def named_by_intents(runtime: Path) -> set[str] | None:
    """Every path an intent record names (a dead owner's work not yet finished or
    undone), or None if one cannot be read (then nothing it could name is removed)."""
    named: set[str] = set()
    for record in (runtime / ".owners").glob("*.json"):
        try:
            intent = json.loads(record.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
        if isinstance(intent, dict):
            named.update(v for v in intent.values() if isinstance(v, str))
    return named


def remove_staged_states(runtime: Path) -> list[Path]:
    """Staged device states (a fork saves one before its snapshot is sealed) whose fork
    is gone and that no fork journal names: an undone fork's, or one a fork killed
    right after its seal left. Returns what it removed."""
    folder = store_path(runtime) / "snapshots"
    staged = sorted(folder.glob(f".*{STAGED_SUFFIX}")) if folder.is_dir() else []
    if not staged:
        return []
    named = named_by_intents(runtime)  # read after the listing: a fork names its state before making it
    if named is None:
        return []
    removed = []
    for path in staged:
        if str(path) in named:
            continue
        pid = staged_state_pid(path)
        if pid is not None:
            if not maker_gone(pid):
                continue
        else:  # a name without a pid (an older hvkit's): kept while it may be in use
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime < KEEP_UNNAMED:
                    continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def vol_temp_dirs() -> list[Path]:
    """Folders `hvkit vol` makes for Volatility (its symbols and cache)."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{VOL_PREFIX}*"))


def remove_vol_leftovers(cache: Path) -> list[Path]:
    """Folders of killed `hvkit vol` runs: in the temporary folder (symbols, Volatility's
    cache) and in hvkit's cache (an older hvkit's copies of guest memory). Removed whole,
    none left empty."""
    removed = []
    for folder in [*vol_temp_dirs(), *sorted(cache.glob(f"{VOL_PREFIX}*"))]:
        tag = folder.name[len(VOL_PREFIX):].split("-", 1)[0]
        if folder.is_symlink():
            continue
        if folder.is_file():  # a copy whose name was to last an instant (no O_TMPFILE there)
            if maker_gone(tag):
                folder.unlink(missing_ok=True)
                removed.append(folder)
            continue
        if not tag.split(".")[0].isdigit():  # an older hvkit's, named without its pid: removed once empty
            with contextlib.suppress(OSError):
                folder.rmdir()
                removed.append(folder)
            continue
        if maker_gone(tag):
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # whatever rmtree left (it ignores errors): never an empty folder
            if not folder.exists():
                removed.append(folder)
    return removed


def remove_fetch_leftovers(runtime: Path, cache: Path) -> list[Path]:
    """RAM files and cached objects of remote fetches whose process is gone (killed
    before they were whole: both are renamed into place only when they are)."""
    removed = []
    found = [(p, p.name[len(IMPORT_PREFIX):-len(".ram")])
             for p in (store_path(runtime) / "frames").glob(f"{IMPORT_PREFIX}*.ram")]
    found += [(p, p.name.split(".", 2)[2]) for p in (cache / "remote").glob("*/.*.*.*")]
    for path, tag in found:
        if maker_gone(tag):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed + _unsealed_fetches(store_path(runtime))


def _unsealed_fetches(store: Path) -> list[Path]:
    """A fetched RAM file moved to its place (frames/remote-<hash>.ram) by a fetch
    killed before it sealed it: no snapshot names its fork id. Looked at under the
    store's lock (a fetch moves and seals under it), skipped while another holds it."""
    frames = sorted((store / "frames").glob("remote-*.ram"))
    if not frames:
        return []
    removed = []
    with open(store / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        sealed = set()
        for snap in (store / "snapshots").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sealed.add(json.loads(snap.read_text()).get("fork_id"))
        for path in frames:
            if path.stem not in sealed:
                for part in (path, path.with_suffix(".present"), path.with_suffix(".source.json")):
                    part.unlink(missing_ok=True)
                removed.append(path)
    return removed


def sweep(runtime: Path, cache: Path) -> None:
    """Everything above, quietly: it never stops the command that calls it."""
    with contextlib.suppress(OSError):
        remove_staged_states(runtime)
    with contextlib.suppress(OSError):
        remove_fetch_leftovers(runtime, cache)
    with contextlib.suppress(OSError):
        remove_vol_leftovers(cache)
