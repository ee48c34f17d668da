"""Volatility 3 with hvkit's symbol table: which linux.* plugins run clean on a memory image.

    .venv/bin/python bench/isf.py --release 6.1.0-56-cloud-amd64 --raw a.raw [--jobs 2] [--json out.json]

First the costs side by side on that image (each a process of its own, timed with
/usr/bin/time: wall seconds and peak memory): `hvkit isf` cold (a fresh cache that shares
only the downloaded headers and kernel) and cached, `hvkit ps` on the image, and `vol
linux.pslist` on it with hvkit's table.

Builds (or finds) the ISF of that Debian kernel (hvkit.kernel.isf.make_isf), puts it in a
symbol directory of its own (<dir>/linux/<table>.json.xz) and runs each plugin of PLUGINS
with `vol --offline` on the raw image. A plugin is "ok" when vol exits 0 with no traceback
and no "Unsatisfied requirement"; anything else is "failed" with the last error line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.kernel.headers import debian_tree  # noqa: E402
from hvkit.cli.forensics import REPLACED_PLUGINS, volatility_plugin_dir  # noqa: E402
from hvkit.kernel.isf import make_isf, volatility_symbol_dir  # noqa: E402

PLUGINS = [
    "linux.pslist.PsList", "linux.pstree.PsTree", "linux.psaux.PsAux", "linux.psscan.PsScan",
    "linux.pidhashtable.PIDHashTable", "linux.kthreads.Kthreads", "linux.envars.Envars",
    "linux.elfs.Elfs", "linux.proc.Maps", "linux.library_list.LibraryList", "linux.lsof.Lsof",
    "linux.mountinfo.MountInfo", "linux.pagecache.Files", "linux.lsmod.Lsmod",
    "linux.kmsg.Kmsg", "linux.bash.Bash", "linux.capabilities.Capabilities",
    "linux.sockstat.Sockstat", "linux.sockscan.Sockscan", "linux.ip.Addr", "linux.ip.Link",
    "linux.iomem.IOMem", "linux.boottime.Boottime", "linux.kallsyms.Kallsyms",
    "linux.vmcoreinfo.VMCoreInfo", "linux.ptrace.Ptrace", "linux.ebpf.EBPF",
    "linux.pscallstack.PsCallStack", "linux.graphics.fbdev.Fbdev",
    "linux.malware.check_syscall.Check_syscall", "linux.malware.check_idt.Check_idt",
    "linux.malware.check_modules.Check_modules", "linux.malware.check_creds.Check_creds",
    "linux.malware.check_afinfo.Check_afinfo", "linux.malware.tty_check.Tty_Check",
    "linux.malware.keyboard_notifiers.Keyboard_notifiers", "linux.malware.malfind.Malfind",
    "linux.malware.modxview.Modxview", "linux.malware.netfilter.Netfilter",
    "linux.malware.hidden_modules.Hidden_modules", "linux.malware.process_spoofing.ProcessSpoofing",
    "linux.tracing.ftrace.CheckFtrace", "linux.tracing.tracepoints.CheckTracepoints",
    "linux.tracing.perf_events.PerfEvents",
]

_ERROR = re.compile(r"Traceback|Unsatisfied requirement|error:|Error:|Exception", re.I)


@dataclass
class PluginRun:
    plugin: str
    ok: bool
    rows: int
    seconds: float
    error: str


def run_plugin(vol: Path, symbols: Path, raw: Path, cache: Path, plugin: str) -> PluginRun:
    """One plugin as `hvkit vol` runs it (hvkit's plugin directory given; hidden_modules as
    hvkit's version of it, see hvkit/forensics/volplugins)."""
    start = time.monotonic()
    proc = subprocess.run([str(vol), "-q", "-r", "json", "--offline", "--cache-path", str(cache),
                           "-p", str(volatility_plugin_dir()), "-s", str(symbols), "-f", str(raw),
                           REPLACED_PLUGINS.get(plugin, plugin)],
                          capture_output=True, text=True, timeout=1800)
    seconds = round(time.monotonic() - start, 1)
    error_lines = [line for line in (proc.stderr + "\n" + proc.stdout[-2000:]).splitlines()
                   if _ERROR.search(line)]
    rows = 0
    try:
        rows = len(json.loads(proc.stdout))
    except ValueError:
        error_lines.append("output is not JSON")
    ok = proc.returncode == 0 and not error_lines
    last = (proc.stderr.strip().splitlines() or [""])[-1] if not ok else ""
    return PluginRun(plugin, ok, rows, seconds, last or "; ".join(error_lines)[:300])


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak MiB, exit status) of `cmd`, by /usr/bin/time."""
    import os

    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        proc = subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%e %M", *cmd], capture_output=True,
                              text=True, env={**os.environ, **(env or {})})
        seconds, kib = out.read().split()[-2:]
    return float(seconds), int(kib) / 1024, proc.returncode


def compare_costs(kernel: Path, raw: Path, cache: Path, symbols: Path, vol_cache: Path) -> list[dict]:
    """hvkit isf cold and cached, hvkit ps and vol linux.pslist on the same image."""
    hvkit = str(Path(sys.executable).with_name("hvkit"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hvkit-isf-cold-") as tmp:
        cold = Path(tmp)
        for shared in ("headers", "guest", "apt", "buildroots"):  # downloads only; nothing built
            if (cache / shared).exists():
                (cold / shared).symlink_to(cache / shared)
        for label in ("hvkit isf (cold)", "hvkit isf (cached)"):
            s, mib, rc = timed_process([hvkit, "isf", str(kernel), "--json"], {"HVKIT_CACHE": str(cold)})
            rows.append({"what": label, "seconds": s, "peak_mib": mib, "ok": rc == 0})
    s, mib, rc = timed_process([hvkit, "ps", str(raw), "--kernel", str(kernel), "--json"], {"HVKIT_CACHE": str(cache)})
    rows.append({"what": "hvkit ps", "seconds": s, "peak_mib": mib, "ok": rc == 0})
    vol = str(Path(sys.executable).with_name("vol"))
    s, mib, rc = timed_process([vol, "-q", "-r", "json", "--offline", "--cache-path", str(vol_cache),
                                "-s", str(symbols), "-f", str(raw), "linux.pslist.PsList"])
    rows.append({"what": "vol linux.pslist", "seconds": s, "peak_mib": mib, "ok": rc == 0})
    ps = rows[2]["seconds"]
    print(f"{'':24} {'seconds':>8} {'peak MiB':>9} {'x hvkit ps':>10}")
    for r in rows:
        print(f"{r['what']:24} {r['seconds']:8.2f} {r['peak_mib']:9.0f} {r['seconds'] / ps:10.1f}"
              + ("" if r["ok"] else "  (failed)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--kernel", type=Path, help="kernel file (default: the cached Debian package's)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "hvkit")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--plugins", nargs="*", default=PLUGINS)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "isf.json",
                    help="results (default docs/results/isf.json: bench/report.py writes docs from it)")
    args = ap.parse_args()
    kernel = args.kernel or next((args.cache / "guest" / f"linux-image-{args.release}" / "boot").glob("vmlinuz-*"))
    report = make_isf(kernel, debian_tree(args.release, args.cache), args.cache)
    print(f"ISF {report.path} ({'cached' if report.cached else f'built in {report.seconds} s'})")
    vol = Path(sys.executable).with_name("vol")
    with tempfile.TemporaryDirectory(prefix="hvkit-vol-") as tmp:
        symbols, cache = volatility_symbol_dir(report.path, Path(tmp) / "symbols"), Path(tmp) / "cache"
        cache.mkdir()
        costs = compare_costs(kernel, args.raw, args.cache, symbols, cache)
        first = run_plugin(vol, symbols, args.raw, cache, args.plugins[0])  # fills vol's caches once
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            rest = list(pool.map(lambda p: run_plugin(vol, symbols, args.raw, cache, p), args.plugins[1:]))
    runs = [first, *rest]
    for r in runs:
        print(f"{'ok    ' if r.ok else 'FAILED'} {r.plugin:55} {r.rows:6} rows {r.seconds:6.1f} s  {r.error}")
    print(f"{sum(r.ok for r in runs)} of {len(runs)} plugins ran clean")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"isf": report.to_json(), "costs": costs, "runs": [asdict(r) for r in runs],
                                         "run": run_info()},
                                        indent=1))


if __name__ == "__main__":
    main()
