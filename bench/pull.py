#!/usr/bin/env python3
"""Benchmarks ``zlayer_registry pull`` against skopeo and against the loopback floor.

Usage::

    python3 bench/pull.py [--rounds 5] [--small] [--python PATH] [--json FILE] [--keep]

It builds the ~300 MB image of ``_oci_testkit.benchmark_layers()`` (six incompressible
48 MiB layers and one layer of 10,000 small files; ``--small`` makes a ~30 MB one), starts
CNCF distribution (``docker-registry serve``) on 127.0.0.1 with its access log on, pushes the
image with skopeo, and measures in every round:

    cold pull     ``PYTHON -m zlayer_registry pull REF --cache EMPTY -q`` against
                  ``skopeo copy docker://REF oci:EMPTY:v1``: wall time of the whole process,
                  its own peak RSS, HTTP requests; and ``bench/plain_loop.py`` (the plain
                  stdlib loop of keep-alive GETs, sha256 and O_DIRECT writes that the
                  target assumes), an info row
    floor         one GET of every blob over loopback (6 keep-alive threads, bytes thrown
                  away) and one sha256 of every blob from memory
    warm re-pull  the same pull into the filled cache, by tag and by digest, against
                  ``PYTHON -c pass``; requests counted in the registry's access log
    start-up      ``PYTHON -X importtime -c "import zlayer_registry"`` and
                  ``PYTHON -m zlayer_registry --help``

It prints medians, minimums and ratios (each ratio from numbers of one round) with PASS/MISS
against the targets.  An untimed warm-up round comes first so every tool reads blobs from the
page cache; the page cache is never dropped, but dirty pages are written back (``sync``)
before each timed pull so one tool's writeback is not billed to the next.  The registry,
any running child and the temporary directory are cleaned up on every exit, Ctrl-C included.

Sections:
    1. SETUP: paths, targets, errors
    2. PROCESSES: timed children and the access-logged registry
    3. MEASUREMENTS: pulls, the floor, start-up
    4. REPORT: statistics, table, JSON
    5. MAIN
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

# =============================================================================
# 1. SETUP: paths, targets, errors
# =============================================================================

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # for _oci_testkit, the repository's test helper

from _oci_testkit import (MIB, DistributionRegistry, ImageInfo,  # noqa: E402
                          benchmark_layers, build_image, free_port)

TAG = "v1"
READ_THREADS = 6  # as many as the puller's default max_workers (DEFAULT_MAX_WORKERS)
STARTUP_SAMPLES_PER_ROUND = 3  # start-up runs are short, so each round takes a few
_READ_CHUNK_BYTES = 1 << 20

# Targets the medians are held to; None means the row is for information.
TARGET_COLD_RATIO = 0.5  # ours / skopeo
TARGET_FLOOR_RATIO = 1.25  # ours / (read + hash)
TARGET_WARM_OVERHEAD_S = 0.060  # warm re-pull minus `python -c pass`
TARGET_WARM_TAG_REQUESTS = 2
TARGET_WARM_DIGEST_REQUESTS = 0
TARGET_RSS_BYTES = 32 * MIB
TARGET_IMPORT_S = 0.030


class BenchError(Exception):
    """Says that a step of the benchmark failed (a tool exited non-zero, a check failed)."""


# =============================================================================
# 2. PROCESSES: timed children and the access-logged registry
# =============================================================================


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """Is one finished child process: wall and CPU time, peak RSS and what it printed."""

    wall_s: float
    cpu_s: float  # user + system, of the tool and anything it waited for
    max_rss_bytes: int
    stdout: str


def _exit_code(status: int) -> int:
    # os.waitstatus_to_exitcode is 3.9+; the macros work on 3.8.
    if hasattr(os, "waitstatus_to_exitcode"):
        return os.waitstatus_to_exitcode(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


class _HighWaterPoller:
    """Polls a process's VmHWM (peak RSS since exec) in a thread until ``stop()``."""

    def __init__(self, pid: int, interval_s: float = 0.002) -> None:
        self._path = "/proc/%d/status" % pid
        self._interval_s = interval_s
        self._done = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                with open(self._path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_bytes = max(self.peak_bytes, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            self._done.wait(self._interval_s)

    def stop(self) -> int:
        """Stops polling; returns the highest VmHWM seen, in bytes."""
        self._done.set()
        self._thread.join()
        return self.peak_bytes


class Runner:
    """Runs child processes one at a time, timing each and taking its own peak RSS.

    The peak RSS comes from ``/usr/bin/time -f %M`` when it is installed.  Reading the rusage
    of our own children would be wrong: Linux carries the high-water mark of the address
    space a child had before exec into its ru_maxrss, and a vfork'd child of this process
    has this process's (tens of MiB after hashing blobs).  GNU time's own ~1 MiB is the
    most it can add, and it adds only to children smaller than that.  Without it, a thread
    polls VmHWM in /proc/PID/status every few milliseconds (a lower bound).  stdout and
    stderr go to files, never to pipes, so a chatty child cannot block on a full pipe.
    """

    def __init__(self, env: Dict[str, str], log_dir: Path, use_time: bool = True) -> None:
        self.env = env
        self.log_dir = log_dir
        self.time_bin = shutil.which("time", path="/usr/bin") if use_time else None
        self._live: Optional[subprocess.Popen] = None

    @property
    def rss_method(self) -> str:
        """Says how peak RSS is measured."""
        return ("%s -f %%M" % self.time_bin) if self.time_bin else "polling /proc/PID/status VmHWM"

    def run(self, name: str, cmd: Sequence[str], cwd: Optional[Path] = None) -> ChildRun:
        """Runs ``cmd`` to the end; raises BenchError when it exits non-zero."""
        out_path, err_path = self.log_dir / (name + ".out"), self.log_dir / (name + ".err")
        rss_path = self.log_dir / (name + ".rss")
        full = list(cmd)
        if self.time_bin:
            full = [self.time_bin, "-o", str(rss_path), "-f", "%M"] + full
        with open(str(out_path), "wb") as out, open(str(err_path), "wb") as err:
            start_s = time.perf_counter()
            # A session of its own: kill_live() can then end the tool together with the
            # /usr/bin/time in front of it, which would otherwise outlive a killed parent.
            proc = subprocess.Popen(full, cwd=None if cwd is None else str(cwd), env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            self._live = proc
            poller = None if self.time_bin else _HighWaterPoller(proc.pid)
            # wait4 for the CPU times: they include what the child waited for (the tool
            # behind /usr/bin/time), and unlike ru_maxrss they start at zero at exec.
            _pid, status, usage = os.wait4(proc.pid, 0)
            wall_s = time.perf_counter() - start_s
            proc.returncode = _exit_code(status)
            self._live = None
        if proc.returncode != 0:
            tail = err_path.read_text(errors="replace")[-1500:].strip()
            raise BenchError("%s exited %d: %s\n%s" % (name, proc.returncode, " ".join(cmd), tail))
        if poller is not None:
            rss_bytes = poller.stop()
        else:
            # GNU time writes "Command exited with..." first when the status is not 0.
            rss_bytes = int(rss_path.read_text().split()[-1]) * 1024
        return ChildRun(wall_s, usage.ru_utime + usage.ru_stime, rss_bytes,
                        out_path.read_text(errors="replace"))

    def output(self, cmd: Sequence[str], cwd: Optional[Path] = None) -> str:
        """Runs a short untimed command and returns stdout and stderr together."""
        proc = subprocess.run(list(cmd), cwd=None if cwd is None else str(cwd), env=self.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)
        if proc.returncode != 0:
            raise BenchError("%s exited %d: %s" % (" ".join(cmd), proc.returncode,
                                                   proc.stdout.decode(errors="replace")[-1500:]))
        return proc.stdout.decode(errors="replace")

    def kill_live(self) -> None:
        """Kills the child being waited for, and its process group, after an interrupt."""
        proc, self._live = self._live, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group start_new_session made for it
        except OSError:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"')


class LoggedRegistry(DistributionRegistry):
    """Is the test helper's DistributionRegistry with the access log on.

    The tests run distribution with its access log off; here every request it serves is one
    Apache combined-format line on stdout (gorilla's CombinedLoggingHandler), which is how
    the benchmark counts the requests a client made.  Readiness wait, stop-by-PID and the
    skopeo push are the helper's own.
    """

    @property
    def access_log(self) -> Path:
        """Returns the file the registry's stdout (the access log) goes to."""
        return self.root / "access.log"

    def _config(self) -> str:
        # JSON is YAML; the packaged /etc/docker/registry/config.yml is never read.
        return json.dumps({
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "storage")},
                        "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": "127.0.0.1:%d" % self.port, "secret": "zlayer-bench-secret"},
        }, indent=2)

    def start(self) -> "LoggedRegistry":
        """Starts the registry on a free loopback port (retrying if the port was taken)."""
        self.root.mkdir(parents=True, exist_ok=True)
        app_log = self.root / "registry.log"
        for _attempt in range(3):
            self.port = free_port()
            config_path = self.root / "config.yml"
            config_path.write_text(self._config())
            with open(str(self.access_log), "wb") as out, open(str(app_log), "wb") as err:
                self.process = subprocess.Popen(
                    [self._registry_bin, "serve", str(config_path)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            if self._wait_ready():
                return self
            self.stop()
        raise BenchError("docker-registry did not answer on /v2/; log tail:\n"
                         + app_log.read_text(errors="replace")[-2000:])

    def requests_logged(self) -> List[str]:
        """Returns ``METHOD PATH`` of every request in the access log so far."""
        text = self.access_log.read_text(errors="replace")
        return [" ".join(m.groups()) for m in _ACCESS_LINE.finditer(text)]

    def requests_since(self, before: int, settle_s: float = 0.05,
                       max_wait_s: float = 2.0) -> List[str]:
        """Returns the requests logged after the first ``before`` ones.

        The line is written once the handler returns, which can be just after the client
        has its response and exits, so this waits until the count holds still.
        """
        deadline = time.monotonic() + max_wait_s
        seen = self.requests_logged()
        while time.monotonic() < deadline:
            time.sleep(settle_s)
            now = self.requests_logged()
            if len(now) == len(seen):
                break
            seen = now
        return seen[before:]


# =============================================================================
# 3. MEASUREMENTS: pulls, the floor, start-up
# =============================================================================


@dataclasses.dataclass
class Bench:
    """Holds what every measurement needs: tools, registry, image and scratch space."""

    python: str
    skopeo: str
    runner: Runner
    registry: LoggedRegistry
    work: Path
    layout: Path
    repository: str
    image: ImageInfo
    manifest_digest: str
    source_dir: Path  # holds the snapshot of zlayer_registry.py every run of ours imports

    @property
    def reference(self) -> str:
        """Returns ``127.0.0.1:PORT/REPOSITORY:v1``."""
        return self.registry.reference(self.repository, TAG)

    @property
    def digest_reference(self) -> str:
        """Returns ``127.0.0.1:PORT/REPOSITORY@sha256:...``."""
        return self.registry.reference(self.repository, self.manifest_digest)

    @property
    def blobs(self) -> List[Any]:
        """Returns the blobs a pull downloads, config and layers, largest first."""
        return sorted((self.image.config,) + self.image.layers, key=lambda b: -b.size)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _check_blobs(bench: Bench, blob_dir: Path, what: str) -> None:
    """Raises BenchError unless every pulled blob is in ``blob_dir`` with the right size."""
    for blob in bench.blobs:
        path = blob_dir / _hex(blob.digest)
        if not path.is_file() or path.stat().st_size != blob.size:
            raise BenchError("%s: blob %s missing or of the wrong size in %s"
                             % (what, blob.digest, blob_dir))


def _timed_with_requests(bench: Bench, name: str, cmd: Sequence[str],
                         cwd: Optional[Path] = None) -> Dict[str, Any]:
    """Runs one timed child; returns wall time, peak RSS, output and the requests it made."""
    before = len(bench.registry.requests_logged())
    run = bench.runner.run(name, cmd, cwd)
    requests = bench.registry.requests_since(before)
    return {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "rss_bytes": run.max_rss_bytes,
            "stdout": run.stdout, "requests": requests}


def pull_ours(bench: Bench, label: str) -> Dict[str, Any]:
    """Cold pull into an empty cache, then warm re-pulls by tag and by digest."""
    cache = bench.work / ("cache-" + label)
    pull = [bench.python, "-m", "zlayer_registry", "pull"]
    try:
        os.sync()
        cold = _timed_with_requests(bench, "ours-cold", pull + [bench.reference, "--cache",
                                                                str(cache), "-q"], bench.source_dir)
        if bench.manifest_digest not in cold["stdout"]:
            raise BenchError("ours: -q printed %r, not the manifest digest %s"
                             % (cold["stdout"][:200], bench.manifest_digest))
        _check_blobs(bench, cache / "blobs" / "sha256", "ours")
        os.sync()
        by_tag = _timed_with_requests(bench, "ours-warm-tag", pull + [
            bench.reference, "--cache", str(cache), "-q"], bench.source_dir)
        by_digest = _timed_with_requests(bench, "ours-warm-digest", pull + [
            bench.digest_reference, "--cache", str(cache), "-q"], bench.source_dir)
    finally:
        shutil.rmtree(str(cache), ignore_errors=True)
    return {"ours_cold_s": cold["wall_s"], "ours_cpu_s": cold["cpu_s"],
            "ours_rss_bytes": cold["rss_bytes"],
            "ours_cold_requests": len(cold["requests"]),
            "warm_tag_s": by_tag["wall_s"], "warm_tag_requests": by_tag["requests"],
            "warm_digest_s": by_digest["wall_s"], "warm_digest_requests": by_digest["requests"]}


def skopeo_command(bench: Bench, dest: Path) -> List[str]:
    """Returns the skopeo copy that is our pull's counterpart (it verifies every blob too)."""
    cmd = [bench.skopeo]
    if not os.path.exists("/etc/containers/policy.json"):
        cmd.append("--insecure-policy")  # without a policy file skopeo refuses to copy
    return cmd + ["copy", "--src-tls-verify=false", "docker://" + bench.reference,
                  "oci:%s:%s" % (dest, TAG)]


def pull_skopeo(bench: Bench, label: str) -> Dict[str, Any]:
    """Cold ``skopeo copy`` of the image into an empty OCI layout."""
    dest = bench.work / ("skopeo-" + label)
    try:
        os.sync()
        cold = _timed_with_requests(bench, "skopeo-cold", skopeo_command(bench, dest))
        _check_blobs(bench, dest / "blobs" / "sha256", "skopeo")
    finally:
        shutil.rmtree(str(dest), ignore_errors=True)
    return {"skopeo_cold_s": cold["wall_s"], "skopeo_cpu_s": cold["cpu_s"],
            "skopeo_rss_bytes": cold["rss_bytes"],
            "skopeo_cold_requests": len(cold["requests"])}


def pull_plain(bench: Bench, label: str) -> Dict[str, Any]:
    """Cold pull by ``bench/plain_loop.py``: the plain stdlib loop of the issue's premise."""
    dest = bench.work / ("plain-" + label)
    try:
        os.sync()
        cold = _timed_with_requests(bench, "plain-cold", [
            bench.python, str(REPO_ROOT / "bench" / "plain_loop.py"),
            bench.registry.host, bench.repository, TAG, str(dest)])
        _check_blobs(bench, dest, "plain loop")
    finally:
        shutil.rmtree(str(dest), ignore_errors=True)
    return {"plain_cold_s": cold["wall_s"], "plain_cpu_s": cold["cpu_s"],
            "plain_rss_bytes": cold["rss_bytes"]}


def read_blobs_s(bench: Bench) -> float:
    """Returns the time to GET every blob once: 6 threads, one keep-alive connection each."""
    pending = [(b.digest, b.size) for b in reversed(bench.blobs)]  # pop() takes the largest
    lock = threading.Lock()
    errors: List[BaseException] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", bench.registry.port, timeout=60)
        buffer = memoryview(bytearray(_READ_CHUNK_BYTES))
        try:
            while True:
                with lock:
                    if not pending or errors:
                        return
                    digest, size = pending.pop()
                conn.request("GET", "/v2/%s/blobs/%s" % (bench.repository, digest))
                response = conn.getresponse()
                received = 0
                while True:
                    count = response.readinto(buffer)
                    if not count:
                        break
                    received += count
                if response.status != 200 or received != size:
                    raise BenchError("floor GET %s: status %d, %d of %d bytes"
                                     % (digest, response.status, received, size))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            conn.close()

    start_s = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(READ_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed_s = time.perf_counter() - start_s
    if errors:
        raise errors[0]
    return elapsed_s


def hash_blobs_s(bench: Bench) -> float:
    """Returns the time to sha256 every blob once, single thread, from memory."""
    total_s = 0.0
    for blob in bench.blobs:
        data = (bench.layout / "blobs" / "sha256" / _hex(blob.digest)).read_bytes()
        start_s = time.perf_counter()
        actual = hashlib.sha256(data).hexdigest()
        total_s += time.perf_counter() - start_s
        if actual != _hex(blob.digest):
            raise BenchError("floor hash of %s gave sha256:%s" % (blob.digest, actual))
    return total_s


def write_blobs_s(bench: Bench) -> float:
    """Returns the time to write every blob once into a new file (page cache, no fsync).

    Not part of the floor the targets use, but both tools must store what they pull.  In a
    VM the first touch of memory the guest gave back costs several times a warm copy, so
    this row varies more than the others.
    """
    scratch = bench.work / "floor-write"
    scratch.mkdir(exist_ok=True)
    total_s = 0.0
    try:
        for blob in bench.blobs:
            data = memoryview((bench.layout / "blobs" / "sha256" / _hex(blob.digest)).read_bytes())
            start_s = time.perf_counter()
            with open(str(scratch / _hex(blob.digest)), "wb", buffering=0) as f:
                for offset in range(0, len(data), _READ_CHUNK_BYTES):
                    f.write(data[offset:offset + _READ_CHUNK_BYTES])
            total_s += time.perf_counter() - start_s
    finally:
        shutil.rmtree(str(scratch), ignore_errors=True)
    return total_s


_IMPORTTIME_LINE = re.compile(r"^import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(.*)$")


def import_time_s(bench: Bench, compiled: bool = True) -> float:
    """Returns the cumulative ``-X importtime`` of zlayer_registry, in seconds.

    ``compiled=False`` imports the copy that has no .pyc (-B: and never gets one).
    """
    directory = bench.source_dir if compiled else bench.source_dir / "nopyc"
    text = bench.runner.output([bench.python, "-B", "-X", "importtime", "-c",
                                "import zlayer_registry"], directory)
    for line in text.splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if match and match.group(3).strip() == "zlayer_registry":
            return int(match.group(2)) / 1e6
    raise BenchError("no zlayer_registry line in -X importtime output:\n" + text[-1500:])


def measure_startup(bench: Bench) -> Dict[str, Any]:
    """Returns lists of ``-c pass``, ``--help`` and import times for one round."""
    out: Dict[str, List[float]] = {"pass_s": [], "pass_rss_bytes": [], "help_s": [],
                                   "import_s": [], "import_nopyc_s": []}
    for _ in range(STARTUP_SAMPLES_PER_ROUND):
        bare = bench.runner.run("python-pass", [bench.python, "-c", "pass"], bench.source_dir)
        out["pass_s"].append(bare.wall_s)
        out["pass_rss_bytes"].append(bare.max_rss_bytes)
        out["help_s"].append(bench.runner.run("ours-help", [
            bench.python, "-m", "zlayer_registry", "--help"], bench.source_dir).wall_s)
        out["import_s"].append(import_time_s(bench))
        out["import_nopyc_s"].append(import_time_s(bench, compiled=False))
    return out


def measure_round(bench: Bench, number: int) -> Dict[str, Any]:
    """Runs one round; the order of the three pulls rotates between rounds."""
    label = "round%d" % number
    sample: Dict[str, Any] = {"round": number}
    pulls: List[Callable[[Bench, str], Dict[str, Any]]] = [pull_ours, pull_skopeo, pull_plain]
    first = number % len(pulls)
    for pull in pulls[first:] + pulls[:first]:
        sample.update(pull(bench, label))
    sample["read_s"] = read_blobs_s(bench)
    sample["hash_s"] = hash_blobs_s(bench)
    sample["write_s"] = write_blobs_s(bench)
    sample.update(measure_startup(bench))
    return sample


# =============================================================================
# 4. REPORT: statistics, table, JSON
# =============================================================================


@dataclasses.dataclass
class Row:
    """Is one line of the table: samples (one per round, or more), format and target."""

    label: str
    samples: List[float]
    unit: str  # "s", "ms", "x", "MiB" or "n"
    target: Optional[float] = None

    @property
    def median(self) -> float:
        """Returns the median of the samples."""
        return statistics.median(self.samples)

    @property
    def verdict(self) -> str:
        """Returns PASS or MISS for the median against the target, or '' without one."""
        if self.target is None:
            return ""
        return "PASS" if self.median <= self.target + 1e-12 else "MISS"

    def show(self, value: Optional[float]) -> str:
        """Formats a value in the row's unit."""
        if value is None:
            return "-"
        if self.unit == "s":
            return "%.3f s" % value
        if self.unit == "ms":
            return "%.1f ms" % (value * 1000)
        if self.unit == "x":
            return "%.2fx" % value
        if self.unit == "MiB":
            return "%.1f MiB" % (value / MIB)
        return "%g" % value


def _per_round(samples: List[Dict[str, Any]], fn: Callable[[Dict[str, Any]], float]) -> List[float]:
    return [fn(s) for s in samples]


def over_pass_flat(samples: List[Dict[str, Any]], key: str) -> List[float]:
    """Returns each sample of ``key`` minus the median ``-c pass`` of its round."""
    return [v - statistics.median(s["pass_s"]) for s in samples for v in s[key]]


def build_rows(samples: List[Dict[str, Any]]) -> List[Row]:
    """Turns the rounds' samples into table rows; ratios pair numbers of the same round."""
    def col(key: str) -> List[float]:
        return _per_round(samples, lambda s: s[key])

    def flat(key: str) -> List[float]:
        return [v for s in samples for v in s[key]]

    def over_pass(key: str) -> List[float]:
        return _per_round(samples, lambda s: s[key] - statistics.median(s["pass_s"]))

    return [
        Row("cold pull, ours", col("ours_cold_s"), "s"),
        Row("cold pull, skopeo copy", col("skopeo_cold_s"), "s"),
        Row("cold: ours / skopeo", _per_round(
            samples, lambda s: s["ours_cold_s"] / s["skopeo_cold_s"]), "x", TARGET_COLD_RATIO),
        Row("info: cold pull, plain stdlib loop", col("plain_cold_s"), "s"),
        Row("info: plain loop / skopeo", _per_round(
            samples, lambda s: s["plain_cold_s"] / s["skopeo_cold_s"]), "x"),
        Row("info: ours / plain loop", _per_round(
            samples, lambda s: s["ours_cold_s"] / s["plain_cold_s"]), "x"),
        Row("floor: read blobs (%d threads)" % READ_THREADS, col("read_s"), "s"),
        Row("floor: sha256 blobs (1 thread)", col("hash_s"), "s"),
        Row("cold: ours / (read + hash)", _per_round(
            samples, lambda s: s["ours_cold_s"] / (s["read_s"] + s["hash_s"])), "x",
            TARGET_FLOOR_RATIO),
        Row("cold: ours / max(read, hash)", _per_round(
            samples, lambda s: s["ours_cold_s"] / max(s["read_s"], s["hash_s"])), "x"),
        Row("info: write blobs to files (1 thread)", col("write_s"), "s"),
        Row("CPU user+sys, ours (cold)", col("ours_cpu_s"), "s"),
        Row("CPU user+sys, skopeo (cold)", col("skopeo_cpu_s"), "s"),
        Row("peak RSS, ours (cold)", col("ours_rss_bytes"), "MiB", TARGET_RSS_BYTES),
        Row("peak RSS, skopeo (cold)", col("skopeo_rss_bytes"), "MiB"),
        Row("peak RSS, plain loop (cold)", col("plain_rss_bytes"), "MiB"),
        Row("peak RSS, python -c pass", flat("pass_rss_bytes"), "MiB"),
        Row("requests, ours (cold)", col("ours_cold_requests"), "n"),
        Row("requests, skopeo (cold)", col("skopeo_cold_requests"), "n"),
        Row("warm re-pull by tag", col("warm_tag_s"), "ms"),
        Row("warm re-pull by digest", col("warm_digest_s"), "ms"),
        Row("python -c pass", flat("pass_s"), "ms"),
        Row("warm by tag - python -c pass", over_pass("warm_tag_s"), "ms",
            TARGET_WARM_OVERHEAD_S),
        Row("warm by digest - python -c pass", over_pass("warm_digest_s"), "ms",
            TARGET_WARM_OVERHEAD_S),
        Row("requests, warm by tag", _per_round(
            samples, lambda s: len(s["warm_tag_requests"])), "n", TARGET_WARM_TAG_REQUESTS),
        Row("requests, warm by digest", _per_round(
            samples, lambda s: len(s["warm_digest_requests"])), "n",
            TARGET_WARM_DIGEST_REQUESTS),
        Row("import zlayer_registry (importtime)", flat("import_s"), "ms", TARGET_IMPORT_S),
        Row("import, no .pyc (source compiled)", flat("import_nopyc_s"), "ms"),
        Row("-m zlayer_registry --help", flat("help_s"), "ms"),
        Row("--help - python -c pass", over_pass_flat(samples, "help_s"), "ms"),
    ]


def format_table(rows: List[Row]) -> str:
    """Returns the table: metric, median, min, target, verdict."""
    targets = {"x": "<= %.2fx", "ms": "<= %.0f ms", "MiB": "<= %.0f MiB", "n": "<= %g"}
    lines = ["%-38s %12s %12s %12s  %s" % ("metric", "median", "min", "target", "")]
    lines.append("-" * len(lines[0]))
    for row in rows:
        target = ""
        if row.target is not None:
            scale = {"ms": 1000, "MiB": 1 / MIB}.get(row.unit, 1)
            target = targets[row.unit] % (row.target * scale)
        lines.append("%-38s %12s %12s %12s  %s" % (row.label, row.show(row.median),
                                                   row.show(min(row.samples)), target,
                                                   row.verdict))
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(bench: Bench, loadavg_before: Sequence[float]) -> Dict[str, Any]:
    """Returns the machine, tools and date the numbers belong to."""
    python_version = bench.runner.output([bench.python, "-c", "import sys; print(sys.version)"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": bench.python,
        "python_version": python_version.split("\n")[0].strip(),
        "skopeo_version": bench.runner.output([bench.skopeo, "--version"]).strip(),
        "registry_version": bench.runner.output(
            [bench.registry._registry_bin, "--version"]).strip(),
        "loadavg_before": list(loadavg_before),
        "loadavg_after": list(os.getloadavg()),
        "source": describe_source(bench.source_dir / "zlayer_registry.py"),
    }


def describe_source(snapshot: Path) -> str:
    """Returns the snapshot's sha256 prefix and the git commit it was taken from."""
    data = snapshot.read_bytes()
    described = "zlayer_registry.py sha256:%s" % hashlib.sha256(data).hexdigest()[:12]
    git = shutil.which("git")
    if git is None:
        return described
    head = subprocess.run([git, "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if head.returncode != 0:
        return described
    committed = subprocess.run([git, "-C", str(REPO_ROOT), "show", "HEAD:zlayer_registry.py"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    state = "as committed" if committed == data else "with uncommitted changes"
    return "%s, from %s %s" % (described, head.stdout.decode().strip(), state)


def format_report(bench: Bench, machine: Dict[str, Any], samples: List[Dict[str, Any]],
                  rows: List[Row]) -> str:
    """Returns the header (machine, image, commands), the table and the request lists."""
    total_bytes = sum(b.size for b in bench.blobs)
    cold = statistics.median(s["ours_cold_s"] for s in samples)
    head = [
        "zlayer_registry pull benchmark, %s" % machine["date"],
        "machine:  %s CPUs, %s, Linux %s" % (machine["nproc"], machine["cpu"], machine["kernel"]),
        "load:     %s before the rounds, %s after (1/5/15 min; other work skews the times)" % (
            "/".join("%.2f" % x for x in machine["loadavg_before"]),
            "/".join("%.2f" % x for x in machine["loadavg_after"])),
        "python:   %s (%s)" % (machine["python_version"], machine["python"]),
        "source:   %s" % machine["source"],
        "peers:    %s; %s" % (machine["skopeo_version"], machine["registry_version"]),
        "image:    %s, %d blobs, %.1f MiB (manifest %s)" % (
            bench.reference, len(bench.blobs), total_bytes / MIB, bench.manifest_digest),
        "ours:     %s -m zlayer_registry pull REF --cache EMPTY -q  (%.0f MiB/s cold)" % (
            bench.python, total_bytes / MIB / cold),
        "skopeo:   %s" % " ".join(skopeo_command(bench, Path("EMPTY"))),
        "rounds:   %d timed after 1 warm-up; start-up rows have %d samples per round" % (
            len(samples), STARTUP_SAMPLES_PER_ROUND),
        "rss:      %s; requests: the registry's access log" % bench.runner.rss_method,
        "",
    ]
    last = samples[-1]
    tail = [
        "",
        "requests of the last warm re-pull by tag:    %s" % (
            ", ".join(last["warm_tag_requests"]) or "none"),
        "requests of the last warm re-pull by digest: %s" % (
            ", ".join(last["warm_digest_requests"]) or "none"),
    ]
    misses = [r.label for r in rows if r.verdict == "MISS"]
    tail.append("targets: %d of %d met%s" % (
        sum(1 for r in rows if r.verdict == "PASS"), sum(1 for r in rows if r.verdict),
        "; missed: " + "; ".join(misses) if misses else ""))
    return "\n".join(head) + format_table(rows) + "\n" + "\n".join(tail)


def write_json(path: Path, bench: Bench, machine: Dict[str, Any],
               samples: List[Dict[str, Any]], rows: List[Row]) -> None:
    """Writes machine, image, every round's raw numbers and the summary rows."""
    data = {
        "machine": machine,
        "image": {"reference": bench.reference, "manifest_digest": bench.manifest_digest,
                  "blobs": len(bench.blobs), "size_bytes": sum(b.size for b in bench.blobs)},
        "rounds": samples,
        "summary": [{"metric": r.label, "unit": r.unit, "median": r.median,
                     "min": min(r.samples), "target": r.target, "verdict": r.verdict or None,
                     "samples": r.samples} for r in rows],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


# =============================================================================
# 5. MAIN
# =============================================================================


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="bench/pull.py", description=__doc__.split("\n")[0],
        epilog="Targets: cold <= 0.5x skopeo and <= 1.25x (read + hash); warm re-pull "
               "<= 60 ms over python -c pass with <= 2 requests (0 by digest); peak RSS "
               "<= 32 MiB; import <= 30 ms.")
    parser.add_argument("--rounds", type=int, default=5, metavar="N",
                        help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--small", action="store_true",
                        help="a ~30 MB image instead of ~300 MB, for a quick check")
    parser.add_argument("--python", default=sys.executable, metavar="PATH",
                        help="interpreter that runs our CLI (default: this one)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (image, registry storage, logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    found = shutil.which(args.python)
    if found is None:
        parser.error("--python %s: not found" % args.python)
    args.python = found
    return args


def prepare(args: argparse.Namespace, work: Path, runner: Runner) -> Bench:
    """Builds the image in ``work`` and describes the run (the registry is not started)."""
    repository = "bench/small" if args.small else "bench/big"
    layers = (benchmark_layers(big_layer_bytes=5 * MIB, small_files=1_000) if args.small
              else benchmark_layers())
    layout = work / "layout"
    print("building %s image in %s ..." % ("~30 MB" if args.small else "~300 MB", layout),
          file=sys.stderr, flush=True)
    image = build_image(layout, TAG, layers=layers)
    # Every run imports one snapshot, so an edit to the checkout in the middle of a run
    # cannot mix two versions into one set of numbers.  It is byte-compiled up front, as
    # the first run on a host leaves it: with PYTHONDONTWRITEBYTECODE set (or a read-only
    # directory) every run would compile the source again.  `nopyc` keeps a copy that is
    # never compiled, for the first-run import row.
    source_dir = work / "source"
    for directory in (source_dir, source_dir / "nopyc"):
        directory.mkdir()
        shutil.copy2(str(REPO_ROOT / "zlayer_registry.py"), str(directory / "zlayer_registry.py"))
    runner.output([args.python, "-m", "py_compile", str(source_dir / "zlayer_registry.py")])
    registry = LoggedRegistry(work / "registry")
    return Bench(python=args.python, skopeo=registry._skopeo_bin, runner=runner,
                 registry=registry, work=work, layout=layout, repository=repository,
                 image=image, manifest_digest=image.digest, source_dir=source_dir)


def publish(bench: Bench) -> None:
    """Starts the registry and pushes the image into it with skopeo."""
    bench.registry.start()
    print("registry on %s; pushing with skopeo ..." % bench.registry.host, file=sys.stderr,
          flush=True)
    pushed = bench.registry.push(bench.layout, TAG, bench.repository)
    if pushed != bench.manifest_digest:
        raise BenchError("skopeo stored manifest %s, the layout has %s"
                         % (pushed, bench.manifest_digest))


def run_rounds(bench: Bench, rounds: int) -> List[Dict[str, Any]]:
    """Runs the untimed warm-up round, then ``rounds`` timed ones."""
    print("warm-up round ...", file=sys.stderr, flush=True)
    measure_round(bench, 0)
    samples = []
    for number in range(1, rounds + 1):
        sample = measure_round(bench, number)
        print("round %d/%d: ours %.3f s, skopeo %.3f s, plain loop %.3f s, read %.3f s, "
              "hash %.3f s, warm %.0f ms"
              % (number, rounds, sample["ours_cold_s"], sample["skopeo_cold_s"],
                 sample["plain_cold_s"], sample["read_s"], sample["hash_s"],
                 sample["warm_tag_s"] * 1000),
              file=sys.stderr, flush=True)
        samples.append(sample)
    return samples


def _child_env(work: Path) -> Dict[str, str]:
    """Returns the environment of the timed tools: no credentials files of the user's."""
    env = dict(os.environ)
    auth_dir = work / "auth"
    auth_dir.mkdir()
    # Both tools would otherwise read ~/.docker/config.json (and maybe run a credential
    # helper) for 127.0.0.1; an empty directory keeps that out of the timings.
    env["DOCKER_CONFIG"] = str(auth_dir)
    env["REGISTRY_AUTH_FILE"] = str(auth_dir / "auth.json")
    return env


def _raise_keyboard_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; returns 0, 1 on a failed step, 130 on interrupt."""
    args = parse_args(argv)
    # SIGTERM takes the same way out as Ctrl-C, through every finally below.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-"))
    runner: Optional[Runner] = None
    bench: Optional[Bench] = None
    try:
        (work / "logs").mkdir()
        runner = Runner(_child_env(work), work / "logs")
        bench = prepare(args, work, runner)
        publish(bench)
        loadavg_before = os.getloadavg()
        samples = run_rounds(bench, args.rounds)
        machine = machine_info(bench, loadavg_before)
        rows = build_rows(samples)
        print(format_report(bench, machine, samples, rows))
        if args.json:
            write_json(args.json, bench, machine, samples, rows)
        return 0
    except BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if runner is not None:
            runner.kill_live()
        if bench is not None:
            bench.registry.stop()
        if args.keep:
            print("bench: kept %s" % work, file=sys.stderr)
        else:
            shutil.rmtree(str(work), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
