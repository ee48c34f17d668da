"""linux.malware.hidden_modules with the table check its authors meant (a Volatility 3 plugin,
loaded by `hvkit vol` through `vol -p`; it is not imported by hvkit itself).

Why it exists: Volatility's linux.malware.hidden_modules (2.28.2) refuses a table unless it was
written by dwarf2json 0.8.0 or later. The reason is in dwarf2json's history: before 0.8.0 it
named anonymous members by their byte offset, so of several anonymous members at one offset
(struct module has such unions) only the last survived, and it placed DWARF 5 bitfields
wrongly; the plugin reads through both. But the check is written with the sense of its
validator inverted (`verify_table_versions` returns True when no table fails the validator,
and the validator returns True for a *bad* version, so True means "a bad table was found",
unless no table has dwarf2json as its producer at all): a table of any other producer is
refused too. Compare linux.kmsg, which passes a validator that returns True for a good
version and refuses on False.

This plugin runs the same code (Volatility's own Modules.get_hidden_modules, on the same
inputs) behind the check as meant: a dwarf2json table older than 0.8.0 is refused; a table of
another producer runs. hvkit's tables keep every anonymous member (named as dwarf2json 0.8.0
does, `unnamed_field_<n>` counted per type) and read bitfields from DW_AT_data_bit_offset or
BTF, so they meet the reason for the check; hvkit does not claim to be dwarf2json.
"""

from __future__ import annotations

from volatility3.framework import exceptions
from volatility3.plugins.linux.malware import hidden_modules
from volatility3.framework.symbols.linux.utilities import modules as linux_utilities_modules


def _old_dwarf2json(version, _datetime) -> bool:
    """The validator's answer for a table dwarf2json wrote: whether it is one to refuse."""
    return not version or tuple(version) < (0, 8, 0)


class Hidden_modules(hidden_modules.Hidden_modules):
    """Carves memory to find hidden kernel modules (Volatility's plugin, with its table
    check as meant: refuses only tables of dwarf2json older than 0.8.0)."""

    @classmethod
    def find_hidden_modules(cls, context, vmlinux_module_name: str):
        space = context.symbol_space
        for name in space:
            table = space[name]
            producer = getattr(table, "producer", None)
            if producer and producer.name == "dwarf2json" and _old_dwarf2json(producer.version, None):
                raise exceptions.SymbolSpaceError(
                    "Invalid symbol table, please ensure the ISF table produced by dwarf2json was "
                    "created with version 0.8.0 or later")
        known = cls.get_lsmod_module_addresses(context, vmlinux_module_name)
        boundaries = linux_utilities_modules.Modules.get_modules_memory_boundaries(context, vmlinux_module_name)
        yield from linux_utilities_modules.Modules.get_hidden_modules(
            context, vmlinux_module_name, known, boundaries)

    implementation = find_hidden_modules
