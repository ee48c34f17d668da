"""Pure parsing: sizes, workloads, kernel files, initramfs, accelerator probe image."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from hvkit.errors import HvkitError
from hvkit.guest.initramfs import char_device, cpio_newc, directory, regular
from hvkit.guest.workload import Workload
from hvkit.kernel import read_kernel_image
from hvkit.units import format_size, parse_size


@pytest.mark.parametrize("text,expected", [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20),
                                           ("2048", 2048 << 20), ("1.5G", 1536 << 20)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12X", "-5M", "1 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(HvkitError, match="invalid memory size"):
        parse_size(text)


def test_format_size_round_trips():
    for n in (256 << 20, 1 << 30, 1536 << 20):
        assert parse_size(format_size(n)) == n


def test_workload_parse():
    assert Workload.parse("alloc:100") == Workload("alloc", 100)
    assert Workload.parse("idle").kernel_args() == "hvkit.workload=idle hvkit.mib=64"
    for bad in ("bogus", "alloc:x", "alloc:0"):
        with pytest.raises(HvkitError):
            Workload.parse(bad)


def test_kernel_version_from_bzimage(guest):
    image = read_kernel_image(guest.kernel)
    assert image.format == "bzImage" and image.bootable
    assert image.release == guest.release
    assert guest.kernel.name == f"vmlinuz-{image.release}"  # Debian names the file after it


def test_non_kernels_are_named(tmp_path, guest):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 200)
    with pytest.raises(HvkitError, match="is not a Linux kernel"):
        read_kernel_image(text)
    with pytest.raises(HvkitError, match="does not exist"):
        read_kernel_image(tmp_path / "missing")
    with pytest.raises(HvkitError, match="not a regular file"):
        read_kernel_image(tmp_path)


def test_initramfs_is_read_back_by_cpio(tmp_path):
    """Our newc writer produces what GNU cpio reads: names, data, device nodes."""
    archive = cpio_newc([directory("bin"), regular("bin/hello", b"hi there\n", executable=True),
                         char_device("console", 5, 1)])
    (tmp_path / "a.cpio").write_bytes(archive)
    listing = subprocess.run(["cpio", "-itv", "-F", str(tmp_path / "a.cpio")],
                             capture_output=True, text=True)
    if listing.returncode != 0 and "not found" in listing.stderr:
        pytest.skip("GNU cpio is not installed")
    assert "bin/hello" in listing.stdout and "console" in listing.stdout
    assert "5,   1" in listing.stdout or "5, 1" in listing.stdout
    gzip.compress(archive)  # and it compresses, as the kernel expects


def test_relative_cache_and_runtime_are_made_absolute_where_read(tmp_path, monkeypatch):
    from hvkit.config import Paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HVKIT_CACHE", "./cache")
    monkeypatch.setenv("HVKIT_RUNTIME", "run")
    p = Paths.from_env()
    assert p.cache == tmp_path / "cache" and p.runtime == tmp_path / "run"
    monkeypatch.setenv("HVKIT_CACHE", "~/c")
    assert Paths.from_env().cache == Path.home() / "c"
