"""Hermetic tests of the pull-through mirror (``serve --upstream``).

The upstream is the programmable fake registry (``_fake_registry``), which
counts requests and injects faults (429, 5xx, stalls, corrupted bytes); the
mirror is a RegistryServer in tmp_path on 127.0.0.1:0.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading

import pytest

from _testsupport import CLI, cli_env, layer_bytes, run_cli, zr

OCI_MANIFEST = zr.MEDIA_TYPE_OCI_MANIFEST
ACCEPT = {"Accept": ", ".join([OCI_MANIFEST, zr.MEDIA_TYPE_OCI_INDEX,
                               zr.MEDIA_TYPE_DOCKER_MANIFEST, zr.MEDIA_TYPE_DOCKER_LIST])}


@pytest.fixture
def store(tmp_path):
    local = zr.LocalRegistry(tmp_path / "store")
    yield local
    local.close()


def _mirror(store, *upstreams, **kwargs):
    return zr.RegistryServer(store, "127.0.0.1", 0, upstreams=list(upstreams), **kwargs).start()


@pytest.fixture
def mirror(store, registry):
    server = _mirror(store, f"http://{registry.host}")
    yield server
    server.shutdown()


def _get(server, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def _stored_name(registry, name):
    return f"{registry.host.replace(':', '-')}/{name}"


def _blob_gets(registry):
    return sum(1 for r in registry.requests if r["method"] == "GET" and "/blobs/" in r["path"])


def _manifest_requests(registry, method):
    return sum(1 for r in registry.requests
               if r["method"] == method and "/manifests/" in r["path"])


def _settled(server):
    """Wait until the mirror's downloads have ended (a reader gets its last byte once
    the digest checks out; the file is synced and stored just after)."""
    for flight in list(server.mirror._flights.values()):
        with flight._cond:
            assert flight._cond.wait_for(lambda: flight.finished, 30)


def _fault(method, part, **action):
    return lambda m, path, headers: dict(action) if m == method and part in path else None


class TestManifests:
    def test_a_tag_is_answered_from_upstream_and_stored_under_its_name(
            self, mirror, registry, store):
        image = registry.add_image("org/app", "v1", [layer_bytes(1)])
        response, body = _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)
        assert response.status == 200
        assert response.getheader("Docker-Content-Digest") == image["digest"]
        assert zr.compute_digest(body) == image["digest"]
        assert response.getheader("Content-Type") == OCI_MANIFEST
        name = _stored_name(registry, "org/app")
        assert store.list_tags(name) == ["v1"]
        assert store.resolve(name, "v1") == image["digest"]

    def test_a_tag_is_asked_upstream_at_most_once_per_ttl(self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=3600)
        try:
            for _ in range(3):
                assert _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0].status == 200
        finally:
            server.shutdown()
        assert _manifest_requests(registry, "HEAD") + _manifest_requests(registry, "GET") == 1

    def test_past_the_ttl_a_head_finds_the_tag_moved_and_the_new_manifest_is_served(
            self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            first = _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0]
            again = _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0]
            moved = registry.add_image("org/app", "v1", [layer_bytes(2)])
            after = _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0]
        finally:
            server.shutdown()
        assert again.getheader("Docker-Content-Digest") == \
            first.getheader("Docker-Content-Digest")
        assert after.getheader("Docker-Content-Digest") == moved["digest"]
        # the second answer cost one HEAD, no GET: the manifest was stored
        assert _manifest_requests(registry, "GET") == 2
        assert _manifest_requests(registry, "HEAD") == 2

    def test_eight_clients_asking_one_tag_at_once_cost_one_resolution(self, mirror, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(
            _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)[0].status)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        assert _manifest_requests(registry, "GET") == 1

    def test_a_child_manifest_by_digest_is_fetched_once_then_from_the_store(
            self, mirror, registry, store):
        child = registry.add_image("org/multi", None, [layer_bytes(3)])
        registry.add_index("org/multi", "v1", [({"os": "linux", "architecture": "amd64"}, child)])
        assert _get(mirror, "/v2/org/multi/manifests/v1", ACCEPT)[0].status == 200
        for _ in range(2):
            response, body = _get(mirror, f"/v2/org/multi/manifests/{child['digest']}", ACCEPT)
            assert response.status == 200 and zr.compute_digest(body) == child["digest"]
        gets = [r for r in registry.requests if child["digest"] in r["path"]]
        assert len(gets) == 1
        assert child["digest"] in store.list_manifests(_stored_name(registry, "org/multi"))

    @pytest.mark.parametrize("status", [429, 500, 503])
    def test_with_the_upstream_failing_a_stored_tag_is_served_marked_stale(
            self, store, registry, status):
        image = registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            assert _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0].status == 200
            registry.faults.append(lambda m, p, h: {"status": status, "once": False,
                                                    "headers": {"Retry-After": "0"}})
            response, body = _get(server, "/v2/org/app/manifests/v1", ACCEPT)
        finally:
            server.shutdown()
        assert response.status == 200
        assert zr.compute_digest(body) == image["digest"]
        assert "Stale" in (response.getheader("Warning") or "")

    def test_with_the_upstream_down_a_stored_tag_is_served_and_an_unknown_one_is_503(
            self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            assert _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0].status == 200
            registry.close()
            stale, _ = _get(server, "/v2/org/app/manifests/v1", ACCEPT)
            unknown, body = _get(server, "/v2/org/app/manifests/v2", ACCEPT)
        finally:
            server.shutdown()
        assert stale.status == 200 and stale.getheader("Warning")
        assert unknown.status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"

    def test_clients_queued_behind_a_failing_upstream_get_the_stale_tag_without_asking_it(
            self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            assert _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0].status == 200
            before = len(registry.requests)
            registry.faults.append(lambda m, p, h: {"status": 503, "once": False})
            statuses = []
            threads = [threading.Thread(target=lambda: statuses.append(_get(
                server, "/v2/org/app/manifests/v1", ACCEPT)[0].getheader("Warning")))
                for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            server.shutdown()
        assert len(statuses) == 4 and all(statuses)  # all four stale, with the warning
        assert len(registry.requests) - before == 1  # one request upstream, no retry

    def test_a_corrupt_manifest_from_upstream_is_503_not_the_clients_fault(
            self, mirror, registry):
        child = registry.add_image("org/multi", None, [layer_bytes(3)])
        registry.add_index("org/multi", "v1", [({"os": "linux", "architecture": "amd64"}, child)])
        registry.faults.append(_fault("GET", child["digest"], status=200, body=b'{"x": 1}',
                                      headers={"Content-Type": OCI_MANIFEST}))
        response, body = _get(mirror, f"/v2/org/multi/manifests/{child['digest']}", ACCEPT)
        assert response.status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"

    def test_an_upstream_429_with_nothing_stored_is_passed_on_with_retry_after(
            self, mirror, registry):
        registry.faults.append(lambda m, p, h: {"status": 429, "once": False,
                                                "headers": {"Retry-After": "0"}})
        response, body = _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)
        assert response.status == 429
        assert response.getheader("Retry-After")
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"

    def test_a_tag_gone_upstream_is_404_and_forgotten_here(self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            assert _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0].status == 200
            del registry.manifests[("org/app", "v1")]
            response, body = _get(server, "/v2/org/app/manifests/v1", ACCEPT)
        finally:
            server.shutdown()
        assert response.status == 404
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert store.list_tags(_stored_name(registry, "org/app")) == []

    def test_a_mirror_takes_no_pushes(self, mirror):
        response, body = _get(mirror, "/v2/org/app/blobs/uploads/", method="POST")
        assert response.status == 405
        assert "mirror" in json.loads(body)["errors"][0]["message"]


class TestBlobs:
    def test_a_blob_is_fetched_once_verified_and_stored(self, mirror, registry, store):
        image = registry.add_image("org/app", "v1", [layer_bytes(1, 3_000_000)])
        layer = image["layers"][0]
        _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)
        for _ in range(2):
            response, body = _get(mirror, f"/v2/org/app/blobs/{layer['digest']}")
            assert response.status == 200 and zr.compute_digest(body) == layer["digest"]
            _settled(mirror)
        assert _blob_gets(registry) == 1
        assert store.has_blob(layer["digest"])

    def test_a_blob_asked_for_before_any_manifest_gets_its_size_by_head(
            self, mirror, registry):
        image = registry.add_image("org/app", "v1", [layer_bytes(4, 100_000)])
        layer = image["layers"][0]
        head, _ = _get(mirror, f"/v2/org/app/blobs/{layer['digest']}", method="HEAD")
        assert head.status == 200 and int(head.getheader("Content-Length")) == layer["size"]
        assert _blob_gets(registry) == 0  # a HEAD downloads nothing
        response, body = _get(mirror, f"/v2/org/app/blobs/{layer['digest']}")
        assert response.status == 200 and zr.compute_digest(body) == layer["digest"]

    def test_a_range_of_a_missing_blob_is_answered_once_it_is_stored(self, mirror, registry):
        data = layer_bytes(5, 50_000)
        image = registry.add_image("org/app", "v1", [data])
        response, body = _get(mirror, f"/v2/org/app/blobs/{image['layers'][0]['digest']}",
                              {"Range": "bytes=100-199"})
        assert response.status == 206 and body == data[100:200]

    def test_clients_asking_at_once_share_one_download_as_it_arrives(
            self, mirror, registry, store):
        data = layer_bytes(6, 2_000_000)
        image = registry.add_image("org/app", "v1", [data])
        digest = image["layers"][0]["digest"]
        _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)
        # The upstream sends 100 kB, then stalls until released, then drops.
        registry.faults.append(_fault("GET", "/blobs/", stall_after=100_000))
        conns, firsts = [], []
        for _ in range(4):
            conn = http.client.HTTPConnection(*mirror.address, timeout=30)
            conn.request("GET", f"/v2/org/app/blobs/{digest}")
            response = conn.getresponse()
            assert response.status == 200
            firsts.append(response.read(100_000))  # what upstream sent so far, streamed
            conns.append((conn, response))
        assert all(first == data[:100_000] for first in firsts)
        registry.stall.set()  # the upstream drops; the mirror resumes with Range
        for (conn, response), first in zip(conns, firsts):
            assert first + response.read() == data
            conn.close()
        _settled(mirror)
        assert _blob_gets(registry) == 2  # the first GET and its resumption, for all four
        assert store.has_blob(digest)

    def test_a_corrupt_download_cuts_its_readers_off_and_stores_nothing(
            self, mirror, registry, store):
        data = layer_bytes(7, 500_000)
        image = registry.add_image("org/app", "v1", [data])
        digest = image["layers"][0]["digest"]
        _get(mirror, "/v2/org/app/manifests/v1", ACCEPT)
        for _ in range(2):  # the download, and the one retry a digest failure gets
            registry.faults.append(_fault("GET", "/blobs/", corrupt_at=10))
        conn = http.client.HTTPConnection(*mirror.address, timeout=30)
        conn.request("GET", f"/v2/org/app/blobs/{digest}")
        response = conn.getresponse()
        if response.status == 200:
            with pytest.raises(http.client.IncompleteRead):
                response.read()
        else:
            assert response.status == 502
        conn.close()
        _settled(mirror)  # the retry may still run
        assert not store.has_blob(digest)
        # the next client gets the right bytes (the faults are spent)
        response, body = _get(mirror, f"/v2/org/app/blobs/{digest}")
        assert response.status == 200 and body == data

    def test_a_blob_upstream_lacks_is_blob_unknown(self, mirror, registry):
        response, body = _get(mirror, f"/v2/org/app/blobs/sha256:{'a' * 64}")
        assert response.status == 404
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"

    def test_our_puller_pulls_an_index_through_the_mirror(self, mirror, registry, tmp_path):
        child = registry.add_image("org/multi", None, [layer_bytes(8), layer_bytes(9)])
        registry.add_index("org/multi", "v1", [({"os": "linux", "architecture": "amd64"}, child)])
        host, port = mirror.address
        with zr.ImagePuller(zr.BlobCache(), platform="linux/amd64") as puller:
            manifest, layers = puller.pull(f"{host}:{port}/org/multi:v1")
        assert [layer.digest for layer in layers] == [d["digest"] for d in child["layers"]]
        assert manifest.digest == child["digest"]


class TestUpstreams:
    def test_ns_picks_the_upstream_and_an_unknown_ns_is_name_unknown(self, store, registry):
        import _fake_registry as fake
        other = fake.FakeRegistry()
        try:
            one = registry.add_image("org/app", "v1", [layer_bytes(1)])
            two = other.add_image("org/app", "v1", [layer_bytes(2)])
            server = _mirror(store, f"one.example=http://{registry.host}",
                             f"two.example=http://{other.host}")
            try:
                default = _get(server, "/v2/org/app/manifests/v1", ACCEPT)[0]
                first = _get(server, "/v2/org/app/manifests/v1?ns=one.example", ACCEPT)[0]
                second = _get(server, "/v2/org/app/manifests/v1?ns=two.example", ACCEPT)[0]
                unknown, body = _get(server, "/v2/org/app/manifests/v1?ns=ghcr.io", ACCEPT)
            finally:
                server.shutdown()
        finally:
            other.close()
        assert default.getheader("Docker-Content-Digest") == one["digest"]
        assert first.getheader("Docker-Content-Digest") == one["digest"]
        assert second.getheader("Docker-Content-Digest") == two["digest"]
        assert unknown.status == 404
        assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
        assert store.list_images() == ["one.example/org/app", "two.example/org/app"]

    @pytest.mark.parametrize("text", ["ftp://registry.example", "https://host/path",
                                      "bad host=http://x", "a=http://b=c"])
    def test_a_malformed_upstream_is_refused(self, store, text):
        with pytest.raises(zr.ZLayerError):
            zr.RegistryServer(store, "127.0.0.1", 0, upstreams=[text])

    def test_docker_hub_names_get_library_and_the_api_host(self, store):
        upstream = zr._Upstream.parse("https://registry-1.docker.io")
        assert (upstream.host, upstream.registry) == ("docker.io", "docker.io")
        mirror = zr._Mirror(store, ["docker.io"], 60, lambda text: None, environ={})
        try:
            client = mirror.client(mirror.upstreams[0], "alpine")
            assert client.repository == "library/alpine"
            assert client.base_url == "https://registry-1.docker.io"
        finally:
            mirror.close()
        assert zr._Upstream.parse("http://10.0.0.5:5000").insecure
        assert not zr._Upstream.parse("http://127.0.0.1:5000").insecure

    def test_tags_are_listed_upstream_and_from_the_store_when_it_is_down(
            self, store, registry):
        registry.add_image("org/app", "v1", [layer_bytes(1)])
        registry.add_image("org/app", "v2", [layer_bytes(2)])
        server = _mirror(store, f"http://{registry.host}", upstream_ttl_s=0)
        try:
            _get(server, "/v2/org/app/manifests/v1", ACCEPT)
            registry.close()
            response, body = _get(server, "/v2/org/app/tags/list")
        finally:
            server.shutdown()
        assert response.status == 200
        assert json.loads(body) == {"name": "org/app", "tags": ["v1"]}


class TestServeUpstream:
    def test_the_cli_says_it_mirrors_and_serves_the_upstream(self, tmp_path, registry):
        image = registry.add_image("org/app", "v1", [layer_bytes(1)])
        proc = subprocess.Popen([*CLI, "serve", "--root", str(tmp_path / "store"), "--port",
                                 "0", "--upstream", f"http://{registry.host}", "--quiet"],
                                stderr=subprocess.PIPE, env=cli_env(tmp_path), text=True)
        try:
            line = proc.stderr.readline()
            assert "pull-through mirror of" in line and registry.host in line, line
            host = line.rsplit("http://", 1)[1].strip()
            conn = http.client.HTTPConnection(host, timeout=30)
            conn.request("GET", "/v2/org/app/manifests/v1", headers=ACCEPT)
            response = conn.getresponse()
            response.read()
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert response.getheader("Docker-Content-Digest") == image["digest"]
        assert proc.returncode == 0 and "Traceback" not in err

    def test_a_malformed_upstream_is_one_line_and_exit_2(self, tmp_path):
        result = run_cli("serve", "--root", str(tmp_path / "store"), "--upstream",
                         "ftp://registry.example", env=cli_env(tmp_path))
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "ftp" in result.stderr


class TestUpstreamCredentials:
    def test_the_upstream_gets_docker_login_credentials_and_clients_never_see_them(
            self, store, registry, tmp_path, monkeypatch):
        import base64
        registry.auth = "basic"
        image = registry.add_image("org/app", "v1", [layer_bytes(1)])
        config = tmp_path / "docker"
        config.mkdir()

        def login(password):
            auth = base64.b64encode(f"user:{password}".encode()).decode()
            (config / "config.json").write_text(json.dumps({"auths": {registry.host: {
                "auth": auth}}}))

        login("secret")
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
        server = _mirror(store, f"http://{registry.host}")
        try:
            good, _ = _get(server, "/v2/org/app/manifests/v1", ACCEPT)
        finally:
            server.shutdown()
        login("wrong-password-xyz")
        server = _mirror(store, f"http://{registry.host}")
        try:
            refused, body = _get(server, "/v2/org/app/manifests/v2", ACCEPT)
        finally:
            server.shutdown()
        assert good.status == 200 and good.getheader("Docker-Content-Digest") == image["digest"]
        assert refused.status == 503
        assert b"wrong-password-xyz" not in body and b"user" not in body
