#!/usr/bin/env python3
"""Our runner of the OCI distribution-spec conformance checks, standard library only.

Usage::

    python3 _conformance.py HOST:PORT [--json] [--https] [--insecure]

The distribution-spec repository's suite (Go only, redesigned in 2026) groups its
checks in four workflows; this runner has the same four, each check a small
function that sends raw HTTP requests and asserts what the spec says:

    pull        ping, manifests and blobs by tag and digest, HEAD, Range, 404s
    push        POST then PUT, POST only, chunked (single, multi, out of order),
                streamed, upload status, mount with and without ``from``, cancel,
                manifest PUT by tag and digest, refused manifests, ``OCI-Subject``
    discovery   tags/list with ``n`` and ``last``, the referrers API with and
                without the ``artifactType`` filter
    management  deletes of tags, manifests and blobs

Every check works in its own repository (``conformance/<n>``), so one failure does not
cascade.  It prints one line per check and the count; the exit status is 0 only when
every check passed.  ``test_conformance.py`` runs it against ``serve`` (every check
must pass) and against distribution 2.8 (a check of the runner itself: exactly the
checks of what 2.8 lacks fail).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CheckFailed(AssertionError):
    """A check's expectation was not met."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Registry:
    """A keep-alive connection to the registry under test, and the steps checks share."""

    def __init__(self, host: str, https: bool = False, insecure: bool = False) -> None:
        self.host = host
        self.https = https
        self.insecure = insecure
        self._conn: Optional[http.client.HTTPConnection] = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                context = ssl.create_default_context()
                if self.insecure:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._conn = http.client.HTTPSConnection(self.host, timeout=60, context=context)
            else:
                self._conn = http.client.HTTPConnection(self.host, timeout=60)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Optional[Mapping[str, str]] = None
                ) -> Tuple[http.client.HTTPResponse, bytes]:
        """Send one request (a path, or a Location the registry gave); return (response, body)."""
        if path.startswith(("http://", "https://")):
            parts = urlsplit(path)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (0, 1):  # once more on a connection the server closed meanwhile
            conn = self._connection()
            try:
                conn.request(method, path, body=body if body or method in (
                    "PUT", "POST", "PATCH") else None, headers=dict(headers or {}))
                response = conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # -- steps --------------------------------------------------------------------

    def start_upload(self, name: str, query: str = "") -> str:
        response, _ = self.request("POST", f"/v2/{name}/blobs/uploads/{query}")
        expect(response.status == 202, f"POST an upload: {response.status}, not 202")
        location = response.getheader("Location")
        expect(bool(location), "POST an upload: no Location")
        return str(location)

    def push_blob(self, name: str, data: bytes) -> Dict[str, Any]:
        """POST a session, then PUT the blob (the one upload every registry must take)."""
        location = self.start_upload(name)
        digest = digest_of(data)
        response, _ = self.request("PUT", with_query(location, f"digest={digest}"), data,
                                   {"Content-Type": "application/octet-stream"})
        expect(response.status == 201, f"PUT a blob: {response.status}, not 201")
        return {"digest": digest, "size": len(data)}

    def push_image(self, name: str, tag: Optional[str], seed: str = "",
                   extra: Optional[Dict[str, Any]] = None) -> Tuple[str, bytes, List[Any]]:
        """Push a config, a layer and a manifest; return (digest, raw, [config, layer])."""
        config = self.push_blob(name, json.dumps({"architecture": "amd64", "os": "linux",
                                                  "seed": seed}).encode())
        layer = self.push_blob(name, f"layer {seed} {name}".encode() * 50)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": dict(config, mediaType=OCI_CONFIG),
                    "layers": [dict(layer, mediaType=LAYER)]}
        manifest.update(extra or {})
        raw = json.dumps(manifest).encode()
        digest = digest_of(raw)
        response, body = self.request("PUT", f"/v2/{name}/manifests/{tag or digest}", raw,
                                      {"Content-Type": OCI_MANIFEST})
        expect(response.status == 201, f"PUT a manifest: {response.status}, not 201 "
               f"({body[:200]!r})")
        return digest, raw, [config, layer]


def with_query(location: str, query: str) -> str:
    return location + ("&" if "?" in location else "?") + query


def error_codes(body: bytes) -> List[str]:
    try:
        return [e.get("code") for e in json.loads(body).get("errors", [])]
    except (ValueError, AttributeError):
        return []


# =============================================================================
# The checks, by workflow
# =============================================================================

Check = Callable[[Registry, str], None]
CHECKS: List[Tuple[str, str, Check]] = []


def check(category: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.append((category, function.__name__, function))
        return function
    return register


# -- pull ----------------------------------------------------------------------

@check("pull")
def ping(r: Registry, name: str) -> None:
    response, _ = r.request("GET", "/v2/")
    expect(response.status == 200, f"GET /v2/: {response.status}")


@check("pull")
def manifest_head_by_tag(r: Registry, name: str) -> None:
    digest, raw, _ = r.push_image(name, "v1")
    response, body = r.request("HEAD", f"/v2/{name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    expect(response.status == 200, f"HEAD: {response.status}")
    expect(response.getheader("Docker-Content-Digest") == digest, "HEAD: wrong digest header")
    expect(response.getheader("Content-Length") == str(len(raw)), "HEAD: wrong Content-Length")
    expect(body == b"", "HEAD: a body")


@check("pull")
def manifest_get_by_tag(r: Registry, name: str) -> None:
    digest, raw, _ = r.push_image(name, "v1")
    response, body = r.request("GET", f"/v2/{name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    expect(response.status == 200 and body == raw, f"GET by tag: {response.status}")
    expect(response.getheader("Content-Type") == OCI_MANIFEST, "GET: wrong Content-Type")


@check("pull")
def manifest_get_by_digest(r: Registry, name: str) -> None:
    digest, raw, _ = r.push_image(name, "v1")
    response, body = r.request("GET", f"/v2/{name}/manifests/{digest}",
                               headers={"Accept": OCI_MANIFEST})
    expect(response.status == 200 and body == raw, f"GET by digest: {response.status}")
    expect(response.getheader("Docker-Content-Digest") == digest, "wrong digest header")


@check("pull")
def blob_head(r: Registry, name: str) -> None:
    blob = r.push_blob(name, b"a blob to HEAD" * 10)
    response, body = r.request("HEAD", f"/v2/{name}/blobs/{blob['digest']}")
    expect(response.status == 200, f"HEAD blob: {response.status}")
    expect(response.getheader("Content-Length") == str(blob["size"]), "wrong Content-Length")
    expect(body == b"", "HEAD: a body")


@check("pull")
def blob_get(r: Registry, name: str) -> None:
    data = os.urandom(70_000)
    blob = r.push_blob(name, data)
    response, body = r.request("GET", f"/v2/{name}/blobs/{blob['digest']}")
    expect(response.status == 200 and body == data, f"GET blob: {response.status}")
    expect(response.getheader("Docker-Content-Digest") in (None, blob["digest"]),
           "wrong digest header")


@check("pull")
def blob_get_range(r: Registry, name: str) -> None:
    data = os.urandom(10_000)
    blob = r.push_blob(name, data)
    response, body = r.request("GET", f"/v2/{name}/blobs/{blob['digest']}",
                               headers={"Range": "bytes=100-199"})
    expect(response.status == 206 and body == data[100:200], f"Range: {response.status}")
    expect((response.getheader("Content-Range") or "").startswith("bytes 100-199/"),
           "no Content-Range")


@check("pull")
def manifest_unknown(r: Registry, name: str) -> None:
    r.push_image(name, "v1")
    response, body = r.request("GET", f"/v2/{name}/manifests/nosuchtag",
                               headers={"Accept": OCI_MANIFEST})
    expect(response.status == 404, f"unknown tag: {response.status}")
    expect("MANIFEST_UNKNOWN" in error_codes(body), f"codes {error_codes(body)}")


@check("pull")
def blob_unknown(r: Registry, name: str) -> None:
    r.push_image(name, "v1")
    response, body = r.request("GET", f"/v2/{name}/blobs/{digest_of(b'never pushed')}")
    expect(response.status == 404, f"unknown blob: {response.status}")
    expect("BLOB_UNKNOWN" in error_codes(body), f"codes {error_codes(body)}")


@check("pull")
def repository_unknown(r: Registry, name: str) -> None:
    response, _ = r.request("GET", f"/v2/{name}/never/manifests/v1",
                            headers={"Accept": OCI_MANIFEST})
    expect(response.status == 404, f"unknown repository: {response.status}")


# -- push ----------------------------------------------------------------------

@check("push")
def post_then_put(r: Registry, name: str) -> None:
    data = b"post then put" * 100
    r.push_blob(name, data)
    response, body = r.request("GET", f"/v2/{name}/blobs/{digest_of(data)}")
    expect(response.status == 200 and body == data, f"read back: {response.status}")


@check("push")
def post_only(r: Registry, name: str) -> None:
    data = b"monolithic post" * 100
    digest = digest_of(data)
    response, _ = r.request("POST", f"/v2/{name}/blobs/uploads/?digest={digest}", data,
                            {"Content-Type": "application/octet-stream"})
    if response.status == 202:  # the spec lets a registry open a session instead
        location = str(response.getheader("Location"))
        response, _ = r.request("PUT", with_query(location, f"digest={digest}"), data)
    expect(response.status == 201, f"POST ?digest=: {response.status}")
    response, body = r.request("GET", f"/v2/{name}/blobs/{digest}")
    expect(response.status == 200 and body == data, f"read back: {response.status}")


def _patch(r: Registry, location: str, data: bytes, start: Optional[int]
           ) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/octet-stream"}
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    response, _ = r.request("PATCH", location, data, headers)
    return response


@check("push")
def chunked_single(r: Registry, name: str) -> None:
    data = os.urandom(20_000)
    location = r.start_upload(name)
    response = _patch(r, location, data, 0)
    expect(response.status == 202, f"PATCH: {response.status}")
    expect(response.getheader("Range") == f"0-{len(data) - 1}", "wrong Range")
    response, _ = r.request("PUT", with_query(str(response.getheader("Location")),
                                              f"digest={digest_of(data)}"))
    expect(response.status == 201, f"final PUT: {response.status}")


@check("push")
def chunked_multi(r: Registry, name: str) -> None:
    data = os.urandom(30_000)
    location = r.start_upload(name)
    for start in range(0, len(data), 10_000):
        response = _patch(r, location, data[start:start + 10_000], start)
        expect(response.status == 202, f"PATCH at {start}: {response.status}")
        location = str(response.getheader("Location"))
    response, _ = r.request("PUT", with_query(location, f"digest={digest_of(data)}"))
    expect(response.status == 201, f"final PUT: {response.status}")
    response, body = r.request("GET", f"/v2/{name}/blobs/{digest_of(data)}")
    expect(body == data, "read back differs")


@check("push")
def chunked_out_of_order(r: Registry, name: str) -> None:
    data = os.urandom(20_000)
    location = r.start_upload(name)
    response = _patch(r, location, data[:10_000], 0)
    location = str(response.getheader("Location"))
    response = _patch(r, location, data[15_000:], 15_000)  # a gap: 10000-14999 is missing
    expect(response.status == 416, f"out-of-order PATCH: {response.status}, not 416")


@check("push")
def streamed(r: Registry, name: str) -> None:
    data = os.urandom(25_000)
    location = r.start_upload(name)
    response = _patch(r, location, data, None)
    expect(response.status == 202, f"streamed PATCH: {response.status}")
    response, _ = r.request("PUT", with_query(str(response.getheader("Location")),
                                              f"digest={digest_of(data)}"))
    expect(response.status == 201, f"final PUT: {response.status}")


@check("push")
def upload_status(r: Registry, name: str) -> None:
    location = r.start_upload(name)
    response = _patch(r, location, b"x" * 1000, 0)
    response, _ = r.request("GET", str(response.getheader("Location")))
    expect(response.status == 204, f"GET upload: {response.status}")
    expect(response.getheader("Range") == "0-999", f"Range {response.getheader('Range')}")
    expect(bool(response.getheader("Location")), "no Location")


@check("push")
def mount_from(r: Registry, name: str) -> None:
    blob = r.push_blob(f"{name}/source", b"mounted blob" * 10)
    response, _ = r.request("POST", f"/v2/{name}/target/blobs/uploads/?mount="
                            f"{blob['digest']}&from={name}/source")
    expect(response.status == 201, f"mount: {response.status}")
    response, _ = r.request("HEAD", f"/v2/{name}/target/blobs/{blob['digest']}")
    expect(response.status == 200, f"mounted blob: {response.status}")


@check("push")
def mount_without_from(r: Registry, name: str) -> None:
    blob = r.push_blob(f"{name}/source", b"anonymous mount" * 10)
    response, _ = r.request("POST", f"/v2/{name}/target/blobs/uploads/?mount={blob['digest']}")
    # 1.1: 201 when the registry mounts it, else a session (202)
    expect(response.status in (201, 202), f"mount without from: {response.status}")


@check("push")
def mount_of_a_missing_blob_opens_a_session(r: Registry, name: str) -> None:
    r.push_blob(f"{name}/source", b"something")
    response, _ = r.request("POST", f"/v2/{name}/target/blobs/uploads/?mount="
                            f"{digest_of(b'absent')}&from={name}/source")
    expect(response.status == 202 and response.getheader("Location"),
           f"mount of a missing blob: {response.status}")


@check("push")
def cancel(r: Registry, name: str) -> None:
    location = r.start_upload(name)
    response, _ = r.request("DELETE", location)
    expect(response.status == 204, f"DELETE upload: {response.status}")
    response, body = r.request("GET", location)
    expect(response.status == 404, f"cancelled upload: {response.status}")
    expect("BLOB_UPLOAD_UNKNOWN" in error_codes(body), f"codes {error_codes(body)}")


@check("push")
def manifest_put_by_tag(r: Registry, name: str) -> None:
    config = r.push_blob(name, b"{}")
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": dict(config, mediaType=OCI_CONFIG), "layers": []}).encode()
    response, _ = r.request("PUT", f"/v2/{name}/manifests/v1", raw,
                            {"Content-Type": OCI_MANIFEST})
    expect(response.status == 201, f"PUT: {response.status}")
    expect(response.getheader("Docker-Content-Digest") == digest_of(raw), "digest header")
    expect(bool(response.getheader("Location")), "no Location")


@check("push")
def manifest_put_by_digest(r: Registry, name: str) -> None:
    digest, raw, _ = r.push_image(name, None)
    response, body = r.request("GET", f"/v2/{name}/manifests/{digest}",
                               headers={"Accept": OCI_MANIFEST})
    expect(response.status == 200 and body == raw, f"GET: {response.status}")


@check("push")
def manifest_naming_a_missing_blob_is_refused(r: Registry, name: str) -> None:
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": {"mediaType": OCI_CONFIG, "digest": digest_of(b"nope"),
                                 "size": 4}, "layers": []}).encode()
    response, body = r.request("PUT", f"/v2/{name}/manifests/v1", raw,
                               {"Content-Type": OCI_MANIFEST})
    expect(response.status == 400, f"PUT: {response.status}")
    expect("MANIFEST_BLOB_UNKNOWN" in error_codes(body), f"codes {error_codes(body)}")


@check("push")
def wrong_digest_is_refused(r: Registry, name: str) -> None:
    location = r.start_upload(name)
    response, body = r.request("PUT", with_query(location, f"digest={digest_of(b'other')}"),
                               b"these bytes")
    expect(response.status == 400, f"PUT with a wrong digest: {response.status}")
    expect("DIGEST_INVALID" in error_codes(body), f"codes {error_codes(body)}")


@check("push")
def manifest_with_subject_answers_oci_subject(r: Registry, name: str) -> None:
    subject, raw, _ = r.push_image(name, "v1")
    empty = r.push_blob(name, b"{}")
    artifact = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "artifactType": "application/vnd.example.sbom",
                           "config": dict(empty, mediaType=OCI_EMPTY), "layers": [],
                           "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                                       "size": len(raw)}}).encode()
    response, _ = r.request("PUT", f"/v2/{name}/manifests/{digest_of(artifact)}", artifact,
                            {"Content-Type": OCI_MANIFEST})
    expect(response.status == 201, f"PUT: {response.status}")
    expect(response.getheader("OCI-Subject") == subject, "no OCI-Subject header")


# -- content discovery ---------------------------------------------------------

@check("discovery")
def tags_list(r: Registry, name: str) -> None:
    for tag in ("b", "a", "c"):
        r.push_image(name, tag, seed=tag)
    response, body = r.request("GET", f"/v2/{name}/tags/list")
    expect(response.status == 200, f"tags/list: {response.status}")
    expect(sorted(json.loads(body).get("tags") or []) == ["a", "b", "c"], f"tags {body[:200]!r}")


def _three_tags(r: Registry, name: str, query: str) -> Tuple[http.client.HTTPResponse, bytes]:
    for tag in ("a", "b", "c"):
        r.push_image(name, tag, seed=tag)
    return r.request("GET", f"/v2/{name}/tags/list{query}")


@check("discovery")
def tags_list_n(r: Registry, name: str) -> None:
    response, body = _three_tags(r, name, "?n=2")
    expect(response.status == 200, f"tags/list?n=2: {response.status}")
    expect(json.loads(body).get("tags") == ["a", "b"], f"tags {body[:200]!r}")
    expect('rel="next"' in (response.getheader("Link") or ""), "no Link to the next page")


@check("discovery")
def tags_list_last(r: Registry, name: str) -> None:
    response, body = _three_tags(r, name, "?n=5&last=a")
    expect(response.status == 200, f"tags/list?last=a: {response.status}")
    expect(json.loads(body).get("tags") == ["b", "c"], f"tags {body[:200]!r}")


def _referrer(r: Registry, name: str, subject: str, size: int, artifact_type: str) -> str:
    empty = r.push_blob(name, b"{}")
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "artifactType": artifact_type,
                      "config": dict(empty, mediaType=OCI_EMPTY), "layers": [],
                      "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                                  "size": size}}).encode()
    response, _ = r.request("PUT", f"/v2/{name}/manifests/{digest_of(raw)}", raw,
                            {"Content-Type": OCI_MANIFEST})
    expect(response.status == 201, f"PUT a referrer: {response.status}")
    return digest_of(raw)


@check("discovery")
def referrers(r: Registry, name: str) -> None:
    subject, raw, _ = r.push_image(name, "v1")
    sbom = _referrer(r, name, subject, len(raw), "application/vnd.example.sbom")
    sig = _referrer(r, name, subject, len(raw), "application/vnd.example.signature")
    response, body = r.request("GET", f"/v2/{name}/referrers/{subject}")
    expect(response.status == 200, f"referrers: {response.status}")
    expect(response.getheader("Content-Type", "").startswith(OCI_INDEX), "not an index")
    found = {m.get("digest"): m.get("artifactType") for m in json.loads(body)["manifests"]}
    expect(found == {sbom: "application/vnd.example.sbom",
                     sig: "application/vnd.example.signature"}, f"referrers {found}")


@check("discovery")
def referrers_filtered(r: Registry, name: str) -> None:
    subject, raw, _ = r.push_image(name, "v1")
    sbom = _referrer(r, name, subject, len(raw), "application/vnd.example.sbom")
    _referrer(r, name, subject, len(raw), "application/vnd.example.signature")
    response, body = r.request("GET", f"/v2/{name}/referrers/{subject}?artifactType="
                               f"{quote('application/vnd.example.sbom', safe='')}")
    expect(response.status == 200, f"referrers: {response.status}")
    expect([m.get("digest") for m in json.loads(body)["manifests"]] == [sbom], "not filtered")
    expect("artifactType" in (response.getheader("OCI-Filters-Applied") or ""),
           "no OCI-Filters-Applied")


@check("discovery")
def referrers_of_an_unknown_subject_are_empty(r: Registry, name: str) -> None:
    r.push_image(name, "v1")
    response, body = r.request("GET", f"/v2/{name}/referrers/{digest_of(b'no such subject')}")
    expect(response.status == 200, f"referrers: {response.status}")
    expect(json.loads(body).get("manifests") == [], "not empty")


# -- content management --------------------------------------------------------

@check("management")
def delete_tag(r: Registry, name: str) -> None:
    digest, _, _ = r.push_image(name, "v1")
    response, _ = r.request("DELETE", f"/v2/{name}/manifests/v1")
    if response.status in (400, 405):  # the spec lets a registry refuse deleting by tag
        return
    expect(response.status == 202, f"DELETE tag: {response.status}")
    response, _ = r.request("GET", f"/v2/{name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    expect(response.status == 404, f"deleted tag: {response.status}")


@check("management")
def delete_manifest(r: Registry, name: str) -> None:
    digest, _, _ = r.push_image(name, "v1")
    response, _ = r.request("DELETE", f"/v2/{name}/manifests/{digest}")
    expect(response.status == 202, f"DELETE manifest: {response.status}")
    response, _ = r.request("GET", f"/v2/{name}/manifests/{digest}",
                            headers={"Accept": OCI_MANIFEST})
    expect(response.status == 404, f"deleted manifest: {response.status}")


@check("management")
def delete_blob(r: Registry, name: str) -> None:
    blob = r.push_blob(name, b"a blob to delete" * 10)
    response, _ = r.request("DELETE", f"/v2/{name}/blobs/{blob['digest']}")
    expect(response.status == 202, f"DELETE blob: {response.status}")
    response, _ = r.request("GET", f"/v2/{name}/blobs/{blob['digest']}")
    expect(response.status == 404, f"deleted blob: {response.status}")


@check("management")
def delete_unknown_manifest(r: Registry, name: str) -> None:
    r.push_image(name, "v1")
    response, _ = r.request("DELETE", f"/v2/{name}/manifests/{digest_of(b'no such')}")
    expect(response.status == 404, f"DELETE an unknown manifest: {response.status}")


# =============================================================================
# Running them
# =============================================================================

def run(host: str, https: bool = False, insecure: bool = False, prefix: str = "conformance"
        ) -> List[Dict[str, Any]]:
    """Run every check; return one result each: category, name, passed, message."""
    results = []
    for number, (category, name, function) in enumerate(CHECKS):
        registry = Registry(host, https, insecure)
        try:
            function(registry, f"{prefix}/{number:02d}-{name.replace('_', '-')}")
            results.append({"category": category, "name": name, "passed": True, "message": ""})
        except (CheckFailed, OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            results.append({"category": category, "name": name, "passed": False,
                            "message": f"{exc.__class__.__name__}: {exc}"
                            if not isinstance(exc, CheckFailed) else str(exc)})
        finally:
            registry.close()
    return results


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host", help="the registry, HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--https", action="store_true", help="talk https")
    parser.add_argument("--insecure", action="store_true", help="do not check its certificate")
    args = parser.parse_args(argv)
    results = run(args.host, args.https, args.insecure)
    passed = sum(result["passed"] for result in results)
    if args.json:
        print(json.dumps({"passed": passed, "total": len(results), "results": results},
                         indent=1))
    else:
        for result in results:
            mark = "pass" if result["passed"] else "FAIL"
            print(f"{mark}  {result['category']:<10} {result['name']}"
                  f"{'  ' + result['message'] if result['message'] else ''}")
        print(f"{passed} of {len(results)} checks passed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
