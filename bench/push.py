#!/usr/bin/env python3
"""Benchmarks ``zlayer_registry push`` against skopeo and a bare stdlib upload loop.

Usage::

    python3 bench/push.py [--rounds 3] [--small] [--python PATH]

It builds the ~300 MB image of ``_oci_testkit.benchmark_layers()`` (``--small``: ~30 MB)
in an OCI layout and, in every round, starts three fresh CNCF distribution registries
(``docker-registry serve`` on 127.0.0.1, no blob known to any) and pushes the layout
into each, alternating the order between rounds:

    ours          ``PYTHON -m zlayer_registry push oci:LAYOUT:v1 HOST/bench/big:v1 -q``
    skopeo        ``skopeo copy --preserve-digests oci:LAYOUT:v1 docker://HOST/bench/big:v1``
    bare loop     6 threads, POST then one streamed monolithic PUT ?digest= per blob
                  (largest first), then the manifest PUT: the floor the registry's ingest sets

and then, into ours's registry: a re-push of the same image (every blob present)
against ``PYTHON -c pass``, and a push into a new repository (blobs mounted from where
the cache saw them).  Wall time of the whole process and its peak RSS (VmHWM, polled).
It prints medians and per-round ratios.  Registries are stopped by PID on every exit.
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
from typing import List, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import _oci_testkit as kit  # noqa: E402

BARE_LOOP = r'''
import hashlib, http.client, json, os, sys, threading
host, port, layout, repository, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
index = json.load(open(os.path.join(layout, "index.json")))
top = index["manifests"][0]
def blob(d): return os.path.join(layout, "blobs", *d.split(":"))
manifest = json.load(open(blob(top["digest"])))
blobs = sorted([manifest["config"]] + manifest["layers"], key=lambda d: -d["size"])
lock = threading.Lock()
def worker():
    conn = http.client.HTTPConnection(host, port)
    while True:
        with lock:
            if not blobs: return
            d = blobs.pop(0)
        conn.request("POST", f"/v2/{repository}/blobs/uploads/")
        r = conn.getresponse(); r.read()
        location = r.getheader("Location")
        path = location.split(f"{host}:{port}", 1)[-1]
        with open(blob(d["digest"]), "rb") as f:
            conn.putrequest("PUT", f"{path}{'&' if '?' in path else '?'}digest={d['digest']}")
            conn.putheader("Content-Length", str(d["size"]))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
            while True:
                chunk = f.read(1 << 20)
                if not chunk: break
                conn.send(chunk)
        r = conn.getresponse(); r.read()
        assert r.status == 201, r.status
threads = [threading.Thread(target=worker) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
conn = http.client.HTTPConnection(host, port)
raw = open(blob(top["digest"]), "rb").read()
conn.request("PUT", f"/v2/{repository}/manifests/{tag}", body=raw,
             headers={"Content-Type": top["mediaType"]})
r = conn.getresponse(); r.read()
assert r.status == 201, r.status
'''


def timed(cmd: List[str], env: dict, cwd: Path) -> Tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS MiB) of that process.

    The peak is VmHWM from /proc/PID/status, polled every few milliseconds (a
    lower bound): wait4's ru_maxrss would carry this process's own size into a
    child forked from it (Linux keeps the pre-exec peak), as bench/pull.py says.
    """
    subprocess.run(["sync"], check=False)
    start = time.perf_counter()
    # In ``cwd`` (the compiled copy's directory): ``-m`` looks there first, and a
    # checkout without bytecode would be compiled on every run.
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.003)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.wait()
    elapsed = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err.strip()[-500:]}")
    return elapsed, peak[0] / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-push-"))
    registries: List[kit.DistributionRegistry] = []
    try:
        layers = kit.benchmark_layers(big_layer_bytes=5 * 1024 * 1024, small_files=1_000) \
            if args.small else kit.benchmark_layers()
        print("building the image ...", file=sys.stderr, flush=True)
        image = kit.build_image(work / "layout", "v1", layers=layers)
        source = work / "source"
        source.mkdir()
        shutil.copy2(str(REPO_ROOT / "zlayer_registry.py"), str(source / "zlayer_registry.py"))
        subprocess.run([args.python, "-m", "py_compile", str(source / "zlayer_registry.py")],
                       check=True)
        env = dict(os.environ, PYTHONPATH=str(source), HOME=str(work))
        env.pop("DOCKER_CONFIG", None)
        size = sum(b.size for b in [image.config, *image.layers])
        print(f"image {image.digest[:19]}: {len(image.layers)} layers, {size / 2**20:.1f} MiB",
              file=sys.stderr)
        skopeo = shutil.which("skopeo")
        rows = {name: [] for name in ("ours", "skopeo", "bare", "repush", "newrepo", "pass")}
        rss: List[float] = []
        for round_no in range(args.rounds):
            order = ["ours", "skopeo", "bare"]
            order = order[round_no % 3:] + order[:round_no % 3]
            hosts = {}
            for name in order:
                registry = kit.DistributionRegistry(work / f"reg-{round_no}-{name}")
                registry.start()
                registries.append(registry)
                hosts[name] = registry
            cache = work / f"cache-{round_no}"
            for name in order:
                host = hosts[name].host
                if name == "ours":
                    seconds, peak = timed([args.python, "-m", "zlayer_registry", "push",
                                           f"oci:{work / 'layout'}:v1", f"{host}/bench/big:v1",
                                           "-q", "--cache", str(cache)], env, source)
                    rss.append(peak)
                elif name == "skopeo":
                    seconds, _ = timed([skopeo, "--insecure-policy", "copy", "--retry-times",
                                        "0", "--preserve-digests", "--dest-tls-verify=false",
                                        "--dest-no-creds", f"oci:{work / 'layout'}:v1",
                                        f"docker://{host}/bench/big:v1"], env, source)
                else:
                    h, p = host.split(":")
                    seconds, _ = timed([args.python, "-c", BARE_LOOP, h, p,
                                        str(work / "layout"), "bench/big", "v1"], env, source)
                rows[name].append(seconds)
            host = hosts["ours"].host
            for name, target in (("repush", "bench/big"), ("newrepo", f"bench/new{round_no}")):
                seconds, _ = timed([args.python, "-m", "zlayer_registry", "push",
                                    f"oci:{work / 'layout'}:v1", f"{host}/{target}:v1", "-q",
                                    "--cache", str(cache)], env, source)
                rows[name].append(seconds)
            rows["pass"].append(timed([args.python, "-c", "pass"], env, source)[0])
            for registry in list(registries):
                registry.stop()
                registries.remove(registry)
            print(f"round {round_no + 1}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in rows.items()), file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        ratio_skopeo = [o / s for o, s in zip(rows["ours"], rows["skopeo"])]
        ratio_bare = [o / b for o, b in zip(rows["ours"], rows["bare"])]
        print(f"push into a fresh registry ({size / 2**20:.1f} MiB, {args.rounds} rounds, "
              f"medians): ours {med['ours']:.3f} s, skopeo {med['skopeo']:.3f} s, "
              f"bare loop {med['bare']:.3f} s")
        print(f"  ours/skopeo per round: {', '.join(f'{r:.3f}' for r in ratio_skopeo)} "
              f"(median {statistics.median(ratio_skopeo):.3f}; target <= 0.75)")
        print(f"  ours/bare loop per round: {', '.join(f'{r:.3f}' for r in ratio_bare)} "
              f"(median {statistics.median(ratio_bare):.3f}; target <= 1.05)")
        print(f"  ours peak RSS: {max(rss):.1f} MiB (target <= 32)")
        print(f"re-push (every blob there): {med['repush']:.3f} s; python -c pass "
              f"{med['pass']:.3f} s; over it {med['repush'] - med['pass']:.3f} s "
              f"(target <= 0.3)")
        print(f"push into a new repository (mounts): {med['newrepo']:.3f} s; over python -c "
              f"pass {med['newrepo'] - med['pass']:.3f} s")
    finally:
        for registry in registries:
            registry.stop()
        shutil.rmtree(str(work), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
