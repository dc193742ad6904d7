#!/usr/bin/env python3
"""The plain stdlib loop the pull target is measured against (bench/pull.py runs it).

Usage::

    python3 bench/plain_loop.py HOST:PORT REPOSITORY TAG DEST_DIR [THREADS]

It does what issue 7 calls "a plain stdlib loop of parallel keep-alive GETs, hashing and
writing": GET the manifest by tag, then THREADS (default 6) threads, each with one
keep-alive ``http.client`` connection, GET the blobs largest first into one reused 1 MiB
buffer, sha256 them and write them to ``DEST_DIR/<hex>`` with ``O_DIRECT`` (where the file
system takes it) and an fsync, failing on any digest mismatch.  No cache index, no locks,
no resume, no retries, no temporary names: the least a verified pull can do.
"""

import hashlib
import http.client
import json
import mmap
import os
import sys
import threading

_CHUNK_BYTES = 1 << 20
_ALIGN_BYTES = 4096
_ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                     "application/vnd.docker.distribution.manifest.v2+json"])


def _get_blob(conn: http.client.HTTPConnection, path: str, blob: dict, dest: str,
              buffer: memoryview) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError("GET %s: HTTP %d" % (path, response.status))
    hasher = hashlib.sha256()
    target = os.path.join(dest, blob["digest"].split(":", 1)[1])
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                 | (getattr(os, "O_DIRECT", 0) if blob["size"] >= 4 * _CHUNK_BYTES else 0))
    try:
        filled = 0
        while True:
            count = response.readinto(buffer[filled:])
            if count:
                hasher.update(buffer[filled:filled + count])
                filled += count
            if filled == len(buffer) or (not count and filled):
                aligned = filled - filled % _ALIGN_BYTES
                if aligned:
                    os.write(fd, buffer[:aligned])
                if aligned < filled:  # the unaligned tail: written without O_DIRECT
                    import fcntl
                    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))
                    os.write(fd, buffer[aligned:filled])
                filled = 0
            if not count:
                break
        os.fsync(fd)
    finally:
        os.close(fd)
    if "sha256:" + hasher.hexdigest() != blob["digest"]:
        raise RuntimeError("digest mismatch for %s" % blob["digest"])


def main(argv: list) -> int:
    host, repository, tag, dest = argv[:4]
    threads = int(argv[4]) if len(argv) > 4 else 6
    name, _, port = host.rpartition(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=60)
    conn.request("GET", "/v2/%s/manifests/%s" % (repository, tag), headers={"Accept": _ACCEPT})
    response = conn.getresponse()
    raw = response.read()
    if response.status != 200:
        raise RuntimeError("GET manifest: HTTP %d" % response.status)
    manifest = json.loads(raw)
    os.makedirs(dest)
    with open(os.path.join(dest, "manifest.json"), "wb") as f:
        f.write(raw)
    pending = sorted([manifest["config"]] + manifest["layers"], key=lambda b: b["size"])
    lock = threading.Lock()
    errors = []

    def worker(connection: http.client.HTTPConnection) -> None:
        buffer = memoryview(mmap.mmap(-1, _CHUNK_BYTES))  # page-aligned, as O_DIRECT needs
        try:
            while True:
                with lock:
                    if not pending or errors:
                        return
                    blob = pending.pop()  # the largest left
                _get_blob(connection, "/v2/%s/blobs/%s" % (repository, blob["digest"]),
                          blob, dest, buffer)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=worker, args=(
        conn if i == 0 else http.client.HTTPConnection(name, int(port), timeout=60),))
        for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        print("plain loop: %s" % errors[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
