"""Forking running VMs: where a fork happens.

forker.py    pause, snapshot on the memory server, start N children, let the VM go on
recovery.py  finish or undo a fork whose process died (its journal names this module)
written.py   the pages a forked VM wrote, read from its QEMU process (for forking it again)
disks.py     a disk-image VM's disk frozen with its memory, past the point of no return
settle.py    a disk-image child settled through its agent: random seed, clock, MAC, address
"""

from hvkit.forking.forker import ChildStarted, ForkReport, child_names, fork, start_children

__all__ = ["fork", "start_children", "child_names", "ForkReport", "ChildStarted"]
