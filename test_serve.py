"""Hermetic tests of the registry server (RegistryServer, ``serve``).

Each test serves a store in tmp_path on 127.0.0.1:0 and talks to it with
http.client, our own pusher and puller, or the CLI.  No peer is needed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from _testsupport import CLI, Sleeps, cli_env, layer_bytes, run_cli, zr

import _oci_testkit as kit  # noqa: E402

OCI_MANIFEST = zr.MEDIA_TYPE_OCI_MANIFEST


@pytest.fixture
def served(tmp_path):
    store = zr.LocalRegistry(tmp_path / "store")
    server = zr.RegistryServer(store, "127.0.0.1", 0).start()
    yield server
    server.shutdown()
    store.close()


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, server):
        self.host, self.port = server.address
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response, data

    def close(self):
        self.conn.close()


@pytest.fixture
def client(served):
    c = Client(served)
    yield c
    c.close()


def _blob(client, name, data):
    digest = zr.compute_digest(data)
    response, _ = client.request("POST", f"/v2/{name}/blobs/uploads/?digest={digest}", data)
    assert response.status == 201, response.status
    return {"digest": digest, "size": len(data)}


def _image(client, name, tag, seed=1, size=1000, extra=None):
    config = _blob(client, name, json.dumps({"os": "linux", "architecture": "amd64",
                                              "seed": seed}).encode())
    layer = _blob(client, name, layer_bytes(seed, size))
    manifest = dict({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                     "config": dict(config, mediaType=zr.MEDIA_TYPE_OCI_CONFIG),
                     "layers": [dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar")]},
                    **(extra or {}))
    raw = json.dumps(manifest).encode()
    response, _ = client.request("PUT", f"/v2/{name}/manifests/{tag}", raw,
                                 {"Content-Type": OCI_MANIFEST})
    assert response.status == 201, response.status
    return raw, layer


def _errors(data):
    return [e["code"] for e in json.loads(data)["errors"]]


class TestBasics:
    def test_ping_names_the_api_version(self, client):
        response, data = client.request("GET", "/v2/")
        assert response.status == 200 and data == b"{}"
        assert response.getheader("Docker-Distribution-API-Version") == "registry/2.0"

    def test_manifest_by_tag_and_digest_with_its_headers(self, client):
        raw, _ = _image(client, "team/app", "v1")
        digest = zr.compute_digest(raw)
        for reference in ("v1", digest):
            response, data = client.request("GET", f"/v2/team/app/manifests/{reference}",
                                            headers={"Accept": OCI_MANIFEST})
            assert response.status == 200 and data == raw
            assert response.getheader("Content-Type") == OCI_MANIFEST
            assert response.getheader("Docker-Content-Digest") == digest
            assert int(response.getheader("Content-Length")) == len(raw)
        response, data = client.request("HEAD", "/v2/team/app/manifests/v1")
        assert response.status == 200 and data == b""
        assert response.getheader("Content-Length") == str(len(raw))

    def test_unknown_names_and_manifests(self, client):
        _image(client, "app", "v1")
        response, data = client.request("GET", "/v2/nope/manifests/v1")
        assert response.status == 404 and _errors(data) == ["MANIFEST_UNKNOWN"]  # as distribution
        response, data = client.request("GET", "/v2/app/manifests/v2")
        assert response.status == 404 and _errors(data) == ["MANIFEST_UNKNOWN"]
        response, data = client.request("GET", "/v2/nope/tags/list")
        assert response.status == 404 and _errors(data) == ["NAME_UNKNOWN"]

    def test_every_accept_header_is_read(self, client):
        raw, _ = _image(client, "app", "v1")
        docker_only = [("Accept", zr.MEDIA_TYPE_DOCKER_MANIFEST)]
        client.conn.putrequest("GET", "/v2/app/manifests/v1")
        for key, value in docker_only + [("Accept", OCI_MANIFEST)]:
            client.conn.putheader(key, value)
        client.conn.endheaders()
        response = client.conn.getresponse()
        assert response.status == 200 and response.read() == raw
        response, data = client.request("GET", "/v2/app/manifests/v1", headers=dict(docker_only))
        assert response.status == 404 and _errors(data) == ["MANIFEST_UNKNOWN"]

    def test_manifest_put_refusals_are_the_specs_codes(self, client):
        raw, layer = _image(client, "app", "v1")
        missing = json.loads(raw)
        missing["layers"][0]["digest"] = zr.compute_digest(b"not uploaded")
        cases = [
            (json.dumps(missing).encode(), "v2", 400, "MANIFEST_BLOB_UNKNOWN"),
            (b"{nope", "v2", 400, "MANIFEST_INVALID"),
            (raw, zr.compute_digest(b"x"), 400, "DIGEST_INVALID"),
            (raw, "-bad", 400, "TAG_INVALID"),
            (b"{" + b" " * zr.MAX_MANIFEST_SIZE_BYTES + b"}", "big", 413, "SIZE_INVALID"),
        ]
        for body, reference, status, code in cases:
            response, data = client.request("PUT", f"/v2/app/manifests/{reference}", body,
                                            {"Content-Type": OCI_MANIFEST})
            assert (response.status, _errors(data)) == (status, [code]), reference
        # The connection survived every refusal (each body was read or drained).
        response, _ = client.request("GET", "/v2/app/tags/list")
        assert json.loads(_)["tags"] == ["v1"]

    @pytest.mark.parametrize("path, code", [
        ("/v2/../etc/manifests/v1", "NAME_INVALID"),
        ("/v2/UPPER/manifests/v1", "NAME_INVALID"),
        ("/v2/a/blobs/sha256:..%2F..%2Fetc", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "0" * 63 + "g", "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:abc", "DIGEST_INVALID"),
        ("/v2/" + "a/" * 200 + "b/manifests/v1", "NAME_INVALID"),
    ])
    def test_hostile_names_and_digests(self, client, served, path, code):
        response, data = client.request("GET", path)
        assert response.status == 400 and _errors(data) == [code]
        assert not (Path(served.store.root).parent / "etc").exists()

    def test_delete_tag_then_manifest(self, client):
        raw, _ = _image(client, "app", "v1")
        digest = zr.compute_digest(raw)
        response, _ = client.request("DELETE", "/v2/app/manifests/v1")
        assert response.status == 202
        response, _ = client.request("GET", f"/v2/app/manifests/{digest}")
        assert response.status == 200  # untagged, still there by digest
        response, _ = client.request("DELETE", f"/v2/app/manifests/{digest}")
        assert response.status == 202
        response, data = client.request("DELETE", f"/v2/app/manifests/{digest}")
        assert response.status == 404

    def test_read_only_answers_405_to_writes(self, tmp_path):
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, read_only=True).start() as server:
            c = Client(server)
            for method, path in (("POST", "/v2/a/blobs/uploads/"), ("PUT", "/v2/a/manifests/v1"),
                                 ("DELETE", "/v2/a/manifests/v1")):
                response, data = c.request(method, path, b"{}")
                assert response.status == 405 and _errors(data) == ["UNSUPPORTED"]
            response, _ = c.request("GET", "/v2/")
            assert response.status == 200
            c.close()


class TestBlobs:
    def test_get_head_and_ranges(self, client):
        data = layer_bytes(5, 100_000)
        blob = _blob(client, "app", data)
        response, body = client.request("GET", f"/v2/app/blobs/{blob['digest']}")
        assert response.status == 200 and body == data
        assert response.getheader("Docker-Content-Digest") == blob["digest"]
        response, body = client.request("HEAD", f"/v2/app/blobs/{blob['digest']}")
        assert response.status == 200 and body == b""
        assert response.getheader("Content-Length") == str(len(data))
        for wanted, status, part, content_range in (
                ("bytes=10-19", 206, data[10:20], "bytes 10-19/100000"),
                ("bytes=99990-", 206, data[99990:], "bytes 99990-99999/100000"),
                ("bytes=-5", 206, data[-5:], "bytes 99995-99999/100000"),
                ("bytes=99999-200000", 206, data[99999:], "bytes 99999-99999/100000")):
            response, body = client.request("GET", f"/v2/app/blobs/{blob['digest']}",
                                            headers={"Range": wanted})
            assert (response.status, body) == (status, part), wanted
            assert response.getheader("Content-Range") == content_range
        response, body = client.request("GET", f"/v2/app/blobs/{blob['digest']}",
                                        headers={"Range": "bytes=200000-"})
        assert response.status == 416
        assert response.getheader("Content-Range") == "bytes */100000"
        response, body = client.request("GET", f"/v2/app/blobs/{zr.compute_digest(b'x')}")
        assert response.status == 404 and _errors(body) == ["BLOB_UNKNOWN"]

    def test_delete_spares_blobs_a_manifest_uses(self, client):
        _, layer = _image(client, "app", "v1")
        response, data = client.request("DELETE", f"/v2/app/blobs/{layer['digest']}")
        assert response.status == 405 and _errors(data) == ["UNSUPPORTED"]
        loose = _blob(client, "app", b"loose")
        response, _ = client.request("DELETE", f"/v2/app/blobs/{loose['digest']}")
        assert response.status == 202
        response, _ = client.request("HEAD", f"/v2/app/blobs/{loose['digest']}")
        assert response.status == 404


def _start(client, name):
    response, _ = client.request("POST", f"/v2/{name}/blobs/uploads/")
    assert response.status == 202
    assert response.getheader("Docker-Upload-UUID")
    assert response.getheader("Range") == "0-0"
    return response.getheader("Location")


class TestUploads:
    def test_post_then_put_and_chunked_patches(self, client, served):
        data = layer_bytes(7, 300_000)
        digest = zr.compute_digest(data)
        location = _start(client, "app")
        for start in range(0, len(data), 100_000):
            piece = data[start:start + 100_000]
            response, _ = client.request("PATCH", location, piece, {
                "Content-Range": f"{start}-{start + len(piece) - 1}",
                "Content-Type": "application/octet-stream"})
            assert response.status == 202
            assert response.getheader("Range") == f"0-{start + len(piece) - 1}"
            location = response.getheader("Location")
        response, _ = client.request("GET", location)
        assert response.status == 204 and response.getheader("Range") == "0-299999"
        response, _ = client.request("PUT", f"{location}&digest={quote(digest)}")
        assert response.status == 201 and response.getheader("Docker-Content-Digest") == digest
        assert served.store.get_blob(digest) == data
        assert not [n for n in os.listdir(Path(served.store.root) / "uploads")
                    if not n.startswith(".")]

    def test_out_of_order_chunk_is_416_with_the_range(self, client):
        location = _start(client, "app")
        response, _ = client.request("PATCH", location, b"abc", {"Content-Range": "0-2"})
        location = response.getheader("Location")
        response, _ = client.request("PATCH", location, b"xyz", {"Content-Range": "10-12"})
        assert response.status == 416 and response.getheader("Range") == "0-2"

    def test_a_wrong_final_digest_keeps_nothing(self, client, served):
        location = _start(client, "app")
        wrong = zr.compute_digest(b"something else")
        response, data = client.request("PUT", f"{location}&digest={wrong}", b"the bytes")
        assert response.status == 400 and _errors(data) == ["DIGEST_INVALID"]
        assert not served.store.has_blob(wrong)
        assert not served.store.has_blob(zr.compute_digest(b"the bytes"))
        response, data = client.request("GET", location)
        assert response.status == 404 and _errors(data) == ["BLOB_UPLOAD_UNKNOWN"]

    def test_final_digest_escaped_or_raw_and_a_streamed_put(self, client, served):
        for data, escape in ((b"raw colon", False), (b"escaped colon", True)):
            digest = zr.compute_digest(data)
            location = _start(client, "app")
            shown = quote(digest) if escape else digest
            response, _ = client.request("PUT", f"{location}&digest={shown}", data)
            assert response.status == 201
            assert served.store.get_blob(digest) == data

    def test_chunked_transfer_encoding_patch(self, client, served):
        data = layer_bytes(8, 50_000)
        location = _start(client, "app")
        client.conn.putrequest("PATCH", location)
        client.conn.putheader("Transfer-Encoding", "chunked")
        client.conn.endheaders()
        for start in range(0, len(data), 7000):
            piece = data[start:start + 7000]
            client.conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        client.conn.send(b"0\r\n\r\n")
        response = client.conn.getresponse()
        response.read()
        assert response.status == 202 and response.getheader("Range") == "0-49999"
        location = response.getheader("Location")
        response, _ = client.request("PUT", f"{location}&digest={zr.compute_digest(data)}")
        assert response.status == 201
        assert served.store.get_blob(zr.compute_digest(data)) == data

    def test_forged_stale_or_foreign_sessions_are_unknown(self, client):
        location = _start(client, "app")
        session = location.split("/uploads/")[1].split("?")[0]
        state = location.split("_state=")[1]
        for path in (f"/v2/app/blobs/uploads/{session}?_state=forged.{'0' * 64}",
                     f"/v2/other/blobs/uploads/{session}?_state={state}",
                     f"/v2/app/blobs/uploads/{'f' * 32}?_state={state}",
                     f"/v2/app/blobs/uploads/../../x?_state={state}"):
            response, data = client.request("PATCH", path, b"x")
            assert response.status in (400, 404) and _errors(data)[0] in (
                "BLOB_UPLOAD_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN"), path
        response, _ = client.request("DELETE", location)
        assert response.status == 204
        response, data = client.request("PATCH", location, b"x")
        assert response.status == 404 and _errors(data) == ["BLOB_UPLOAD_UNKNOWN"]

    def test_mount_of_a_stored_blob_and_of_a_missing_one(self, client):
        stored = _blob(client, "one", b"mount me")
        response, _ = client.request(
            "POST", f"/v2/two/blobs/uploads/?mount={stored['digest']}&from=one")
        assert response.status == 201
        assert response.getheader("Docker-Content-Digest") == stored["digest"]
        missing = zr.compute_digest(b"absent")
        response, _ = client.request("POST", f"/v2/two/blobs/uploads/?mount={missing}&from=one")
        assert response.status == 202 and "/blobs/uploads/" in response.getheader("Location")

    def test_a_session_survives_a_restart_of_the_server(self, tmp_path):
        root = tmp_path / "store"
        data = layer_bytes(9, 200_000)
        with zr.LocalRegistry(root) as store:
            with zr.RegistryServer(store, "127.0.0.1", 0).start() as server:
                c = Client(server)
                location = _start(c, "app")
                response, _ = c.request("PATCH", location, data[:120_000],
                                        {"Content-Range": "0-119999"})
                location = response.getheader("Location")
                c.close()
        with zr.LocalRegistry(root) as store:
            with zr.RegistryServer(store, "127.0.0.1", 0).start() as server:
                c = Client(server)
                response, _ = c.request("GET", location)
                assert response.status == 204 and response.getheader("Range") == "0-119999"
                response, _ = c.request("PATCH", location, data[120_000:],
                                        {"Content-Range": f"120000-{len(data) - 1}"})
                location = response.getheader("Location")
                response, _ = c.request("PUT", f"{location}&digest={zr.compute_digest(data)}")
                assert response.status == 201
                assert store.get_blob(zr.compute_digest(data)) == data
                c.close()

    def test_concurrent_uploads_of_one_blob(self, served):
        data = layer_bytes(10, 400_000)
        digest = zr.compute_digest(data)
        statuses, errors = [], []

        def upload():
            c = Client(served)
            try:
                location = _start(c, "app")
                response, _ = c.request("PUT", f"{location}&digest={digest}", data)
                statuses.append(response.status)
            except Exception as exc:  # reported below
                errors.append(exc)
            finally:
                c.close()

        threads = [threading.Thread(target=upload) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and statuses == [201] * 6
        assert served.store.get_blob(digest) == data


class TestListings:
    def test_tags_and_catalog_pages_with_links(self, client):
        for tag in ("a", "b", "c", "d", "e"):
            _image(client, "app", tag)
        _image(client, "other", "v1")
        response, data = client.request("GET", "/v2/app/tags/list?n=2")
        assert json.loads(data) == {"name": "app", "tags": ["a", "b"]}
        assert response.getheader("Link") == '</v2/app/tags/list?n=2&last=b>; rel="next"'
        response, data = client.request("GET", "/v2/app/tags/list?n=2&last=b")
        assert json.loads(data)["tags"] == ["c", "d"]
        response, data = client.request("GET", "/v2/app/tags/list?n=2&last=d")
        assert json.loads(data)["tags"] == ["e"] and response.getheader("Link") is None
        response, data = client.request("GET", "/v2/app/tags/list?n=0")
        assert json.loads(data)["tags"] == []
        response, data = client.request("GET", "/v2/_catalog?n=1")
        assert json.loads(data) == {"repositories": ["app"]}
        assert "last=app" in response.getheader("Link")
        response, data = client.request("GET", "/v2/app/tags/list?n=x")
        assert response.status == 400

    def test_referrers_with_the_artifact_type_filter(self, client):
        raw, _ = _image(client, "app", "v1")
        subject = {"mediaType": OCI_MANIFEST, "digest": zr.compute_digest(raw), "size": len(raw)}
        made = []
        for kind in ("application/spdx+json", "application/vnd.dev.sig"):
            empty = _blob(client, "app", b"{}")
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "artifactType": kind,
                               "config": dict(empty, mediaType="application/vnd.oci.empty.v1+json"),
                               "layers": [], "subject": subject}).encode()
            digest = zr.compute_digest(body)
            response, _ = client.request("PUT", f"/v2/app/manifests/{digest}", body,
                                         {"Content-Type": OCI_MANIFEST})
            assert response.status == 201 and response.getheader("OCI-Subject") == subject["digest"]
            made.append((digest, kind))
        response, data = client.request("GET", f"/v2/app/referrers/{subject['digest']}")
        assert response.status == 200
        assert response.getheader("Content-Type") == zr.MEDIA_TYPE_OCI_INDEX
        listed = json.loads(data)["manifests"]
        assert sorted((d["digest"], d["artifactType"]) for d in listed) == sorted(made)
        response, data = client.request(
            "GET", f"/v2/app/referrers/{subject['digest']}?artifactType=application/spdx%2Bjson")
        assert [d["digest"] for d in json.loads(data)["manifests"]] == [made[0][0]]
        assert response.getheader("OCI-Filters-Applied") == "artifactType"
        response, data = client.request("GET", f"/v2/app/referrers/{zr.compute_digest(b'n')}")
        assert response.status == 200 and json.loads(data)["manifests"] == []


class TestClients:
    def test_our_pusher_and_puller_round_trip_monolithic_and_chunked(self, served, tmp_path):
        host = "%s:%d" % served.address
        image = kit.build_image(tmp_path / "layout", "v1", layers=kit.default_layers(
            2, random_bytes=300_000, small_files=3, seed=3))
        for chunk, repository in ((None, "whole"), (100_000, "chunks")):
            with zr.ImagePusher(zr.BlobCache(), environ={}, chunk_bytes=chunk,
                                sleep=Sleeps()) as pusher:
                result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{host}/{repository}:v1")
            assert result.digest == image.digest
        with zr.ImagePuller(zr.BlobCache(), environ={}, platform="linux/amd64",
                            sleep=Sleeps()) as puller:
            pulled = puller.pull_image(f"{host}/chunks:v1")
        assert pulled.manifest.digest == image.digest
        assert [l.digest for l in pulled.layers] == [l.digest for l in image.layers]

    def test_referrers_copied_into_our_server_are_served(self, served, tmp_path):
        host = "%s:%d" % served.address
        store = zr.LocalRegistry(tmp_path / "other")
        raw = _image(Client(served), "src", "v1")[0]
        subject = {"mediaType": OCI_MANIFEST, "digest": zr.compute_digest(raw), "size": len(raw)}
        c = Client(served)
        empty = _blob(c, "src", b"{}")
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "artifactType": "application/spdx+json",
                           "config": dict(empty, mediaType="application/vnd.oci.empty.v1+json"),
                           "layers": [], "subject": subject}).encode()
        c.request("PUT", f"/v2/src/manifests/{zr.compute_digest(body)}", body,
                  {"Content-Type": OCI_MANIFEST})
        with zr.ImagePusher(store.cache, environ={}, sleep=Sleeps()) as pusher:
            result = pusher.copy(f"{host}/src:v1", f"{host}/dst:v1", referrers=True)
        assert result.referrers == [zr.compute_digest(body)]
        # Our server indexes subjects: no fallback tag was needed.
        response, data = c.request("GET", f"/v2/dst/referrers/{subject['digest']}")
        assert [d["digest"] for d in json.loads(data)["manifests"]] == [zr.compute_digest(body)]
        assert "sha256-" + subject["digest"][7:] not in served.store.list_tags("dst")
        c.close()
        store.close()


def _serve_cli(tmp_path, *args):
    """Start ``serve --port 0``; return (process, base URL host:port)."""
    proc = subprocess.Popen([*CLI, "serve", "--root", str(tmp_path / "store"), "--port", "0",
                             *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=cli_env(tmp_path), cwd=str(tmp_path), text=True)
    line = proc.stderr.readline()
    assert "serving the local registry" in line, line
    return proc, line.rsplit("http://", 1)[1].strip()


class TestServeCommand:
    def test_sigterm_stops_it_cleanly_and_the_log_has_a_line_per_request(self, tmp_path):
        proc, host = _serve_cli(tmp_path)
        try:
            conn = http.client.HTTPConnection(host, timeout=30)
            conn.request("GET", "/v2/")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert '"GET /v2/" 200' in err and "stopped" in err and "Traceback" not in err

    def test_a_kill_during_an_upload_leaves_no_blob_and_the_session_resumes(self, tmp_path):
        data = layer_bytes(11, 500_000)
        digest = zr.compute_digest(data)
        proc, host = _serve_cli(tmp_path, "--quiet")
        try:
            conn = http.client.HTTPConnection(host, timeout=30)
            conn.request("POST", "/v2/app/blobs/uploads/")
            response = conn.getresponse()
            response.read()
            location = response.getheader("Location")
            conn.request("PATCH", location, data[:200_000], {"Content-Range": "0-199999"})
            response = conn.getresponse()
            response.read()
            location = response.getheader("Location")
            # Half a chunk, then the server is killed.
            conn.putrequest("PATCH", location)
            conn.putheader("Content-Length", "300000")
            conn.putheader("Content-Range", "200000-499999")
            conn.endheaders()
            conn.send(data[200_000:300_000])
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        store = zr.LocalRegistry(tmp_path / "store")
        assert not store.has_blob(digest)
        store.close()
        proc, host = _serve_cli(tmp_path, "--quiet")
        try:
            conn = http.client.HTTPConnection(host, timeout=30)
            conn.request("GET", location)
            response = conn.getresponse()
            response.read()
            held = int(response.getheader("Range").split("-")[1]) + 1
            assert 200_000 <= held <= 300_000
            conn.request("PUT", f"{location}&digest={digest}", data[held:],
                         {"Content-Range": f"{held}-{len(data) - 1}"})
            response = conn.getresponse()
            response.read()
            assert response.status == 201
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        with zr.LocalRegistry(tmp_path / "store") as store:
            assert store.get_blob(digest) == data

    def test_a_slow_client_is_cut_off_and_others_are_served(self, tmp_path):
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, timeout_s=1.0).start() as server:
            c = Client(server)
            location = _start(c, "app")
            slow = socket.create_connection(server.address, timeout=30)
            slow.sendall(f"PATCH {location} HTTP/1.1\r\nHost: x\r\n"
                         "Content-Length: 1000\r\n\r\nonly a little".encode())
            response, _ = c.request("GET", "/v2/")
            assert response.status == 200  # served while the slow one stalls
            received = b""
            for data in iter(lambda: slow.recv(65536), b""):
                received += data  # until the server hangs up on it
            slow.close()
            assert b"202" not in received.split(b"\r\n", 1)[0]
            # What came before the stall is in the session; the rest can follow.
            c.close()
            c = Client(server)  # (the first one idled past the timeout too)
            response, _ = c.request("GET", location)
            assert response.status == 204 and response.getheader("Range") == "0-12"
            c.close()
        store.close()

    @pytest.mark.parametrize("args, expected", [
        (["--port", "99999"], "invalid port"),
        (["--port", "x"], "invalid port"),
        (["--root", ""], "--root is empty"),
    ])
    def test_bad_input_is_one_line(self, tmp_path, args, expected):
        done = run_cli("serve", *args, cwd=tmp_path, timeout=60)
        assert done.returncode in (1, 2)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) <= 2, \
            done.stderr
        assert "Traceback" not in done.stderr

    def test_a_port_in_use_is_one_line(self, tmp_path):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            done = run_cli("serve", "--root", str(tmp_path / "s"), "--port", str(port),
                           cwd=tmp_path, timeout=60)
        assert done.returncode == 1 and "cannot listen on 127.0.0.1" in done.stderr
        assert "Traceback" not in done.stderr


class TestLimits:
    def test_uploads_beyond_the_limit_get_429_and_the_others_go_on(self, tmp_path):
        store = zr.LocalRegistry(tmp_path / "store")
        server = zr.RegistryServer(store, "127.0.0.1", 0, max_uploads=1).start()
        first, second = Client(server), Client(server)
        data = layer_bytes(21, 10_000)
        digest = zr.compute_digest(data)
        try:
            location = _start(first, "app")
            first.conn.putrequest("PATCH", location)  # half a body: it holds its slot
            first.conn.putheader("Content-Length", str(len(data)))
            first.conn.endheaders()
            first.conn.send(data[:5000])
            deadline = time.monotonic() + 30
            while server._uploads._value and time.monotonic() < deadline:
                threading.Event().wait(0.01)  # until the first upload holds the only slot
            response, body = second.request("POST", f"/v2/app/blobs/uploads/?digest={digest}",
                                            data)
            assert response.status == 429 and response.getheader("Retry-After")
            assert _errors(body) == ["TOOMANYREQUESTS"]
            first.conn.send(data[5000:])
            answer = first.conn.getresponse()
            answer.read()
            assert answer.status == 202
            response, _ = second.request("POST", f"/v2/app/blobs/uploads/?digest={digest}", data)
            assert response.status == 201
        finally:
            first.close()
            second.close()
            server.shutdown()
            store.close()

    def test_a_huge_manifest_is_413_before_its_body_is_read(self, client):
        client.conn.putrequest("PUT", "/v2/app/manifests/v1")
        client.conn.putheader("Content-Type", OCI_MANIFEST)
        client.conn.putheader("Content-Length", str(zr.MAX_MANIFEST_SIZE_BYTES + 2 ** 30))
        client.conn.endheaders()
        response = client.conn.getresponse()  # answered with no byte of the body sent
        assert response.status == 413
        assert _errors(response.read()) == ["SIZE_INVALID"]

    def test_a_session_past_its_age_is_upload_unknown(self, client, monkeypatch):
        location = _start(client, "app")
        monkeypatch.setattr(zr, "_UPLOAD_SESSION_MAX_AGE_S", -1.0)
        response, data = client.request("GET", location)
        assert response.status == 404 and _errors(data) == ["BLOB_UPLOAD_UNKNOWN"]

    def test_an_upload_cut_off_half_way_keeps_what_came_and_shows_no_blob(self, served):
        data = layer_bytes(22, 300_000)
        digest = zr.compute_digest(data)
        cut = Client(served)
        location = _start(cut, "app")
        cut.conn.putrequest("PATCH", location)
        cut.conn.putheader("Content-Length", str(len(data)))
        cut.conn.endheaders()
        cut.conn.send(data[:100_000])
        cut.close()  # the client is gone half-way
        other = Client(served)
        try:
            deadline = time.monotonic() + 30
            while True:  # the server sees the end of the connection
                response, _ = other.request("GET", location)
                held = int(response.getheader("Range").split("-")[1]) + 1
                if held == 100_000 or time.monotonic() > deadline:
                    break
                threading.Event().wait(0.02)
            assert response.status == 204 and held == 100_000
            assert not served.store.has_blob(digest)
            response, _ = other.request("PUT", f"{location}&digest={digest}", data[held:],
                                        {"Content-Range": f"{held}-{len(data) - 1}"})
            assert response.status == 201 and served.store.get_blob(digest) == data
        finally:
            other.close()


class TestOnlineGc:
    def test_gc_runs_while_serving_sparing_young_and_tagged_blobs(self, tmp_path):
        store = zr.LocalRegistry(tmp_path / "store")
        old = store.put_blob(b"an old orphan")
        server = zr.RegistryServer(store, "127.0.0.1", 0, gc_interval_s=0.05,
                                   gc_grace_s=0).start()
        client = Client(server)
        try:
            raw, layer = _image(client, "app", "v1")
            deadline = time.monotonic() + 30
            while store.has_blob(old) and time.monotonic() < deadline:
                threading.Event().wait(0.05)
            assert not store.has_blob(old)
            response, data = client.request("GET", f"/v2/app/blobs/{layer['digest']}")
            assert response.status == 200 and zr.compute_digest(data) == layer["digest"]
        finally:
            client.close()
            server.shutdown()
            store.close()

    def test_gc_racing_pushes_leaves_every_tag_whole(self, tmp_path):
        store = zr.LocalRegistry(tmp_path / "store")
        orphan = store.put_blob(b"swept while the pushes go on")
        server = zr.RegistryServer(store, "127.0.0.1", 0, gc_interval_s=0.005,
                                   gc_grace_s=0).start()
        client = Client(server)
        pushed = refused = 0
        try:
            for seed in range(30):
                config = _blob(client, "race", json.dumps({"seed": seed}).encode())
                layer = _blob(client, "race", layer_bytes(seed, 2000))
                raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                  "config": dict(config, mediaType=zr.MEDIA_TYPE_OCI_CONFIG),
                                  "layers": [dict(layer, mediaType="application/octet-stream")]
                                  }).encode()
                response, data = client.request("PUT", f"/v2/race/manifests/t{seed}", raw,
                                                {"Content-Type": OCI_MANIFEST})
                if response.status == 201:
                    pushed += 1
                else:  # collected between its upload and its manifest: a grace of 0
                    assert response.status == 400, response.status
                    assert _errors(data) == ["MANIFEST_BLOB_UNKNOWN"] * len(_errors(data))
                    refused += 1
        finally:
            client.close()
            server.shutdown()
        assert pushed + refused == 30
        assert not store.has_blob(orphan)  # the collector ran meanwhile
        for tag in store.list_tags("race"):
            for child in store.get_manifest("race", tag).children:
                assert store.has_blob(child.digest), (tag, child.digest)
        store.close()


class TestTls:
    def test_https_serves_our_puller_and_a_stalled_handshake_holds_nobody(self, tmp_path,
                                                                          tls_files):
        import ssl
        cert, key = map(str, tls_files)
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, tls_cert=cert, tls_key=key,
                               timeout_s=5).start() as server:
            assert server.url.startswith("https://")
            stalled = socket.create_connection(server.address, timeout=30)  # no handshake
            context = ssl.create_default_context(cafile=cert)
            conn = http.client.HTTPSConnection(*server.address, context=context, timeout=30)
            conn.request("GET", "/v2/")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b"{}"
            conn.close()
            host = "%s:%d" % server.address
            image = kit.build_image(tmp_path / "layout", "v1")
            with zr.ImagePusher(zr.BlobCache(), environ={}, ssl_context=context,
                                sleep=Sleeps()) as pusher:
                pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{host}/tls/app:v1")
            with zr.ImagePuller(zr.BlobCache(), environ={}, platform="linux/amd64",
                                ssl_context=context, sleep=Sleeps()) as puller:
                pulled = puller.pull_image(f"{host}/tls/app:v1")
            assert pulled.manifest.digest == image.digest
            stalled.close()
        store.close()

    def test_a_missing_key_is_one_line(self, tmp_path, tls_files):
        certificate = [str(tls_files[0])]
        done = run_cli("serve", "--root", str(tmp_path / "s"), "--port", "0", "--tls-cert",
                       certificate[0], cwd=tmp_path, timeout=60)
        assert done.returncode == 1 and "go together" in done.stderr
        done = run_cli("serve", "--root", str(tmp_path / "s"), "--port", "0", "--tls-cert",
                       certificate[0], "--tls-key", str(tmp_path / "nope.pem"), cwd=tmp_path,
                       timeout=60)
        assert done.returncode == 1 and "cannot load the TLS certificate" in done.stderr
        assert "Traceback" not in done.stderr


def _htpasswd_line(flags, user, password):
    done = subprocess.run(["htpasswd", "-nb", *flags, user, password], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def _basic(user, password):
    import base64
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class TestHtpasswd:
    @pytest.mark.parametrize("flags", [["-B", "-C", "4"], ["-m"], ["-s"], ["-2"], ["-5"],
                                       ["-5", "-r", "2000"]])
    def test_every_format_htpasswd_writes_verifies(self, flags):
        user, _, stored = _htpasswd_line(flags, "alice", "pä ss:word").partition(":")
        entry = zr._HtpasswdEntry(user, stored)
        assert not entry.refused
        assert entry.check("pä ss:word".encode()) and not entry.check(b"pa ss:word")

    def test_known_bcrypt_and_ssha_answers(self):
        import base64
        import hashlib
        vector = zr._HtpasswdEntry("u", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")
        assert vector.check(b"U*U") and not vector.check(b"U*V")
        long_key = "$2a$05$abcdefghijklmnopqrstuu5s2v8.iXieOjg/.AySBTTZIIVFJeBui"
        entry = zr._HtpasswdEntry("u", long_key)
        key = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" \
              b"chars after 72 are ignored"
        assert entry.check(key) and entry.check(key[:72] + b"anything")
        salt = b"salt"
        ssha = base64.b64encode(hashlib.sha1(b"secret" + salt).digest() + salt).decode()
        assert zr._HtpasswdEntry("u", "{SSHA}" + ssha).check(b"secret")

    @pytest.mark.parametrize("stored, why", [
        ("abJnggxhB/yWI", "DES crypt"), ("plainpassword", "DES crypt or a plain"),
        ("$2y$14$" + "a" * 53, "bcrypt cost 14"), ("$6$rounds=9000000$salt$x", "rounds=")])
    def test_lines_it_cannot_use_are_refused_with_a_reason(self, stored, why):
        entry = zr._HtpasswdEntry("u", stored)
        assert why in entry.refused and not entry.check(b"plainpassword")

    def test_a_server_with_htpasswd(self, tmp_path):
        import io as _io
        users = tmp_path / "htpasswd"
        users.write_text("\n".join([_htpasswd_line(["-B", "-C", "4"], "alice", "wonder"),
                                    _htpasswd_line(["-m"], "bob", "builder"),
                                    "carol:abJnggxhB/yWI", "# a comment", ""]) + "\n")
        log = _io.StringIO()
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, htpasswd=str(users),
                               log=log).start() as server:
            c = Client(server)
            response, data = c.request("GET", "/v2/")
            assert response.status == 401 and _errors(data) == ["UNAUTHORIZED"]
            assert response.getheader("WWW-Authenticate") == 'Basic realm="zlayer-registry"'
            for user, password in (("alice", "wonder"), ("bob", "builder")):
                response, _ = c.request("GET", "/v2/", headers=_basic(user, password))
                assert response.status == 200, user
            for user, password in (("alice", "wrong"), ("nobody", "wonder"),
                                   ("carol", "anything")):
                response, _ = c.request("GET", "/v2/", headers=_basic(user, password))
                assert response.status == 401, user
            # A body sent before the 401 does not throw the connection off.
            response, _ = c.request("PUT", "/v2/app/manifests/v1", b"{" + b" " * 5000 + b"}",
                                    {"Content-Type": OCI_MANIFEST})
            assert response.status == 401
            response, _ = c.request("GET", "/v2/", headers=_basic("alice", "wonder"))
            assert response.status == 200
            # Our own push and pull, with basic credentials.
            host = "%s:%d" % server.address
            kit.build_image(tmp_path / "layout", "v1")
            auth = zr.RegistryAuth.basic("bob", "builder")
            with zr.ImagePusher(zr.BlobCache(), environ={}, sleep=Sleeps()) as pusher:
                pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{host}/auth/app:v1",
                            dst_auth=auth)
            with zr.ImagePuller(zr.BlobCache(), environ={}, platform="linux/amd64",
                                sleep=Sleeps()) as puller:
                assert puller.pull_image(f"{host}/auth/app:v1", auth).layers
                with pytest.raises(zr.AuthError):
                    puller.pull_image(f"{host}/auth/app:v1",
                                      zr.RegistryAuth.basic("bob", "nope"))
            # The file is read again when it changes.
            with open(users, "a") as f:
                f.write(_htpasswd_line(["-2"], "dave", "newcomer") + "\n")
            os.utime(users, (1, 1))  # a different mtime whatever the clock's resolution
            server.users._checked_at = -10.0  # the once-a-second check is due
            response, _ = c.request("GET", "/v2/", headers=_basic("dave", "newcomer"))
            assert response.status == 200
            c.close()
        text = log.getvalue()
        assert "carol cannot log in: DES crypt" in text
        for secret in ("wonder", "builder", "newcomer", "nope"):
            assert secret not in text
        assert " bob " in text and " alice " in text
        store.close()

    def test_failures_past_the_limit_get_429(self, tmp_path):
        users = tmp_path / "htpasswd"
        users.write_text(_htpasswd_line(["-m"], "alice", "wonder") + "\n")
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, htpasswd=str(users)).start() as server:
            c = Client(server)
            statuses = [c.request("GET", "/v2/", headers=_basic("alice", f"guess{n}"))[0].status
                        for n in range(12)]
            assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
            response, _ = c.request("GET", "/v2/", headers=_basic("alice", "wonder"))
            assert response.status == 429  # even the right one, for a minute
            c.close()
        store.close()

    def test_plain_http_credentials_off_loopback_are_refused(self, tmp_path):
        users = tmp_path / "htpasswd"
        users.write_text(_htpasswd_line(["-m"], "alice", "wonder") + "\n")
        store = zr.LocalRegistry(tmp_path / "store")
        with pytest.raises(zr.ZLayerError, match="unencrypted"):
            zr.RegistryServer(store, "0.0.0.0", 0, htpasswd=str(users))
        with pytest.raises(zr.ZLayerError, match="cannot read --htpasswd"):
            zr.RegistryServer(store, "127.0.0.1", 0, htpasswd=str(tmp_path / "missing"))
        store.close()


class TestServerErrors:
    def test_a_client_reset_is_no_traceback(self, tmp_path, capfd):
        import socket
        import struct
        store = zr.LocalRegistry(tmp_path / "store")
        server = zr.RegistryServer(store, "127.0.0.1", 0).start()
        try:
            sock = socket.create_connection(server.address)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(4096)
            # Close with RST (SO_LINGER 0): the handler's next read is ECONNRESET.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            conn = http.client.HTTPConnection(*server.address, timeout=10)
            conn.request("GET", "/v2/")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            server.shutdown()
            store.close()
        assert "Traceback" not in capfd.readouterr().err
