"""Resilience tests for zlayer_registry: faults on the wire, crashes, concurrency,
full disks, hostile registries, bad command lines and secrets.

Hermetic: every server is on 127.0.0.1 (``_fake_registry.FakeRegistry``, its
``ObjectStore`` and ``ForwardProxy``, and ``_fault_proxy.FaultProxy`` between
the puller and the registry).  Nothing sleeps to wait for a race: stalls are
released by Events, progress is observed through Events and Conditions, and
backoff goes to a recording ``sleep``.

Blocks (a class each):
    WIRE         one fault per test through the FaultProxy; the pull completes
                 with every blob verified or fails with a clear ZLayerError
    CRASHES      the CLI killed with SIGKILL at random points of a download
    CONCURRENCY  four processes pulling one image into one cache
    DISK FULL    a real 1 MiB tmpfs, and a cache whose writer hits ENOSPC
    HOSTILE      registries that lie, loop, bloat or point tokens elsewhere
    CLI INPUT    malformed references, unknown flags, unusable cache paths
    SECRETS      credentials never shown, never sent where they must not go

Module bugs these tests found (resume after a reset or stall, cache write
errors taken for network errors, unframed responses left open, port range,
--max-workers 0, credentials echoed by a registry) are fixed; their tests stay
as regression tests.
"""

from __future__ import annotations

import base64
import errno
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import pytest

from _testsupport import (HERE, KiB, MiB, Sleeps, cli_env, layer_bytes,
                          make_puller, run_cli, start_cli, tar_gz, zr)

import _fake_registry as fake  # noqa: E402
from _fault_proxy import FaultProxy, repeat_bytes  # noqa: E402

GiB = 1024 * MiB
def read_slack_bytes(read_bytes: int) -> int:
    """Bytes a server may get rid of beyond the ``read_bytes`` a client read before closing.

    The proxy shrinks its send buffer for huge bodies; the client's receive
    buffer remains.  Linux sizes it from what the application copies out
    (dynamic right-sizing, about twice per round trip), never above
    net.ipv4.tcp_rmem's maximum: a client that reads N bytes lets the kernel
    take in at most a few times N more, plus the initial buffer.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            rmem_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        rmem_max = 32 * MiB
    return min(rmem_max, 4 * read_bytes + 256 * KiB) + 64 * KiB


PASSWORD = "hunter2-Sup3rS3cret"


# =============================================================================
# helpers and fixtures
# =============================================================================

def assert_one_line_error(out, code: int) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("zlayer-registry: error: "), out.stderr


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_docker_config(directory: Path, host: str, user: str = "user",
                        password: str = PASSWORD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(
        {"auths": {host: {"auth": b64(f"{user}:{password}")}}}))
    return directory


def blob_file(root: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":", 1)
    return root / "blobs" / algorithm / encoded


def tmp_files(root: Path) -> List[str]:
    return sorted(os.listdir(root / "tmp"))


def check_cache(root: Path, contents: Dict[str, bytes], failed: Iterable[str] = ()) -> Any:
    """The invariants after any pull, good or bad: nothing partial, nothing unverified."""
    assert tmp_files(root) == [], "partial files left behind"
    for digest in failed:
        assert not blob_file(root, digest).exists(), f"blob file for failed {digest}"
    cache = zr.BlobCache.open(root)
    assert cache.verify() == []
    for entry in cache.entries():
        if entry["digest"] in contents:
            assert cache.get(entry["digest"]) == contents[entry["digest"]]
    for digest in failed:
        assert not cache.has(digest)
    return cache


class Bounded:
    """Asserts that a block finished within ``limit_s`` seconds."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s

    def __enter__(self) -> "Bounded":
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.elapsed_s = time.monotonic() - self.start
        assert self.elapsed_s < self.limit_s, f"took {self.elapsed_s:.1f}s"


_PARTIAL_RE = re.compile(r"^[0-9a-f]{16}\.(\d+)\..+\.partial$")


def close_quickly(server: Any) -> None:
    """Close a _fake_registry server without waiting out its 0.5 s poll interval.

    shutdown() only raises a flag that serve_forever() checks when its
    select() returns; a connection makes it return now.
    """
    closer = threading.Thread(target=server.close)
    closer.start()
    address = server.server.server_address
    while closer.is_alive():
        try:
            socket.create_connection(address, timeout=1).close()
        except OSError:
            pass
        closer.join(0.01)


@pytest.fixture
def registry():
    server = fake.FakeRegistry()
    yield server
    close_quickly(server)


@pytest.fixture
def proxy(registry):
    server = FaultProxy(upstream=registry.host)
    yield server
    server.close()


@pytest.fixture
def object_store():
    server = fake.ObjectStore()
    yield server
    close_quickly(server)


@pytest.fixture
def sleeps():
    return Sleeps()


@pytest.fixture
def image(registry):
    """config + three layers of a few hundred KB, as the registry serves them."""
    layers = [layer_bytes(i, 300_000 + 50_000 * i) for i in range(3)]
    info = registry.add_image("team/app", "v1", layers)
    info["contents"] = {d["digest"]: data for d, data in zip(info["layers"], layers)}
    info["contents"][info["config"]["digest"]] = registry.blobs[info["config"]["digest"]]
    info["blobs"] = [info["config"]] + info["layers"]
    return info


def ref(proxy_or_registry, name: str = "team/app:v1") -> str:
    return f"{proxy_or_registry.host}/{name}"


def blob_gets(server: FaultProxy, digest: str) -> List[Dict[str, Any]]:
    return server.log("GET", f"/blobs/{digest}")


def mount_tmpfs(target: Path, options: str) -> Optional[str]:
    """Mount a tmpfs; return None, or why it cannot be done here."""
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}"
    return None


def unmount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# =============================================================================
# WIRE: one fault per test, through the FaultProxy
# =============================================================================

class TestWireFaults:
    def pull(self, proxy, tmp_path, sleeps, **kwargs):
        cache = zr.BlobCache.open(tmp_path / "cache")
        return make_puller(cache, sleeps, **kwargs).pull_image(ref(proxy)), cache

    def test_clean_pull_through_the_proxy_counts_every_byte(self, proxy, image, tmp_path,
                                                           sleeps):
        result, _ = self.pull(proxy, tmp_path, sleeps)
        assert result.manifest.digest == image["digest"]
        for blob in image["blobs"]:
            assert [r["status"] for r in blob_gets(proxy, blob["digest"])] == [200]
            assert proxy.body_bytes(path=blob["digest"]) == blob["size"]
        assert result.bytes_downloaded == sum(b["size"] for b in image["blobs"])
        assert sleeps == []
        check_cache(tmp_path / "cache", image["contents"])

    def test_reset_before_headers_is_retried(self, proxy, image, tmp_path, sleeps):
        digest = image["layers"][1]["digest"]
        rule = proxy.add_rule("reset", method="GET", path=digest)
        with Bounded(10):
            result, _ = self.pull(proxy, tmp_path, sleeps)
        assert rule.fired == 1 and result.manifest.digest == image["digest"]
        gets = blob_gets(proxy, digest)
        assert [g["status"] for g in gets] == [None, 200]
        assert "Range" not in gets[1]["headers"]
        assert len(sleeps) <= 1  # a reused connection gets one fresh attempt for free
        check_cache(tmp_path / "cache", image["contents"])

    @pytest.mark.parametrize("offset", [1, 65_536, 200_000, 349_999])
    def test_truncated_body_resumes_with_range(self, proxy, image, tmp_path, sleeps, offset):
        blob = image["layers"][1]
        rule = proxy.add_rule("truncate", method="GET", path=blob["digest"], offset=offset)
        with Bounded(10):
            result, _ = self.pull(proxy, tmp_path, sleeps)
        assert rule.fired == 1
        gets = blob_gets(proxy, blob["digest"])
        assert [g["status"] for g in gets] == [200, 206]
        assert gets[1]["headers"]["Range"] == f"bytes={offset}-"
        assert [g["body_bytes"] for g in gets] == [offset, blob["size"] - offset]
        assert proxy.body_bytes(path=blob["digest"]) == blob["size"]
        assert result.bytes_downloaded == sum(b["size"] for b in image["blobs"])
        check_cache(tmp_path / "cache", image["contents"])

    def test_truncation_every_time_gives_up_within_bounded_time(self, proxy, image,
                                                                 tmp_path, sleeps):
        blob = image["layers"][1]
        proxy.add_rule("truncate", method="GET", path=blob["digest"], offset=100_000,
                       times=None)
        with Bounded(10), pytest.raises(zr.ZLayerError) as info:
            self.pull(proxy, tmp_path, sleeps, retries=3)
        assert blob["digest"] in str(info.value)
        gets = blob_gets(proxy, blob["digest"])
        assert len(gets) == 4 and all(g["headers"].get("Range") == "bytes=100000-"
                                      for g in gets[1:])
        assert proxy.body_bytes(path=blob["digest"]) == 100_000
        check_cache(tmp_path / "cache", image["contents"], failed=[blob["digest"]])

    def test_reset_mid_body_completes(self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][2]
        rule = proxy.add_rule("reset_body", method="GET", path=blob["digest"], offset=200_000)
        with Bounded(10):
            result, _ = self.pull(proxy, tmp_path, sleeps)
        assert rule.fired == 1 and result.manifest.digest == image["digest"]
        assert blob_gets(proxy, blob["digest"])[0]["body_bytes"] == 200_000
        assert len(sleeps) == 1
        check_cache(tmp_path / "cache", image["contents"])

    def test_reset_mid_body_resumes_near_the_offset(self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][2]
        proxy.add_rule("reset_body", method="GET", path=blob["digest"], offset=200_000)
        self.pull(proxy, tmp_path, sleeps)
        gets = blob_gets(proxy, blob["digest"])
        # The kernel may drop what was in flight when the RST arrived, no more.
        resumed_at = int(gets[1]["headers"].get("Range", "bytes=0-")[6:-1])
        assert 200_000 - 128 * KiB < resumed_at <= 200_000
        assert proxy.body_bytes(path=blob["digest"]) <= blob["size"] + 128 * KiB

    def test_a_byte_flipped_once_is_downloaded_again(self, proxy, image, tmp_path, sleeps,
                                                     capfd):
        blob = image["layers"][0]
        rule = proxy.add_rule("flip", method="GET", path=blob["digest"], offset=123_457)
        with Bounded(10):
            result, _ = self.pull(proxy, tmp_path, sleeps)
        assert rule.reached.is_set() and result.manifest.digest == image["digest"]
        gets = blob_gets(proxy, blob["digest"])
        assert len(gets) == 2 and "Range" not in gets[1]["headers"]  # again from byte 0
        assert "failed its digest check" in capfd.readouterr().err
        check_cache(tmp_path / "cache", image["contents"])

    def test_a_byte_flipped_twice_is_a_digest_mismatch_and_nothing_unverified_is_visible(
            self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][0]
        rule = proxy.add_rule("flip", method="GET", path=blob["digest"], offset=123_457,
                              times=2)
        with Bounded(10), pytest.raises(zr.DigestMismatchError) as info:
            self.pull(proxy, tmp_path, sleeps)
        assert rule.reached.is_set()
        assert info.value.expected == blob["digest"] and info.value.actual != blob["digest"]
        assert blob["digest"] in str(info.value)
        assert len(blob_gets(proxy, blob["digest"])) == 2  # once more, then it is the error
        check_cache(tmp_path / "cache", image["contents"], failed=[blob["digest"]])

    def test_stall_mid_body_times_out_and_completes(self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][1]
        release = threading.Event()
        rule = proxy.add_rule("stall", method="GET", path=blob["digest"], offset=150_000,
                              event=release)
        try:
            with Bounded(10):
                result, _ = self.pull(proxy, tmp_path, sleeps, timeout_s=0.5)
        finally:
            release.set()
        assert rule.reached.is_set() and result.manifest.digest == image["digest"]
        gets = blob_gets(proxy, blob["digest"])
        assert len(gets) == 2 and gets[0]["body_bytes"] >= 150_000
        check_cache(tmp_path / "cache", image["contents"])

    def test_stall_mid_body_resumes_with_range(self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][1]
        release = threading.Event()
        proxy.add_rule("stall", method="GET", path=blob["digest"], offset=150_000,
                       event=release)
        try:
            self.pull(proxy, tmp_path, sleeps, timeout_s=0.5)
        finally:
            release.set()
        gets = blob_gets(proxy, blob["digest"])
        assert gets[1]["headers"].get("Range") == "bytes=150000-"

    def test_endless_stall_fails_within_bounded_time(self, proxy, image, tmp_path, sleeps):
        blob = image["layers"][1]
        rule = proxy.add_rule("stall", method="GET", path=blob["digest"], offset=150_000,
                              times=None)
        with Bounded(15), pytest.raises(zr.RegistryError, match="kept failing") as info:
            self.pull(proxy, tmp_path, sleeps, timeout_s=0.3, retries=2)
        assert rule.fired == 3 and info.value.temporary
        assert blob["digest"] in str(info.value)
        check_cache(tmp_path / "cache", image["contents"], failed=[blob["digest"]])

    def test_stall_before_headers_times_out_and_is_retried(self, proxy, image, tmp_path,
                                                           sleeps):
        digest = image["layers"][0]["digest"]
        release = threading.Event()
        rule = proxy.add_rule("stall_headers", method="GET", path=digest, event=release)
        try:
            with Bounded(10):
                result, _ = self.pull(proxy, tmp_path, sleeps, timeout_s=0.5)
        finally:
            release.set()
        assert rule.reached.is_set() and result.manifest.digest == image["digest"]
        assert len(blob_gets(proxy, digest)) == 2
        # A timeout on a pooled keep-alive connection gets one free fresh attempt.
        assert len(sleeps) <= 1
        check_cache(tmp_path / "cache", image["contents"])

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    @pytest.mark.parametrize("where", ["manifests", "blobs"])
    def test_5xx_once_is_retried_with_backoff(self, proxy, image, tmp_path, sleeps, status,
                                              where):
        # Into an empty cache the tag itself is fetched (no HEAD first).
        path = "/manifests/v1" if where == "manifests" \
            else f"/blobs/{image['layers'][0]['digest']}"
        rule = proxy.add_rule("respond", method="GET", path=path, status=status)
        result, _ = self.pull(proxy, tmp_path, sleeps)
        assert rule.fired == 1 and result.manifest.digest == image["digest"]
        assert len(sleeps) == 1 and 0 < sleeps[0] <= zr.RETRY_BACKOFF_BASE_S
        assert [r["status"] for r in proxy.log("GET", path)] == [status, 200]
        check_cache(tmp_path / "cache", image["contents"])

    @pytest.mark.parametrize("status", [500, 503])
    def test_5xx_forever_is_a_temporary_registry_error(self, proxy, image, tmp_path, sleeps,
                                                       status):
        digest = image["layers"][2]["digest"]
        proxy.add_rule("respond", method="GET", path=digest, status=status, times=None)
        with Bounded(10), pytest.raises(zr.RegistryError) as info:
            self.pull(proxy, tmp_path, sleeps, retries=3)
        assert info.value.status == status and info.value.temporary
        assert f"answered {status}" in str(info.value)
        assert len(blob_gets(proxy, digest)) == 4 and len(sleeps) == 3
        check_cache(tmp_path / "cache", image["contents"], failed=[digest])

    def test_429_with_retry_after_waits_that_long(self, proxy, image, tmp_path, sleeps):
        digest = image["layers"][0]["digest"]
        proxy.add_rule("respond", method="GET", path=digest, status=429,
                       headers={"Retry-After": "7"})
        self.pull(proxy, tmp_path, sleeps)
        assert sleeps == [7.0]
        check_cache(tmp_path / "cache", image["contents"])

    def test_429_without_retry_after_backs_off(self, proxy, image, tmp_path, sleeps):
        digest = image["layers"][0]["digest"]
        proxy.add_rule("respond", method="GET", path=digest, status=429)
        self.pull(proxy, tmp_path, sleeps)
        assert len(sleeps) == 1 and 0 < sleeps[0] <= zr.RETRY_BACKOFF_BASE_S
        check_cache(tmp_path / "cache", image["contents"])

    def test_429_forever_is_rate_limited_error(self, proxy, image, tmp_path, sleeps):
        digest = image["layers"][0]["digest"]
        proxy.add_rule("respond", method="GET", path=digest, status=429, times=None,
                       headers={"Retry-After": "3"})
        with pytest.raises(zr.RateLimitedError, match="rate limited") as info:
            self.pull(proxy, tmp_path, sleeps, retries=2)
        assert info.value.retry_after_s == 3.0 and info.value.status == 429
        assert sleeps == [3.0, 3.0]
        check_cache(tmp_path / "cache", image["contents"], failed=[digest])

    def test_401_mid_pull_reauthenticates(self, registry, proxy, image, tmp_path, sleeps):
        registry.auth = "bearer"
        # Blob GETs in order (one worker): config, layer 0, layer 1 pass, then the
        # token "expires": the third blob GET is answered 401 with the registry's challenge.
        rule = proxy.add_rule("unauthorized", method="GET", path="/blobs/", nth=3)
        cache = zr.BlobCache.open(tmp_path / "cache")
        result = make_puller(cache, sleeps, max_workers=1).pull_image(
            ref(proxy), zr.RegistryAuth.basic("user", "secret"))
        assert rule.fired == 1 and result.manifest.digest == image["digest"]
        gets = proxy.log("GET", "/blobs/")
        assert [g["status"] for g in gets] == [200, 200, 401, 200, 200]
        assert len(registry.token_requests) == 2
        first, refused, retried = (g["headers"]["Authorization"] for g in gets[:2] + gets[3:4])
        assert first == refused != retried and retried.startswith("Bearer ")
        assert gets[2]["path"] == gets[3]["path"]
        check_cache(tmp_path / "cache", image["contents"])

    def test_401_that_persists_is_an_auth_error(self, registry, proxy, image, tmp_path,
                                                sleeps):
        registry.auth = "bearer"
        proxy.add_rule("unauthorized", method="GET", path="/blobs/", nth=2, times=None)
        cache = zr.BlobCache.open(tmp_path / "cache")
        with Bounded(10), pytest.raises(zr.AuthError, match="401") as info:
            make_puller(cache, sleeps, max_workers=1).pull_image(
                ref(proxy), zr.RegistryAuth.basic("user", PASSWORD))
        assert PASSWORD not in str(info.value) and b64(f"user:{PASSWORD}") not in str(info.value)
        assert info.value.status == 401
        check_cache(tmp_path / "cache", image["contents"],
                    failed=[l["digest"] for l in image["layers"]])

    def test_blob_redirect_to_object_store_carries_no_authorization(
            self, registry, proxy, object_store, image, tmp_path, sleeps):
        registry.auth = "bearer"
        for blob in image["blobs"]:
            object_store.blobs[blob["digest"][7:]] = image["contents"][blob["digest"]]
        rule = proxy.add_rule("redirect", method="GET", path="/blobs/", times=None,
                              location=lambda p: f"{object_store.url}/bucket/"
                                                 f"{p.rsplit(':', 1)[1]}?X-Amz-Signature=s3cr3t")
        result, _ = self.pull(proxy, tmp_path, sleeps)
        assert result.manifest.digest == image["digest"] and rule.fired == 4
        assert len(object_store.requests) == 4
        assert all("Authorization" not in r["headers"] for r in object_store.requests)
        # ...while the registry's own blob URLs did get the token.
        assert all(g["headers"]["Authorization"].startswith("Bearer ")
                   for g in proxy.log("GET", "/blobs/"))
        check_cache(tmp_path / "cache", image["contents"])

    def test_blob_redirect_to_a_missing_object_is_not_found_without_the_signature(
            self, proxy, object_store, image, tmp_path, sleeps):
        digest = image["layers"][0]["digest"]
        proxy.add_rule("redirect", method="GET", path=digest, times=None,
                       location=f"{object_store.url}/bucket/nothing?X-Amz-Signature=s3cr3t")
        with pytest.raises(zr.NotFoundError) as info:
            self.pull(proxy, tmp_path, sleeps)
        assert "s3cr3t" not in str(info.value) and info.value.url.startswith(object_store.url)
        check_cache(tmp_path / "cache", image["contents"], failed=[digest])


# =============================================================================
# CRASHES: SIGKILL in the middle of downloads
# =============================================================================

class TestCrashes:
    def test_sigkill_at_random_points_leaves_a_consistent_cache(self, registry, tmp_path):
        rng = random.Random(20240611)
        # Enough layers that eight rounds, each finishing a few, never run out.
        sizes = [rng.randint(100_000, 250_000) for _ in range(32)]
        layers = [layer_bytes(100 + i, size) for i, size in enumerate(sizes)]
        info = registry.add_image("crash/app", "v1", layers)
        contents = {d["digest"]: data for d, data in zip(info["layers"], layers)}
        layer_digests = [d["digest"] for d in info["layers"]]
        cache_dir = tmp_path / "cache"
        # One proxy per round: a request the killed process had already sent
        # cannot use up the next round's rule.
        proxies: List[FaultProxy] = []
        try:
            for round_number in range(8):
                missing = [d for d in layer_digests if not blob_file(cache_dir, d).exists()]
                assert missing, f"round {round_number}: every layer already cached"
                proxy = FaultProxy(upstream=registry.host)
                proxies.append(proxy)
                rule = proxy.add_rule(
                    "stall", method="GET", nth=rng.randint(1, min(3, len(missing))),
                    offset=rng.randint(0, 99_999),
                    path=lambda p: any(p.endswith(d) for d in layer_digests))
                self.pull_and_kill(proxy, rule, cache_dir, tmp_path)
            # The dead processes left partial files; only theirs are there.
            leftovers = tmp_files(cache_dir)
            assert leftovers, "a stalled download must have left a partial file"
            for name in leftovers:
                match = _PARTIAL_RE.match(name)
                assert match, name
                assert not zr._pid_alive(int(match.group(1))), name
            verify = run_cli("cache", "verify", "--cache", str(cache_dir), cwd=tmp_path)
            assert verify.returncode == 0 and " 0 corrupt" in verify.stdout, verify
            assert tmp_files(cache_dir) == []  # that open removed them
            all_blobs = layer_digests + [info["config"]["digest"]]
            cached_before = {d for d in all_blobs if blob_file(cache_dir, d).exists()}
            proxy = FaultProxy(upstream=registry.host)
            proxies.append(proxy)
            final = run_cli("pull", ref(proxy, "crash/app:v1"), "--cache", str(cache_dir),
                            "-q", cwd=tmp_path)
            assert final.returncode == 0, final.stderr
            assert final.stdout.strip() == info["digest"]
            fetched = {r["path"].rsplit("/", 1)[1] for r in proxy.log("GET", "/blobs/")}
            assert fetched == set(all_blobs) - cached_before  # nothing twice
        finally:
            for proxy in proxies:
                proxy.close()
        check_cache(cache_dir, contents)
        assert all(blob_file(cache_dir, d).read_bytes() == contents[d] for d in layer_digests)
        assert run_cli("cache", "verify", "--cache", str(cache_dir),
                       cwd=tmp_path).returncode == 0

    @pytest.mark.parametrize("command", ["oci-archive", "docker-archive", "unpack"])
    def test_sigkill_while_writing_leaves_what_the_next_run_removes(self, registry, tmp_path,
                                                                      command):
        """A SIGKILL while an archive or a root filesystem is written leaves a temporary
        named with the dead writer's PID beside the target; the next run there removes it."""
        files = [(f"f{i:04d}", layer_bytes(i, 2048)) for i in range(3000)]
        layer = tar_gz(files)
        big = tar_gz([("big", layer_bytes(7, 24 * MiB))])
        registry.add_image("crash/big", "v1", [layer, big])
        cache_dir, out = tmp_path / "cache", tmp_path / "out"
        out.mkdir()
        assert run_cli("pull", f"{registry.host}/crash/big:v1", "--cache", str(cache_dir), "-q",
                       cwd=tmp_path).returncode == 0
        if command == "unpack":
            args = ["unpack", f"{registry.host}/crash/big:v1", str(out / "rootfs")]
            temporary = re.compile(r"^\.rootfs\.staging\.(\d+)\.[0-9a-f]+$")
        else:
            args = ["export", f"{registry.host}/crash/big:v1", f"{command}:{out}/image.tar"]
            temporary = re.compile(r"^\.tmp\.(\d+)\.[0-9a-f]+\.partial$")
        process = start_cli(*args, "--cache", str(cache_dir), home=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while not any(temporary.match(name) for name in os.listdir(out)):
                assert process.poll() is None, ("finished before it could be killed",
                                                process.communicate())
                assert time.monotonic() < deadline, "no temporary appeared"
                time.sleep(0.001)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        left = [name for name in os.listdir(out) if temporary.match(name)]
        assert left and all(not zr._pid_alive(int(temporary.match(n).group(1))) for n in left)
        again = run_cli(*args, "--cache", str(cache_dir), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert sorted(os.listdir(out)) == (["rootfs"] if command == "unpack" else ["image.tar"])

    @staticmethod
    def pull_and_kill(proxy: FaultProxy, rule: Any, cache_dir: Path, home: Path) -> None:
        """Start a CLI pull, SIGKILL it as soon as the stall is reached."""
        process = start_cli("pull", ref(proxy, "crash/app:v1"), "--cache", str(cache_dir),
                            "-q", "--max-workers", "2", home=home)
        try:
            deadline = time.monotonic() + 30
            while not rule.reached.wait(0.05):
                assert process.poll() is None, (rule, process.communicate())
                assert time.monotonic() < deadline, "stall never reached"
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == -signal.SIGKILL


# =============================================================================
# SIGNALS: Ctrl-C and SIGTERM in the middle of a download
# =============================================================================

class TestSignals:
    @pytest.mark.parametrize("signum, code, word", [
        (signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
    @pytest.mark.parametrize("command", ["pull", "export"])
    def test_signal_mid_download_exits_cleanly_and_leaves_nothing(
            self, proxy, image, tmp_path, signum, code, word, command):
        digest = image["layers"][2]["digest"]
        gate = threading.Event()
        stall = proxy.add_rule("stall", method="GET", path=digest, offset=50_000, event=gate)
        cache_dir, archive = tmp_path / "cache", tmp_path / "out" / "image.tar"
        archive.parent.mkdir()
        args = ["--cache", str(cache_dir)] + (
            ["-q"] if command == "pull" else [f"oci-archive:{archive}"])
        process = start_cli(command, ref(proxy), *args, home=tmp_path)
        try:
            assert stall.reached.wait(30)
            process.send_signal(signum)
            _, err = process.communicate(timeout=30)
        finally:
            gate.set()
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == code, err
        assert err.strip() == f"zlayer-registry: {word}"
        assert not blob_file(cache_dir, digest).exists()
        check_cache(cache_dir, image["contents"], failed=[digest])
        assert os.listdir(tmp_path / "out") == []  # no archive, no .partial


# =============================================================================
# CONCURRENCY: several processes, one cache
# =============================================================================

class TestConcurrency:
    def test_four_processes_pull_one_image_into_one_cache(self, registry, proxy, tmp_path):
        layers = [layer_bytes(200 + i, 150_000 + 10_000 * i) for i in range(6)]
        info = registry.add_image("shared/app", "v1", layers)
        contents = {d["digest"]: data for d, data in zip(info["layers"], layers)}
        layer_digests = [d["digest"] for d in info["layers"]]
        gate = threading.Event()
        # Every layer download pauses after 1000 bytes until all four processes
        # have asked for the manifest, so the downloads overlap.
        stall = proxy.add_rule("stall", method="GET", offset=1000, times=None, event=gate,
                               path=lambda p: any(p.endswith(d) for d in layer_digests))
        cache_dir = tmp_path / "cache"
        args = ["pull", ref(proxy, "shared/app:v1"), "--cache", str(cache_dir), "-q"]
        processes = [start_cli(*args, home=tmp_path) for _ in range(4)]
        try:
            # The cache is empty, so a process GETs the tag; one that starts
            # after a blob landed HEADs it first.
            assert proxy.wait_until(lambda p: p.count("HEAD", "/manifests/v1")
                                    + p.count("GET", "/manifests/v1") == 4, 30)
            assert stall.reached.wait(30)
            gate.set()
            outputs = [p.communicate(timeout=60) for p in processes]
        finally:
            gate.set()
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        assert [p.returncode for p in processes] == [0] * 4, outputs
        assert {o[0].strip() for o in outputs} == {info["digest"]}
        for blob in info["layers"] + [info["config"]]:
            assert len(blob_gets(proxy, blob["digest"])) == 1, blob["digest"]
        cache = check_cache(cache_dir, contents)
        assert len(cache.entries()) == 2 + len(layers)
        assert os.listdir(cache_dir / "locks") == []


# =============================================================================
# DISK FULL
# =============================================================================

class _FullDiskWriter:
    """Wraps a cache writer; raises ENOSPC once the disk's free bytes are used up."""

    def __init__(self, inner: Any, disk: "_FullDiskCache") -> None:
        self._inner, self._disk = inner, disk

    @property
    def offset(self) -> int:
        return self._inner.offset

    def _use(self, count: int) -> None:
        with self._disk.lock_:
            if self._disk.free_bytes < count:
                self._disk.refusals += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._disk.free_bytes -= count

    def write(self, data: Any) -> None:
        self._use(len(data))
        self._inner.write(data)

    def buffer(self) -> memoryview:
        return self._inner.buffer()

    def filled(self, count: int) -> None:
        self._use(count)
        self._inner.filled(count)

    def restart(self) -> None:
        self._inner.restart()

    def check(self) -> None:
        self._inner.check()

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def __enter__(self) -> "_FullDiskWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.abort()


class _FullDiskCache(zr.DirectoryBlobCache):
    """A directory cache on a "disk" with ``free_bytes`` left for blob data."""

    def __init__(self, root: str, free_bytes: int) -> None:
        super().__init__(root)
        self.free_bytes = free_bytes
        self.refusals = 0
        self.lock_ = threading.Lock()

    def begin_write(self, digest: str, size: Optional[int] = None, media_type: str = ""):
        return _FullDiskWriter(super().begin_write(digest, size, media_type), self)


class TestDiskFull:
    @pytest.fixture
    def small_disk(self, tmp_path):
        target = tmp_path / "small"
        reason = mount_tmpfs(target, "size=1m")
        if reason:
            pytest.skip(reason)
        yield target
        # Worker threads' SQLite connections sit in reference cycles: collect
        # them, or the filesystem stays busy.
        gc.collect()
        unmount(target)

    def test_real_tmpfs_fills_up(self, registry, small_disk, sleeps):
        layers = [layer_bytes(300 + i, 400_000) for i in range(3)]  # 1.2 MB > 1 MiB
        info = registry.add_image("big/app", "v1", layers)
        contents = {d["digest"]: data for d, data in zip(info["layers"], layers)}
        cache = zr.BlobCache.open(small_disk / "cache")
        # Whichever write meets the full disk first speaks: a blob file (the OS's
        # "No space left on device") or the SQLite index ("database or disk is full").
        with Bounded(10), pytest.raises(zr.CacheError,
                                        match="No space left|disk is full") as info_exc:
            with make_puller(cache, sleeps) as puller:
                puller.pull(ref(registry, "big/app:v1"))
        assert str(small_disk) in str(info_exc.value)
        assert sleeps == []  # a full disk is not retried like a network error
        cache.close()
        missing = [d for d in contents if not blob_file(small_disk / "cache", d).exists()]
        assert missing, "1.2 MB cannot all fit on 1 MiB"
        reopened = check_cache(small_disk / "cache", contents, failed=missing)
        reopened.close()
        out = run_cli("cache", "verify", "--cache", str(small_disk / "cache"),
                      cwd=small_disk.parent)
        assert out.returncode == 0, out

    def test_real_tmpfs_fills_up_under_a_staged_large_blob(self, registry, tmp_path, sleeps):
        """A blob of 4 MiB or more goes through the staging buffer (O_DIRECT where the file
        system allows it): the full disk is still one clean CacheError and no partial file."""
        target = tmp_path / "small4"
        reason = mount_tmpfs(target, "size=4m")
        if reason:
            pytest.skip(reason)
        try:
            data = layer_bytes(310, zr._DIRECT_IO_MIN_BYTES + 1_000_001)
            registry.add_image("big/one", "v1", [data])
            cache = zr.BlobCache.open(target / "cache")
            with Bounded(10), pytest.raises(zr.CacheError, match="No space left|disk is full"):
                with make_puller(cache, sleeps) as puller:
                    puller.pull(ref(registry, "big/one:v1"))
            assert sleeps == []
            cache.close()
            assert os.listdir(target / "cache" / "tmp") == []
            out = run_cli("cache", "verify", "--cache", str(target / "cache"), cwd=tmp_path)
            assert out.returncode == 0, out
        finally:
            gc.collect()
            unmount(target)

    def test_injected_enospc_is_a_cache_error_and_not_retried(self, registry, proxy, image,
                                                              tmp_path, sleeps):
        root = tmp_path / "cache"
        # The config comes first (the puller checks its platform), then one
        # worker downloads the largest layer first: layer 2 fits, layer 1 does not.
        manifest = registry.manifests[("team/app", image["digest"])][0]
        budget = len(manifest) + image["config"]["size"] + image["layers"][2]["size"] + 100_000
        cache = _FullDiskCache(str(root), free_bytes=budget)
        with Bounded(10), pytest.raises(zr.CacheError, match="No space left") as info:
            make_puller(cache, sleeps, max_workers=1).pull(ref(proxy))
        assert image["layers"][1]["digest"] in str(info.value)
        # A full disk is not a dropped connection: no backoff, no Range resume.
        assert sleeps == [] and cache.refusals == 1
        assert not any("Range" in r["headers"] for r in proxy.log("GET", "/blobs/"))
        assert cache.has(image["layers"][2]["digest"]) and cache.has(image["config"]["digest"])
        check_cache(root, image["contents"],
                    failed=[image["layers"][1]["digest"], image["layers"][0]["digest"]])


# =============================================================================
# HOSTILE REGISTRIES
# =============================================================================
# Each scenario configures the registry (and/or the proxy in front of it) and
# returns (expected error class, message pattern).  Scenarios pull
# PROXY/team/app:v1, where a real image is tagged; only the hostile part differs.

def _manifest_with_layer(registry, layer: Dict[str, Any]) -> None:
    config = registry.add_blob(b'{"architecture":"amd64","os":"linux"}')
    registry.add_manifest("team/app", "v1", {
        "schemaVersion": 2, "mediaType": fake.OCI_MANIFEST,
        "config": dict(config, mediaType=fake.OCI_CONFIG),
        "layers": [dict({"mediaType": fake.OCI_LAYER_GZIP}, **layer)]})


def _scenario_not_json(registry, proxy, image):
    registry.add_manifest("team/app", "v1", None, media_type=fake.OCI_MANIFEST,
                          raw=b"<html><body>Welcome to nginx!</body></html>")
    return zr.ManifestError, "not valid JSON"


def _scenario_json_but_not_an_object(registry, proxy, image):
    registry.add_manifest("team/app", "v1", None, media_type=fake.OCI_MANIFEST,
                          raw=b'["schemaVersion", 2]')
    return zr.ManifestError, "not a JSON object"


def _scenario_wrong_media_type(registry, proxy, image):
    manifest = dict(image["manifest"], mediaType="application/vnd.oci.image.layer.v1.tar")
    registry.add_manifest("team/app", "v1", manifest, media_type=fake.OCI_MANIFEST)
    return zr.ManifestError, "unsupported mediaType"


def _scenario_schema1(registry, proxy, image):
    registry.add_manifest("team/app", "v1", {"schemaVersion": 1, "name": "team/app",
                                             "fsLayers": []}, media_type=fake.OCI_MANIFEST)
    return zr.ManifestError, "schema 1"


def _scenario_over_cap_with_length(registry, proxy, image):
    big = dict(image["manifest"], annotations={"pad": "x" * (zr.MAX_MANIFEST_SIZE_BYTES + 10)})
    registry.add_manifest("team/app", "v1", big)
    return zr.ManifestError, "limit"


def _scenario_over_cap_unframed(registry, proxy, image):
    # No Content-Length: the body ends when the server closes, after 1 GiB.
    proxy.add_rule("respond", method="GET", path="/manifests/", status=200,
                   headers={"Content-Type": fake.OCI_MANIFEST},
                   body_iter=lambda: repeat_bytes(1 * GiB, b" " * (64 * KiB)),
                   sndbuf_bytes=16 * KiB)
    return zr.ManifestError, "limit"


def _scenario_digest_mismatch(registry, proxy, image):
    # By digest: another manifest's bytes.  By tag (the cache is empty, so the
    # tag is fetched directly): those bytes, under a Docker-Content-Digest
    # that promises the real manifest.
    other = registry.add_image("team/app", "other", [layer_bytes(77, 1000)])
    body, media_type = registry.manifests[("team/app", other["digest"])]
    registry.manifests[("team/app", image["digest"])] = (body, media_type)
    proxy.add_rule("respond", method="GET", path="/manifests/v1", status=200, body=body,
                   headers={"Content-Type": media_type,
                            "Docker-Content-Digest": image["digest"]})
    return zr.DigestMismatchError, "manifest digest mismatch"


def _scenario_negative_size(registry, proxy, image):
    _manifest_with_layer(registry, {"digest": "sha256:" + "a" * 64, "size": -1})
    return zr.ManifestError, "invalid size -1"


def _scenario_huge_size(registry, proxy, image):
    _manifest_with_layer(registry, {"digest": "sha256:" + "a" * 64, "size": 1 << 60})
    return zr.ManifestError, "limit"


def _scenario_string_size(registry, proxy, image):
    _manifest_with_layer(registry, {"digest": "sha256:" + "a" * 64, "size": "1000"})
    return zr.ManifestError, "invalid size"


def _scenario_sha1_digest(registry, proxy, image):
    _manifest_with_layer(registry, {"digest": "sha1:" + "a" * 40, "size": 10})
    return zr.ManifestError, "unsupported algorithm 'sha1'"


def _scenario_md5_digest(registry, proxy, image):
    _manifest_with_layer(registry, {"digest": "md5:" + "a" * 32, "size": 10})
    return zr.ManifestError, "unsupported algorithm 'md5'"


def _scenario_endless_manifest_redirects(registry, proxy, image):
    hops = iter(range(10 ** 6))
    proxy.add_rule("redirect", method="GET", path="/manifests/", times=None,
                   location=lambda p: f"/v2/team/app/manifests/{image['digest']}?hop={next(hops)}")
    return zr.RegistryError, "redirected more than 10 times"


def _scenario_endless_blob_redirects(registry, proxy, image):
    registry.redirect_loop = True
    return zr.RegistryError, "redirected more than 10 times"


def _scenario_redirect_to_ftp(registry, proxy, image):
    proxy.add_rule("redirect", method="GET", path="/blobs/", times=None,
                   location="ftp://127.0.0.1/blob")
    return zr.RegistryError, "unsupported URL scheme"


def _scenario_redirect_to_file(registry, proxy, image):
    proxy.add_rule("redirect", method="GET", path="/blobs/", times=None,
                   location="file:///etc/passwd")
    return zr.RegistryError, "unsupported URL scheme"


def _scenario_realm_plain_http_remote(registry, proxy, image):
    registry.auth, registry.realm = "bearer", "http://auth.example.com/token"
    return zr.AuthError, "not https"


def _scenario_realm_metadata_service(registry, proxy, image):
    registry.auth, registry.realm = "bearer", "http://169.254.169.254/latest/meta-data/"
    return zr.AuthError, "not https"


def _scenario_realm_ftp(registry, proxy, image):
    registry.auth, registry.realm = "bearer", "ftp://127.0.0.1/token"
    return zr.AuthError, "unusable token realm"


def _scenario_realm_file(registry, proxy, image):
    registry.auth, registry.realm = "bearer", "file:///etc/shadow"
    return zr.AuthError, "unusable token realm"


def _scenario_huge_error_body(registry, proxy, image):
    proxy.add_rule("respond", method="GET", path="/manifests/", status=404, length=4 * GiB,
                   body_iter=lambda: repeat_bytes(4 * GiB), sndbuf_bytes=16 * KiB)
    return zr.NotFoundError, "answered 404"


def _scenario_huge_token_response(registry, proxy, image):
    registry.auth, registry.realm = "bearer", f"{proxy.url}/token"
    proxy.add_rule("respond", method="GET", path="^/token", status=200, length=4 * GiB,
                   body_iter=lambda: repeat_bytes(4 * GiB), sndbuf_bytes=16 * KiB)
    return zr.AuthError, "returned no token"


def _scenario_endless_blob(registry, proxy, image):
    digest = image["layers"][0]["digest"]
    proxy.add_rule("respond", method="GET", path=digest, status=200, length=4 * GiB,
                   body_iter=lambda: repeat_bytes(4 * GiB), sndbuf_bytes=16 * KiB)
    return zr.DigestMismatchError, "larger than announced"


def _scenario_short_blob(registry, proxy, image):
    digest = image["layers"][0]["digest"]
    registry.blobs[digest] = registry.blobs[digest][:1000]
    return zr.DigestMismatchError, "wrong size"


HOSTILE = {
    "manifest-not-json": _scenario_not_json,
    "manifest-json-array": _scenario_json_but_not_an_object,
    "manifest-wrong-media-type": _scenario_wrong_media_type,
    "manifest-schema1": _scenario_schema1,
    "manifest-over-cap-content-length": _scenario_over_cap_with_length,
    "manifest-over-cap-unframed": _scenario_over_cap_unframed,
    "manifest-digest-mismatch": _scenario_digest_mismatch,
    "descriptor-negative-size": _scenario_negative_size,
    "descriptor-huge-size": _scenario_huge_size,
    "descriptor-string-size": _scenario_string_size,
    "descriptor-sha1": _scenario_sha1_digest,
    "descriptor-md5": _scenario_md5_digest,
    "endless-manifest-redirects": _scenario_endless_manifest_redirects,
    "endless-blob-redirects": _scenario_endless_blob_redirects,
    "redirect-to-ftp": _scenario_redirect_to_ftp,
    "redirect-to-file": _scenario_redirect_to_file,
    "realm-plain-http-remote": _scenario_realm_plain_http_remote,
    "realm-metadata-service": _scenario_realm_metadata_service,
    "realm-ftp": _scenario_realm_ftp,
    "realm-file": _scenario_realm_file,
    "huge-error-body": _scenario_huge_error_body,
    "huge-token-response": _scenario_huge_token_response,
    "endless-blob": _scenario_endless_blob,
    "short-blob": _scenario_short_blob,
}
# Where the hostile part is a blob, the blobs that must not be cached (the
# manifest and the other blobs are legitimately cached and verified).
_BLOB_LEVEL: Dict[str, Callable[[Dict[str, Any]], List[str]]] = {
    "endless-blob-redirects": lambda image: [b["digest"] for b in image["blobs"]],
    "redirect-to-ftp": lambda image: [b["digest"] for b in image["blobs"]],
    "redirect-to-file": lambda image: [b["digest"] for b in image["blobs"]],
    "endless-blob": lambda image: [image["layers"][0]["digest"]],
    "short-blob": lambda image: [image["layers"][0]["digest"]],
}
# How many body bytes a client may read before giving up, per scenario.
_READ_CAPS = {
    "manifest-over-cap-unframed": zr.MAX_MANIFEST_SIZE_BYTES + 1,
    "huge-error-body": zr.MAX_ERROR_BODY_BYTES,
    "huge-token-response": zr.MAX_TOKEN_RESPONSE_BYTES,
    "endless-blob": 1 * MiB,
}


class TestHostileRegistries:
    def check_nothing_cached(self, name, image, root: Path) -> None:
        cache = zr.BlobCache.open(root)
        assert tmp_files(root) == []
        assert cache.verify() == []
        cached = {e["digest"] for e in cache.entries()}
        if name in _BLOB_LEVEL:
            poisoned = _BLOB_LEVEL[name](image)
            assert cached.isdisjoint(poisoned), cached
            assert not any(blob_file(root, d).exists() for d in poisoned)
        else:
            assert cached == set(), cached
        cache.close()

    def check_bytes_read(self, name, proxy) -> None:
        cap = _READ_CAPS.get(name)
        if cap is None:
            return
        # The server's handler ends when the client closes; count what it sent by then.
        assert proxy.wait_until(lambda p: all(r["done"] for r in p.requests), 20)
        sent = [r["body_bytes"] for r in proxy.requests if r["rule"] == "respond"]
        assert len(sent) == 1, sent
        assert sent[0] < cap + read_slack_bytes(cap), (name, sent[0])

    @pytest.mark.parametrize("name", sorted(HOSTILE))
    def test_api(self, name, registry, proxy, image, tmp_path, sleeps):
        error, pattern = HOSTILE[name](registry, proxy, image)
        root = tmp_path / "cache"
        with Bounded(20), pytest.raises(error, match=pattern) as info:
            make_puller(zr.BlobCache.open(root), sleeps).pull(
                ref(proxy), zr.RegistryAuth.basic("user", "secret"))
        message = str(info.value)
        assert isinstance(info.value, zr.ZLayerError)
        assert not message[0].isupper() and "secret" not in message
        self.check_nothing_cached(name, image, root)
        self.check_bytes_read(name, proxy)

    @pytest.mark.parametrize("name", sorted(HOSTILE))
    def test_cli(self, name, registry, proxy, image, tmp_path):
        _, pattern = HOSTILE[name](registry, proxy, image)
        root = tmp_path / "cache"
        out = run_cli("pull", ref(proxy), "--cache", str(root), cwd=tmp_path)
        assert_one_line_error(out, 1)
        assert re.search(pattern, out.stderr), out.stderr
        assert out.stdout == ""
        self.check_nothing_cached(name, image, root)

    def test_unframed_response_socket_is_closed(self, registry, proxy, image, sleeps):
        _scenario_over_cap_unframed(registry, proxy, image)
        with pytest.raises(zr.ManifestError) as info:
            make_puller(sleeps=sleeps).pull(ref(proxy))
        assert "limit" in str(info.value)  # the caller still holds the error
        # The server's handler ends once the client has closed the connection.
        assert proxy.wait_until(lambda p: all(r["done"] for r in p.requests), 2)

    def test_redirect_hops_are_counted(self, registry, proxy, image, sleeps):
        _scenario_endless_manifest_redirects(registry, proxy, image)
        with pytest.raises(zr.RegistryError):
            make_puller(sleeps=sleeps).pull(ref(proxy))
        assert proxy.count("GET", "/manifests/") == zr.MAX_REDIRECTS + 1

    def test_realm_refusals_send_nothing_anywhere(self, registry, proxy, image):
        registry.auth = "bearer"
        registry.realm = f"ftp://{proxy.host}/token"
        with pytest.raises(zr.AuthError):
            make_puller().pull(ref(registry), zr.RegistryAuth.basic("user", "secret"))
        assert proxy.requests == [] and registry.token_requests == []


# =============================================================================
# CLI INPUT
# =============================================================================

class TestCliInput:
    def test_a_pull_that_fails_before_any_blob_leaves_no_cache(self, tmp_path):
        out = run_cli("pull", "127.0.0.1:9/app", "--cache", str(tmp_path / "new"),
                      cwd=tmp_path)
        assert_one_line_error(out, 1)
        assert not (tmp_path / "new").exists()
        (tmp_path / "old").mkdir()
        run_cli("pull", "127.0.0.1:9/app", "--cache", str(tmp_path / "old"), cwd=tmp_path)
        assert (tmp_path / "old").is_dir()  # one that was there stays

    def test_an_empty_cache_option_is_an_error(self, tmp_path):
        out = run_cli("pull", "127.0.0.1:9/app", "--cache", "", cwd=tmp_path)
        assert_one_line_error(out, 1)
        assert "--cache is empty" in out.stderr

    def test_a_broken_docker_config_warning_says_where_it_broke(self, tmp_path):
        (tmp_path / "dc").mkdir()
        (tmp_path / "dc" / "config.json").write_text('{"auths": {\n  "x": secret-ish}')
        out = run_cli("pull", "127.0.0.1:9/app", "--cache", str(tmp_path / "c"),
                      env={"DOCKER_CONFIG": str(tmp_path / "dc")}, cwd=tmp_path)
        assert "not JSON (line 2, column 8)" in out.stderr and "secret-ish" not in out.stderr

    def test_a_host_that_does_not_resolve_is_named(self):
        import socket as _socket
        error = zr._unreachable_error(
            "docker.io", "registry-1.docker.io", zr._ProxySettings(), "GET",
            "https://registry-1.docker.io/v2/", _socket.gaierror(-2, "Name not known"), None)
        assert str(error).startswith("cannot reach docker.io (registry-1.docker.io): ")
        local = zr._unreachable_error(
            "localhost:5000", "localhost", zr._ProxySettings(), "GET",
            "http://localhost:5000/v2/", ConnectionRefusedError(111, "refused"), None)
        assert str(local).startswith("cannot reach localhost:5000: ")

    @pytest.mark.parametrize("reference, text", [
        ("", "empty reference"),
        ("a b", "whitespace"),
        ("Team/App", "lowercase"),
        ("https://registry.example/app", "no URL scheme"),
        ("app:", "invalid tag"),
        ("app:-x", "invalid tag"),
        ("app@sha256:abc", "64 lowercase hex"),
        ("app@md5:" + "a" * 32, "unsupported algorithm"),
        ("app@sha256:" + "A" * 64, "lowercase hex"),
        ("-app", "invalid path component"),
        ("a" * 300, "longer than 255"),
        ("exa mple.com/app", "whitespace"),
        ("bad_host:5000/app", "invalid registry host"),
    ])
    def test_malformed_references(self, reference, text, tmp_path):
        out = run_cli("pull", "--cache", str(tmp_path / "c"), "--", reference, cwd=tmp_path)
        assert_one_line_error(out, 1)
        assert text in out.stderr

    def test_port_out_of_range_is_refused(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(1, 1000)])
        port = int(registry.host.split(":")[1]) + 65536
        out = run_cli("pull", f"127.0.0.1:{port}/app:v1", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path)
        assert registry.requests == [], "talked to a port that was never named"
        assert_one_line_error(out, 1)
        assert f"port {port} is out of range" in out.stderr

    @pytest.mark.parametrize("args, text", [
        (["pull", "app", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--frobnicate"], "unrecognized arguments"),
        (["pull"], "required"),
        (["pull", "app", "--max-workers", "many"], "at least 1, got 'many'"),
        (["pull", "app", "--cache"], "expected one argument"),
        (["cache", "verify", "--bogus"], "unrecognized arguments"),
        (["cache", "prune", "--max-bytes", "-5"], "invalid size"),
        (["cache", "explode"], "invalid choice"),
    ])
    def test_usage_errors_exit_2(self, args, text, tmp_path):
        out = run_cli(*args, cwd=tmp_path)
        assert_one_line_error(out, 2)
        assert text in out.stderr

    @pytest.mark.parametrize("workers", ["0", "-3"])
    def test_max_workers_below_one_is_a_usage_error(self, workers, tmp_path):
        out = run_cli("pull", "127.0.0.1:9/app", "--max-workers", workers, "--cache",
                      str(tmp_path / "c"), cwd=tmp_path)
        assert_one_line_error(out, 2)
        assert "at least 1" in out.stderr and not (tmp_path / "c").exists()

    def cache_cases(self, tmp_path: Path) -> Dict[str, Any]:
        in_the_way = tmp_path / "file"
        in_the_way.write_text("not a directory")
        blobs_is_a_file = tmp_path / "blobs-file"
        blobs_is_a_file.mkdir()
        (blobs_is_a_file / "blobs").write_text("x")
        bad_index = tmp_path / "bad-index"
        zr.BlobCache.open(bad_index)
        (bad_index / "index.sqlite").write_bytes(b"this is not a database" * 100)
        return {
            "under-a-file": (in_the_way / "cache", "cannot create cache directory"),
            "is-a-file": (in_the_way, "cannot create cache directory"),
            "in-proc": (Path("/proc/zlayer-cache"), "cannot create cache directory"),
            "under-proc-file": (Path("/proc/version/cache"), "cannot create cache directory"),
            "blobs-is-a-file": (blobs_is_a_file, "cannot create cache directory"),
            "index-not-a-database": (bad_index, "cache index"),
        }

    @pytest.mark.parametrize("case", ["under-a-file", "is-a-file", "in-proc",
                                      "under-proc-file", "blobs-is-a-file",
                                      "index-not-a-database"])
    @pytest.mark.parametrize("command", [["pull", "127.0.0.1:9/app"], ["cache", "verify"],
                                         ["cache", "ls"]])
    def test_unusable_cache_paths(self, case, command, registry, tmp_path):
        path, text = self.cache_cases(tmp_path)[case]
        if command[0] == "pull":
            registry.add_image("app", "v1", [layer_bytes(1, 1000)])
            command = ["pull", ref(registry, "app:v1")]
        if command[0] == "cache" and not path.is_dir():
            # cache commands never create one
            text = "is not a directory" if path.exists() else "no cache at"
        out = run_cli(*command, "--cache", str(path), cwd=tmp_path)
        if case == "index-not-a-database" and command[0] == "cache" and \
                command[1] == "verify" and out.returncode == 0:
            # verify hashes the files; it may not need the index at all.
            assert "0 corrupt" in out.stdout
            return
        assert_one_line_error(out, 1)
        assert text in out.stderr, out.stderr
        assert str(path) in out.stderr

    def test_read_only_filesystem(self, tmp_path):
        target = tmp_path / "ro"
        reason = mount_tmpfs(target, "ro,size=64k")
        if reason:
            pytest.skip(reason)
        try:
            out = run_cli("pull", "127.0.0.1:9/app", "--cache", str(target / "c"),
                          cwd=tmp_path)
        finally:
            unmount(target)
        assert_one_line_error(out, 1)
        assert "Read-only file system" in out.stderr

    def test_directory_without_write_permission(self, tmp_path):
        # Root ignores mode bits, so as root the CLI runs as an unprivileged user
        # (with an interpreter that user can reach: /root is usually 0o700).
        kwargs: Dict[str, Any] = {}
        python = sys.executable
        if os.geteuid() == 0:
            kwargs["preexec_fn"] = _become_nobody
            python = next((c for c in (sys.executable, "/usr/bin/python3")
                           if _runs_as_nobody(c)), "")
            if not python:
                pytest.skip("no Python interpreter the unprivileged user can run")
        base = Path(tempfile.mkdtemp(prefix="zl-perm-"))
        locked = base / "locked"
        try:
            base.chmod(0o755)
            locked.mkdir()
            if os.geteuid() == 0:
                os.chown(locked, 65534, 65534)
            locked.chmod(0o500)
            # A copy the unprivileged user can read, wherever this checkout is.
            shutil.copy(HERE / "zlayer_registry.py", base)
            out = subprocess.run([python, "-m", "zlayer_registry", "pull",
                                  "127.0.0.1:9/app", "--cache", str(locked / "c")],
                                 capture_output=True, text=True, cwd=str(base),
                                 env=cli_env(base), timeout=60, **kwargs)
            assert_one_line_error(out, 1)
            assert "Permission denied" in out.stderr and str(locked) in out.stderr
            assert not (locked / "c").exists()
        finally:
            if locked.exists():
                locked.chmod(0o700)
            shutil.rmtree(base)


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def _runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import sqlite3"], preexec_fn=_become_nobody,
                              capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


# =============================================================================
# SECRETS
# =============================================================================

def _no_secret(text: str, user: str = "user", password: str = PASSWORD) -> None:
    assert password not in text
    assert b64(f"{user}:{password}") not in text
    assert b64(password) not in text


class TestSecrets:
    @pytest.fixture
    def authed(self, registry, proxy, image, tmp_path):
        registry.auth = "bearer"
        registry.users = {"user": PASSWORD}
        config = write_docker_config(tmp_path / "dc", proxy.host)
        return {"DOCKER_CONFIG": str(config)}

    def test_debug_output_of_a_good_pull_shows_no_secret(self, proxy, image, authed,
                                                         tmp_path):
        out = run_cli("--debug", "pull", ref(proxy), "--cache", str(tmp_path / "c"),
                      "--json", env=authed, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        _no_secret(out.stdout + out.stderr)
        tokens = proxy.log("GET", "/blobs/")
        assert tokens and all(t["headers"]["Authorization"].startswith("Bearer ")
                              for t in tokens)

    @pytest.mark.parametrize("fault", ["flip", "unauthorized", "respond"])
    def test_debug_traceback_of_a_failed_pull_shows_no_secret(self, registry, proxy, image,
                                                              authed, tmp_path, fault):
        digest = image["layers"][0]["digest"]
        if fault == "flip":
            proxy.add_rule("flip", method="GET", path=digest, offset=10, times=2)
        elif fault == "unauthorized":
            proxy.add_rule("unauthorized", method="GET", path=digest, times=None)
        else:
            proxy.add_rule("respond", method="GET", path=digest, status=403)
        out = run_cli("--debug", "pull", ref(proxy), "--cache", str(tmp_path / "c"),
                      env=authed, cwd=tmp_path)
        assert out.returncode == 1 and "Traceback" in out.stderr  # --debug shows it
        _no_secret(out.stdout + out.stderr)

    def test_wrong_password_error_shows_no_secret(self, registry, proxy, image, tmp_path):
        registry.auth = "bearer"
        config = write_docker_config(tmp_path / "dc", proxy.host, password=PASSWORD + "x")
        out = run_cli("--debug", "pull", ref(proxy), "--cache", str(tmp_path / "c"),
                      env={"DOCKER_CONFIG": str(config)}, cwd=tmp_path)
        assert out.returncode == 1 and "401" in out.stderr
        _no_secret(out.stdout + out.stderr, password=PASSWORD + "x")

    def test_registry_echoing_credentials_is_not_repeated(self, registry, proxy, image,
                                                          tmp_path):
        registry.auth, registry.realm = "bearer", f"{proxy.url}/token"
        echo = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message":
                                       f"bad credentials: Basic {b64('user:' + PASSWORD)}"}]})
        proxy.add_rule("respond", method="GET", path="^/token", status=401, times=None,
                       body=echo.encode())
        config = write_docker_config(tmp_path / "dc", proxy.host)
        out = run_cli("pull", ref(proxy), "--cache", str(tmp_path / "c"),
                      env={"DOCKER_CONFIG": str(config)}, cwd=tmp_path)
        assert out.returncode == 1
        _no_secret(out.stdout + out.stderr)

    def test_no_credentials_to_a_plain_http_remote_by_redirect(self, registry, object_store,
                                                               image, sleeps):
        registry.auth = "basic"
        registry.users = {"user": PASSWORD}
        forward = fake.ForwardProxy()
        try:
            forward.hosts["objects.test"] = "127.0.0.1"
            store_port = object_store.url.rsplit(":", 1)[1]
            digest = image["layers"][0]["digest"]
            registry.faults.append(lambda m, p, h: {"status": 307, "body": b"", "headers": {
                "Location": f"http://objects.test:{store_port}/bucket/{digest[7:]}"}}
                if p.endswith(digest) else None)
            puller = make_puller(sleeps=sleeps, environ={"HTTP_PROXY": forward.url})
            with pytest.raises(zr.RegistryError,
                               match=r"refusing plain http to objects\.test") as info:
                puller.pull(ref(registry), zr.RegistryAuth.basic("user", PASSWORD))
            assert "--insecure" in str(info.value)
            _no_secret(str(info.value))
            assert forward.requests == [] and object_store.requests == []
        finally:
            close_quickly(forward)

    def test_no_credentials_to_a_plain_http_token_realm(self, registry, image, sleeps):
        registry.auth = "bearer"
        registry.users = {"user": PASSWORD}
        forward = fake.ForwardProxy()
        try:
            forward.hosts["auth.test"] = "127.0.0.1"
            registry.realm = f"http://auth.test:{registry.host.split(':')[1]}/token"
            puller = make_puller(sleeps=sleeps, environ={"HTTP_PROXY": forward.url})
            with pytest.raises(zr.AuthError, match="not https") as info:
                puller.pull(ref(registry), zr.RegistryAuth.basic("user", PASSWORD))
            _no_secret(str(info.value))
            assert forward.requests == [] and registry.token_requests == []
        finally:
            close_quickly(forward)

    def test_insecure_remote_registry_keeps_credentials_off_the_blob_host(
            self, registry, object_store, image, sleeps):
        # --insecure lets credentials go to the plain-http registry itself, and
        # still not to the host a blob is redirected to.
        registry.auth = "basic"
        registry.users = {"user": PASSWORD}
        forward = fake.ForwardProxy()
        try:
            port = registry.host.split(":")[1]
            store_port = object_store.url.rsplit(":", 1)[1]
            forward.hosts.update({"registry.test": "127.0.0.1", "objects.test": "127.0.0.1"})
            for blob in image["blobs"]:
                object_store.blobs[blob["digest"][7:]] = image["contents"][blob["digest"]]
            registry.faults.append(lambda m, p, h: {
                "status": 307, "body": b"", "once": False, "headers": {
                    "Location": f"http://objects.test:{store_port}/bucket/"
                                f"{p.rsplit(':', 1)[1]}"}}
                if "/blobs/" in p and "Authorization" in h else None)
            puller = make_puller(sleeps=sleeps, insecure=True,
                                 environ={"HTTP_PROXY": forward.url})
            manifest, _ = puller.pull(f"registry.test:{port}/team/app:v1",
                                      zr.RegistryAuth.basic("user", PASSWORD))
            assert manifest.digest == image["digest"]
            assert len(object_store.requests) == 4
            assert all("Authorization" not in r["headers"] for r in object_store.requests)
            blob_requests = [r for r in registry.requests if "/blobs/" in r["path"]]
            assert blob_requests and all(r["headers"].get("Authorization") == "Basic "
                                         + b64(f"user:{PASSWORD}") for r in blob_requests)
        finally:
            close_quickly(forward)

    def test_redirect_to_another_loopback_name_drops_authorization(
            self, registry, proxy, object_store, image, tmp_path, sleeps):
        registry.auth = "bearer"
        for blob in image["blobs"]:
            object_store.blobs[blob["digest"][7:]] = image["contents"][blob["digest"]]
        store_port = object_store.url.rsplit(":", 1)[1]
        proxy.add_rule("redirect", method="GET", path="/blobs/", times=None,
                       location=lambda p: f"http://localhost:{store_port}/bucket/"
                                          f"{p.rsplit(':', 1)[1]}")
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache, sleeps).pull(ref(proxy), zr.RegistryAuth.basic("user", "secret"))
        assert len(object_store.requests) == 4
        assert all("Authorization" not in r["headers"] for r in object_store.requests)
        check_cache(tmp_path / "c", image["contents"])
