"""The docs: the benchmark figures in them are what bench/report.py makes from the committed
JSON in docs/results/, and every relative link in README.md and docs/ leads to a file that
exists. No guest, no QEMU: a second or so."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "report.py"



def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def copy_tree(tmp_path: Path) -> Path:
    """The parts of the checkout report.py reads and writes, in a temporary folder."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(REPORT, root / "bench" / "report.py")
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "README.md", root / "README.md")
    return root


def run_report(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "bench" / "report.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_docs_are_up_to_date_with_the_committed_results():
    proc = run_report(ROOT, "--check")
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_generator_is_idempotent_and_check_sees_a_stale_block(tmp_path):
    root = copy_tree(tmp_path)
    before = {p: p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md")]}
    assert run_report(root).returncode == 0
    assert {p: p.read_text() for p in before} == before, "a second run changed the docs"
    # a block edited by hand is out of date, and the generator puts it back
    page = root / "docs" / "fork.md"
    page.write_text(page.read_text().replace("<!-- /bench:fork -->", "| 1 | made up |\n<!-- /bench:fork -->", 1))
    proc = run_report(root, "--check")
    assert proc.returncode == 1 and "docs/fork.md" in proc.stderr
    assert run_report(root).returncode == 0
    assert page.read_text() == before[page]


def test_every_bench_has_a_block_and_its_results():
    text = "\n".join(p.read_text() for p in markdown_files())
    for bench in ("fork", "share", "identify", "isf", "hypercall"):
        assert f"<!-- bench:{bench} -->" in text, f"no block for bench/{bench}.py in the docs"
    assert (ROOT / "docs" / "results").is_dir()


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks are not links
    out = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, an anchor of the same page
        out.append(target)
    return out


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_that_exist(page):
    missing = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files or headings: {missing}"
