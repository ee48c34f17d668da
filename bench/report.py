"""bench/report: write the benchmarks' figures into the docs, from the benches' own JSON.

    .venv/bin/python bench/report.py            rewrite every bench block in README.md and docs/*.md
    .venv/bin/python bench/report.py --check    exit 1 (and name the files) when a block is out of date

A bench block in a markdown file is everything between two markers, e.g.

    <!-- bench:fork -->
    (generated: a table, the conditions of the run, a chart)
    <!-- /bench:fork -->

Each block name has a renderer below that reads one JSON file of docs/results/
(written there by the bench itself: bench/fork.py, share.py, identify.py, isf.py,
hypercall.py all default to docs/results/<bench>.json) and returns markdown: the table,
then the conditions the JSON recorded (machine, date, load average, command line; see
bench/runinfo.py) and, where the bench draws one, its PNG chart. Nothing in a block is
written by hand: rerun the bench, then this script, and commit both.

Only the standard library: tests/test_report.py runs `--check` without a guest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z0-9_-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


# ---------------------------------------------------------------- helpers

def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("-" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def ms(v: float | None) -> str | None:
    return None if v is None else f"{v * 1000:.0f} ms"


def num(v: float | None, fmt: str = "{:.2f}") -> str | None:
    return None if v is None else fmt.format(v)


def loaded(run: dict) -> bool:
    """A run on a shared, busy machine: something else kept at least one core busy when
    it started (1-minute load >= 1), or the load at its end exceeded the cores."""
    start, end = run.get("loadavg_start") or [0], run.get("loadavg_end") or [0]
    return start[0] >= 1.0 or end[0] > (run.get("cores") or 1)


def conditions(data: dict, bench: str) -> str:
    """The line under each table: where, when, how busy, which command."""
    run = data.get("run")
    if not run:
        return (f"*Conditions not recorded (the JSON predates bench/runinfo.py): rerun `bench/{bench}.py` "
                f"to record them.*")
    start, end = run["loadavg_start"], run["loadavg_end"]
    text = (f"*Measured on `{run['host']}` ({run['cores']} cores, Linux {run['kernel']}) on "
            f"{run['started'][:16].replace('T', ' ')} UTC, {run['wall_s']:.0f} s wall; load average "
            f"{start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at start, {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} "
            f"at end (1 / 5 / 15 min); command: `{run['command']}`.*")
    if loaded(run):
        text += ("\n\n**These figures were taken on a shared, loaded machine** (other jobs were running: "
                 "see the load average): times are longer, and noisier, than on a quiet host.")
    return text


def chart(name: str, alt: str, results: Path, docs: Path) -> str:
    png = results / f"{name}.png"
    if not png.exists():
        return ""
    rel = Path(os.path.relpath(png, docs))
    return f"\n\n![{alt}]({rel.as_posix()})"


class Missing(Exception):
    pass


def load(results: Path, bench: str) -> dict:
    path = results / f"{bench}.json"
    if not path.exists():
        raise Missing(f"*No results committed yet: run `.venv/bin/python bench/{bench}.py`, then "
                      f"`.venv/bin/python bench/report.py`.*")
    return json.loads(path.read_text())


def load_part(results: Path, part: str, bench: str) -> dict:
    """The results of `part` of a bench when they come from a run of their own
    (`bench/BENCH.py ... --json docs/results/PART.json`: those parts take minutes per
    arm under TCG), else the bench's whole run."""
    return load(results, part if (results / f"{part}.json").exists() else bench)


# ---------------------------------------------------------------- renderers

def render_fork(results: Path, docs: Path) -> str:
    data = load(results, "fork")
    rows = data.get("rows") or []
    if not rows:
        return "*This run had no default-guest rows (`--sizes ''`).*\n\n" + conditions(data, "fork")
    by = {(r["size"], r["n"], r["method"]): r for r in rows}
    cases = list(dict.fromkeys((r["size"], r["n"]) for r in rows))
    out = []
    for size, n in cases:
        h, m, t = (by.get((size, n, k)) for k in ("hvkit fork", "migrate + restore", "template copy"))

        def times(r, ref=h):
            if not r:
                return None
            x = f" ({r['first_child_s'] / ref['first_child_s']:.1f}x)" if ref and r is not ref else ""
            samples = r.get("first_child_samples_s") or []
            if len(samples) > 1:  # the median's spread: a busy moment of a shared host shows here
                x += f" (first: {min(samples) * 1000:.0f}-{max(samples) * 1000:.0f} ms in {len(samples)} runs)"
            if n == 1:
                return f"{r['first_child_s'] * 1000:.0f} ms{x}"
            return f"{r['first_child_s'] * 1000:.0f} / {r['all_children_s'] * 1000:.0f} ms{x}"

        pss = " / ".join("-" if r is None else f"{r['pss_mib_mean']:.1f}" for r in (h, m, t))
        after = next((r["settle_s"] for r in (h, m, t) if r), None)
        paused = ms(h.get("parent_paused_s")) if h else None
        jit = (f"{h['jit_code_mib_mean']:.1f} MiB / {h['jit_flushes_max']}"
               if h and h.get("jit_code_mib_mean") is not None else None)
        out.append([size, n, times(h), paused, times(m), times(t), pss + f" (after {after:.0f} s)", jit])
    text = table(["size", "N", "hvkit fork: first / all", "hvkit: parent paused", "migrate + restore: first / all",
                  "template copy: first / all", "PSS MiB per child (hvkit / migrate / template)",
                  "hvkit child's translated code / buffer flushes"], out)
    text += _fork_warm(rows, by)
    refork = [r for r in rows if "refork_pages_written" in r]
    if refork:
        text += "\n\nForking a forked VM (the 1-second-old child of the N = 1 case):\n\n" + table(
            ["size", "pages the child wrote", "tables written", "snapshot", "its child running"],
            [[r["size"], r["refork_pages_written"], r["refork_tables_written"], ms(r["refork_snapshot_s"]),
              ms(r["refork_first_child_s"])] for r in refork])
    resets = [r for r in rows if "reset_s" in r]
    if resets:
        text += "\n\n`vm reset` of that child (after it was forked in turn):\n\n" + table(
            ["size", "pages the child had written", "reset (request to running)", "child not running"],
            [[r["size"], r["reset_pages_dropped"], ms(r["reset_s"]), ms(r["reset_stopped_s"])] for r in resets])
    before = _fork_before(results, by)
    if before:
        text += before
    hv = [r for r in rows if r["method"] == "hvkit fork" and r.get("runs", 1) > 1]
    note = (f"hvkit's rows are the median of {hv[0]['runs']} runs, the baselines' one run each."
            if hv else "Every row is a single run (`--repeat 1`).")
    return (text + "\n\n" + note + " " + conditions(data, "fork")
            + chart("fork", "time to the first child against size, PSS per child against N", results, docs))


def _fork_warm(rows: list[dict], by: dict) -> str:
    """The warm pool's rows (`hvkit pool set VM -n N` before the request) beside the cold
    fork: a fork of the running VM, and N more children of the same snapshot."""
    out = []
    for r in rows:
        cold = by.get((r["size"], r["n"], "hvkit fork"))
        if r["method"] != "hvkit fork, warm pool" or not cold:
            continue

        def pair(key: str) -> str:
            w, c = r.get(key), cold.get(key)
            if w is None or c is None:
                return "-"
            return f"{w * 1000:.1f} / {c * 1000:.1f} ms ({c / w:.1f}x)"

        out.append([r["size"], r["n"], pair("first_child_s"), pair("all_children_s"),
                    pair("snapshot_first_child_s"), pair("snapshot_all_children_s"), pair("parent_paused_s"),
                    f"{r['pss_mib_mean']:.1f} / {cold['pss_mib_mean']:.1f}"])
    if not out:
        return ""
    return ("\n\nWarm pool (N child QEMUs kept ready by `hvkit pool set VM -n N`) / cold, and how many times "
            "faster warm is; \"of the snapshot\" is N more children of the same snapshot (`fork --snapshot`: "
            "the child's own path, without the parent's pause and seal):\n\n"
            + table(["size", "N", "fork: first child", "fork: all N", "of the snapshot: first",
                     "of the snapshot: all N", "parent paused", "PSS MiB per child"], out))


def _fork_before(results: Path, by: dict) -> str:
    """hvkit's rows side by side with the same bench run on the code before issue 21
    (docs/results/fork-main.json: children with kernel arguments and THP, the parent
    paused until its children ran), as ratios."""
    path = results / "fork-main.json"
    if not path.exists():
        return ""
    old = json.loads(path.read_text())
    out = []
    for r in old.get("rows", []):
        new = by.get((r["size"], r["n"], r["method"]))
        if r["method"] != "hvkit fork" or not new:
            continue
        out.append([r["size"], r["n"], f"{new['first_child_s'] * 1000:.0f} / {r['first_child_s'] * 1000:.0f} ms "
                    f"({new['first_child_s'] / r['first_child_s']:.2f}x)",
                    f"{new['all_children_s'] * 1000:.0f} / {r['all_children_s'] * 1000:.0f} ms "
                    f"({new['all_children_s'] / r['all_children_s']:.2f}x)",
                    f"{new['pss_mib_mean']:.1f} / {r['pss_mib_mean']:.1f} MiB ({new['pss_mib_mean'] / r['pss_mib_mean']:.2f}x)"])
    if not out:
        return ""
    return ("\n\nhvkit fork now / before issue 21 (the same bench on the code before it: children with kernel "
            "arguments and THP, the parent paused until they ran), as ratios now / before:\n\n"
            + table(["size", "N", "first child", "all N", "PSS per child"], out)
            + "\n\nThe run before: " + conditions(old, "fork"))


def render_fork_image(results: Path, docs: Path) -> str:
    data = load_part(results, "fork-image", "fork")  # `bench/fork.py --sizes '' --json ...`
    rows = data.get("image_rows") or []
    if not rows:
        return ("*The committed run did not fork the Debian image guest (`--no-image-guest`: it boots a "
                "1 GiB systemd guest per method, ~40 s each under TCG). Run `bench/fork.py --image-guest` "
                "to fill this table.*\n\n" + conditions(data, "fork"))
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["method"], "failed: " + r["error"][:80], None, None, None, None])
            continue
        x = r.get("first_child_vs_hvkit")
        x = f" ({x:.1f}x first)" if x is not None and r["method"] != "hvkit fork" else ""
        paused = ms(r.get("parent_paused_s")) if r["method"].startswith("hvkit") else "until the end"
        out.append([r["method"], f"{r['first_child_s'] * 1000:.0f} / {r['all_children_s'] * 1000:.0f} ms{x}",
                    f"{r['first_agent_s'] * 1000:.0f} / {r['all_agents_s'] * 1000:.0f} ms",
                    ms(r.get("all_fork_done_s")), paused or "-",
                    f"{r['pss_mib_mean']:.1f} MiB (after {r['settle_s']:.0f} s)"])
    first = next(r for r in rows)
    return (f"Debian 12 image guest, {first['size']}, {first['n']} children:\n\n"
            + table(["method", "first runs / all run", "first agent / all agents", "fork done", "parent paused",
                     "PSS per child"], out) + "\n\n" + conditions(data, "fork"))


def render_share(results: Path, docs: Path) -> str:
    data = load(results, "share")
    arms = data.get("arms") or []
    if not arms:
        return "*This run had only the page cache rows (`--arms ''`).*\n\n" + conditions(data, "share")
    out = []
    for r in arms:
        pause = r.get("max_pause_s")
        out.append([r["arm"], f"{r['given_back_a'] / MiB:.0f} MiB", f"{100 * r['given_back_a_share_of_memfree']:.0f}%",
                    f"{num(r['seconds_to_80pct'])} / {num(r['seconds_to_90pct'])} s",
                    None if pause is None else f"{pause * 1000:.0f} ms", f"{r['given_back_b'] / MiB:.0f} MiB",
                    num(r.get("cpu_s_per_gib")) if r["arm"] != "page reporting" else "(in guest + QEMU)"])
    a = arms[0]
    head = (f"Guest of {data['memory']}, kernel {data['kernel']}; phase A allocates and frees {a['alloc_mib']} MiB, "
            f"phase B allocates {data['fragment_mib']} MiB and frees every other page.\n\n")
    return (head + table(["arm", "given back after alloc+free", "of MemFree", "time to 80% / 90%", "longest pause",
                          "given back, fragmented", "host CPU s/GiB"], out)
            + chart("share", "host memory of the guest over time, per arm", results, docs)
            + "\n\n" + conditions(data, "share"))


def render_share_cache(results: Path, docs: Path) -> str:
    data = load_part(results, "share-page-cache", "share")  # `bench/share.py --arms '' --json ...`
    rows = data.get("page_cache") or []
    if not rows:
        return ("*The committed run did not include the page-cache guest (`--no-page-cache`: a 1 GiB Debian "
                "image guest per arm, each booted and filled over ssh, several minutes under TCG). Run "
                "`bench/share.py --page-cache` to fill this table.*\n\n" + conditions(data, "share"))
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["arm"], None, None, None, "could not run: " + r["error"][:80], None])
            continue
        sh, note = r.get("share"), f"over {r['window_s']:.0f} s"
        if sh:
            note = (f"{sh['free_pages']:,} free pages, {sh['backed_free_pages']:,} with host memory, "
                    f"{sh['given_pages']:,} given back in {sh['pauses']} pauses (longest {sh['paused_s'] * 1000:.0f} ms)")
        elif r.get("ksmd_cpu_s") is not None:
            note += f", ksmd {r['ksmd_cpu_s']:.1f} CPU s"
        out.append([r["arm"], f"{r['guest_memfree'] / MiB:.0f} MiB", f"{r['guest_cached'] / MiB:.0f} MiB",
                    f"{r['host_before'] / MiB:.0f} MiB",
                    f"{r['given_back'] / MiB:.0f} MiB ({100 * r['given_back'] / max(r['guest_memfree'], 1):.0f}% "
                    f"of MemFree)", note])
    return (table(["arm", "MemFree", "Cached", "host before", "given back", "detail"], out) + "\n\n"
            + conditions(data, "share"))


def render_identify(results: Path, docs: Path) -> str:
    data = load(results, "identify")
    out = []
    for r in data.get("guests") or []:
        agree = [v for v in r["agreement"].values() if v is not None]
        worst = min(agree) if agree else None
        out.append([r["kernel"], r["size"], f"{r['identify_total_s']:.3f} s ({r['identify_paused_s']:.3f} s)",
                    f"{r['identify_s_per_gib']:.2f}", f"{r['agent_export_s']:.2f} s ({r['agent_over_hvkit']:.0f}x)",
                    f"{r['ps_total_s']:.3f} s",
                    "100% every class" if worst == 1.0 else f"worst class {100 * worst:.2f}%" if worst else None])
    text = table(["kernel", "guest", "identify (VM paused)", "s per GiB", "agent export", "ps",
                  "agreement with kpageflags"], out)
    builds = data.get("builds") or {}
    if builds:
        text += "\n\nLayout and symbols, first build (from an empty cache) and cached load:\n\n" + table(
            ["kernel", "layout first / cached", "symbols first / cached"],
            [[k, f"{b['layout_first_s']:.1f} s / {b['layout_cached_s'] * 1000:.0f} ms",
              f"{b['symbols_first_s']:.2f} s / {b['symbols_cached_s'] * 1000:.0f} ms"] for k, b in builds.items()])
    return text + "\n\n" + conditions(data, "identify")


def render_isf(results: Path, docs: Path) -> str:
    data = load(results, "isf")
    costs = data.get("costs") or []
    ps = next((c["seconds"] for c in costs if c["what"] == "hvkit ps"), None)
    text = table(["step", "seconds", "peak MiB", "x hvkit ps"],
                 [[f"`{c['what']}`" + ("" if c["ok"] else " (failed)"), f"{c['seconds']:.2f}",
                   f"{c['peak_mib']:.0f}", num(ps and c["seconds"] / ps, "{:.1f}")] for c in costs])
    runs = data.get("runs") or []
    if runs:
        ok = [r["plugin"].split(".", 1)[1] for r in runs if r["ok"]]
        bad = [r for r in runs if not r["ok"]]
        text += (f"\n\n{len(ok)} of {len(runs)} Volatility plugins ran clean with hvkit's table: "
                 + ", ".join(ok) + ".")
        if bad:
            text += "\n\nFailed:\n\n" + table(["plugin", "last error line"],
                                              [[r["plugin"], r["error"][:160].replace("|", "\\|")] for r in bad])
    return text + "\n\n" + conditions(data, "isf")


def render_hypercall(results: Path, docs: Path) -> str:
    data = load(results, "hypercall")
    out = []
    for r in data["arms"]:
        e = r["exits_per_call"]
        per = "0" if e <= 0 else f"{e:.2f}" if e >= 0.5 else f"1/{round(1 / e)}"
        out.append([r["arm"], f"{r['us_per_call']:.1f}", f"{r['calls_per_s']:,.0f}",
                    f"{r['throughput_vs_immediate']:.2f}", per, f"{r['host_us_per_call']:.2f}"])
    t = data.get("targets") or {}
    text = (f"{data['count']:,} `HV_TRACE` calls per run, best of {data['repeat']}:\n\n"
            + table(["arm", "µs per call", "calls/s", "x immediate", "exits per call", "host µs per call"], out))
    if t:
        text += (f"\n\nTargets: at most one exit per 256 deferred calls: "
                 f"{'met' if t['exit_target_met'] else 'not met'}; 5x the immediate throughput: "
                 f"{'met' if t['throughput_target_met'] else 'not met'} "
                 f"(best {t['best_deferred_throughput_vs_immediate']:.2f}x).")
    return (text + chart("hypercall", "throughput and exits per hypercall, per arm", results, docs)
            + "\n\n" + conditions(data, "hypercall"))


def render_share_private(results: Path, docs: Path) -> str:
    data = load(results, "share-private")  # `bench/share.py --arms '' --no-page-cache --private`
    out = []
    for r in data["rows"]:
        given = r["host_before"] - r["host_after"]
        out.append([r["kind"], f"{r['guest_memfree'] / MiB:.0f} MiB",
                    f"{given / MiB:.0f} MiB ({100 * r['given_back_share_of_memfree']:.0f}%)",
                    f"{r['rss_before'] / MiB:.0f} / {r['rss_after'] / MiB:.0f} MiB",
                    f"{r['pss_before'] / MiB:.0f} / {r['pss_after'] / MiB:.0f} MiB",
                    f"{r['mem_available_gain'] / MiB:+.0f} MiB", f"{r['dropped_pages']:,} in {r['runs']} runs",
                    f"{r['in_pause_s'] * 1000:.0f} ms"])
    return (f"Guests of {data['memory']}, kernel {data['kernel']}, each after allocating all its free memory but "
            "12 MiB and freeing it; one `hvkit share` each:\n\n"
            + table(["VM", "MemFree", "given back (of MemFree)", "QEMU RSS before / after",
                     "QEMU PSS before / after", "host MemAvailable", "pages dropped", "identify + drop, paused"], out)
            + "\n\n" + conditions(data, "share"))


ARM_NAMES = {"idle": "service, no load added", "loaded": "service + 2 x cores busy loops",
             "loaded-nice0": "service at nice 0 + busy loops", "watchers": "one share --watch per VM + busy loops"}


def render_service(results: Path, docs: Path) -> str:
    data = load(results, "service")
    rows = []
    for r in data["arms"]:
        ratio = r.get("max_vs_watchers")
        took = r["pauses"] > 0  # an arm with no pause has no pause times
        rows.append([ARM_NAMES.get(r["arm"], r["arm"]), r["nice"], r["busy_loops"], r["pauses"],
                     ms(r["p50_s"]) if took else None, ms(r["p99_s"]) if took else None,
                     ms(r["max_s"]) if took else None, r["over_budget"], f"{r['given_mib']:.0f} MiB",
                     f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}",
                     None if ratio is None or not took else f"{ratio:.2f}"])
    t = data.get("targets") or {}
    checks = data.get("memcheck") or {}
    kids = data["children"]
    text = (f"{data['vms']} VMs of {data['memory']}" + (f" and {kids} fork children of the first" if kids else "")
            + f", {data['seconds']:.0f} s per "
            f"arm, service every {data['watch']:g} s, budget {data['max_pause'] * 1000:.0f} ms:\n\n"
            + table(["arm", "nice", "busy loops", "pauses", "p50", "p99", "longest", "over budget", "given back",
                     "load 1-min start / end", "longest vs watchers"], rows))
    def verdict(target: dict | None, what: str, limit: str) -> str:
        if not target or target.get("value_s") is None:
            return f"{what} <= {limit}: not measured (no pause taken in that arm)"
        cond = "" if target.get("conditions_as_asked") else f", but at load {target['load']:.1f}, not as the target asks"
        return f"{what} <= {limit}: {ms(target['value_s'])} ({'met' if target['met'] else 'not met'}{cond})"
    if t:
        text += ("\n\nTargets (issue 22): " + verdict(t.get("idle_p99"), "p99 on an idle machine", "100 ms") + "; "
                 + verdict(t.get("loaded_max"), "longest loaded to 2 x cores", "250 ms") + ".")
    if checks:
        text += (f" Memory checker: {sum(c['errors'] for c in checks.values())} errors in "
                 f"{sum(c['rounds'] for c in checks.values())} rounds of {len(checks)} guests.")
    return text + "\n\n" + conditions(data, "service")


DENSITY_ARMS = {"nothing": "nothing (RAM files)", "hvkit": "hvkit service (`share --all --watch`)",
                "KSM": "KSM (RAM inside QEMU)", "page-reporting": "free page reporting (virtio-balloon)",
                "hvkit+KSM": "hvkit service + KSM (RAM inside QEMU)"}


def render_density(results: Path, docs: Path) -> str:
    data = load(results, "density")
    arms = data["arms"]
    ksm = next((r for r in arms if r["arm"] == "KSM"), None)
    out, parts = [], []
    for r in arms:
        agent = (None if not (r["service"] or r["ksm"]) else
                 f"{r['agent_core_pct_per_vm']:.2f}% ({num(r.get('agent_core_pct_per_vm_second_half'), '{:.2f}%') or '-'})")
        out.append([DENSITY_ARMS.get(r["arm"], r["arm"]), r["vms"], f"{r['guest_ram'] / MiB:.0f} MiB",
                    f"{r['used_mean'] / MiB:.0f} MiB", f"{r['host_mean'] / MiB:.0f} MiB", num(r["host_over_used"]),
                    num(r["guest_mib_per_host_mib"]),
                    f"{r['host_mean'] / ksm['host_mean']:.2f}x" if ksm and ksm["host_mean"] else None, agent,
                    f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}"])
        m = {k: v / MiB for k, v in r["parts_mean"].items()}
        extra = []
        if r["ksm"]:
            extra.append(f"KSM saved {r['ksm_sharing_mean_pages'] * 4096 / MiB:.0f} MiB")
        if r.get("service_rss"):
            extra.append(f"service RSS {r['service_rss'] / MiB:.0f} MiB")
        if r.get("service_summary"):
            extra.append("service " + r["service_summary"].split("INFO ", 1)[-1])
        extra += r.get("notes") or []
        parts.append([r["arm"], f"{m['files']:.0f}", f"{m['private']:.0f}", f"{m['page_cache']:.0f}",
                      f"{m['store']:.0f}", "; ".join(extra) or None])
    kinds = arms[0]["kinds"].values()
    what = (f"{data['vms']} default guests of {data['memory']} (memory checker or alloc cycles of {data['alloc']} MiB), "
            f"{sum(k == 'child' for k in kinds)} fork children of the first"
            + (f", one Debian 12 image guest of {data['image_memory']} with page-cache churn "
               f"({data['image_churn']} MiB file)" if data["image"] else ", no image guest")
            + f"; {data['seconds']:.0f} s per arm, means over its second half; service every {data['watch']:g} s.\n\n")
    text = what + table(["arm", "VMs", "guest RAM", "guests' used", "host memory", "host / used",
                         "guest MiB per host MiB", "host vs KSM", "agent CPU per VM (2nd half)",
                         "load 1-min start / end"], out)
    text += ("\n\nWhere the host memory is (MiB, means over the second half):\n\n"
             + table(["arm", "RAM files", "QEMUs' own pages", "snapshot page cache", "fork store", "also"], parts))
    t = data.get("targets") or {}
    verdicts = []
    for key, what in (("host_over_used", "host / used with the service <= 1.25"),
                      ("ksm_over_hvkit", "KSM alone / the service >= 2"),
                      ("core_pct_per_vm", "the service's CPU <= 2% of a core per VM")):
        v = t.get(key)
        verdicts.append(f"{what}: " + ("not measured" if not v else
                                       f"{v['value']:.2f} ({'met' if v['met'] else 'not met'})"))
    text += "\n\nTargets (issue 22): " + "; ".join(verdicts) + "."
    checks = [c for r in arms for c in (r.get("memcheck") or {}).values()]
    if checks:
        text += (f" Memory checker: {sum(c['errors'] for c in checks)} errors, "
                 f"{sum(c['corrupt'] for c in checks)} corrupt, in {sum(c['rounds'] for c in checks)} rounds "
                 f"of {len(checks)} guests.")
    return (text + chart("density", "host memory for the guests' RAM over time, per arm", results, docs)
            + "\n\n" + conditions(data, "density"))


def render_remote(results: Path, docs: Path) -> str:
    data = load(results, "remote")
    rows = data["rows"]
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        by = {r["arm"]: r for r in rows if r["size"] == size}
        local = (by.get("local child") or {}).get("first_child_s")
        for arm, r in by.items():
            if "first_child_s" in r:
                ratio = f"{r['first_child_s'] / local:.2f}x" if local else None
                fetched = (None if arm == "local child" else
                           f"{r.get('chunks_fetched_by_fork', 0)} by the fork, {r.get('chunks_fetched_on_read', 0)} on read"
                           + (f" (of them {r['chunks_prefetched']} prefetched)" if r.get("chunks_prefetched") else "")
                           + f"; {r.get('pages_served', 0)} pages served")
                out.append([size, arm, ms(r["first_child_s"]), ratio, fetched])
            else:
                pages = r.get("pages_written")
                what = (f"{r['chunks_uploaded']} chunks ({r['pages_uploaded']} pages) of {r.get('chunks', '-')}, "
                        f"{r.get('chunks_zero', '-')} zero; working set {r.get('working_set_chunks', '-')} chunks"
                        if pages is None else
                        f"{r['chunks_uploaded']} chunks ({r['pages_uploaded']} pages) for {pages} pages written: "
                        f"{r['pages_uploaded'] / max(pages, 1):.2f}x")
                out.append([size, arm, f"{r['seconds']:.1f} s", f"{r['bytes'] / MiB:.1f} MiB sent", what])
    text = (f"Chunks of {data.get('chunk_bytes', 65536) // 1024} KiB; one run per arm; round trips are loopback "
            f"(no added delay).\n\n"
            + table(["size", "arm", "first child / push", "vs local / sent", "chunks"], out))
    return text + "\n\n" + conditions(data, "remote")


def render_soak(results: Path, docs: Path) -> str:
    data = load(results, "soak")
    rows = [[vm, c["rounds"], c["errors"], c["corrupt_words"], f"{c['given_mib']:.0f} MiB"] for vm, c in data["vms"].items()]
    ran = ", ".join(f"{op} {c['ran']} (median {c['median_s']:.1f} s)" for op, c in sorted(data["commands"].items()))
    text = (f"{data['seconds']:.0f} s of the service (every {data['watch']:g} s) on {len(rows)} VMs, two commands at "
            f"a time beside it: {ran}; {len(data['failures'])} failed. "
            f"{'Held' if data['held'] else 'NOT held'}: 0 corrupt words in every VM.\n\n"
            + table(["VM", "checker rounds", "errors", "corrupt words", "given back by the service"], rows))
    if data["failures"]:
        text += "\n\nFailed: " + "; ".join(f"`{f}`" for f in data["failures"][:5])
    return text + "\n\n" + conditions(data, "soak")


RENDERERS: dict[str, Callable[[Path, Path], str]] = {
    "fork": render_fork, "fork-image": render_fork_image, "share": render_share,
    "share-page-cache": render_share_cache, "share-private": render_share_private,
    "identify": render_identify, "isf": render_isf,
    "hypercall": render_hypercall, "service": render_service, "remote": render_remote, "soak": render_soak,
    "density": render_density,
}


# ---------------------------------------------------------------- files

def markdown_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def regenerate(text: str, results: Path, docs: Path) -> str:
    def one(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise SystemExit(f"bench/report: unknown block 'bench:{name}' (known: {', '.join(RENDERERS)})")
        try:
            body = RENDERERS[name](results, docs)
        except Missing as e:
            body = str(e)
        return (f"{m.group(1)}<!-- generated by bench/report.py from {results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}: "
                f"do not edit -->\n{body.rstrip()}\n{m.group(4)}")

    return BLOCK.sub(one, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results", help="folder of the benches' JSON")
    a = ap.parse_args()
    results = a.results.resolve()
    stale, blocks = [], 0
    for path in markdown_files(ROOT):
        text = path.read_text()
        blocks += len(BLOCK.findall(text))
        new = regenerate(text, results, path.parent)
        if new != text:
            stale.append(path)
            if not a.check:
                path.write_text(new)
    names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
    if a.check:
        if stale:
            print(f"bench/report: out of date with {results}: {names} (run bench/report.py)", file=sys.stderr)
            return 1
        print(f"bench/report: {blocks} blocks up to date")
        return 0
    print(f"bench/report: {blocks} blocks; rewrote {names or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
