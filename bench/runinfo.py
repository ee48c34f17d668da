"""The conditions of a bench run, recorded in its JSON so that a reader of the figures
knows where and when they were taken: machine, date, load average at start and end,
command line. bench/report.py prints them under each table it writes into docs/.

Import it first thing in a bench (the start is taken at import time), then put
`run_info()` under the key "run" of the JSON."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time

_START = time.time()
_LOAD_START = os.getloadavg()


def run_info() -> dict:
    """Machine, start/end time, wall time, load average (1, 5, 15 min) at start and end, argv."""
    now = time.time()
    return {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "started": datetime.datetime.fromtimestamp(_START, datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(now - _START, 1),
        "loadavg_start": [round(x, 2) for x in _LOAD_START],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "argv": list(sys.argv),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }
