"""Runs several Volatility 3 plugins on one memory image in one process, the kernel
found once: `python volbatch.py SYMBOLS IMAGE CACHE PLUGIN_DIR OUT PLUGIN...`.

Each `vol` run parses the ISF, validates it against its schema and scans the image for
the kernel's banner before its plugin does anything: about 2.5 s, most of a plugin's
run on a small guest. Here the first plugin finds the kernel (Volatility's own
automagic, as `vol` runs it) and every other plugin is handed that kernel module's
configuration, so what the tests check is each plugin's own work on hvkit's table.

For each plugin, OUT/<plugin>.json holds what `vol -r json` prints, or OUT/<plugin>.err
what went wrong (the exception, with its traceback).
"""

from __future__ import annotations

import io
import logging
import sys
import traceback
from contextlib import redirect_stdout
from pathlib import Path


def main(symbols: str, image: str, cache: str, plugin_dir: str, out: str, names: list[str]) -> int:
    import volatility3.framework as framework
    import volatility3.plugins
    import volatility3.symbols
    from volatility3.cli import MuteProgress, text_renderer
    from volatility3.framework import automagic, constants, contexts, interfaces, plugins
    from volatility3.framework.automagic import stacker
    from volatility3.framework.configuration import requirements

    logging.getLogger("volatility3").setLevel(logging.ERROR)
    framework.require_interface_version(2, 0, 0)
    constants.OFFLINE = True
    constants.CACHE_PATH = cache
    volatility3.plugins.__path__ = [str(Path(plugin_dir).absolute())] + list(constants.PLUGINS_PATH)
    volatility3.symbols.__path__ = [str(Path(symbols).absolute())] + list(constants.SYMBOL_BASEPATHS)
    constants.PARALLELISM = constants.Parallelism.Off
    framework.import_files(volatility3.plugins, True)
    listed = framework.list_plugins()
    ctx = contexts.Context()
    ctx.config["automagic.LayerStacker.single_location"] = requirements.URIRequirement.location_from_file(image)
    available = automagic.available(ctx)
    kernel: str | None = None  # the name of the kernel module in the context, once found
    out_dir = Path(out)
    for name in names:
        try:
            plugin = listed[name]
            path = interfaces.configuration.path_join("plugins", plugin.__name__)
            if kernel is not None:  # the kernel module found for the first plugin
                ctx.config[interfaces.configuration.path_join(path, "kernel")] = kernel
            chosen = automagic.choose_automagic(available, plugin)
            if ctx.config.get("automagic.LayerStacker.stackers", None) is None:
                ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin)
            constructed = plugins.construct_plugin(ctx, chosen, plugin, "plugins", MuteProgress(),
                                                   _file_handler(out_dir))
            kernel = kernel or constructed.config.get("kernel")
            grid = constructed.run()
            text = io.StringIO()
            with redirect_stdout(text):
                text_renderer.JsonRenderer().render(grid)
            (out_dir / f"{name}.json").write_text(text.getvalue())
        except Exception:
            (out_dir / f"{name}.err").write_text(traceback.format_exc())
    return 0


def _file_handler(out_dir: Path):
    """Files plugins write (e.g. --dump) go to `out_dir`, as `vol -o` puts them."""
    from volatility3.cli import CommandLine

    cli = CommandLine()
    cli.output_dir = str(out_dir)
    return cli.file_handler_class_factory()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6], sys.argv[6:]))
