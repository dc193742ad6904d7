"""Hermetic tests of the S3 sections: the SigV4 signer, the credential chain, the
object client and S3BlobCache.

The signer is checked against the AWS SigV4 test suite's published answers
(``../shared/testdata/sigv4``, or ``testdata/sigv4`` when copied beside) and
against S3 cases whose answers botocore computed (``test_interop_s3`` asks
botocore again, live).  The S3 is ``_fake_s3.FakeS3`` on 127.0.0.1, which
checks every signature with its own code; the container-credentials and
instance-metadata endpoints are small fakes on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest

from _testsupport import zr

import _fake_s3
from _fake_registry import _Base, _serve

HERE = Path(__file__).resolve().parent
VECTORS = next((p for p in (HERE / "testdata" / "sigv4", HERE.parent / "shared" / "testdata" /
                            "sigv4") if p.is_dir()), None)

AK, SK = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
E = zr._EMPTY_SHA256


# =============================================================================
# 28. S3: SigV4 signing
# =============================================================================

def _suite_cases():
    if VECTORS is None:
        return []
    return sorted(str(p.with_suffix("")) for p in VECTORS.rglob("*.req")
                  if "post-sts-header-after" not in p.name)


def _parse_req(text):
    head, _, body = text.partition("\n\n")
    lines = [line for line in head.split("\n") if line]
    method, target = re.match(r"(\S+) (.*) HTTP/1.1$", lines[0]).groups()
    headers = []
    for line in lines[1:]:
        if line.startswith(" ") and headers:  # a folded header line
            headers[-1] = (headers[-1][0], headers[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, target, headers, body


class TestSigV4Suite:
    """The published AWS test suite (service "service": path normalised, encoded again)."""

    def test_the_suite_is_there(self):
        assert len(_suite_cases()) >= 30, f"SigV4 vectors not found (looked for {VECTORS})"

    @pytest.mark.parametrize("base", _suite_cases(),
                             ids=lambda b: Path(b).name if isinstance(b, str) else str(b))
    def test_known_answer(self, base):
        method, target, headers, body = _parse_req(Path(base + ".req").read_text("utf-8"))
        date = next(v for k, v in headers if k.lower() == "x-amz-date")
        token = next((v for k, v in headers if k.lower() == "x-amz-security-token"), None)
        if Path(base).name == "get-vanilla-with-session-token":
            token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"
        host = next(v for k, v in headers if k.lower() == "host")
        headers = [(k, v) for k, v in headers
                   if k.lower() not in ("x-amz-date", "x-amz-security-token")]
        signed = zr.sigv4_headers(method, f"https://{host}{target}", headers,
                                  hashlib.sha256(body.encode()).hexdigest(),
                                  access_key="AKIDEXAMPLE",
                                  secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                  region="us-east-1", service="service", amz_date=date,
                                  session_token=token)
        assert signed["Authorization"] == Path(base + ".authz").read_text().strip()
        assert "x-amz-content-sha256" not in signed  # only S3 has it
        assert signed["x-amz-date"] == date


# Answers computed by botocore's S3SigV4Auth (region us-west-2, 20261203T101500Z,
# the AWS documentation's example keys); test_interop_s3 recomputes them live.
S3_CASES = {
    "space-in-key": ("GET", "https://bucket.s3.us-west-2.amazonaws.com/a%20b/c%20d.txt", {}, E,
                     None, "9fd81387017a307f9f48d031dfc253c6725896811169c660c582e51ce88dc36f"),
    "unicode-key": ("GET", "https://bucket.s3.us-west-2.amazonaws.com/%E1%88%B4/%C3%A9t%C3%A9",
                    {}, E, None,
                    "6d914c13ddec9c7ac051f178b248efc46d4a6ae2efcbf8ea561eb727c759d2ad"),
    "plus-equals-tilde-percent": (
        "PUT", "https://bucket.s3.us-west-2.amazonaws.com/a%2Bb%3Dc~d%25e",
        {"Content-Length": "0"}, E, None,
        "2fd01b65e46e53723c49742b7719bf5fac1647193b83a3f2b8f0d22d198b2415"),
    "double-slash-and-dots": (
        "GET", "https://bucket.s3.us-west-2.amazonaws.com/x//y/../z/./w", {}, E, None,
        "98ae87c7407b95a69634b4464b046d785436faf6fd7ca61e30b5e205776b7f46"),
    "repeated-empty-unsorted-query": (
        "GET", "https://s3.us-west-2.amazonaws.com/bucket?prefix=b&list-type=2&prefix=a"
        "&delimiter=&uploads", {}, E, None,
        "fedb72e0ed32a10c5cd425e4cef7cbae58f19eb0dc177846c861070b00e320ef"),
    "encoded-query-values": (
        "GET", "https://s3.us-west-2.amazonaws.com/bucket?list-type=2&prefix=a%2Fb%20c"
        "&continuation-token=1%2B2%3D%3D", {}, E, None,
        "432128e8d6f340266da16dde90a1670288bca3decd427d3a5a12fc095b865ab9"),
    "header-runs-of-spaces": (
        "PUT", "https://bucket.s3.us-west-2.amazonaws.com/k",
        {"X-Amz-Meta-Note": "  a   b    c  ", "Content-Type": "application/octet-stream"},
        "5d41402abc4b2a76b9719d911017c592ae0d4cb1e4a6ee4b1d2ad4e1b1e1c1a0", None,
        "ba78167f5ae6356a1679d0e6e2bbcd6fd5a7d3981f5c8199bbfd24c14162373a"),
    "unsigned-payload": (
        "PUT", "https://bucket.s3.us-west-2.amazonaws.com/big?partNumber=3&uploadId=abc%2Bdef",
        {"Content-Length": "8388608"}, "UNSIGNED-PAYLOAD", None,
        "f7dc4e358f2c7f672d60c41a241d98bda2cefcf9001fc6646427d3e2e4d2da2f"),
    "session-token": (
        "GET", "https://bucket.s3.us-west-2.amazonaws.com/k", {}, E,
        "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+token/with=symbols",
        "8824b32a6135a00116309505cf7722f4503f57e88c14c8980dacefb9611f5864"),
    "path-style-port": (
        "HEAD", "http://127.0.0.1:8333/bucket/docker/registry/v2/blobs/sha256/ab/abcd/data", {},
        E, None, "3f86334eed46c439a85c48648fc8000c4bddff94aec89f4dcd2fab4a50dfbdc4"),
    "default-port-dropped": (
        "GET", "https://bucket.s3.us-west-2.amazonaws.com:443/k", {}, E, None,
        "17a2e533ac2bd75eb7bd25641795b562fea6a92b59ae83d1cc25715713498c74"),
    "if-none-match-lease": (
        "PUT", "http://localhost:9000/b/p/zlayer/leases/sha256/ab",
        {"If-None-Match": "*", "Content-Type": "application/json"}, E, None,
        "8eb26cb246d71310b4f1c2b3801914ef5f26c9ec7aade5927703ee73d887033d"),
}


def _sign_s3(method, url, headers, payload, token, amz_date="20261203T101500Z"):
    return zr.sigv4_headers(method, url, headers, payload, access_key=AK, secret_key=SK,
                            region="us-west-2", service="s3", amz_date=amz_date,
                            session_token=token)


class TestSigV4S3:
    @pytest.mark.parametrize("name", sorted(S3_CASES))
    def test_s3_case(self, name):
        method, url, headers, payload, token, expected = S3_CASES[name]
        signed = _sign_s3(method, url, headers, payload, token)
        assert signed["Authorization"].endswith(f"Signature={expected}")
        assert signed["x-amz-content-sha256"] == payload
        assert ("x-amz-security-token" in signed) == bool(token)
        signed_names = signed["Authorization"].split("SignedHeaders=")[1].split(",")[0]
        assert "x-amz-content-sha256" in signed_names.split(";")

    def test_s3_path_is_signed_as_given_and_other_services_normalise_it(self):
        s3 = _sign_s3("GET", "https://b.s3.amazonaws.com/a//b/../c", {}, E, None)
        plain = _sign_s3("GET", "https://b.s3.amazonaws.com/a/c", {}, E, None)
        assert s3["Authorization"] != plain["Authorization"]
        assert zr._sigv4_path("/a//b/../c", "s3") == "/a//b/../c"
        assert zr._sigv4_path("/a//b/../c", "service") == "/a/c"
        assert zr._sigv4_path("/a%20b", "service") == "/a%2520b"  # encoded once more

    def test_aws_documentation_examples(self):
        # "Signature Calculations for the Authorization Header" and "Query
        # String Authentication" of the S3 API reference.
        signed = zr.sigv4_headers("GET", "https://examplebucket.s3.amazonaws.com/test.txt",
                                  {"Range": "bytes=0-9"}, E, access_key=AK, secret_key=SK,
                                  region="us-east-1", service="s3", amz_date="20130524T000000Z")
        assert signed["Authorization"] == (
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            " SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature="
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
        put = zr.sigv4_headers(
            "PUT", "https://examplebucket.s3.amazonaws.com/test%24file.text",
            {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072", access_key=AK,
            secret_key=SK, region="us-east-1", service="s3", amz_date="20130524T000000Z")
        assert put["Authorization"].endswith(
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
        listing = zr.sigv4_headers(
            "GET", "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J", {}, E,
            access_key=AK, secret_key=SK, region="us-east-1", service="s3",
            amz_date="20130524T000000Z")
        assert listing["Authorization"].endswith(
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
        url = zr.sigv4_presign("GET", "https://examplebucket.s3.amazonaws.com/test.txt",
                               access_key=AK, secret_key=SK, region="us-east-1",
                               amz_date="20130524T000000Z", expires_s=86400)
        assert url == (
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
            "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
            "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")

    def test_presign_carries_the_session_token_and_refuses_bad_expiry(self):
        url = zr.sigv4_presign("GET", "https://b.s3.amazonaws.com/k", access_key=AK,
                               secret_key=SK, region="us-east-1", amz_date="20261203T000000Z",
                               session_token="tok/en+=")
        assert "X-Amz-Security-Token=tok%2Fen%2B%3D&" in url
        for bad in (0, 604801):
            with pytest.raises(ValueError):
                zr.sigv4_presign("GET", "https://b.s3.amazonaws.com/k", access_key=AK,
                                 secret_key=SK, region="us-east-1",
                                 amz_date="20261203T000000Z", expires_s=bad)

    def test_bad_date_is_refused_and_the_secret_never_appears(self):
        with pytest.raises(ValueError, match="amz_date"):
            _sign_s3("GET", "https://b.s3.amazonaws.com/k", {}, E, None, amz_date="2026-12-03")
        signed = _sign_s3("GET", "https://b.s3.amazonaws.com/k", {}, E, "the-token")
        assert SK not in json.dumps(signed)


# =============================================================================
# 29. S3: credentials
# =============================================================================

class _Endpoint:
    """A metadata endpoint on loopback: answers from ``routes`` {(method, path): (status, body)}."""

    def __init__(self, routes):
        self.routes = routes
        self.requests = []
        endpoint = self

        class Handler(_Base):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                endpoint.requests.append((self.command, self.path, dict(self.headers)))
                answer = endpoint.routes.get((self.command, self.path), (404, b"no"))
                if callable(answer):
                    answer = answer(self)
                self.send_body(answer[0], answer[1])

            do_GET = do_PUT = _any

        self.server, _ = _serve(Handler, self)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made = []

    def make(routes):
        made.append(_Endpoint(routes))
        return made[-1]
    yield make
    for e in made:
        e.close()


def _iso(seconds):
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _creds_json(key="ASIATEMP", secret="temp/secret", token="temp-token", expires=None):
    document = {"AccessKeyId": key, "SecretAccessKey": secret, "Token": token}
    if expires is not None:
        document["Expiration"] = _iso(expires)
    return json.dumps(document).encode()


NO_IMDS = {"AWS_EC2_METADATA_DISABLED": "true"}


class TestCredentialChain:
    def test_environment_comes_first(self, tmp_path):
        (tmp_path / ".aws").mkdir()
        (tmp_path / ".aws" / "credentials").write_text(
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n")
        chain = zr._CredentialChain({"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "s",
                                     "AWS_SESSION_TOKEN": "t"}, home=str(tmp_path))
        found = chain.get()
        assert (found.access_key, found.session_token, found.source) == ("ENVKEY", "t",
                                                                          "environment")

    def test_profiles_of_the_credentials_and_config_files(self, tmp_path):
        credentials, config = tmp_path / "creds", tmp_path / "config"
        credentials.write_text("[default]\naws_access_key_id = D\naws_secret_access_key = d\n"
                               "[team]\naws_access_key_id = T\naws_secret_access_key = t\n")
        config.write_text("[profile other]\naws_access_key_id = O\naws_secret_access_key = o\n"
                          "region = eu-west-3\nendpoint_url = http://127.0.0.1:9000\n"
                          "[profile team]\nregion = ap-south-1\n")
        environ = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials),
                   "AWS_CONFIG_FILE": str(config), **NO_IMDS}
        assert zr._CredentialChain(environ).get().access_key == "D"
        team = dict(environ, AWS_PROFILE="team")
        assert zr._CredentialChain(team).get().access_key == "T"
        settings = zr._AwsSettings(team)
        assert zr._aws_region(team, settings) == "ap-south-1"
        other = dict(environ, AWS_PROFILE="other")
        assert zr._CredentialChain(other).get().access_key == "O"
        settings = zr._AwsSettings(other)
        assert zr._aws_region(other, settings) == "eu-west-3"
        assert zr._aws_endpoint(other, settings) == "http://127.0.0.1:9000"
        assert zr._aws_region(dict(other, AWS_REGION="us-east-2"), settings) == "us-east-2"
        assert zr._aws_endpoint(dict(other, AWS_ENDPOINT_URL_S3="http://s3.test/"),
                                settings) == "http://s3.test"
        with pytest.raises(zr.CacheError, match="profile 'missing'"):
            zr._CredentialChain(dict(environ, AWS_PROFILE="missing")).get()

    def test_credential_process_is_run_and_rerun_before_expiry(self, tmp_path):
        import sys
        import time
        script = tmp_path / "creds.py"
        counter = tmp_path / "count"
        script.write_text(
            "import json, pathlib, time\n"
            f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1\n"
            "p.write_text(str(n))\n"
            "print(json.dumps({'Version': 1, 'AccessKeyId': f'PROC{n}', 'SecretAccessKey': 's',"
            " 'SessionToken': 't', 'Expiration': time.strftime('%Y-%m-%dT%H:%M:%SZ',"
            " time.gmtime(time.time() + 3600))}))\n")
        config = tmp_path / "config"
        config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
        now = [time.time()]
        chain = zr._CredentialChain({"AWS_CONFIG_FILE": str(config), **NO_IMDS,
                                     "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")},
                                    clock=lambda: now[0])
        assert chain.get().access_key == "PROC1"
        assert chain.get().access_key == "PROC1"  # kept while valid
        now[0] += 3600 - 5 * 60  # inside the refresh window
        assert chain.get().access_key == "PROC2"

    def test_container_endpoint_with_token_and_refresh(self, endpoint):
        import time
        issued = []

        def answer(handler):
            issued.append(handler.headers.get("Authorization"))
            return 200, _creds_json(key=f"ASIA{len(issued)}", expires=time.time() + 1200)
        server = endpoint({("GET", "/creds"): answer})
        now = [time.time()]
        chain = zr._CredentialChain({"AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + "/creds",
                                     "AWS_CONTAINER_AUTHORIZATION_TOKEN": "pod-token",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent", **NO_IMDS},
                                    clock=lambda: now[0])
        first = chain.get()
        assert (first.access_key, first.session_token) == ("ASIA1", "temp-token")
        assert issued == ["pod-token"]
        now[0] += 10 * 60  # 10 minutes left: renewed
        assert chain.get().access_key == "ASIA2"

    def test_a_failed_renewal_keeps_valid_credentials_until_the_last_minute(self, endpoint):
        import time
        state = {"ok": True}

        def answer(handler):
            if not state["ok"]:
                return 500, b"down"
            return 200, _creds_json(expires=time.time() + 1200)
        server = endpoint({("GET", "/c"): answer})
        now = [time.time()]
        chain = zr._CredentialChain({"AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + "/c",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent"}, clock=lambda: now[0])
        chain.get()
        state["ok"] = False
        now[0] += 10 * 60
        assert chain.get().access_key == "ASIATEMP"  # renewal failed, still valid
        now[0] += 10 * 60 - 30
        with pytest.raises(zr.CacheError, match="answered 500"):
            chain.get()

    def test_full_uri_elsewhere_over_http_is_refused(self):
        chain = zr._CredentialChain({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://evil.test/c",
                                     "AWS_CONTAINER_AUTHORIZATION_TOKEN": "pod-token",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent"})
        with pytest.raises(zr.CacheError, match="must be https, loopback"):
            chain.get()

    def test_imdsv2_token_then_role_then_credentials(self, endpoint):
        import time
        routes = {("PUT", "/latest/api/token"): (200, b"imds-session"),
                  ("GET", "/latest/meta-data/iam/security-credentials/"): (200, b"my-role\n"),
                  ("GET", "/latest/meta-data/iam/security-credentials/my-role"):
                      (200, json.dumps({"Code": "Success", "AccessKeyId": "ASIAEC2",
                                        "SecretAccessKey": "ec2secret", "Token": "ec2token",
                                        "Expiration": _iso(time.time() + 6 * 3600)}).encode())}
        server = endpoint(routes)
        chain = zr._CredentialChain({"AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url,
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent"})
        found = chain.get()
        assert (found.access_key, found.session_token) == ("ASIAEC2", "ec2token")
        put, role, creds = server.requests
        assert put[0] == "PUT" and put[2]["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        assert role[2]["X-aws-ec2-metadata-token"] == "imds-session"
        assert creds[2]["X-aws-ec2-metadata-token"] == "imds-session"
        assert "ec2secret" not in repr(found) and "ec2token" not in str(found)

    def test_nothing_found_says_what_was_tried(self, tmp_path):
        import socket
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # a port nobody listens on: an EC2 endpoint off EC2
        chain = zr._CredentialChain({"AWS_EC2_METADATA_SERVICE_ENDPOINT":
                                     f"http://127.0.0.1:{port}"}, home=str(tmp_path))
        with pytest.raises(zr.CacheError) as caught:
            chain.get()
        message = str(caught.value)
        assert "no AWS credentials found" in message and "EC2 instance metadata" in message
        disabled = zr._CredentialChain(NO_IMDS, home=str(tmp_path))
        with pytest.raises(zr.CacheError) as caught:
            disabled.get()
        assert "EC2 instance metadata" not in str(caught.value)

    def test_half_a_key_pair_and_refusals_never_quote_secrets(self, tmp_path, endpoint):
        with pytest.raises(zr.CacheError, match="lack AWS_SECRET_ACCESS_KEY"):
            zr._CredentialChain({"AWS_ACCESS_KEY_ID": "A"}).get()
        server = endpoint({("GET", "/c"): (200, b'{"AccessKeyId": "X", "Token": "leak-me"}')})
        chain = zr._CredentialChain({"AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + "/c",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent"})
        with pytest.raises(zr.CacheError) as caught:
            chain.get()
        assert "leak-me" not in str(caught.value)
        credentials = zr.S3Credentials("AKIAEXAMPLEKEY", "very-secret", "session-secret")
        assert "very-secret" not in repr(credentials) and "session-secret" not in repr(credentials)


# =============================================================================
# 30-31. S3: the object client and S3BlobCache
# =============================================================================

@pytest.fixture
def s3():
    server = _fake_s3.FakeS3()
    server.create_bucket("fleet")
    yield server
    server.close()


def _cache(s3, prefix="cache", **kwargs):
    kwargs.setdefault("credentials", zr.S3Credentials(_fake_s3.ACCESS_KEY, _fake_s3.SECRET_KEY))
    return zr.S3BlobCache("fleet", prefix=prefix, endpoint=s3.endpoint, region="us-east-1",
                          environ={}, **kwargs)


def _digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class TestS3BlobCache:
    def test_put_get_head_delete_in_distributions_layout(self, s3):
        cache = _cache(s3)
        data = os.urandom(100_000)
        digest = _digest(data)
        assert not cache.has(digest) and cache.open_blob(digest) is None
        cache.put(digest, data, "application/vnd.oci.image.layer.v1.tar+gzip")
        hex_digest = digest.split(":")[1]
        key = f"cache/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        assert s3.objects("fleet")[key] == data
        put = next(r for r in s3.requests if r["method"] == "PUT")
        assert put["headers"]["x-amz-content-sha256"] == hex_digest  # S3 checks it too
        assert cache.has(digest) and cache.size(digest) == len(data)
        assert cache.get(digest) == data
        assert cache.media_type(digest) == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert cache.delete(digest) and not cache.delete(digest)
        assert not cache.has(digest)

    def test_a_corrupted_object_is_reported_never_served_whole(self, s3):
        cache = _cache(s3)
        data = os.urandom(50_000)
        digest = _digest(data)
        cache.put(digest, data)
        s3.faults.append(lambda m, k, q: {"corrupt": True} if m == "GET" else None)
        with pytest.raises(zr.DigestMismatchError):
            cache.get(digest)
        s3.faults.append(lambda m, k, q: {"corrupt": True} if k.endswith("/data") else None)
        assert cache.verify() == [digest]

    def test_a_writer_uploads_only_verified_bytes(self, s3):
        cache = _cache(s3)
        data = os.urandom(10_000)
        with pytest.raises(zr.DigestMismatchError):
            with cache.begin_write(_digest(b"other"), len(data)) as writer:
                writer.write(data)
                writer.commit()
        assert s3.count("PUT") == 0 and not s3.objects("fleet")
        with cache.begin_write() as writer:  # an upload: digest known at the end
            writer.write(data)
            writer.commit(_digest(data))
        assert cache.get(_digest(data)) == data

    def test_multipart_in_parallel_above_the_threshold(self, s3, tmp_path):
        cache = _cache(s3, multipart_threshold_bytes=256 * 1024, part_bytes=100 * 1024)
        data = os.urandom(1_000_000)
        digest = _digest(data)
        path = tmp_path / "blob"
        path.write_bytes(data)
        cache.put_path(str(path), digest)
        parts = [r for r in s3.requests if r["method"] == "PUT" and "partNumber=" in r["path"]]
        assert len(parts) == 10 and all(r["headers"]["x-amz-content-sha256"] != "UNSIGNED-PAYLOAD"
                                        for r in parts)
        assert cache.get(digest) == data and not s3.uploads

    def test_a_failed_part_aborts_the_upload(self, s3, tmp_path):
        cache = _cache(s3, multipart_threshold_bytes=256 * 1024, part_bytes=100 * 1024, retries=0)
        data = os.urandom(600_000)
        path = tmp_path / "blob"
        path.write_bytes(data)
        s3.faults.append(lambda m, k, q: {"status": 403, "code": "AccessDenied"}
                         if q.get("partNumber") == "4" else None)
        with pytest.raises(zr.CacheError) as caught:
            cache.put_path(str(path), _digest(data))
        assert caught.value.code == "AccessDenied"
        assert not s3.uploads and s3.count("DELETE") == 1
        assert not any("/data" in k for k in s3.objects("fleet"))

    def test_slowdown_and_dropped_connections_are_retried(self, s3):
        sleeps = []
        cache = _cache(s3)
        cache.client._sleep = sleeps.append
        data = b"retry me"
        s3.faults.append(lambda m, k, q: {"status": 503, "code": "SlowDown"} if m == "PUT" else None)
        s3.faults.append(lambda m, k, q: {"drop": True} if m == "GET" else None)
        cache.put(_digest(data), data)
        assert cache.get(_digest(data)) == data
        assert len(sleeps) == 1  # the 503; a dropped pooled connection is re-sent at once
        assert s3.count("PUT") == 2 and s3.count("GET", "/data") == 2

    def test_errors_carry_the_s3_code_and_say_what_to_do(self, s3):
        wrong = _cache(s3, credentials=zr.S3Credentials(_fake_s3.ACCESS_KEY, "wrong-secret"))
        with pytest.raises(zr.CacheError) as caught:
            wrong.put(_digest(b"x"), b"x")
        assert caught.value.code == "SignatureDoesNotMatch" and caught.value.status == 403
        assert "check the secret key" in str(caught.value)
        assert "wrong-secret" not in str(caught.value)
        missing = zr.S3BlobCache("nobucket", endpoint=s3.endpoint, environ={}, credentials=zr.
                                 S3Credentials(_fake_s3.ACCESS_KEY, _fake_s3.SECRET_KEY))
        with pytest.raises(zr.CacheError) as caught:
            missing.put(_digest(b"x"), b"x")
        assert caught.value.code == "NoSuchBucket"

    def test_listing_pages_and_references(self, s3):
        s3.page_size = 3
        cache = _cache(s3)
        blobs = [os.urandom(100 + i) for i in range(8)]
        for data in blobs:
            cache.put(_digest(data), data)
        assert sorted(cache.digests()) == sorted(_digest(d) for d in blobs)
        sizes = {e["digest"]: e["size"] for e in cache.entries()}
        assert sizes == {_digest(d): len(d) for d in blobs}
        manifest = json.dumps({"schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
                               "config": {"mediaType": zr.MEDIA_TYPE_OCI_CONFIG,
                                          "digest": _digest(blobs[0]), "size": len(blobs[0])},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                           "digest": _digest(blobs[1]),
                                           "size": len(blobs[1])}]}).encode()
        cache.put(_digest(manifest), manifest, zr.MEDIA_TYPE_OCI_MANIFEST)
        cache.record_reference("registry.test/app:v1", _digest(manifest),
                               zr.MEDIA_TYPE_OCI_MANIFEST)
        assert cache.lookup_reference("registry.test/app:v1") == _digest(manifest)
        assert cache.references() == {"registry.test/app:v1": _digest(manifest)}
        assert cache.gc() == []  # the default grace spares what was just uploaded
        removed = cache.gc(grace_s=0)
        assert sorted(removed) == sorted(_digest(d) for d in blobs[2:])
        assert cache.has(_digest(blobs[0])) and cache.has(_digest(manifest))
        assert cache.forget_reference("registry.test/app:v1")
        assert cache.lookup_reference("registry.test/app:v1") is None

    def test_gc_refuses_a_bucket_without_records(self, s3):
        cache = _cache(s3, prefix="registry")
        cache.put(_digest(b"a registry's blob"), b"a registry's blob")
        with pytest.raises(zr.CacheError, match="no reference records"):
            cache.gc(grace_s=0)
        assert cache.has(_digest(b"a registry's blob"))

    def test_gc_aborts_uploads_a_killed_process_left(self, s3):
        cache = _cache(s3)
        key = cache.blob_key(_digest(b"left"))
        upload_id = cache.client.create_upload(key)
        assert cache.abort_stale_uploads(older_than_s=3600) == 0
        assert cache.abort_stale_uploads(older_than_s=-60) == 1
        assert upload_id not in s3.uploads

    def test_from_url_and_addressing(self, s3):
        cache = zr.S3BlobCache.from_url("s3://fleet/a/b/", endpoint=s3.endpoint, environ={},
                                        credentials=zr.S3Credentials("A", "B"))
        assert (cache.bucket, cache.prefix, cache.url) == ("fleet", "a/b", "s3://fleet/a/b")
        assert cache.client.url("k") == f"{s3.endpoint}/fleet/k"  # path style off AWS
        aws = zr.S3BlobCache("my-bucket", region="eu-west-1", environ={},
                             credentials=zr.S3Credentials("A", "B"))
        assert aws.client.url("k") == "https://my-bucket.s3.eu-west-1.amazonaws.com/k"
        dotted = zr.S3BlobCache("my.bucket", region="eu-west-1", environ={},
                                credentials=zr.S3Credentials("A", "B"))
        assert dotted.client.url("k") == "https://s3.eu-west-1.amazonaws.com/my.bucket/k"
        for bad in ("fleet", "s3://", "s3:///x"):
            with pytest.raises(zr.CacheError):
                zr.S3BlobCache.from_url(bad, environ={}, credentials=zr.S3Credentials("A", "B"))

    def test_presigned_url_fetches_without_credentials(self, s3):
        cache = _cache(s3)
        data = b"presigned blob"
        cache.put(_digest(data), data)
        url = cache.presign(_digest(data), expires_s=60)
        assert "X-Amz-Signature=" in url and url.startswith(s3.endpoint + "/fleet/cache/")

    def test_conditional_put(self, s3):
        cache = _cache(s3)
        assert cache.client.put_if_absent("cache/zlayer/leases/x", b"1") is True
        assert cache.client.put_if_absent("cache/zlayer/leases/x", b"2") is False
        s3.support_conditional = False
        assert cache.client.put_if_absent("cache/zlayer/leases/y", b"1") is None

    def test_parallel_writers_of_one_blob(self, s3):
        cache = _cache(s3)
        data = os.urandom(300_000)
        errors = []

        def write():
            try:
                cache.put(_digest(data), data)
            except Exception as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=write) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and cache.get(_digest(data)) == data


# =============================================================================
# 32. S3: the fleet tier
# =============================================================================

from _testsupport import layer_bytes, make_puller  # noqa: E402


def _blob_gets(registry):
    return [r for r in registry.requests if r["method"] == "GET" and "/blobs/" in r["path"]]


@pytest.fixture
def image(registry):
    return registry.add_image("team/app", "v1", [layer_bytes(1, 300_000), layer_bytes(2, 200_000)])


def _host(tmp_path, name, s3, **kwargs):
    """One host of the fleet: its own local cache, the shared bucket."""
    cache = zr.DirectoryBlobCache(str(tmp_path / name))
    return make_puller(cache, remote_cache=_cache(s3, **kwargs.pop("remote", {})), **kwargs)


def _layer_keys(s3):
    return {k for k in s3.objects("fleet") if k.endswith("/data")}


def _held_until_leased(s3, hosts):
    """A registry fault that answers a blob GET only once ``hosts`` hosts have tried
    to lease that blob: they all missed it in the bucket at the same moment."""
    import time

    def hold(method, path, headers):
        if "/blobs/sha256:" in path:
            leases = "zlayer/leases/sha256/" + path.rsplit(":", 1)[1]
            deadline = time.monotonic() + 30
            while s3.count("PUT", leases) < hosts and time.monotonic() < deadline:
                threading.Event().wait(0.005)
        return None
    return hold


class TestFleetTier:
    def test_first_host_uploads_second_host_reads_the_bucket(self, registry, image, s3,
                                                             tmp_path):
        with _host(tmp_path, "one", s3) as puller:
            first = puller.pull_image(f"{registry.host}/team/app:v1")
        assert len(_blob_gets(registry)) == 3  # config and two layers, once each
        # Blobs, the manifest and the reference record are in the bucket.
        assert len(_layer_keys(s3)) == 4
        record = _cache(s3).reference_record(f"{registry.host}/team/app:v1")
        assert record["digest"] == image["digest"]
        with _host(tmp_path, "two", s3) as puller:
            second = puller.pull_image(f"{registry.host}/team/app:v1")
        assert len(_blob_gets(registry)) == 3  # nothing more from the registry
        assert [layer.read_bytes() for layer in second.layers] == \
            [layer.read_bytes() for layer in first.layers]
        assert not any(r["method"] == "HEAD" and r["key"].endswith("/data")
                       for r in s3.requests)  # a local miss is one GET, no HEAD first

    def test_pull_returns_before_uploads_and_flush_waits(self, registry, image, s3, tmp_path):
        gate = threading.Event()
        s3.faults.append(lambda m, k, q: gate.wait(10) and None
                         if m == "PUT" and k.endswith("/data") else None)
        puller = _host(tmp_path, "one", s3)
        try:
            puller.pull_image(f"{registry.host}/team/app:v1")
            assert not _layer_keys(s3)  # the pull is done, the uploads are not
            gate.set()
            puller.flush_remote()
            assert len(_layer_keys(s3)) == 4
        finally:
            gate.set()
            puller.close()

    def test_a_corrupt_object_is_not_served_and_is_replaced(self, registry, image, s3,
                                                            tmp_path, capsys):
        with _host(tmp_path, "one", s3) as puller:
            puller.pull_image(f"{registry.host}/team/app:v1")
        layer = image["layers"][0]
        key = _cache(s3).blob_key(layer["digest"])
        good, content_type, when = s3.buckets["fleet"][key]
        s3.buckets["fleet"][key] = (b"X" + good[1:], content_type, when)
        before = len(_blob_gets(registry))
        with _host(tmp_path, "two", s3) as puller:
            result = puller.pull_image(f"{registry.host}/team/app:v1")
        assert result.layers[0].read_bytes() == good
        assert len(_blob_gets(registry)) == before + 1  # that layer alone, from the registry
        assert s3.objects("fleet")[key] == good  # the good copy replaced the bad one
        assert "failed its digest check" in capsys.readouterr().err

    def test_s3_down_never_fails_a_pull(self, registry, image, tmp_path, capsys):
        dead = _fake_s3.FakeS3()
        dead.create_bucket("fleet")
        dead.close()  # nothing listens there now
        with _host(tmp_path, "one", dead, remote={"retries": 0}) as puller:
            result = puller.pull_image(f"{registry.host}/team/app:v1")
        assert len(result.layers) == 2
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "going on without it" in warnings[0]

    def test_wrong_credentials_warn_once_and_pull_from_the_registry(self, registry, image, s3,
                                                                    tmp_path, capsys):
        bad = zr.S3Credentials(_fake_s3.ACCESS_KEY, "not-the-secret")
        with _host(tmp_path, "one", s3, remote={"credentials": bad}) as puller:
            puller.pull_image(f"{registry.host}/team/app:v1")
        err = capsys.readouterr().err
        assert err.count("warning") == 1 and "SignatureDoesNotMatch" in err
        assert "not-the-secret" not in err

    def test_credentials_the_transport_cannot_use_are_one_warning(self, registry, image, s3,
                                                                   tmp_path, capsys):
        # A container-credentials URL of a scheme the HTTP client refuses: the
        # failure comes from the transport, and must still not fail the pull.
        chain = zr._CredentialChain({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "ftp://creds.test/x",
                                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                     "AWS_CONFIG_FILE": "/nonexistent"})
        with _host(tmp_path, "one", s3, remote={"credentials": chain}) as puller:
            # Not empty: the tag is resolved by HEAD, so the manifest is first asked
            # of the bucket (a read, in this thread).
            puller.cache.put(_digest(b"other"), b"other")
            result = puller.pull_image(f"{registry.host}/team/app:v1")
        assert len(result.layers) == 2
        assert capsys.readouterr().err.count("going on without it") == 1

    def test_s3_stopping_in_the_middle_of_a_blob(self, registry, image, s3, tmp_path):
        with _host(tmp_path, "one", s3) as puller:
            puller.pull_image(f"{registry.host}/team/app:v1")
        before = len(_blob_gets(registry))
        big = image["layers"][0]["digest"]
        # The bucket sends 1000 bytes of the big layer, then stops answering at all.
        cut = []

        def stop(method, key, query):
            if cut:
                return {"drop": True, "once": False}
            if method == "GET" and key.endswith(big[7:] + "/data"):
                cut.append(key)
                return {"cut": 1000, "once": False}
            return None
        s3.faults.append(stop)
        with _host(tmp_path, "two", s3, remote={"retries": 0}) as puller:
            result = puller.pull_image(f"{registry.host}/team/app:v1")
        assert result.layers[0].read_bytes() == layer_bytes(1, 300_000)
        resumed = [r for r in _blob_gets(registry)[before:] if big in r["path"]]
        assert resumed and resumed[0]["headers"].get("Range") == "bytes=1000-"

    def test_by_digest_with_the_registry_down(self, registry, image, s3, tmp_path):
        with _host(tmp_path, "one", s3) as puller:
            puller.pull_image(f"{registry.host}/team/app:v1")
        host = registry.host
        registry.close()
        with _host(tmp_path, "two", s3) as puller:
            result = puller.pull_image(f"{host}/team/app@{image['digest']}")
        assert len(result.layers) == 2 and result.manifest.digest == image["digest"]

    def test_offline_by_tag_from_the_record(self, registry, image, s3, tmp_path, capsys):
        with _host(tmp_path, "one", s3) as puller:
            puller.pull_image(f"{registry.host}/team/app:v1")
        host = registry.host
        registry.close()
        with _host(tmp_path, "two", s3, offline=True) as puller:
            result = puller.pull_image(f"{host}/team/app:v1")
        assert result.manifest.digest == image["digest"]
        assert "may have moved it" in capsys.readouterr().err
        with _host(tmp_path, "three", s3, offline=True) as puller, \
                pytest.raises(zr.NotFoundError, match="--offline"):
            puller.pull_image(f"{host}/team/other:v1")

    def test_two_hosts_at_once_download_each_blob_once(self, registry, image, s3, tmp_path):
        registry.faults.append(_held_until_leased(s3, hosts=2))
        results, errors = {}, []

        def pull(name):
            try:
                with _host(tmp_path, name, s3) as puller:
                    results[name] = puller.pull_image(f"{registry.host}/team/app:v1")
            except Exception as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=pull, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        gets = _blob_gets(registry)
        assert sorted(r["path"].rsplit("/", 1)[1] for r in gets) == sorted(
            d["digest"] for d in [image["config"]] + image["layers"])
        for descriptor in [image["config"]] + image["layers"]:  # both hosts raced for each
            assert s3.count("PUT", "zlayer/leases/sha256/" + descriptor["digest"][7:]) >= 2
        assert not any(k.startswith("cache/zlayer/leases/") for k in s3.objects("fleet"))

    def test_without_conditional_writes_hosts_download_in_parallel(self, registry, image, s3,
                                                                   tmp_path, caplog):
        import logging
        s3.support_conditional = False
        with caplog.at_level(logging.DEBUG, logger="zlayer_registry"):
            with _host(tmp_path, "one", s3) as puller:
                puller.pull_image(f"{registry.host}/team/app:v1")
        assert any("does not do conditional writes" in r.message for r in caplog.records)
        assert len(_layer_keys(s3)) == 4


# =============================================================================
# The CLI: --remote-cache, --cache s3://..., --offline, and four hosts at once
# =============================================================================

from _testsupport import run_cli, start_cli  # noqa: E402


def _aws_env(s3, **extra):
    env = {"AWS_ACCESS_KEY_ID": _fake_s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": _fake_s3.SECRET_KEY,
           "AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.update(extra)
    return env


class TestCli:
    def test_pull_through_the_remote_cache_then_a_second_host(self, registry, image, s3,
                                                             tmp_path):
        ref = f"{registry.host}/team/app:v1"
        first = run_cli("pull", ref, "--cache", str(tmp_path / "one"), "--remote-cache",
                        "s3://fleet/cache", env=_aws_env(s3), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert image["digest"] in first.stdout
        assert len(_layer_keys(s3)) == 4  # it waited for the uploads before it exited
        second = run_cli("pull", ref, "--cache", str(tmp_path / "two"),
                         env=_aws_env(s3, ZLAYER_REMOTE_CACHE="s3://fleet/cache"), cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert len(_blob_gets(registry)) == 3

    def test_offline_and_registry_down(self, registry, image, s3, tmp_path):
        ref = f"{registry.host}/team/app:v1"
        assert run_cli("pull", ref, "--cache", str(tmp_path / "one"), "--remote-cache",
                       "s3://fleet/cache", env=_aws_env(s3), cwd=tmp_path).returncode == 0
        registry.close()
        offline = run_cli("pull", ref, "--cache", str(tmp_path / "two"), "--remote-cache",
                          "s3://fleet/cache", "--offline", "-q", env=_aws_env(s3),
                          cwd=tmp_path)
        assert offline.returncode == 0, offline.stderr
        assert offline.stdout.strip() == image["digest"]
        assert "may have moved it" in offline.stderr

    def test_s3_alone_and_the_cache_commands(self, registry, image, s3, tmp_path):
        ref = f"{registry.host}/team/app:v1"
        env = _aws_env(s3)
        pulled = run_cli("pull", ref, "--cache", "s3://fleet/only", env=env, cwd=tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        assert "s3://fleet/only" in pulled.stdout
        listed = run_cli("cache", "ls", "--cache", "s3://fleet/only", "--json", env=env,
                         cwd=tmp_path)
        data = json.loads(listed.stdout)
        assert data["references"] == {ref: image["digest"]} and len(data["blobs"]) == 4
        verified = run_cli("cache", "verify", "--cache", "s3://fleet/only", env=env,
                           cwd=tmp_path)
        assert verified.returncode == 0 and "4 blobs checked, 0 corrupt" in verified.stdout
        stray = b"unreferenced"
        _cache(s3, prefix="only").put(_digest(stray), stray)
        gc = run_cli("cache", "gc", "--grace", "0", "--cache", "s3://fleet/only", env=env,
                     cwd=tmp_path)
        assert gc.returncode == 0 and "removed 1 unreferenced blob" in gc.stdout
        assert not _cache(s3, prefix="only").has(_digest(stray))
        assert run_cli("cache", "rm", ref, "--cache", "s3://fleet/only", env=env,
                       cwd=tmp_path).returncode == 0
        pruned = run_cli("cache", "prune", "--max-bytes", "0", "--cache", "s3://fleet/only",
                         env=env, cwd=tmp_path)
        assert pruned.returncode == 0 and not _layer_keys(s3)

    def test_s3_alone_fails_clearly_when_s3_does(self, registry, image, s3, tmp_path):
        ref = f"{registry.host}/team/app:v1"
        wrong = run_cli("pull", ref, "--cache", "s3://fleet/only",
                        env=_aws_env(s3, AWS_SECRET_ACCESS_KEY="the-wrong-one"), cwd=tmp_path)
        assert wrong.returncode == 1
        assert "SignatureDoesNotMatch" in wrong.stderr and "Traceback" not in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1
        assert "the-wrong-one" not in wrong.stderr
        nothing = run_cli("pull", ref, "--cache", "s3://fleet/only", env={
            "AWS_EC2_METADATA_DISABLED": "true"}, cwd=tmp_path)
        assert nothing.returncode == 1 and "no AWS credentials found" in nothing.stderr

    def test_remote_cache_down_is_one_warning(self, registry, image, tmp_path):
        dead = _fake_s3.FakeS3()
        dead.close()
        pulled = run_cli("pull", f"{registry.host}/team/app:v1", "--cache", str(tmp_path / "c"),
                         "--remote-cache", "s3://fleet/cache", env=_aws_env(dead), cwd=tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stderr.count("warning") == 1 and "going on without it" in pulled.stderr

    def test_remote_cache_with_an_s3_cache_is_a_usage_error(self, s3, tmp_path):
        done = run_cli("pull", "alpine", "--cache", "s3://fleet/x", "--remote-cache",
                       "s3://fleet/y", env=_aws_env(s3), cwd=tmp_path)
        assert done.returncode == 2 and "local --cache DIR" in done.stderr

    def test_four_hosts_one_download_per_layer(self, registry, image, s3, tmp_path):
        registry.faults.append(_held_until_leased(s3, hosts=4))
        hosts = [start_cli("pull", f"{registry.host}/team/app:v1", "-q", "--cache",
                           str(tmp_path / f"host{n}"), "--remote-cache", "s3://fleet/cache",
                           home=tmp_path, env=_aws_env(s3)) for n in range(4)]
        outputs = [host.communicate(timeout=120) for host in hosts]
        assert [host.returncode for host in hosts] == [0, 0, 0, 0], outputs
        assert {out.strip() for out, _ in outputs} == {image["digest"]}
        fetched = sorted(r["path"].rsplit("/", 1)[1] for r in _blob_gets(registry))
        assert fetched == sorted(d["digest"] for d in [image["config"]] + image["layers"])
        for descriptor in [image["config"]] + image["layers"]:
            assert s3.count("PUT", "zlayer/leases/sha256/" + descriptor["digest"][7:]) >= 4
        assert not any("/zlayer/leases/" in k for k in s3.objects("fleet"))


class TestFollower:
    """A large blob from the registry goes up to the bucket while it still downloads."""

    def test_the_upload_runs_alongside_the_download(self, registry, s3, tmp_path):
        import time
        big = layer_bytes(7, 3_000_000)
        image = registry.add_image("team/big", "v1", [big])
        layer = image["layers"][0]["digest"]
        key = _cache(s3).blob_key(layer)
        registry.faults.append(lambda m, p, h: {"stall_after": 2_600_000}
                               if m == "GET" and p.endswith(layer) else None)
        puller = _host(tmp_path, "one", s3, remote={"part_bytes": 100 * 1024})
        done = []
        try:
            worker = threading.Thread(target=lambda: done.append(
                puller.pull_image(f"{registry.host}/team/big:v1")))
            worker.start()
            # The download is held at 2.6 MB: what arrived is on its way to S3 meanwhile.
            deadline = time.monotonic() + 30
            while s3.receiving.get(key, 0) < 2 * 1024 * 1024 and time.monotonic() < deadline:
                threading.Event().wait(0.01)
            assert not done and s3.receiving.get(key, 0) >= 2 * 1024 * 1024
            assert key not in s3.objects("fleet")  # nothing visible before it is verified
            registry.stall.set()
            worker.join(30)
            assert done
            puller.flush_remote()
        finally:
            registry.stall.set()
            puller.close()
        assert s3.objects("fleet")[key] == big
        puts = [r for r in s3.requests if r["method"] == "PUT" and r["key"] == key]
        assert len(puts) == 1  # one PUT, not again after the commit

    def test_a_download_that_fails_leaves_nothing_in_the_bucket(self, registry, s3, tmp_path):
        big = layer_bytes(8, 3_000_000)
        image = registry.add_image("team/bad", "v1", [big])
        layer = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"corrupt_at": 2_900_000, "once": False}
                               if m == "GET" and p.endswith(layer) else None)
        with _host(tmp_path, "one", s3, remote={"part_bytes": 100 * 1024}) as puller, \
                pytest.raises(zr.DigestMismatchError):
            puller.pull_image(f"{registry.host}/team/bad:v1")
        assert _cache(s3).blob_key(layer) not in s3.objects("fleet")
        assert not s3.uploads
        assert not any("/zlayer/leases/" in k for k in s3.objects("fleet"))


class TestOfflineWithoutRemote:
    def test_offline_uses_the_local_records(self, registry, image, tmp_path):
        ref = f"{registry.host}/team/app:v1"
        cache = str(tmp_path / "c")
        assert run_cli("pull", ref, "--cache", cache, cwd=tmp_path).returncode == 0
        registry.close()
        again = run_cli("pull", ref, "--cache", cache, "--offline", "-q", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == image["digest"] and "may have moved it" in again.stderr
        other = run_cli("pull", f"{registry.host}/team/other:v1", "--cache", cache,
                        "--offline", cwd=tmp_path)
        assert other.returncode == 1 and "--offline" in other.stderr
        assert len(other.stderr.strip().splitlines()) == 1

    def test_s3_honours_the_proxy_rules(self, s3):
        cache = zr.S3BlobCache("fleet", endpoint="http://s3.example.test", environ={
            "HTTP_PROXY": "http://proxy.test:3128", "NO_PROXY": "other.test"},
            credentials=zr.S3Credentials("A", "B"))
        assert cache.client.transport.proxies.proxy_for("http", "s3.example.test", 80) == \
            "http://proxy.test:3128"


class TestCopyThroughTheRemoteCache:
    def test_copy_reads_a_registry_source_through_the_bucket(self, registry, image, s3,
                                                             tmp_path):
        ref = f"{registry.host}/team/app:v1"
        env = _aws_env(s3)
        assert run_cli("pull", ref, "--cache", str(tmp_path / "one"), "--remote-cache",
                       "s3://fleet/cache", env=env, cwd=tmp_path).returncode == 0
        before = len(_blob_gets(registry))
        copied = run_cli("copy", ref, f"oci:{tmp_path / 'layout'}:v1", "--cache",
                         str(tmp_path / "two"), "--remote-cache", "s3://fleet/cache", "-q",
                         env=env, cwd=tmp_path)
        assert copied.returncode == 0, copied.stderr
        assert copied.stdout.strip() == image["digest"]
        assert len(_blob_gets(registry)) == before
        assert (tmp_path / "layout" / "index.json").exists()


class TestOverTls:
    def test_multipart_over_https_with_aws_ca_bundle(self, s3, tmp_path, tls_files):
        from test_zlayer_registry import _TlsFront
        cert, key = tls_files
        front = _TlsFront(s3.server.server_address[1], cert, key)
        try:
            cache = zr.S3BlobCache("fleet", prefix="tls", endpoint=f"https://127.0.0.1:{front.port}",
                                   environ={"AWS_CA_BUNDLE": str(cert)},
                                   credentials=zr.S3Credentials(_fake_s3.ACCESS_KEY,
                                                                _fake_s3.SECRET_KEY),
                                   multipart_threshold_bytes=256 * 1024, part_bytes=100 * 1024)
            data = os.urandom(1_000_000)
            path = tmp_path / "blob"
            path.write_bytes(data)
            cache.put_path(str(path), _digest(data))  # ten parts, four threads, one file
            assert cache.get(_digest(data)) == data and not s3.uploads
            cache.close()
            with pytest.raises(zr.CacheError, match="AWS_CA_BUNDLE"):
                zr.S3BlobCache("fleet", endpoint="https://127.0.0.1:1",
                               environ={"AWS_CA_BUNDLE": str(tmp_path / "missing.pem")},
                               credentials=zr.S3Credentials("A", "B"))
        finally:
            front.close()
