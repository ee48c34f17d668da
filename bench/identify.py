"""bench/identify: the parts of identification that exist so far, timed on real guests.

    .venv/bin/python bench/identify.py [--sizes 256M,1G] [--repeat 5] [--json out.json]

Measures, per guest size: `hvkit ps` (paused time and total), symbol and layout load
from the cache; once: the first layout build (headers download + compile, from an empty
cache) against its cached load. Targets from issue 3: ps under 0.3 s, first layout
build under 30 s, cached load under 1 s. (Page classification is not built yet; its
timings join this benchmark when it is.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest  # noqa: E402
from hvkit.introspect import list_tasks  # noqa: E402
from hvkit.introspect.source import open_guest  # noqa: E402
from hvkit.kernel.headers import debian_tree  # noqa: E402
from hvkit.kernel.layout import build_layout  # noqa: E402
from hvkit.kernel.symbols import load_symbols  # noqa: E402
from hvkit.qemu import VM  # noqa: E402
from hvkit.units import parse_size  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def first_build(guest) -> dict:
    """Layout and symbols from an empty cache, then from the warm one."""
    with tempfile.TemporaryDirectory(prefix="hvkit-bench-") as tmp:
        cache = Path(tmp)
        cold_layout, _ = timed(lambda: build_layout(debian_tree(guest.release, cache), cache))
        warm_layout, _ = timed(lambda: build_layout(debian_tree(guest.release, cache), cache))
        cold_syms, _ = timed(lambda: load_symbols(guest.kernel, cache, guest.config))
        warm_syms, _ = timed(lambda: load_symbols(guest.kernel, cache, guest.config))
    return {"layout_first_s": cold_layout, "layout_cached_s": warm_layout,
            "symbols_first_s": cold_syms, "symbols_cached_s": warm_syms}


def ps_run(size: str, repeat: int, paths: Paths) -> dict:
    with VM.start(f"bench-ps-{size}", memory=size, workload="hold:64", paths=paths) as vm:
        vm.wait_for_console("HVKIT-HOLD holding", timeout=300)
        totals, paused, count = [], [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            with open_guest(vm.name, paths=paths) as g:
                count = len(list_tasks(g.kernel, g.layout).tasks)
            totals.append(time.perf_counter() - t0)
            paused.append(g.paused_for)
    return {"size": size, "bytes": parse_size(size), "processes": count,
            "ps_total_s": statistics.median(totals), "ps_paused_s": statistics.median(paused)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("bench/results/identify.json"))
    args = ap.parse_args()
    paths = Paths.from_env()
    guest = build_default_guest(paths)
    build = first_build(guest)
    rows = [ps_run(s, args.repeat, paths) for s in args.sizes.split(",")]
    print(f"layout: first build {build['layout_first_s']:.2f} s (target < 30), cached "
          f"{build['layout_cached_s'] * 1000:.1f} ms (target < 1000) -> {build['layout_first_s'] / build['layout_cached_s']:.0f}x")
    print(f"symbols: first {build['symbols_first_s']:.2f} s, cached {build['symbols_cached_s'] * 1000:.1f} ms")
    print(f"{'guest':>6} {'procs':>6} {'ps total s':>11} {'paused s':>9} {'target s':>9}")
    for r in rows:
        print(f"{r['size']:>6} {r['processes']:>6} {r['ps_total_s']:>11.3f} {r['ps_paused_s']:>9.3f} {0.3:>9.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kernel": guest.release, "build": build, "ps": rows}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
