"""bench/identify: identification timed on real guests, beside an in-guest agent.

    .venv/bin/python bench/identify.py [--kernels default,linux-image-6.12-cloud-amd64,linux-image-cloud-amd64/sid]
                                       [--sizes 256M,1G,4G] [--repeat 5] [--json out.json]

Per kernel (the default guest's, and any Debian kernel package) and guest size (each
guest holds 64 MiB after allocating and freeing): the time to
classify every page from outside (`hvkit identify`: task walk + struct page array, the
VM paused meanwhile) against the baseline of asking an agent inside the guest (the
default guest's `dump` of /proc/kpageflags over its serial port), and how well the two
agree per class; `hvkit ps`. Once: the first layout build (headers download + compile,
from an empty cache) against its cached load. Targets from issue 3: classification
under 0.5 s per GiB, ps under 0.3 s, first layout build under 30 s, cached load under 1 s.
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

from runinfo import run_info  # noqa: E402  (bench/ is on sys.path: the script's own folder)

from hvkit.config import Paths  # noqa: E402
from hvkit.guest import build_default_guest, build_kernel_guest  # noqa: E402
from hvkit.introspect import PageClass, classify, list_tasks  # noqa: E402
from hvkit.introspect.source import open_guest  # noqa: E402
from hvkit.kernel.headers import debian_tree  # noqa: E402
from hvkit.kernel.layout import build_layout  # noqa: E402
from hvkit.kernel.symbols import load_symbols  # noqa: E402
from hvkit.qemu import start_vm  # noqa: E402
from hvkit.units import parse_size  # noqa: E402
from hvkit.guest.control import frozen_ground_truth, ground_truth  # noqa: E402


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


def agreement(truth, pm, layout) -> dict:
    """Share of the guest's own pages of each class that hvkit puts in that class."""
    expected = truth.page_classes(layout.const)
    ours = pm.classes.copy()
    ours[ours == PageClass.KERNEL_IMAGE] = PageClass.RESERVED
    out = {}
    for cls in (PageClass.FREE, PageClass.SLAB, PageClass.PAGE_TABLE, PageClass.ANONYMOUS,
                PageClass.PAGE_CACHE, PageClass.RESERVED):
        e = expected == cls
        out[cls.label] = float((ours[e] == cls).mean()) if e.any() else None
    return out


def guest_run(size: str, repeat: int, paths: Paths, package: str | None) -> dict:
    with start_vm(f"bench-id-{size}", memory=size, workload="hold:64", kernel_package=package,
                  paths=paths) as vm:
        vm.wait_for_console("HVKIT-HOLD holding", timeout=300)
        ps_total, ps_paused, id_total, id_paused, classify_s, agent = [], [], [], [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with open_guest(vm.name, paths=paths) as g:
                count = len(list_tasks(g.kernel, g.layout).tasks)
            ps_total.append(time.perf_counter() - t0)
            ps_paused.append(g.paused_for)

            t0 = time.perf_counter()
            with open_guest(vm.name, paths=paths) as g:
                t1 = time.perf_counter()
                pm = classify(g.kernel, g.layout, list_tasks(g.kernel, g.layout))
                classify_s.append(time.perf_counter() - t1)
            id_total.append(time.perf_counter() - t0)
            id_paused.append(g.paused_for)

            agent.append(timed(lambda: ground_truth(vm))[0])

        def look():
            with open_guest(vm.name, paths=paths) as g:
                return classify(g.kernel, g.layout, list_tasks(g.kernel, g.layout)), g.layout

        truth, (pm, layout) = frozen_ground_truth(vm, look, timeout=600)
    gib = parse_size(size) / (1 << 30)
    med = statistics.median
    return {"kernel": layout.release, "size": size, "bytes": parse_size(size), "pages": pm.pages,
            "processes": count,
            "identify_total_s": med(id_total), "identify_paused_s": med(id_paused),
            "classify_s": med(classify_s), "identify_s_per_gib": med(id_total) / gib,
            "agent_export_s": med(agent), "agent_over_hvkit": med(agent) / med(id_total),
            "ps_total_s": med(ps_total), "ps_paused_s": med(ps_paused),
            "agreement": agreement(truth, pm, layout),
            "classes_mib": {c.label: n * 4096 / (1 << 20) for c, n in pm.counts().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="default,linux-image-6.12-cloud-amd64,linux-image-cloud-amd64/sid",
                    help="'default' (the default guest's kernel) and/or Debian kernel packages")
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path,
                    default=Path(__file__).resolve().parents[1] / "docs" / "results" / "identify.json",
                    help="results (default docs/results/identify.json: bench/report.py writes docs from it)")
    args = ap.parse_args()
    paths = Paths.from_env()
    builds, rows = {}, []
    for name in args.kernels.split(","):
        package = None if name == "default" else name
        guest = build_default_guest(paths) if package is None else build_kernel_guest(paths, package)
        builds[guest.release] = first_build(guest)
        rows += [guest_run(s, args.repeat, paths, package) for s in args.sizes.split(",")]
    for release, build in builds.items():
        print(f"{release}: layout first build {build['layout_first_s']:.2f} s (target < 30), cached "
              f"{build['layout_cached_s'] * 1000:.1f} ms (target < 1000); symbols first "
              f"{build['symbols_first_s']:.2f} s, cached {build['symbols_cached_s'] * 1000:.1f} ms")
    print()
    print(f"{'kernel':>28} {'guest':>6} {'identify s':>10} {'paused s':>9} {'s/GiB':>6} {'target':>6} "
          f"{'agent s':>8} {'agent/hvkit':>11} {'ps s':>6} {'ps paused':>9} {'worst agreement':>22}")
    for r in rows:
        worst = min((v, k) for k, v in r["agreement"].items() if v is not None)
        print(f"{r['kernel']:>28} {r['size']:>6} {r['identify_total_s']:>10.3f} {r['identify_paused_s']:>9.3f} "
              f"{r['identify_s_per_gib']:>6.3f} {0.5:>6.1f} {r['agent_export_s']:>8.2f} "
              f"{r['agent_over_hvkit']:>10.0f}x {r['ps_total_s']:>6.3f} {r['ps_paused_s']:>9.3f} "
              f"{worst[1]:>14} {100 * worst[0]:.2f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"builds": builds, "guests": rows, "run": run_info()}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
