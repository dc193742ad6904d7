#!/usr/bin/env python3
"""Benchmarks ``zlayer_registry serve --upstream`` (the pull-through mirror) in front of
the CNCF distribution registry 2.8.

Usage::

    python3 bench/mirror.py [--rounds 3] [--small] [--python PATH]

It builds the ~300 MB image of ``_oci_testkit.benchmark_layers()`` (``--small``: ~30 MB),
has skopeo push it into distribution (``docker-registry serve``), and per round:

    direct     ``skopeo copy docker://DISTRIBUTION/bench/big:v1 oci:DIR``
    first      the same copy through a new mirror with an empty store (every blob
               crosses from distribution through the mirror as the client reads it)
    second     the same copy from that mirror again (a second host: all from its store)

Medians and per-round ratios first/direct (target <= 1.3) and second/direct (target
<= 1.1), and the mirror's peak RSS (VmHWM, polled).  Every server is stopped by PID.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _oci_testkit as kit  # noqa: E402
from serve import OurServer, prepare, push_layout, skopeo_pull  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-mirror-"))
    distribution = None
    mirrors = []
    try:
        image, size, source, env, skopeo = prepare(args, work)
        distribution = kit.DistributionRegistry(work / "distribution")
        distribution.start()
        push_layout(skopeo, work, distribution.host)
        print(f"image {image.digest[:19]}: {len(image.layers)} layers, {size / 2**20:.1f} MiB",
              file=sys.stderr, flush=True)
        rows = {k: [] for k in ("direct", "first", "second")}
        peak = 0
        for round_no in range(args.rounds):
            root = work / f"mirror-{round_no}"
            mirror = OurServer(args.python, root, env, source,
                               "--upstream", f"http://{distribution.host}")
            mirrors.append(mirror)
            if round_no % 2:  # alternate which goes first (the page cache warms both ways)
                rows["direct"].append(skopeo_pull(skopeo, distribution.host, work / "one"))
                rows["first"].append(skopeo_pull(skopeo, mirror.host, work / "one"))
            else:
                rows["first"].append(skopeo_pull(skopeo, mirror.host, work / "one"))
                rows["direct"].append(skopeo_pull(skopeo, distribution.host, work / "one"))
            rows["second"].append(skopeo_pull(skopeo, mirror.host, work / "one"))
            mirror.stop()
            peak = max(peak, mirror.peak_kib)
            shutil.rmtree(root, ignore_errors=True)
            print(f"round {round_no + 1}: " + ", ".join(
                f"{k} {v[-1]:.3f} s" for k, v in rows.items()), file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        first = [f / d for f, d in zip(rows["first"], rows["direct"])]
        second = [s / d for s, d in zip(rows["second"], rows["direct"])]
        print(f"skopeo pull of {size / 2**20:.1f} MiB ({args.rounds} rounds, medians): direct "
              f"from distribution {med['direct']:.3f} s, first through the mirror "
              f"{med['first']:.3f} s, second from the mirror {med['second']:.3f} s")
        print(f"  first/direct per round: {', '.join(f'{r:.3f}' for r in first)} "
              f"(median {statistics.median(first):.3f}; target <= 1.3)")
        print(f"  second/direct per round: {', '.join(f'{r:.3f}' for r in second)} "
              f"(median {statistics.median(second):.3f}; target <= 1.1)")
        print(f"the mirror's peak RSS: {peak / 1024:.1f} MiB")
    finally:
        for mirror in mirrors:
            mirror.stop()
        if distribution is not None:
            distribution.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
