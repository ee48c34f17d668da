"""The warm pool: child QEMUs started ahead of time, so that a fork's child only has to
load its device state.

    hvkit pool set VM -n K   keep K QEMUs ready for children of VM's kind of machine
                             (memory size, CPUs, accelerator, CPU model, devices)

A pooled QEMU is started as a child would be (launch.qemu_command), paused, waiting for
an incoming migration, its RAM a memory-server *slot* (memserver/slots.py): a file that
names no snapshot yet. QEMU 7.2 reads no page of guest RAM before a device state comes,
so once a fork has sealed its snapshot, it binds the slot to it and hands each pooled
QEMU the state by fd: the child runs without a QEMU start on its path.

    <runtime>/memserver/pool/config.json     what to keep: {key: {size, machine, like}}
                             keeper.pid      "<pid> <start ticks>" of the keeper process
                             starting/<batch>/<i>/   QEMUs coming up (a VM folder each)
                             ready/<key>/<batch>/<i>/  ready, claimed a batch at a time
                             claimed/<batch>.<pid>/<i>/  a fork's (pid) batch, each QEMU
                                                     moving to a child's folder (a rename)

A batch shares one slot, so its QEMUs share the pages they only read (one page cache),
as children of one snapshot do; a fork claims whole batches (a rename: two forks never
get the same one) and binds each batch's slot to its snapshot. QEMUs of a claimed batch
that no child takes are stopped (a slot is bound once).

The keeper (`main` here, in a process of its own started detached by `pool set` and by
a fork when it is not running) refills the pool, replaces a QEMU that died and stops the
QEMUs of a fork that died before it took them; it never runs on a fork's path. Pooled
QEMUs belong to the memory server: the keeper stops them and exits when the server goes,
and `memserver stop` stops the keeper and them (daemon.py), so none is left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hvkit.config import Paths, make_private_dir
from hvkit.errors import HvkitError
from hvkit.memserver import MemServer, Snapshot
from hvkit.memserver.daemon import KEEPER, keeper_of, memserver_alive, stop_pool_processes
from hvkit.memserver.slots import bind_slot, new_slot, remove_slot
from hvkit.procs import kill_processes_with, left_by_dead_process, process_start_ticks, same_process
from hvkit.qemu import VM, find_vm
from hvkit.qemu.launch import cpu_model_of, qemu_binary, qemu_command, spawn_process, wait_qmp_ready
from hvkit.qemu.ownership import fault_point
from hvkit.qemu.runtime import RuntimeDir, SuccessorDir, VMSpec, check_name

log = logging.getLogger(__name__)

MAX_SIZE = 64
# the keeper's command (not `-m`: this module is imported by the package before it would run)
KEEPER_MAIN = "import sys; from hvkit.forking.pool import main; sys.exit(main(sys.argv[1:]))"
POLL_SECONDS = 0.2


# ---- which machines a pooled QEMU can be a child of ------------------------------------

def _child_spec(machine: dict, name: str, ram_file: str, server_pid: int | None) -> VMSpec:
    return VMSpec(**{**machine, "name": check_name(name), "ram": "snapshot", "snapshot": None,
                     "ram_file": ram_file, "memserver_pid": server_pid, "parent": None, "pid": None,
                     "started_at": None, "proc_start": None, "command": []})


def machine_key(machine: dict) -> str | None:
    """What a child of `machine` (a VMSpec as a dict) is, as QEMU's command line says it
    with the folder and RAM file left out: equal keys, interchangeable QEMUs. None for a
    machine the pool does not serve (a disk image's children each get their own disk,
    port and MAC; an attached VM is never forked)."""
    if machine.get("disk") or machine.get("origin", "hvkit") != "hvkit" or machine.get("ram_nodes"):
        return None
    spec = _child_spec(machine, "x", "@ram", None)
    shape = qemu_command(qemu_binary(), RuntimeDir(Path("/@")), spec, cpu_model_of(machine.get("command") or []))
    return hashlib.sha256("\0".join(shape).encode()).hexdigest()[:12]


# ---- where things are -----------------------------------------------------------------

@dataclass(frozen=True)
class PoolDir:
    root: Path  # <runtime>/memserver/pool

    @classmethod
    def of(cls, paths: Paths) -> "PoolDir":
        return cls(MemServer.of(paths).root / "pool")

    config_file = property(lambda self: self.root / "config.json")
    keeper_pid_file = property(lambda self: self.root / "keeper.pid")
    keeper_log = property(lambda self: self.root / "keeper.log")
    starting = property(lambda self: self.root / "starting")
    ready = property(lambda self: self.root / "ready")
    claimed = property(lambda self: self.root / "claimed")

    def config(self) -> dict[str, dict]:
        try:
            return json.loads(self.config_file.read_text())
        except (OSError, ValueError):
            return {}

    def write_config(self, config: dict[str, dict]) -> None:
        make_private_dir(self.root)
        tmp = self.config_file.with_name(f".config.{os.getpid()}")
        _write_private(tmp, json.dumps(config, indent=1))
        os.replace(tmp, self.config_file)

    def keeper_pid(self) -> int | None:
        """The live keeper's pid, or None."""
        pid, ticks = keeper_of(self.root.parent)  # the server folder holds the pool
        return pid if same_process(pid, ticks, KEEPER) else None

    last_claim_file = property(lambda self: self.root / "last_claim")

    def batches(self, key: str, n: int = 1) -> list[Path]:
        """The ready batches of `key`, best for `n` children first: the smallest that
        holds n, then the fullest (QEMUs of a batch claimed and not taken are stopped)."""
        folder = self.ready / key
        found = [(len(entries(b)), b) for b in folder.iterdir() if b.is_dir()] if folder.is_dir() else []
        return [b for _, b in sorted(found, key=lambda f: (f[0] < n, f[0] if f[0] >= n else -f[0]))]

    def batch_size(self, wanted: int) -> int:
        """How many QEMUs the next batch gets: as many as the last fork took (children
        of one fork share a batch's page cache; more would be stopped unused), at most
        the `wanted` missing."""
        try:
            last = int(self.last_claim_file.read_text())
        except (OSError, ValueError):
            last = wanted
        return max(1, min(wanted, last))


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, its owner's alone (a pool's files name VMs and their commands)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def entries(batch: Path) -> list[Path]:
    """The QEMU folders of a batch ([] if a fork claimed it away meanwhile)."""
    try:
        return sorted((e for e in batch.iterdir() if e.is_dir()), key=lambda e: e.name)
    except OSError:
        return []


def entry_vm(entry: Path) -> VM | None:
    """The pooled QEMU of folder `entry`, if its spec is there."""
    rundir = RuntimeDir(entry)
    spec = rundir.read_spec()
    return VM(rundir, spec) if spec is not None else None


def _batch_info(batch: Path) -> dict:
    try:
        return json.loads((batch / "batch.json").read_text())
    except (OSError, ValueError):
        return {}


def stop_entries(batch: Path, store: Path | None = None) -> None:
    """Stops every QEMU of a batch folder and removes it; with `store`, its slot record
    too (only for a batch never claimed: a claimed batch's slot may be the RAM of the
    children that took its other QEMUs; a new server forgets every slot)."""
    stop_entries_of(entries(batch))
    info = _batch_info(batch)
    if store is not None and info.get("slot"):
        remove_slot(store, info["slot"])
    shutil.rmtree(batch, ignore_errors=True)


# ---- what the user asks for -------------------------------------------------------------

@dataclass
class PoolStatus:
    key: str
    like: str  # the VM the configuration was taken from
    memory: int
    cpus: int
    size: int  # QEMUs wanted ready
    ready: int
    starting: int
    rss: int  # bytes the ready QEMUs hold (resident), all together

    def to_json(self) -> dict:
        return asdict(self)


def set_pool(paths: Paths, vm_name: str, size: int) -> PoolStatus:
    """Keeps `size` QEMUs ready for children of VM `vm_name`'s kind (0: none); starts
    the memory server and the keeper as needed."""
    if not 0 <= size <= MAX_SIZE:
        raise HvkitError(f"invalid pool size {size}", f"give 0 to {MAX_SIZE}")
    vm = find_vm(vm_name, paths)
    machine = asdict(vm.spec)
    key = machine_key(machine)
    if key is None:
        raise HvkitError(f"VM {vm_name!r} is not a kind the pool serves (a VM of a disk image, an attached VM "
                         "or a NUMA VM)", "its children start as they do now, without a pool")
    pool = PoolDir.of(paths)
    config = pool.config()
    if size:
        config[key] = {"size": size, "machine": machine, "like": vm_name}
    else:
        config.pop(key, None)
    pool.write_config(config)
    if config:
        ensure_keeper(paths)
    return next(s for s in pool_status(paths) if s.key == key) if size else PoolStatus(
        key, vm_name, vm.spec.memory, vm.spec.cpus, 0, 0, 0, 0)


def clear_pool(paths: Paths) -> None:
    """No pool any more: the keeper and every pooled QEMU stopped."""
    pool = PoolDir.of(paths)
    pool.write_config({})
    server = MemServer.of(paths)
    stop_pool_processes(server.root, server.store_path)


def pool_status(paths: Paths) -> list[PoolStatus]:
    pool = PoolDir.of(paths)
    rows = []
    for key, cfg in pool.config().items():
        ready = [e for b in pool.batches(key) for e in entries(b)]
        starting = [e for b in (pool.starting.iterdir() if pool.starting.is_dir() else [])
                    if _batch_info(b).get("key") == key for e in entries(b)]
        rss = 0
        for entry in ready:
            vm = entry_vm(entry)
            if vm is not None and vm.pid:
                rss += _rss(vm.pid)
        machine = cfg.get("machine", {})
        rows.append(PoolStatus(key, cfg.get("like", ""), machine.get("memory", 0), machine.get("cpus", 0),
                               cfg.get("size", 0), len(ready), len(starting), rss))
    return rows


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ensure_keeper(paths: Paths) -> int | None:
    """The keeper's pid: the running one, or one started now (None if there is nothing
    to keep). Starts the memory server first: pooled QEMUs map its slots."""
    pool = PoolDir.of(paths)
    if not pool.config():
        return None
    pid = pool.keeper_pid()
    if pid:
        return pid
    MemServer.of(paths).start()
    make_private_dir(pool.root)
    with os.fdopen(os.open(pool.keeper_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", KEEPER_MAIN, str(paths.runtime)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                umask=0o077, env={**os.environ, "HVKIT_RUNTIME": str(paths.runtime)})
    return proc.pid


# ---- a fork takes QEMUs ---------------------------------------------------------------------

def claim(paths: Paths, snapshot: Snapshot, n: int) -> list[Path]:
    """Pooled QEMUs for `n` children of `snapshot`, their slots bound to it: the folders
    of live, ready QEMUs (in claimed/, this process's), in batch order; [] when the pool
    has none of its kind. Whole batches are claimed, so there may be more than `n`: the
    caller stops those (`stop_entries_of`) once its children run (a bound slot is of no
    use to another snapshot)."""
    key = machine_key(snapshot.machine)
    pool = PoolDir.of(paths)
    if key is None or not (pool.ready / key).is_dir():
        return []
    store = MemServer.of(paths).store_path
    with contextlib.suppress(OSError):
        _write_private(pool.last_claim_file, str(n))  # the keeper makes batches of this size
    got: list[Path] = []
    for batch in pool.batches(key, n):
        if len(got) >= n:
            break
        mine = pool.claimed / f"{batch.name}.{os.getpid()}"
        make_private_dir(pool.claimed)
        try:
            os.rename(batch, mine)  # only one fork gets it
        except OSError:
            continue
        fault_point("pool claimed")
        info = _batch_info(mine)
        try:
            bind_slot(store, info["slot"], snapshot.name, snapshot.size)
        except (HvkitError, KeyError) as e:
            log.warning("a pooled batch could not be bound (%s): stopping it", e)
            stop_entries(mine)
            continue
        fault_point("pool bound")
        for entry in entries(mine):
            vm = entry_vm(entry)
            if vm is not None and vm.qemu_alive():
                got.append(entry)
    return got


def stop_entries_of(found: list[Path]) -> None:
    """Stops the pooled QEMUs of folders `found` and removes the folders."""
    for entry in found:
        vm = entry_vm(entry)
        if vm is not None:
            vm.kill(signal.SIGKILL)
        kill_processes_with(f"{entry}/qmp.sock".encode())  # spawned, its spec not written yet
        shutil.rmtree(entry, ignore_errors=True)


def _pooled_spec(entry: Path) -> VMSpec:
    spec = RuntimeDir(entry).read_spec()
    if spec is None or not spec.pid:
        raise HvkitError(f"pooled QEMU {entry.name} has no spec")
    return spec


def take(entry: Path, name: str, snapshot: Snapshot, server_pid: int, parent: str | None,
         paths: Paths) -> VM:
    """Pooled QEMU `entry` (claimed) becomes child `name`: its folder renamed to the
    child's (sockets, console and log keep working: the files stay the same), the child's
    spec written. The caller holds the child with an intent to stop it (a kill before
    the spec is written leaves the pooled spec, which names the same QEMU)."""
    pooled = _pooled_spec(entry)
    rundir = RuntimeDir(paths.vm_dir(name))
    os.rename(entry, rundir.path)  # fails if a folder of that name appeared meanwhile
    fault_point("pool taken")
    spec = VMSpec(**{**snapshot.machine, "name": name, "ram": "snapshot", "snapshot": snapshot.name,
                     "ram_file": pooled.ram_file, "memserver_pid": server_pid, "parent": parent,
                     "pid": pooled.pid, "proc_start": pooled.proc_start, "started_at": pooled.started_at,
                     "command": pooled.command})
    rundir.write_spec(spec)
    return VM(rundir, spec)


def take_as_successor(entry: Path, vm: VM) -> VM:
    """Pooled QEMU `entry` (claimed, its slot bound to `vm`'s snapshot) as `vm`'s next
    QEMU: its files moved into `vm`'s folder under the successor's names (SuccessorDir;
    its console as console-next.log), its spec (naming `vm`) written last; the caller
    switches to it as to any successor (`SuccessorDir.take_over`)."""
    pooled = _pooled_spec(entry)
    mine, nxt = RuntimeDir(entry), SuccessorDir(vm.rundir.path)
    nxt.discard()
    for src, dst in ((mine.qmp_sock, nxt.qmp_sock), (mine.ctl_sock, nxt.ctl_sock), (mine.qemu_log, nxt.qemu_log),
                     (mine.console_log, nxt.own_console)):
        os.rename(src, dst)
    spec = VMSpec(**{**asdict(vm.spec), "pid": pooled.pid, "proc_start": pooled.proc_start,
                     "started_at": pooled.started_at, "command": pooled.command, "ram_file": pooled.ram_file})
    nxt.write_spec(spec)  # from here on a recovery finds it by its pid and start
    shutil.rmtree(entry, ignore_errors=True)
    return VM(nxt, spec)


def release_claims(paths: Paths) -> None:
    """Stops the QEMUs this process claimed and did not take (a child that failed), and
    removes its claimed batch folders."""
    pool = PoolDir.of(paths)
    for batch in (pool.claimed.glob(f"*.{os.getpid()}") if pool.claimed.is_dir() else []):
        stop_entries(batch)


# ---- the keeper ---------------------------------------------------------------------------

def start_batch(pool: PoolDir, key: str, machine: dict, count: int, server: MemServer, server_pid: int) -> None:
    """`count` QEMUs of `machine`'s kind, sharing one new slot, started and waited for,
    then moved to ready/ all at once. One that fails to start stops the batch."""
    batch_id = secrets.token_hex(5)
    batch = make_private_dir(pool.starting) / batch_id
    os.mkdir(batch, 0o700)
    _write_private(batch / "batch.json", json.dumps({"slot": batch_id, "size": machine["memory"], "key": key}))
    new_slot(server.store_path, batch_id, machine["memory"])
    ram_file = str(server.mount / "slots" / f"{batch_id}.ram")
    try:
        vms = []
        for i in range(count):
            entry = RuntimeDir(batch / str(i))
            os.mkdir(entry.path, 0o700)
            spec = _child_spec(machine, f"pool-{batch_id}-{i}", ram_file, server_pid)
            spec.command = qemu_command(qemu_binary(), entry, spec, cpu_model_of(machine.get("command") or []))
            vm = VM(entry, spec)
            spawn_process(vm)  # its spec names its pid and start: found by those once its folder moves
            vms.append(vm)
        for vm in vms:
            wait_qmp_ready(vm, 60.0)
        make_private_dir(pool.ready / key)
        os.rename(batch, pool.ready / key / batch_id)
    except BaseException:
        stop_entries(batch, server.store_path)
        raise


def keep(paths: Paths) -> None:
    """The keeper's loop (see the module comment)."""
    pool = PoolDir.of(paths)
    server = MemServer.of(paths)
    server_pid = server.pid()
    if server_pid is None or pool.keeper_pid():
        return
    _write_private(pool.keeper_pid_file, f"{os.getpid()} {process_start_ticks(os.getpid())}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while memserver_alive(server_pid) and pool.config():
            try:
                _keep_once(pool, server, server_pid)
            except (OSError, HvkitError) as e:  # a fork moved something meanwhile: look again
                log.warning("pool: %s", e)
            _reap()
            time.sleep(POLL_SECONDS)
    finally:
        for folder in (pool.starting, pool.ready):
            for batch in (folder.rglob("batch.json") if folder.is_dir() else []):
                stop_entries(batch.parent, server.store_path)
        _stop_orphaned_claims(pool, server)
        pool.keeper_pid_file.unlink(missing_ok=True)


def _keep_once(pool: PoolDir, server: MemServer, server_pid: int) -> None:
    config = pool.config()
    for key, cfg in config.items():
        ready = 0
        for batch in pool.batches(key):
            for entry in entries(batch):
                vm = entry_vm(entry)
                if vm is None or not vm.qemu_alive():  # died: replaced below
                    log.warning("pooled QEMU %s is gone: replacing it", entry.name)
                    stop_entries_of([entry])
                else:
                    ready += 1
            if not entries(batch):
                stop_entries(batch, server.store_path)
        if ready < cfg["size"]:
            try:
                start_batch(pool, key, cfg["machine"], pool.batch_size(cfg["size"] - ready), server, server_pid)
            except HvkitError as e:
                log.error("pooled QEMUs of %s did not start: %s", cfg.get("like"), e)
                time.sleep(2.0)  # not a busy loop when QEMU cannot start
    for stale in (pool.ready.iterdir() if pool.ready.is_dir() else []):
        if stale.name not in config:
            for batch in list(stale.iterdir()):
                stop_entries(batch, server.store_path)
            shutil.rmtree(stale, ignore_errors=True)
    _stop_orphaned_claims(pool, server)


def _stop_orphaned_claims(pool: PoolDir, server: MemServer) -> None:
    """QEMUs a fork claimed and did not take before it died (its pid ends the name)."""
    for batch in (pool.claimed.iterdir() if pool.claimed.is_dir() else []):
        pid = batch.name.rpartition(".")[2]
        if not pid.isdigit() or left_by_dead_process(pid):
            stop_entries(batch)


def _reap() -> None:
    """Pooled QEMUs are the keeper's children, also once a fork took them: reap those
    that ended."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    runtime = Path(argv[0]) if argv else Paths.from_env().runtime
    keep(Paths(Paths.from_env().cache, runtime))
    return 0

