"""Looking into a Linux guest from outside it: where its kernel sits in guest-physical
memory (KASLR undone from memory alone), kernel and process address translation, and
the guest's processes. Symbols and structure layouts come from hvkit.kernel; memory
from hvkit.memory; nothing here trusts what it reads from the guest."""

from hvkit.introspect.kernelspace import KernelMismatch, KernelSpace
from hvkit.introspect.pages import PageClass, PageMap, classify
from hvkit.introspect.tasks import GuestTask, TaskWalk, list_tasks

__all__ = ["GuestTask", "KernelMismatch", "KernelSpace", "PageClass", "PageMap", "TaskWalk",
           "classify", "list_tasks"]
