"""Prometheus metrics of the host service (`hvkit share --all --watch --metrics ADDR:PORT`),
served with prometheus_client from a registry of its own (no process metrics of the
default one: the page holds hvkit's figures only).

Per VM (label `vm`): the guest's free pages at its last share, pages given back, host
memory held for its RAM, its RAM size, pauses (a histogram of seconds), shares
(cycles) and errors (label `kind`: refused, gone, error); for the host: MemAvailable.
A VM that goes away takes its series with it.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hvkit.errors import HvkitError
from hvkit.qemu.listing import VMStatus
from hvkit.sharing.sharer import ShareResult

PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ShareMetrics:
    """The service's figures as Prometheus metrics (an Observer of service.Service)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.free_pages = Gauge("hvkit_share_guest_free_pages",
                                "Pages on the guest kernel's free lists at the VM's last share", ["vm"], registry=r)
        self.given = Counter("hvkit_share_given_back_pages",
                             "Guest pages whose host memory was given back (holes punched)", ["vm"], registry=r)
        self.host_memory = Gauge("hvkit_share_host_memory_bytes",
                                 "Host memory held for the VM's guest RAM", ["vm"], registry=r)
        self.guest_memory = Gauge("hvkit_share_guest_memory_bytes", "The VM's guest RAM size", ["vm"], registry=r)
        self.pauses = Histogram("hvkit_share_pause_seconds", "How long each pause of the VM lasted", ["vm"],
                                buckets=PAUSE_BUCKETS, registry=r)
        self.cycles = Counter("hvkit_share_cycles", "Shares of the VM (one pause each, or none)", ["vm"], registry=r)
        self.errors = Counter("hvkit_share_errors", "Shares that failed, by kind (refused, gone, error)",
                              ["vm", "kind"], registry=r)
        self.mem_available = Gauge("hvkit_host_mem_available_bytes", "The host's MemAvailable (/proc/meminfo)",
                                   registry=r)
        self._kinds: dict[str, set[str]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ---- Observer ---------------------------------------------------------------------

    def shared(self, vm: str, result: ShareResult) -> None:
        self.free_pages.labels(vm).set(result.free_pages)
        self.given.labels(vm).inc(result.given_pages)
        self.host_memory.labels(vm).set(result.host_after)
        self.cycles.labels(vm).inc()
        for seconds, _, _ in result.pause_log:
            self.pauses.labels(vm).observe(seconds)

    def vm_seen(self, row: VMStatus) -> None:
        self.host_memory.labels(row.name).set(row.host_memory)
        self.guest_memory.labels(row.name).set(row.memory)
        for metric in (self.given, self.cycles, self.pauses):
            metric.labels(row.name)  # a series from the start, at 0
        self.errors.labels(row.name, "refused")

    def vm_gone(self, vm: str) -> None:
        for metric in (self.free_pages, self.given, self.host_memory, self.guest_memory, self.pauses, self.cycles):
            try:
                metric.remove(vm)
            except KeyError:
                pass
        for kind in self._kinds.pop(vm, set()) | {"refused"}:
            try:
                self.errors.remove(vm, kind)
            except KeyError:
                pass

    def error(self, vm: str, kind: str) -> None:
        self._kinds.setdefault(vm, set()).add(kind)
        self.errors.labels(vm, kind).inc()

    def host(self, mem_available: int) -> None:
        self.mem_available.set(mem_available)

    # ---- serving ----------------------------------------------------------------------

    def serve(self, address: str) -> tuple[str, int]:
        """Serves the page at http://ADDR:PORT/metrics in a thread; the address bound."""
        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise HvkitError(f"cannot serve metrics on {address}: {e.strerror or e}",
                             "pick a free port (or another address) with --metrics ADDR:PORT") from None
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_address(text: str) -> tuple[str, int]:
    """('127.0.0.1', 9782) of '127.0.0.1:9782', '[::1]:9782' or ':9782' (every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise HvkitError(f"invalid metrics address {text!r}", "write it as ADDR:PORT, e.g. 127.0.0.1:9782")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
