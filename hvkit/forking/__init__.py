"""Forking running VMs: where a fork happens.

forker.py   pause, snapshot on the memory server, start N children, let the VM go on
written.py  the pages a forked VM wrote, read from its QEMU process (for forking it again)
"""

from hvkit.forking.forker import ChildStarted, ForkReport, child_names, fork, start_children

__all__ = ["fork", "start_children", "child_names", "ForkReport", "ChildStarted"]
