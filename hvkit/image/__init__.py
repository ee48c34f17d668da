"""Disk images of real distributions for hvkit's guests (issue 14).

This folder owns building them: `build_debian_image()` makes a bootable Debian 12
(bookworm) disk, a qcow2 file built from Debian packages with mmdebstrap and
`mke2fs -d` (no loop devices, no mounts on the host, no boot loader), with the image's
own kernel and initramfs copied out beside it for QEMU's `-kernel`/`-initrd`, an ssh
key pair for root, the QEMU guest agent, and hvkit's control port (files/hvkit-control:
the same requests as the default guest's /init, on the same second serial port).

Images live in the cache under `images/<name>/` and are never written to after the
build: boot each VM on a qcow2 overlay of `disk.qcow2` (`DebianImage.overlay()`).
"""

from hvkit.image.debian import DebianImage, build_debian_image, cached_debian_image

__all__ = ["DebianImage", "build_debian_image", "cached_debian_image"]
