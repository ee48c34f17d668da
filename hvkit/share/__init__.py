"""Giving a guest's free pages back to the host, with no driver in the guest.

The VM is paused; hvkit identifies the pages on the guest kernel's free lists from
outside (hvkit.introspect), punches holes for them in the VM's RAM file, and resumes.
A hole reads as zeros and costs no host memory until the guest touches the page again.
"""

from hvkit.share.sharer import Sharer, ShareRefused, ShareResult, share_once

__all__ = ["ShareRefused", "ShareResult", "Sharer", "share_once"]
