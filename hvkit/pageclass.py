"""The classes a page frame of a Linux guest can have: the vocabulary that hvkit's
identification (hvkit.introspect, from outside the guest) and the guest's own view
(hvkit.guest.groundtruth, from its /proc/kpageflags) are compared in."""

from __future__ import annotations

from enum import IntEnum


class PageClass(IntEnum):
    NOT_PRESENT = 0
    FREE = 1
    PAGE_TABLE = 2
    SLAB = 3
    KERNEL_IMAGE = 4
    RESERVED = 5
    ANONYMOUS = 6
    PAGE_CACHE = 7
    KERNEL_OTHER = 8

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")
