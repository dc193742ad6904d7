#!/usr/bin/env python3
"""Benchmarks the S3 fleet cache against SeaweedFS, the registry alone and boto3.

Usage::

    python3 bench/s3.py [--rounds 3] [--small] [--python PATH]

Builds the ~300 MB image of ``_oci_testkit.benchmark_layers()`` (``--small``: ~30 MB),
pushes it into distribution 2.8 with skopeo, starts SeaweedFS (its S3 gateway checks
SigV4), and per round measures, each a fresh process with a cold local cache:

    registry    ``pull`` from distribution, no remote cache
    bare-put    a bare loop: the same blobs PUT to S3, six at a time (http.client,
                signed with the blob's digest, read from the registry pull's files)
    first       ``pull --remote-cache s3://bench/rN``, the bucket prefix empty (the
                registry download and the uploads overlap; the command waits for both)
    bare-get    a bare loop: the blobs GET from S3 six at a time, hashed, written to files
    second      ``pull --remote-cache s3://bench/rN`` again into another empty local cache
                (everything comes from S3)

then the put and get of one 48 MiB blob, ours (S3BlobCache) against boto3's
``upload_file``/``download_file`` and ``put_object``/``get_object``.

Before each timed step the bench waits for SeaweedFS to go idle (it works on for seconds
after an ingest, which slowed whatever came next).

Targets (issue 15): second <= 1.1 x registry, or <= 1.05 x bare-get where SeaweedFS's
own speed forbids the first; first <= 1.1 x max(registry, bare-put); peak RSS of a
pull <= 32 MiB; 48 MiB put and get >= 0.9 x boto3's throughput.  Every server is
stopped by PID; boto3 is imported here only, never by the module.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _oci_testkit as kit  # noqa: E402
import _seaweedfs  # noqa: E402
import zlayer_registry as zr  # noqa: E402
from pull import Runner  # noqa: E402
from serve import prepare, push_layout  # noqa: E402

BUCKET = "bench"
PARALLEL = 6
MIB = 1024 * 1024


def _signed(method: str, url: str, payload: str, extra: Dict[str, str]) -> Dict[str, str]:
    headers = dict(extra)
    headers.update(zr.sigv4_headers(method, url, headers, payload,
                                    access_key=_seaweedfs.ACCESS_KEY,
                                    secret_key=_seaweedfs.SECRET_KEY, region="us-east-1",
                                    service="s3", amz_date=zr._amz_date()))
    return headers


def settle(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until SeaweedFS is idle (under 5% of a CPU over 0.5 s): after taking
    300 MB it keeps working for seconds, which would slow whatever runs next."""
    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu()
        time.sleep(0.5)
        if cpu() - before < 0.025:
            return


def _parallel(work: List, job) -> float:
    """Run ``job`` over ``work`` on PARALLEL threads; return the wall time."""
    queue = list(work)
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                if not queue:
                    return
                item = queue.pop()
            job(item)
    start = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bare_put(endpoint: str, prefix: str, blobs: List[Path]) -> float:
    """PUT each blob file once (digest-signed), six at a time; return the wall time."""
    host = endpoint.split("://", 1)[1]

    def put(path: Path) -> None:
        hex_digest = path.name
        key = f"{prefix}/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        url = f"{endpoint}/{BUCKET}/{key}"
        size = path.stat().st_size
        conn = http.client.HTTPConnection(host, blocksize=MIB)
        with open(path, "rb") as f:
            conn.request("PUT", f"/{BUCKET}/{key}", body=f, headers=_signed(
                "PUT", url, hex_digest, {"Content-Length": str(size)}))
            response = conn.getresponse()
            response.read()
        conn.close()
        assert response.status == 200, response.status
    return _parallel(blobs, put)


def bare_get(endpoint: str, prefix: str, digests: List[str], out: Path) -> float:
    """GET each blob, hash it and write it to a file, six at a time; return the wall time."""
    host = endpoint.split("://", 1)[1]
    out.mkdir(parents=True, exist_ok=True)

    def get(hex_digest: str) -> None:
        key = f"{prefix}/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        url = f"{endpoint}/{BUCKET}/{key}"
        conn = http.client.HTTPConnection(host)
        conn.request("GET", f"/{BUCKET}/{key}", headers=_signed("GET", url, zr._EMPTY_SHA256,
                                                                 {}))
        response = conn.getresponse()
        hasher = hashlib.sha256()
        view = memoryview(bytearray(MIB))  # one buffer, received into: no copies
        with open(out / hex_digest, "wb") as f:
            while True:
                count = response.readinto(view)
                if not count:
                    break
                hasher.update(view[:count])
                f.write(view[:count])
        conn.close()
        assert response.status == 200 and hasher.hexdigest() == hex_digest
    return _parallel(digests, get)


def blob_throughput(seaweed: _seaweedfs.SeaweedFS, work: Path, rounds: int) -> Dict[str, list]:
    """Put and get one 48 MiB blob: ours against boto3, alternating; seconds per round."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    data = os.urandom(48 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = work / "blob48"
    path.write_bytes(data)
    ours = zr.S3BlobCache(BUCKET, prefix="blob48", endpoint=seaweed.endpoint, environ={},
                          region="us-east-1", credentials=zr.S3Credentials(
                              _seaweedfs.ACCESS_KEY, _seaweedfs.SECRET_KEY))
    client = boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                          aws_access_key_id=_seaweedfs.ACCESS_KEY,
                          aws_secret_access_key=_seaweedfs.SECRET_KEY)
    config = TransferConfig()  # what the AWS CLI uses: 8 MiB parts, 10 threads
    rows: Dict[str, list] = {k: [] for k in ("ours_put", "boto3_upload_file", "boto3_put_object",
                                             "ours_get", "boto3_download_file",
                                             "boto3_get_object")}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        rows[name].append(time.perf_counter() - start)

    def ours_get():
        stream = ours.open_stream(digest)
        hasher = hashlib.sha256()
        with stream, open(work / "got-ours", "wb") as f:
            view = memoryview(bytearray(MIB))
            while True:
                n = stream.readinto1(view)
                if not n:
                    break
                hasher.update(view[:n])
                f.write(view[:n])
        assert "sha256:" + hasher.hexdigest() == digest

    def boto_get_object():
        body = client.get_object(Bucket=BUCKET, Key="boto/blob")["Body"]
        hasher = hashlib.sha256()
        with open(work / "got-boto", "wb") as f:
            for chunk in iter(lambda: body.read(MIB), b""):
                hasher.update(chunk)
                f.write(chunk)
        assert "sha256:" + hasher.hexdigest() == digest

    for n in range(rounds):
        order = [("ours_put", lambda: ours.put_path(str(path), digest)),
                 ("boto3_upload_file", lambda: client.upload_file(str(path), BUCKET, "boto/blob",
                                                                   Config=config)),
                 ("boto3_put_object", lambda: client.put_object(
                     Bucket=BUCKET, Key="boto/blob2", Body=open(path, "rb")))]
        for name, fn in (order if n % 2 == 0 else order[::-1]):
            timed(name, fn)
        order = [("ours_get", ours_get),
                 ("boto3_download_file", lambda: client.download_file(
                     BUCKET, "boto/blob", str(work / "got-dl"), Config=config)),
                 ("boto3_get_object", boto_get_object)]
        for name, fn in (order if n % 2 == 0 else order[::-1]):
            timed(name, fn)
        print(f"blob round {n + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()),
              file=sys.stderr, flush=True)
    ours.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zlayer-bench-s3-"))
    distribution = seaweed = None
    runner = None
    try:
        image, size, source, env, skopeo = prepare(args, work)
        distribution = kit.DistributionRegistry(work / "distribution")
        distribution.start()
        push_layout(skopeo, work, distribution.host)
        seaweed = _seaweedfs.SeaweedFS(work / "seaweedfs", volume_size_limit_mb=8192).start()
        seaweed.create_bucket(BUCKET)
        env = dict(env, **seaweed.env())
        runner = Runner(env, work)
        # A fresh SeaweedFS allocates its volumes on the first writes (seconds): warm it up
        # with one multipart upload and one PUT, so round 1 measures what the others do.
        warm = zr.S3BlobCache(BUCKET, prefix="warmup", endpoint=seaweed.endpoint, environ={},
                              region="us-east-1", multipart_threshold_bytes=8 * MIB,
                              part_bytes=8 * MIB, credentials=zr.S3Credentials(
                                  _seaweedfs.ACCESS_KEY, _seaweedfs.SECRET_KEY))
        blob = os.urandom(48 * MIB)
        (work / "warmup").write_bytes(blob)
        warm.put_path(str(work / "warmup"), "sha256:" + hashlib.sha256(blob).hexdigest())
        warm.put("sha256:" + hashlib.sha256(blob[:MIB]).hexdigest(), blob[:MIB])
        warm.close()
        reference = f"{distribution.host}/bench/big:v1"
        digests = [b.digest.split(":")[1] for b in [image.config, *image.layers]]
        print(f"image {image.digest[:19]}: {len(image.layers)} layers, {size / MIB:.1f} MiB",
              file=sys.stderr, flush=True)
        rows: Dict[str, list] = {k: [] for k in ("registry", "bare_put", "first", "bare_get",
                                                 "second")}
        rss: Dict[str, list] = {k: [] for k in ("registry", "first", "second")}
        pull = [args.python, "-m", "zlayer_registry", "pull", reference, "-q"]
        for n in range(args.rounds):
            prefix = f"r{n}"
            settle(seaweed.process.pid)
            run = runner.run(f"registry-{n}", pull + ["--cache", str(work / f"registry-{n}")],
                             cwd=work)  # not the checkout: its module is not compiled
            rows["registry"].append(run.wall_s)
            rss["registry"].append(run.max_rss_bytes)
            files = [work / f"registry-{n}" / "blobs" / "sha256" / d for d in digests]
            # The first host and the bare upload take turns at going first.
            steps = ["first", "bare_put"] if n % 2 == 0 else ["bare_put", "first"]
            for step in steps:
                settle(seaweed.process.pid)
                if step == "bare_put":
                    rows["bare_put"].append(bare_put(seaweed.endpoint, f"bare{n}", files))
                    continue
                run = runner.run(f"first-{n}", pull + ["--cache", str(work / f"first-{n}"),
                                                       "--remote-cache",
                                                       f"s3://{BUCKET}/{prefix}"], cwd=work)
                rows["first"].append(run.wall_s)
                rss["first"].append(run.max_rss_bytes)
            settle(seaweed.process.pid)
            rows["bare_get"].append(bare_get(seaweed.endpoint, prefix, digests,
                                             work / f"bare-get-{n}"))
            settle(seaweed.process.pid)
            run = runner.run(f"second-{n}", pull + ["--cache", str(work / f"second-{n}"),
                                                    "--remote-cache", f"s3://{BUCKET}/{prefix}"],
                             cwd=work)
            rows["second"].append(run.wall_s)
            rss["second"].append(run.max_rss_bytes)
            for name in ("registry", "first", "second"):
                shutil.rmtree(work / f"{name}-{n}", ignore_errors=True)
            shutil.rmtree(work / f"bare-get-{n}", ignore_errors=True)
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()),
                  file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        second_reg = [s / r for s, r in zip(rows["second"], rows["registry"])]
        second_bare = [s / b for s, b in zip(rows["second"], rows["bare_get"])]
        first_ratio = [f / max(r, p) for f, r, p in zip(rows["first"], rows["registry"],
                                                         rows["bare_put"])]
        print(f"pull of {size / MIB:.1f} MiB, {args.rounds} rounds (medians): " + ", ".join(
            f"{k} {v:.3f} s" for k, v in med.items()))
        print(f"second/registry {statistics.median(second_reg):.2f} (target <= 1.1; rounds "
              + ", ".join(f"{x:.2f}" for x in second_reg) + ")")
        print(f"second/bare-get {statistics.median(second_bare):.2f} (target <= 1.05; rounds "
              + ", ".join(f"{x:.2f}" for x in second_bare) + ")")
        print(f"first/max(registry, bare-put) {statistics.median(first_ratio):.2f} (target <= "
              "1.1; rounds " + ", ".join(f"{x:.2f}" for x in first_ratio) + ")")
        print("peak RSS (MiB, max of rounds): " + ", ".join(
            f"{k} {max(v) / MIB:.1f}" for k, v in rss.items()) + " (target <= 32)")
        blob = blob_throughput(seaweed, work, max(3, args.rounds))
        bmed = {k: statistics.median(v) for k, v in blob.items()}
        print("48 MiB blob (medians, s): " + ", ".join(f"{k} {v:.3f}" for k, v in bmed.items()))
        print(f"put throughput ours/boto3 upload_file {bmed['boto3_upload_file'] / bmed['ours_put']:.2f}, "
              f"ours/boto3 put_object {bmed['boto3_put_object'] / bmed['ours_put']:.2f} (target >= 0.9)")
        print(f"get throughput ours/boto3 download_file {bmed['boto3_download_file'] / bmed['ours_get']:.2f}, "
              f"ours/boto3 get_object {bmed['boto3_get_object'] / bmed['ours_get']:.2f} (target >= 0.9)")
        print(json.dumps({"rows": rows, "rss": rss, "blob": blob}))
        return 0
    finally:
        if runner is not None:
            runner.kill_live()
        if seaweed is not None:
            seaweed.stop()
        if distribution is not None:
            distribution.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
