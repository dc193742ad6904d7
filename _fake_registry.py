"""A programmable OCI distribution registry on 127.0.0.1 for hermetic tests.

Standard library only.  It serves manifests and blobs, can demand Docker
token auth or basic auth, hands out expiring tokens, redirects blob GETs to a
second "object store" server that rejects any request carrying
Authorization (as S3 presigned URLs do), and injects faults per request:
429 with Retry-After, 5xx, a connection dropped in the middle of a blob, a
corrupted byte, a stalled body, ignored Range headers.

It also takes pushes as distribution-spec 1.1 describes them: upload
sessions (POST, PATCH with Content-Range, PUT ?digest=, GET status, DELETE),
monolithic POST ?digest=, mounts (?mount=&from=), manifest PUT, and DELETE
of manifests and blobs.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type, owner: Any) -> None:
        self.owner = owner
        self.connections = 0
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client drops a connection (tests do that on purpose)."""

    def get_request(self) -> Tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.connections += 1
        return sock, addr


def _serve(handler: type, owner: Any) -> Tuple["_Server", threading.Thread]:
    """Start a server for ``handler`` on 127.0.0.1:0 in a daemon thread."""
    server = _Server(handler, owner)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


class _Base(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def send_body(self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None,
                  content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class ObjectStore:
    """A second host for blob redirects; like S3, it refuses a request with Authorization."""

    def __init__(self) -> None:
        self.blobs: Dict[str, bytes] = {}
        self.requests: List[Dict[str, Any]] = []
        store = self

        class Handler(_Base):
            def do_GET(self) -> None:
                store.requests.append({"path": self.path, "headers": dict(self.headers)})
                if "Authorization" in self.headers:
                    self.send_body(400, b"<Error>InvalidArgument: only one auth "
                                        b"mechanism allowed</Error>", content_type="text/xml")
                    return
                key = urlsplit(self.path).path.rsplit("/", 1)[-1]
                data = store.blobs.get(key)
                if data is None:
                    self.send_body(404, b"")
                    return
                self.send_body(200, data, content_type="application/octet-stream")

        self.server, self.thread = _serve(Handler, self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeRegistry:
    """The registry.  Configure attributes, then point a puller at ``host``."""

    def __init__(self) -> None:
        self.blobs: Dict[str, bytes] = {}
        self.manifests: Dict[Tuple[str, str], Tuple[bytes, str]] = {}
        self.requests: List[Dict[str, Any]] = []
        self.auth: Optional[str] = None          # None, "bearer" or "basic"
        self.users: Dict[str, str] = {"user": "secret"}
        self.refresh_tokens: Dict[str, str] = {}
        self.token_lifetime_s: Optional[int] = 300
        self.token_max_uses: Optional[int] = None
        self.tokens: Dict[str, Dict[str, Any]] = {}
        self.token_requests: List[Dict[str, Any]] = []
        self.realm: Optional[str] = None
        self.redirect_blobs_to: Optional[ObjectStore] = None
        self.redirect_loop = False
        self.support_head = True
        self.send_digest_header = True
        self.honor_range = True
        # Uploads: sessions by id, what each request body held, and limits.
        self.uploads: Dict[str, bytearray] = {}
        self.body_sizes: List[int] = []
        self.max_body_bytes: Optional[int] = None   # a larger request body is a 413
        self.support_mount = True                   # ?mount=&from= (a repository's blob)
        self.support_anonymous_mount = False        # ?mount= alone (spec 1.1; distribution no)
        # Which repository holds which blob: with strict_repositories, a blob is
        # found (HEAD, GET, mount) only in the repositories that have it.
        self.repository_blobs: Dict[str, set] = {}
        self.strict_repositories = False
        # The referrers API (spec 1.1): without it, /referrers/ is a 404 and
        # clients fall back to the sha256-<hex> tag schema.
        self.support_referrers = False
        self.chunk_min_length: Optional[int] = None  # OCI-Chunk-Min-Length on sessions
        # Faults: callables taking (method, path, headers) and returning an
        # action dict or None; consumed in order.
        self.faults: List[Callable[[str, str, Dict[str, str]], Optional[Dict[str, Any]]]] = []
        self.stall = threading.Event()
        self._lock = threading.Lock()
        registry = self

        class Handler(_Base):
            def do_HEAD(self) -> None:
                registry._handle(self)

            def do_GET(self) -> None:
                registry._handle(self)

            def do_POST(self) -> None:
                registry._handle(self)

            def do_PUT(self) -> None:
                registry._handle(self)

            def do_PATCH(self) -> None:
                registry._handle(self)

            def do_DELETE(self) -> None:
                registry._handle(self)

        self.server, self.thread = _serve(Handler, self)

    # -- content ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.stall.set()
        self.server.shutdown()
        self.server.server_close()

    def add_blob(self, data: bytes) -> Dict[str, Any]:
        digest = sha256(data)
        self.blobs[digest] = data
        if self.redirect_blobs_to is not None:
            self.redirect_blobs_to.blobs[digest.split(":")[1]] = data
        return {"digest": digest, "size": len(data)}

    def add_manifest(self, repository: str, tag: Optional[str], manifest: Dict[str, Any],
                     media_type: Optional[str] = None, raw: Optional[bytes] = None) -> str:
        body = raw if raw is not None else json.dumps(manifest, indent=1).encode()
        media_type = media_type or manifest.get("mediaType") or OCI_MANIFEST
        digest = sha256(body)
        self.manifests[(repository, digest)] = (body, media_type)
        if tag:
            self.manifests[(repository, tag)] = (body, media_type)
        return digest

    def add_image(self, repository: str, tag: Optional[str], layers: List[bytes],
                  config: Optional[Dict[str, Any]] = None, docker: bool = False,
                  manifest_extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        config = config or {"architecture": "amd64", "os": "linux",
                            "rootfs": {"type": "layers", "diff_ids": []}}
        config_desc = self.add_blob(json.dumps(config).encode())
        config_desc["mediaType"] = ("application/vnd.docker.container.image.v1+json"
                                    if docker else OCI_CONFIG)
        layer_descs = []
        for data in layers:
            desc = self.add_blob(data)
            desc["mediaType"] = ("application/vnd.docker.image.rootfs.diff.tar.gzip"
                                 if docker else OCI_LAYER_GZIP)
            layer_descs.append(desc)
        manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                    "config": config_desc, "layers": layer_descs}
        manifest.update(manifest_extra or {})
        self.repository_blobs.setdefault(repository, set()).update(
            [config_desc["digest"]] + [d["digest"] for d in layer_descs])
        digest = self.add_manifest(repository, tag, manifest)
        body = self.manifests[(repository, digest)][0]
        return {"digest": digest, "size": len(body), "mediaType": manifest["mediaType"],
                "manifest": manifest, "config": config_desc, "layers": layer_descs}

    def add_index(self, repository: str, tag: str,
                  children: List[Tuple[Dict[str, str], Dict[str, Any]]]) -> str:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": child["mediaType"], "digest": child["digest"],
             "size": child["size"], "platform": platform} for platform, child in children]}
        return self.add_manifest(repository, tag, index)

    # -- request log ------------------------------------------------------------

    def count(self, method: Optional[str] = None, kind: Optional[str] = None) -> int:
        return sum(1 for r in self.requests
                   if (method is None or r["method"] == method)
                   and (kind is None or f"/{kind}/" in r["path"]))

    # -- handling ---------------------------------------------------------------

    def _handle(self, h: _Base) -> None:
        headers = {k: v for k, v in h.headers.items()}
        path = urlsplit(h.path).path
        with self._lock:
            self.requests.append({"method": h.command, "path": h.path, "headers": headers})
        length = int(h.headers.get("Content-Length") or 0)
        if self.max_body_bytes is not None and length > self.max_body_bytes:
            h.close_connection = True
            h.send_body(413, b"request entity too large", content_type="text/plain")
            return
        body = h.rfile.read(length) if h.command in ("POST", "PUT", "PATCH") else b""
        with self._lock:
            self.body_sizes.append(len(body))
        if path == "/token":
            self._token(h, body)
            return
        for fault in list(self.faults):
            action = fault(h.command, path, headers)
            if action is not None:
                with self._lock:  # a one-shot fault hits exactly one request
                    if action.get("once", True):
                        if fault not in self.faults:
                            continue
                        self.faults.remove(fault)
                if action.get("keep_bytes") is not None:  # a cut-off upload kept in part
                    upload_id = path.rsplit("/", 1)[-1]
                    with self._lock:
                        if upload_id in self.uploads:
                            self.uploads[upload_id] += body[:action["keep_bytes"]]
                if self._apply_fault(h, action, path):
                    return
                break
        if not self._authorized(h):
            return
        if path == "/v2/" or path == "/v2":
            h.send_body(200, b"{}")
            return
        upload = re.fullmatch(r"/v2/(.+)/blobs/uploads/([^/]*)", path)
        if upload:
            self._upload(h, upload.group(1), upload.group(2), body)
            return
        referrers = re.fullmatch(r"/v2/(.+)/referrers/([^/]+)", path)
        if referrers and self.support_referrers and h.command == "GET":
            self._referrers(h, *referrers.groups())
            return
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if not match:
            h.send_body(404, json.dumps({"errors": [{"code": "NAME_UNKNOWN",
                                                     "message": "unknown"}]}).encode())
            return
        repository, kind, ref = match.groups()
        if h.command == "DELETE":
            self._delete(h, repository, kind, ref)
        elif kind == "manifests" and h.command == "PUT":
            self._put_manifest(h, repository, ref, body)
        elif kind == "manifests":
            self._manifest(h, repository, ref)
        else:
            self._blob(h, repository, ref)

    # -- pushes -----------------------------------------------------------------

    @staticmethod
    def _error(h: _Base, status: int, code: str, message: str,
               headers: Optional[Dict[str, str]] = None) -> None:
        h.send_body(status, json.dumps({"errors": [{"code": code, "message": message}]}).encode(),
                    headers)

    def _upload(self, h: _Base, repository: str, upload_id: str, body: bytes) -> None:
        query = parse_qs(urlsplit(h.path).query)
        if h.command == "POST" and not upload_id:
            mount, source = query.get("mount", [""])[0], query.get("from", [""])[0]
            if mount and ((source and self.support_mount and self._has(source, mount)) or
                          (not source and self.support_anonymous_mount and mount in self.blobs)):
                self.repository_blobs.setdefault(repository, set()).add(mount)
                h.send_body(201, b"", {"Location": f"/v2/{repository}/blobs/{mount}",
                                       "Docker-Content-Digest": mount})
                return
            digest = query.get("digest", [""])[0]
            if digest:
                self._finish_upload(h, repository, bytearray(body), digest)
                return
            with self._lock:
                upload_id = f"u{len(self.uploads)}-{time.time_ns()}"
                self.uploads[upload_id] = bytearray(body)
            self._upload_status(h, repository, upload_id, 202)
            return
        data = self.uploads.get(upload_id)
        if data is None:
            self._error(h, 404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
            return
        if h.command == "GET":
            self._upload_status(h, repository, upload_id, 204)
        elif h.command == "DELETE":
            del self.uploads[upload_id]
            h.send_body(204, b"")
        elif h.command == "PATCH":
            start = re.fullmatch(r"(\d+)-(\d+)", h.headers.get("Content-Range", "") or "")
            if start is not None and int(start.group(1)) != len(data):
                self._upload_status(h, repository, upload_id, 416)
                return
            data += body
            self._upload_status(h, repository, upload_id, 202)
        elif h.command == "PUT":
            del self.uploads[upload_id]
            self._finish_upload(h, repository, data + body, query.get("digest", [""])[0])
        else:
            self._error(h, 405, "UNSUPPORTED", "method not allowed")

    def _upload_status(self, h: _Base, repository: str, upload_id: str, status: int) -> None:
        size = len(self.uploads[upload_id])
        headers = {"Location": f"/v2/{repository}/blobs/uploads/{upload_id}",
                   "Range": f"0-{max(size - 1, 0)}", "Docker-Upload-UUID": upload_id}
        if self.chunk_min_length is not None:
            headers["OCI-Chunk-Min-Length"] = str(self.chunk_min_length)
        h.send_body(status, b"", headers)

    def _finish_upload(self, h: _Base, repository: str, data: bytearray, digest: str) -> None:
        if sha256(bytes(data)) != digest:
            self._error(h, 400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            return
        self.blobs[digest] = bytes(data)
        self.repository_blobs.setdefault(repository, set()).add(digest)
        h.send_body(201, b"", {"Location": f"/v2/{repository}/blobs/{digest}",
                               "Docker-Content-Digest": digest})

    def _put_manifest(self, h: _Base, repository: str, ref: str, body: bytes) -> None:
        media_type = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        digest = sha256(body)
        if ref.startswith("sha256:") and ref != digest:
            self._error(h, 400, "DIGEST_INVALID", "manifest digest did not match")
            return
        self.manifests[(repository, digest)] = (body, media_type)
        if not ref.startswith("sha256:"):
            self.manifests[(repository, ref)] = (body, media_type)
        headers = {"Location": f"/v2/{repository}/manifests/{digest}",
                   "Docker-Content-Digest": digest}
        subject = json.loads(body).get("subject") if body.startswith(b"{") else None
        if self.support_referrers and isinstance(subject, dict):
            headers["OCI-Subject"] = subject.get("digest", "")
        h.send_body(201, b"", headers)

    def _referrers(self, h: _Base, repository: str, digest: str) -> None:
        found = []
        for (repo, ref), (body, media_type) in list(self.manifests.items()):
            if repo != repository or not ref.startswith("sha256:"):
                continue
            data = json.loads(body)
            if (data.get("subject") or {}).get("digest") != digest:
                continue
            found.append({"mediaType": media_type, "digest": ref, "size": len(body),
                          "artifactType": data.get("artifactType") or
                          data.get("config", {}).get("mediaType", "")})
        h.send_body(200, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                     "manifests": found}).encode(),
                    {"Content-Type": OCI_INDEX})

    def _delete(self, h: _Base, repository: str, kind: str, ref: str) -> None:
        if kind == "blobs":
            found = self.blobs.pop(ref, None) is not None
        else:
            found = self.manifests.pop((repository, ref), None) is not None
        if not found:
            self._error(h, 404, "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN",
                        "unknown")
            return
        h.send_body(202, b"")

    def _apply_fault(self, h: _Base, action: Dict[str, Any], path: str) -> bool:
        status = action.get("status")
        if status:
            extra = action.get("headers", {})
            body = action.get("body", json.dumps({"errors": [{"code": "TOOMANYREQUESTS"
                                                              if status == 429 else "UNAVAILABLE",
                                                              "message": "fault"}]}).encode())
            h.send_body(status, body, extra)
            return True
        if action.get("drop_after") is not None or action.get("corrupt_at") is not None \
                or action.get("stall_after") is not None:
            digest = path.rsplit("/", 1)[-1]
            data = self.blobs[digest]
            start = self._range_start(h) if self.honor_range else 0
            if action.get("corrupt_at") is not None:
                pos = action["corrupt_at"]
                data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
            payload = data[start:]
            h.send_response(206 if start else 200)
            h.send_header("Content-Length", str(len(payload)))
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.end_headers()
            cut = action.get("drop_after", action.get("stall_after"))
            if cut is None:
                h.wfile.write(payload)
                return True
            h.wfile.write(payload[:cut])
            h.wfile.flush()
            if action.get("stall_after") is not None:
                self.stall.wait(30)
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        return False

    def _challenge(self) -> str:
        if self.auth == "basic":
            return 'Basic realm="fake"'
        realm = self.realm or f"http://{self.host}/token"
        return f'Bearer realm="{realm}",service="fake-registry"'

    def _authorized(self, h: _Base) -> bool:
        if self.auth is None:
            return True
        value = h.headers.get("Authorization", "")
        ok = False
        if self.auth == "basic" and value.startswith("Basic "):
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
            ok = self.users.get(user) == password
        elif self.auth == "bearer" and value.startswith("Bearer "):
            with self._lock:
                info = self.tokens.get(value[7:])
                if info is not None:
                    info["uses"] += 1
                    ok = info["expires"] > time.time() and (
                        self.token_max_uses is None or info["uses"] <= self.token_max_uses)
        if not ok:
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                           "message": "authentication required"}]}).encode()
            h.send_body(401, body, {"WWW-Authenticate": self._challenge()})
        return ok

    def _token(self, h: _Base, body: bytes) -> None:
        query = parse_qs(urlsplit(h.path).query)
        form = parse_qs(body.decode()) if body else {}
        record = {"method": h.command, "query": query, "form": form,
                  "authorization": h.headers.get("Authorization")}
        self.token_requests.append(record)
        if h.command == "POST":
            if form.get("grant_type") != ["refresh_token"] or \
                    form.get("refresh_token", [""])[0] not in self.refresh_tokens.values():
                h.send_body(401, b'{"error":"invalid_grant"}')
                return
        else:
            value = h.headers.get("Authorization", "")
            if value.startswith("Basic "):
                user, _, password = base64.b64decode(value[6:]).decode().partition(":")
                if self.users.get(user) != password:
                    h.send_body(401, b'{"details":"incorrect username or password"}')
                    return
        token = f"tok-{len(self.tokens)}-{time.time()}"
        lifetime = self.token_lifetime_s
        with self._lock:
            self.tokens[token] = {"expires": time.time() + (lifetime or 60), "uses": 0}
        answer: Dict[str, Any] = {"token": token}
        if lifetime is not None:
            answer["expires_in"] = lifetime
        h.send_body(200, json.dumps(answer).encode())

    def _manifest(self, h: _Base, repository: str, ref: str) -> None:
        entry = self.manifests.get((repository, ref))
        accept = h.headers.get("Accept", "")
        if entry is None or (entry[1] not in accept and entry[1].startswith("application/vnd.oci")):
            h.send_body(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                                     "message": "manifest unknown"}]}).encode())
            return
        if h.command == "HEAD" and not self.support_head:
            h.send_body(405, b"")
            return
        body, media_type = entry
        headers = {"Docker-Content-Digest": sha256(body)} if self.send_digest_header else {}
        h.send_body(200, body, headers, content_type=media_type)

    @staticmethod
    def _range_start(h: _Base) -> int:
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        return int(match.group(1)) if match else 0

    def _has(self, repository: str, digest: str) -> bool:
        return digest in self.blobs and (not self.strict_repositories or
                                         digest in self.repository_blobs.get(repository, ()))

    def _blob(self, h: _Base, repository: str, digest: str) -> None:
        data = self.blobs.get(digest) if self._has(repository, digest) else None
        if data is None:
            h.send_body(404, json.dumps({"errors": [{"code": "BLOB_UNKNOWN",
                                                     "message": "blob unknown"}]}).encode())
            return
        if self.redirect_loop:
            h.send_body(307, b"", {"Location": f"/v2/loop/blobs/{digest}"})
            return
        if self.redirect_blobs_to is not None:
            location = f"{self.redirect_blobs_to.url}/bucket/{digest.split(':')[1]}?X-Amz-Signature=s3cr3t"
            h.send_body(307, b"", {"Location": location})
            return
        start = self._range_start(h) if self.honor_range else 0
        if start:
            h.send_body(206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                        content_type="application/octet-stream")
        else:
            h.send_body(200, data, content_type="application/octet-stream")


class ForwardProxy:
    """A plain-HTTP forward proxy on loopback that records the requests it forwards."""

    def __init__(self) -> None:
        self.requests: List[str] = []
        self.hosts: Dict[str, str] = {}   # name -> address, e.g. registry.test -> 127.0.0.1
        proxy = self

        class Handler(_Base):
            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def _forward(self) -> None:
                import http.client
                proxy.requests.append(self.path)
                parts = urlsplit(self.path)
                target = http.client.HTTPConnection(proxy.hosts.get(parts.hostname, parts.hostname),
                                                    parts.port, timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-connection", "host")}
                target.request(self.command, parts.path + (f"?{parts.query}" if parts.query else ""),
                               headers=headers)
                response = target.getresponse()
                body = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                target.close()

        self.server, self.thread = _serve(Handler, self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
