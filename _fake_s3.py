"""A small S3 on 127.0.0.1 for hermetic tests: path-style buckets, SigV4 checked.

Standard library only, and independent of the module under test: it checks
each request's SigV4 signature with its own few lines (S3's rules: the path
and query exactly as received), checks x-amz-content-sha256 against the body,
and serves PUT (with ``If-None-Match: *``), GET (Range), HEAD, DELETE,
ListObjectsV2 (pages of ``page_size``), and multipart uploads (create, part,
complete, abort, list).  Faults are callables ``(method, key, query)``
returning an action: ``{"status": 503, "code": "SlowDown"}``, ``{"drop": True}``
(close the connection unanswered), ``{"cut": N}`` (send N bytes of a GET's body,
then close).  Errors are S3's XML.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

from _fake_registry import _Base, _serve

ACCESS_KEY = "AKIDFAKES3EXAMPLE"
SECRET_KEY = "fake/secret+key/EXAMPLE"


class FakeS3:
    """One S3 endpoint; buckets are created by ``create_bucket``."""

    def __init__(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 region: str = "us-east-1") -> None:
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.buckets: Dict[str, Dict[str, Tuple[bytes, str, float]]] = {}
        self.uploads: Dict[str, Tuple[str, str, Dict[int, bytes], float]] = {}
        self.requests: List[Dict[str, Any]] = []
        self.faults: List[Callable[[str, str, Dict[str, str]], Optional[Dict[str, Any]]]] = []
        self.page_size = 1000
        self.support_conditional = True   # If-None-Match: * (False: 501 NotImplemented)
        self.tokens: Dict[str, str] = {}   # session tokens accepted, by access key
        self.receiving: Dict[str, int] = {}  # body bytes received so far, by object key
        self._lock = threading.Lock()
        self._next_upload = 0
        s3 = self

        class Handler(_Base):
            def do_HEAD(self) -> None:
                s3._handle(self)

            def do_GET(self) -> None:
                s3._handle(self)

            def do_PUT(self) -> None:
                s3._handle(self)

            def do_POST(self) -> None:
                s3._handle(self)

            def do_DELETE(self) -> None:
                s3._handle(self)

        self.server, self.thread = _serve(Handler, self)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def create_bucket(self, name: str) -> None:
        self.buckets.setdefault(name, {})

    def objects(self, bucket: str) -> Dict[str, bytes]:
        return {key: value[0] for key, value in self.buckets[bucket].items()}

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for r in self.requests if r["method"] == method and contains in r["path"])

    # -- handling -----------------------------------------------------------------

    def _error(self, h: _Base, status: int, code: str, message: str = "") -> None:
        body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>"
                f"<Message>{escape(message or code)}</Message></Error>").encode()
        h.send_body(status, body, content_type="application/xml")

    def _signature_ok(self, h: _Base, body: bytes) -> Optional[str]:
        """Return None when the request's SigV4 signature is right, else the error code."""
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "AccessDenied"
        fields = dict(part.strip().split("=", 1) for part in auth[17:].split(","))
        access_key, day, region, service, _ = fields["Credential"].split("/")
        if access_key != self.access_key:
            return "InvalidAccessKeyId"
        token = h.headers.get("x-amz-security-token")
        if self.tokens.get(access_key, token) != token:
            return "InvalidToken"
        signed = fields["SignedHeaders"].split(";")
        if "host" not in signed or "x-amz-content-sha256" not in signed:
            return "AccessDenied"
        target = urlsplit(h.path)
        pairs = sorted(tuple(p.split("=", 1)) if "=" in p else (p, "")
                       for p in target.query.split("&") if p)
        query = "&".join(f"{k}={v}" for k, v in pairs)
        headers = "".join(f"{name}:{' '.join((h.headers.get(name) or '').split())}\n"
                          for name in signed)
        payload = h.headers.get("x-amz-content-sha256", "")
        request = "\n".join([h.command, target.path, query, headers, ";".join(signed), payload])
        date = h.headers.get("x-amz-date", "")
        scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope,
                             hashlib.sha256(request.encode()).hexdigest()])
        key = ("AWS4" + self.secret_key).encode()
        for part in (day, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["Signature"]) or date[:8] != day:
            return "SignatureDoesNotMatch"
        if payload != "UNSIGNED-PAYLOAD" and payload != hashlib.sha256(body).hexdigest():
            return "XAmzContentSHA256Mismatch"
        return None

    def _handle(self, h: _Base) -> None:
        target = urlsplit(h.path)
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        bucket, _, key = unquote(target.path).lstrip("/").partition("/")
        length = int(h.headers.get("Content-Length") or 0)
        chunks, got = [], 0
        while got < length:  # in pieces: ``receiving`` shows a body still arriving
            chunk = h.rfile.read(min(65536, length - got))
            if not chunk:
                return  # the client broke the request off: nothing is stored
            chunks.append(chunk)
            got += len(chunk)
            self.receiving[key] = got
        body = b"".join(chunks)
        with self._lock:
            self.requests.append({"method": h.command, "path": h.path, "key": key,
                                  "headers": dict(h.headers), "size": len(body)})
        action = None
        for fault in list(self.faults):
            action = fault(h.command, key, query)
            if action is not None:
                with self._lock:
                    if action.get("once", True):
                        if fault not in self.faults:
                            action = None
                            continue
                        self.faults.remove(fault)
                break
        if action and action.get("drop"):
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if action and action.get("status"):
            self._error(h, action["status"], action.get("code", "InternalError"))
            return
        problem = self._signature_ok(h, body)
        if problem is not None:
            status = 400 if problem == "XAmzContentSHA256Mismatch" else 403
            self._error(h, status, problem, "The request signature we calculated does not "
                        "match the signature you provided." if problem ==
                        "SignatureDoesNotMatch" else problem)
            return
        if bucket not in self.buckets:
            self._error(h, 404, "NoSuchBucket", "The specified bucket does not exist")
            return
        objects = self.buckets[bucket]
        if not key:
            if h.command == "HEAD":
                h.send_body(200, b"")
            elif "uploads" in query:
                self._list_uploads(h, bucket, query)
            else:
                self._list(h, objects, query)
            return
        if h.command == "POST" and "uploads" in query:
            with self._lock:
                self._next_upload += 1
                upload_id = f"up{self._next_upload}+/="
                self.uploads[upload_id] = (bucket, key, {}, time.time())
            h.send_body(200, f"<InitiateMultipartUploadResult><UploadId>{escape(upload_id)}"
                        f"</UploadId></InitiateMultipartUploadResult>".encode(),
                        content_type="application/xml")
            return
        if "uploadId" in query:
            self._multipart(h, objects, key, query, body)
            return
        if h.command == "PUT":
            if h.headers.get("If-None-Match") == "*":
                if not self.support_conditional:
                    self._error(h, 501, "NotImplemented", "conditional writes")
                    return
                with self._lock:
                    if key in objects:
                        self._error(h, 412, "PreconditionFailed")
                        return
                    objects[key] = (body, h.headers.get("Content-Type", ""), time.time())
            else:
                with self._lock:
                    objects[key] = (body, h.headers.get("Content-Type", ""), time.time())
            h.send_body(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            return
        if h.command == "DELETE":
            with self._lock:
                objects.pop(key, None)
            h.send_body(204, b"")
            return
        stored = objects.get(key)
        if stored is None:
            self._error(h, 404, "NoSuchKey", "The specified key does not exist.")
            return
        data, content_type, _ = stored
        status, headers = 200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}
        ranged = h.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-", 1)[0])
            if start >= len(data):
                self._error(h, 416, "InvalidRange")
                return
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        if action and action.get("cut") is not None and h.command == "GET":
            h.send_response(status)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[:action["cut"]])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if action and action.get("corrupt") and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        h.send_body(status, data, headers, content_type=content_type or "binary/octet-stream")

    def _list(self, h: _Base, objects: Dict[str, Tuple[bytes, str, float]],
              query: Dict[str, str]) -> None:
        prefix = query.get("prefix", "")
        after = query.get("continuation-token") or query.get("start-after") or ""
        keys = sorted(k for k in objects if k.startswith(prefix) and k > after)
        page, more = keys[:self.page_size], len(keys) > self.page_size
        items = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{len(objects[k][0])}</Size>"
            f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(objects[k][2]))}"
            f"</LastModified></Contents>" for k in page)
        token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" \
            if more else ""
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns='
                '"http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>{items}{token}"
                "</ListBucketResult>").encode()
        h.send_body(200, body, content_type="application/xml")

    def _list_uploads(self, h: _Base, bucket: str, query: Dict[str, str]) -> None:
        items = "".join(
            f"<Upload><Key>{escape(key)}</Key><UploadId>{escape(upload_id)}</UploadId>"
            f"<Initiated>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(started))}"
            f"</Initiated></Upload>"
            for upload_id, (b, key, _, started) in sorted(self.uploads.items())
            if b == bucket and key.startswith(query.get("prefix", "")))
        body = ('<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<IsTruncated>false</IsTruncated>{items}</ListMultipartUploadsResult>").encode()
        h.send_body(200, body, content_type="application/xml")

    def _multipart(self, h: _Base, objects: Dict[str, Tuple[bytes, str, float]], key: str,
                   query: Dict[str, str], body: bytes) -> None:
        import re
        upload = self.uploads.get(query["uploadId"])
        if upload is None or upload[1] != key:
            self._error(h, 404, "NoSuchUpload")
            return
        parts = upload[2]
        if h.command == "PUT":
            parts[int(query["partNumber"])] = body
            h.send_body(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        elif h.command == "DELETE":
            self.uploads.pop(query["uploadId"], None)
            h.send_body(204, b"")
        elif h.command == "POST":
            named = [int(n) for n in re.findall(rb"<PartNumber>([0-9]+)</PartNumber>", body)]
            etags = re.findall(rb"<ETag>([^<]+)</ETag>", body)
            for number, etag in zip(named, etags):
                if number not in parts or etag.decode().replace("&quot;", '"') != \
                        f'"{hashlib.md5(parts[number]).hexdigest()}"':
                    self._error(h, 400, "InvalidPart")
                    return
            with self._lock:
                objects[key] = (b"".join(parts[n] for n in named), "", time.time())
                self.uploads.pop(query["uploadId"], None)
            h.send_body(200, b"<CompleteMultipartUploadResult/>", content_type="application/xml")
        else:
            self._error(h, 405, "MethodNotAllowed")
