"""Giving a guest's free pages back to the host, with no driver in the guest.

    freepages.py  which pages are free (found from outside, checked against the guest
                  kernel's own count) and punching them out of a RAM file: used by
                  share and by fork
    sharer.py     `hvkit share`: a running VM paused, its free pages given back, resumed
    private.py    RAM private to QEMU (forked VMs, anonymous RAM): pages QEMU holds, and
                  dropping them with an madvise run inside QEMU
    inject.py     running that madvise in QEMU's main thread over ptrace, crash-safe

A hole reads as zeros and costs no host memory until the guest touches the page again.
"""

from hvkit.sharing.freepages import ShareRefused
from hvkit.sharing.sharer import Sharer, ShareResult, share_once

__all__ = ["ShareRefused", "ShareResult", "Sharer", "share_once"]
