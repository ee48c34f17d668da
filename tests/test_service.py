"""`hvkit share --all --watch`, the host service, on real guests: it follows VMs as they
come, go and die, leaves a VM another command holds alone, logs a refusal once, ends on
SIGTERM with no VM paused; its metrics page passes promtool and a real Prometheus server
scrapes it; its systemd unit passes systemd-analyze verify.

The service runs in a runtime folder of its own (not the session's), so it sees only the
VMs each test starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from hvkit.config import Paths
from hvkit.qemu import find_vm, list_vms, start_vm
from hvkit.qemu.ownership import Ownership
from hvkit.qemu.qmp import qmp
from hvkit.sharing.unit import systemd_runs, unit_text

from conftest import qemus_of, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_runtime(guest):
    """A runtime folder for this test alone; every VM left in it is stopped after."""
    runtime = Path(tempfile.mkdtemp(prefix="hvsvc-", dir="/dev/shm"))
    paths = Paths(Paths.from_env().cache, runtime)
    yield paths
    for row in list_vms(paths):
        if row.state != "dead":
            find_vm(row.name, paths).stop()
    leftovers = qemus_of(runtime)
    for pid in leftovers:
        os.kill(pid, 9)
    shutil.rmtree(runtime, ignore_errors=True)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceRun:
    """`hvkit share --all --watch ...` in a child process, its JSON lines and log
    lines gathered as they come."""

    def __init__(self, paths: Paths, *args: str, env: dict | None = None) -> None:
        env = {**os.environ, "HVKIT_RUNTIME": str(paths.runtime), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "hvkit", "share", "--all", "--json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.results: list[dict] = []
        self.log: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, is_json: bool) -> None:
        for line in stream:
            if is_json:
                self.results.append(json.loads(line))
            else:
                self.log.append(line.rstrip("\n"))

    def of(self, vm: str) -> list[dict]:
        return [r for r in self.results if r["vm"] == vm]

    def wait_for(self, what, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, "the service ended:\n" + "\n".join(self.log)
            assert time.monotonic() < deadline, "timed out; the service's log:\n" + "\n".join(self.log)
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        for t in self._threads:
            t.join(timeout=10)
        return code


@pytest.mark.slow
def test_service_follows_vms_and_ends_on_sigterm_with_none_paused(own_runtime):
    paths = own_runtime
    with start_vm("svc-a", memory="256M", workload="alloc:150", paths=paths) as a, \
            start_vm("svc-anon", memory="128M", ram="anonymous", paths=paths) as anon:
        a.wait_for_console(r"HVKIT-ALLOC done mib=150", timeout=120)
        before = a.host_memory()
        # a VM whose RAM hvkit must not touch: its QEMU (anonymous RAM, shared over ptrace)
        # is already traced by another process, which share refuses
        tracer = subprocess.Popen([sys.executable, "-c", (
            "import ctypes, time\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.ptrace(0x4206, {anon.pid}, None, None) == 0\n"  # PTRACE_SEIZE
            "print('seized', flush=True)\n"
            "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
        assert tracer.stdout.readline().strip() == "seized"
        service = ServiceRun(paths, "--watch", "0.3")
        try:
            # VM a: its free memory given back, in pauses within the budget's batches
            service.wait_for(lambda: sum(r["given_pages"] for r in service.of("svc-a")) * 4096 > 100 << 20)
            assert a.host_memory() < before - (100 << 20)

            # a VM that comes later is picked up; one that is stopped and one that dies are dropped
            with start_vm("svc-late", memory="128M", paths=paths) as late, \
                    start_vm("svc-dies", memory="128M", paths=paths) as dies:
                service.wait_for(lambda: service.of("svc-late") and service.of("svc-dies"))
                late.stop()
                os.kill(dies.pid, signal.SIGKILL)
                service.wait_for(lambda: sum(": gone (" in line for line in service.log) >= 2)

            # a VM another command holds is skipped while it does (one owner per VM)
            owner = Ownership(paths.runtime, "svc-a")
            with owner.hold("test holds it"):
                n = len(service.of("svc-a"))
                service.wait_for(lambda: any("svc-a: busy with hvkit test holds it" in line for line in service.log))
                time.sleep(1.0)  # a few rounds of 0.3 s
                assert len(service.of("svc-a")) == n
            service.wait_for(lambda: len(service.of("svc-a")) > n)

            # SIGTERM while the service holds a VM (inside a share): it ends after that pause
            deadline = time.monotonic() + 60
            while (owner.holder() or {}).get("pid") != service.proc.pid or not owner.lock_file.exists():
                assert time.monotonic() < deadline, "\n".join(service.log)
                time.sleep(0.002)
            service.proc.send_signal(signal.SIGTERM)
            assert service.stop() == 0, "\n".join(service.log)
        finally:
            service.stop()
            tracer.kill()
            tracer.wait()
        log = "\n".join(service.log)
        print(log)
        assert a.run_state() == "running" and anon.run_state() == "running"
        assert not owner.intent_file.exists()  # no pause of the service left recorded
        assert "Traceback" not in log
        assert sum("svc-anon: not shared:" in line for line in service.log) == 1  # the refusal, once
        assert any("svc-late: gone (" in line for line in service.log)
        assert any("svc-dies: gone (" in line for line in service.log)
        assert service.log[-1].split(" INFO ")[-1].startswith("stopped after")
        pauses = [p for r in service.results for p, _, _ in r["pause_log"]]
        assert pauses and all("\x1b[" not in line for line in service.log)  # no colour in a pipe


@pytest.mark.slow
def test_sigkill_of_the_service_inside_a_pause_is_finished_by_the_next_command(own_runtime):
    """The service killed right after it paused a VM (HVKIT_DIE_AT): the VM is found
    paused, and the next hvkit command (here `vm list`) resumes it from the pause's record."""
    paths = own_runtime
    with start_vm("svc-k", memory="128M", workload="alloc:64", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120)
        # a large budget: the preview never holds the pause back on a loaded machine
        run = ServiceRun(paths, "--watch", "0.3", "--max-pause", "5", env={"HVKIT_DIE_AT": "paused share"})
        assert run.proc.wait(timeout=180) == -signal.SIGKILL, "\n".join(run.log)
        run.stop()
        assert qmp(vm.rundir.qmp_sock, "query-status")["status"] == "paused"  # killed inside its pause
        rows = {r.name: r for r in list_vms(paths)}
        assert rows["svc-k"].state == "running"
        assert not Ownership(paths.runtime, "svc-k").intent_file.exists()


@pytest.mark.slow
def test_policy_threshold_and_free_memory_kept(own_runtime):
    """--mem-available-below: nothing is shared while the host has more available;
    --keep-free: that much free memory with host memory stays with the guest."""
    paths = own_runtime
    with start_vm("svc-p", memory="128M", workload="alloc:64", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120)
        held = vm.host_memory()
        idle = ServiceRun(paths, "--watch", "0.3", "--mem-available-below", "1M")
        try:
            idle.wait_for(lambda: any("is above the threshold of 1 MiB: idle" in line for line in idle.log))
            time.sleep(2)  # several rounds
        finally:
            assert idle.stop() == 0, "\n".join(idle.log)
        assert not idle.results and vm.host_memory() >= held - (1 << 20)

        keep = 32 << 20
        kept = ServiceRun(paths, "--watch", "0.3", "--keep-free", "32M")
        try:
            # shares until what is left with host memory is what it keeps (a pause that ran out
            # of budget on a loaded host gives back less, and the next one goes on)
            kept.wait_for(lambda: any(r["given_pages"] and r["backed_free_pages"] - r["given_pages"] <= keep // 4096
                                      for r in kept.of("svc-p")), timeout=180)
            time.sleep(2)  # a few rounds more
        finally:
            assert kept.stop() == 0, "\n".join(kept.log)
        results = kept.of("svc-p")
        done = next(i for i, r in enumerate(results)
                    if r["given_pages"] and r["backed_free_pages"] - r["given_pages"] <= keep // 4096)
        given = sum(r["given_pages"] for r in results) * 4096
        left = (results[done]["backed_free_pages"] - results[done]["given_pages"]) * 4096
        print(f"kept {left >> 20} MiB free with host memory; gave back {given >> 20} MiB")
        assert left == keep  # exactly what it was asked to keep
        assert given > 16 << 20  # and gave back the rest of what the guest freed
        # what it keeps is never given back afterwards (only what the guest frees beyond it)
        assert all(r["backed_free_pages"] - r["given_pages"] >= keep // 4096 for r in results[done + 1:])


def prometheus_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as f:
        doc = json.load(f)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.slow
def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(own_runtime, tmp_path):
    for tool in ("promtool", "prometheus"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (./setup.sh installs Debian's prometheus)")
    paths = own_runtime
    port, prom_port = free_port(), free_port()
    with start_vm("svc-m", memory="128M", workload="alloc:64", paths=paths) as vm:
        vm.wait_for_console(r"HVKIT-ALLOC done mib=64", timeout=120)
        service = ServiceRun(paths, "--watch", "0.5", "--metrics", f"127.0.0.1:{port}")
        prometheus = None
        try:
            service.wait_for(lambda: service.of("svc-m"))
            # the user pauses the VM: its memory holds still, so what hvkit reports and
            # what Prometheus scraped must be equal (the service shares a paused VM in place)
            vm.pause()
            service.wait_for(lambda: len(service.of("svc-m")) >= 2 and service.of("svc-m")[-1]["given_pages"] == 0)
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True)
            assert check.returncode == 0, check.stdout + check.stderr
            assert b'hvkit_share_host_memory_bytes{vm="svc-m"}' in page

            config = tmp_path / "prometheus.yml"
            config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hvkit\n"
                              f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
            prometheus = subprocess.Popen(["prometheus", f"--config.file={config}",
                                           f"--storage.tsdb.path={tmp_path / 'data'}",
                                           f"--web.listen-address=127.0.0.1:{prom_port}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            found: list[dict] = []

            def scraped() -> bool:
                assert prometheus.poll() is None, prometheus.stderr.read().decode()
                try:
                    found[:] = prometheus_query(prom_port, 'hvkit_share_host_memory_bytes{vm="svc-m"}')
                except OSError:
                    return False
                return bool(found)

            service.wait_for(scraped, timeout=120)
            reported = {row.name: row for row in list_vms(paths)}["svc-m"].host_memory
            assert found[0]["metric"]["vm"] == "svc-m" and found[0]["metric"]["job"] == "hvkit"
            assert int(float(found[0]["value"][1])) == reported == service.of("svc-m")[-1]["host_after"]
            free = prometheus_query(prom_port, 'hvkit_share_guest_free_pages{vm="svc-m"}')
            assert int(float(free[0]["value"][1])) == service.of("svc-m")[-1]["free_pages"]
            cycles = prometheus_query(prom_port, 'hvkit_share_cycles_total{vm="svc-m"}')
            assert 1 <= int(float(cycles[0]["value"][1])) <= len(service.of("svc-m"))
            assert prometheus_query(prom_port, "hvkit_host_mem_available_bytes")
        finally:
            if prometheus is not None:
                prometheus.terminate()
                prometheus.wait(timeout=30)
            assert service.stop() == 0, "\n".join(service.log)
        assert vm.run_state() == "paused"  # the user's pause is the user's: the service kept it
        vm.resume()


def test_service_options_are_checked_in_one_line(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        env = {"HVKIT_RUNTIME": str(tmp_path / "rt")}
        cases = {
            ("share", "--all"): "give it --watch SECONDS",
            ("share", "--metrics", f"127.0.0.1:{port}"): "--metrics belongs to the host service",
            ("share", "--all", "vm1", "--watch", "1"): "drop the VM name",
            ("share", "--all", "--watch", "1", "--metrics", "nonsense"): "invalid metrics address",
            ("share", "--all", "--watch", "1", "--metrics", f"127.0.0.1:{port}"): "cannot serve metrics on",
            ("share", "--all", "--watch", "1", "--mem-available-below", "lots"): "invalid memory size",
            ("share",): "which VM?",
        }
        for args, message in cases.items():
            proc = run_cli(*args, env=env, timeout=60)
            assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here (Debian's systemd package has it)")
    proc = run_cli("share", "--all", "--watch", "10", "--metrics", "127.0.0.1:9782", "--keep-free", "64M",
                   "--install-unit", "--unit-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / "hvkit-share.service"
    text = unit.read_text()
    assert "share --all --watch 10 --metrics 127.0.0.1:9782 --keep-free 64M" in text
    assert f"Environment=HVKIT_RUNTIME={Paths.from_env().runtime}" in text
    result = _verify(unit)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    # the unit shipped in contrib/ is what --install-unit writes for its paths, and verifies
    # too once its hvkit exists (here: this checkout's)
    shipped = (ROOT / "contrib" / "hvkit-share.service").read_text()
    assert shipped == unit_text("/usr/local/bin/hvkit", ["--watch", "10", "--metrics", "127.0.0.1:9782"],
                                "/dev/shm/hvkit", "/root/.cache/hvkit")
    here = tmp_path / "shipped" / "hvkit-share.service"
    here.parent.mkdir()
    here.write_text(shipped.replace("/usr/local/bin/hvkit", str(Path(sys.executable).parent / "hvkit")))
    result = _verify(here)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # a broken unit is caught (the check can fail)
    here.write_text(shipped.replace("Type=exec", "Type=nonsense"))
    assert _verify(here).stderr.strip()


def test_the_unit_starts_the_service_under_systemd(tmp_path):
    if not systemd_runs():
        init = Path("/proc/1/comm").read_text().strip()
        pytest.skip(f"systemd is not this machine's init (PID 1 is {init!r}, no /run/systemd/system): "
                    "the unit is checked with systemd-analyze verify instead")
    proc = run_cli("share", "--all", "--watch", "5", "--install-unit", timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        subprocess.run(["systemctl", "start", "hvkit-share.service"], check=True, timeout=60)
        deadline = time.monotonic() + 30
        while subprocess.run(["systemctl", "is-active", "hvkit-share.service"], capture_output=True,
                             text=True).stdout.strip() != "active":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        subprocess.run(["systemctl", "stop", "hvkit-share.service"], check=True, timeout=60)
        status = subprocess.run(["systemctl", "show", "-p", "Result", "hvkit-share.service"],
                                capture_output=True, text=True).stdout.strip()
        assert status == "Result=success", status
    finally:
        subprocess.run(["systemctl", "stop", "hvkit-share.service"], timeout=60)
        Path("/etc/systemd/system/hvkit-share.service").unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], timeout=60)
