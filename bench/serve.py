#!/usr/bin/env python3
"""Benchmarks ``zlayer_registry serve`` against the CNCF distribution registry 2.8.

Usage::

    python3 bench/serve.py [--rounds 3] [--small] [--python PATH] [--clients 8]

It builds the ~300 MB image of ``_oci_testkit.benchmark_layers()`` (``--small``: ~30 MB)
in an OCI layout, starts distribution (``docker-registry serve``) and our server
(``PYTHON -m zlayer_registry serve``) on 127.0.0.1, and has skopeo push the image into
both (``--preserve-digests``).  Then, per round, in alternating order:

    one pull      ``skopeo copy docker://HOST/bench/big:v1 oci:DIR`` from each server
    N at once     N such skopeo copies started together (``--clients``), from each server

Wall times (the N-at-once figure is the slowest of the N), medians and per-round ratios
ours/distribution; and our server's peak RSS (VmHWM, polled) over the whole run.
Both servers are stopped by PID on every exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, List, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import _oci_testkit as kit  # noqa: E402


class OurServer:
    """``python -m zlayer_registry serve`` on a free port, its RSS polled."""

    def __init__(self, python: str, root: Path, env: dict, cwd: Path, *extra: str) -> None:
        self.port = kit.free_port()
        self.proc = subprocess.Popen(
            [python, "-m", "zlayer_registry", "serve", "--root", str(root), "--port",
             str(self.port), "--quiet", *extra], env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()
        if "serving" not in line:
            raise SystemExit(f"our server did not start: {line}")
        self.peak_kib = 0
        self._watch = threading.Thread(target=self._poll, daemon=True)
        self._watch.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _poll(self) -> None:
        while self.proc.poll() is None:
            try:
                with open(f"/proc/{self.proc.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def skopeo_pull(skopeo: str, host: str, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([skopeo, "--insecure-policy", "copy", "--retry-times", "0",
                           "--src-tls-verify=false", "--src-no-creds",
                           f"docker://{host}/bench/big:v1", f"oci:{dest}:v1"],
                          stdin=subprocess.DEVNULL, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"skopeo pull from {host} failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def many_pulls(skopeo: str, host: str, work: Path, clients: int) -> float:
    """Start ``clients`` pulls at once; return the slowest one's wall time."""
    times: List[float] = []
    errors: List[BaseException] = []

    def one(n: int) -> None:
        try:
            times.append(skopeo_pull(skopeo, host, work / f"many-{n}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for n in range(clients):
        shutil.rmtree(work / f"many-{n}", ignore_errors=True)
    return max(times)


def prepare(args: argparse.Namespace, work: Path) -> Tuple[Any, int, Path, dict, str]:
    """Build the bench image (``--small``: ~30 MB) and a compiled copy of the module;
    return (image, its size, the copy's directory, the environment, skopeo)."""
    layers = kit.benchmark_layers(big_layer_bytes=5 * 1024 * 1024, small_files=1_000) \
        if args.small else kit.benchmark_layers()
    print("building the image ...", file=sys.stderr, flush=True)
    image = kit.build_image(work / "layout", "v1", layers=layers)
    size = sum(b.size for b in [image.config, *image.layers])
    source = work / "source"
    source.mkdir()
    shutil.copy2(str(REPO_ROOT / "zlayer_registry.py"), str(source / "zlayer_registry.py"))
    subprocess.run([args.python, "-m", "py_compile", str(source / "zlayer_registry.py")],
                   check=True)
    env = dict(os.environ, PYTHONPATH=str(source), HOME=str(work))
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise SystemExit("skopeo is not installed")
    return image, size, source, env, skopeo


def push_layout(skopeo: str, work: Path, host: str) -> None:
    """Copy the bench image from ``work/layout`` into the registry at ``host`` as bench/big:v1."""
    subprocess.run([skopeo, "--insecure-policy", "copy", "--preserve-digests",
                    "--dest-tls-verify=false", f"oci:{work / 'layout'}:v1",
                    f"docker://{host}/bench/big:v1"], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-serve-"))
    distribution = None
    ours = None
    try:
        image, size, source, env, skopeo = prepare(args, work)
        distribution = kit.DistributionRegistry(work / "distribution")
        distribution.start()
        ours = OurServer(args.python, work / "store", env, source)
        for host in (distribution.host, ours.host):
            push_layout(skopeo, work, host)
        print(f"image {image.digest[:19]}: {len(image.layers)} layers, {size / 2**20:.1f} MiB; "
              f"{args.clients} clients at once", file=sys.stderr, flush=True)
        rows = {k: [] for k in ("ours", "distribution", "ours_many", "distribution_many")}
        for round_no in range(args.rounds):
            order = [("distribution", distribution.host), ("ours", ours.host)]
            if round_no % 2:
                order.reverse()
            for name, host in order:
                rows[name].append(skopeo_pull(skopeo, host, work / "one"))
            for name, host in order:
                rows[f"{name}_many"].append(many_pulls(skopeo, host, work, args.clients))
            print(f"round {round_no + 1}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in rows.items()), file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        one = [o / d for o, d in zip(rows["ours"], rows["distribution"])]
        many = [o / d for o, d in zip(rows["ours_many"], rows["distribution_many"])]
        alone = [m / o for m, o in zip(rows["ours_many"], rows["ours"])]
        alone_d = [m / o for m, o in zip(rows["distribution_many"], rows["distribution"])]
        print(f"skopeo pull of {size / 2**20:.1f} MiB ({args.rounds} rounds, medians): from "
              f"ours {med['ours']:.3f} s, from distribution {med['distribution']:.3f} s")
        print(f"  ours/distribution per round: {', '.join(f'{r:.3f}' for r in one)} "
              f"(median {statistics.median(one):.3f}; target <= 1.1)")
        print(f"{args.clients} pulls at once (the slowest): ours {med['ours_many']:.3f} s, "
              f"distribution {med['distribution_many']:.3f} s; ours/distribution "
              f"{', '.join(f'{r:.3f}' for r in many)}")
        print(f"  slowest of {args.clients} / one alone: ours "
              f"{', '.join(f'{r:.2f}' for r in alone)}, distribution "
              f"{', '.join(f'{r:.2f}' for r in alone_d)} (target for ours <= 1.5)")
        print(f"our server's peak RSS: {ours.peak_kib / 1024:.1f} MiB (target <= 64)")
    finally:
        if ours is not None:
            ours.stop()
        if distribution is not None:
            distribution.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
