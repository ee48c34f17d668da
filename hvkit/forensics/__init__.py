"""Bridges to the tools forensics users already have (Volatility 3, drgn), fed with
what hvkit knows of a kernel without its debug package: types compiled from its own
headers, symbols from its own kallsyms."""
