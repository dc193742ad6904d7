"""Hermetic tests for zlayer_registry: no network beyond 127.0.0.1, no peers.

The blocks follow the module's sections.  Registries are `_fake_registry`
servers on 127.0.0.1:0; collaborators (cache, sleep, clock, environ,
credential-helper runner) are passed in rather than patched.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _testsupport import (CLI, HERE, SHA_A, SHA_B, Sleeps, cli_env, dead_pid, layer_bytes,
                          make_puller, run_cli, run_python, start_cli, zr)

import _fake_registry as fake  # noqa: E402

ACCEPT = {"Accept": zr._MANIFEST_ACCEPT}


# -----------------------------------------------------------------------------
# fixtures
# -----------------------------------------------------------------------------

@pytest.fixture
def object_store():
    server = fake.ObjectStore()
    yield server
    server.close()


@pytest.fixture
def sleeps():
    return Sleeps()


# -----------------------------------------------------------------------------
# meta: the module's shape
# -----------------------------------------------------------------------------

def _top_level_names(tree):
    """Yield (name, node) for every name a module's top level defines."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name, node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    yield target.id, node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node


class TestModuleShape:
    def test_all_lists_exactly_the_public_names(self):
        tree = ast.parse((HERE / "zlayer_registry.py").read_text())
        public = {name for name, _ in _top_level_names(tree) if not name.startswith("_")}
        assert public == set(zr.__all__)

    def test_public_names_have_docstrings(self):
        for name in zr.__all__:
            obj = getattr(zr, name)
            if callable(obj) and not isinstance(obj, (str, int, float)):
                assert obj.__doc__ and obj.__doc__.strip()[0].isupper(), name

    def test_imports_only_the_standard_library(self):
        tree = ast.parse((HERE / "zlayer_registry.py").read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
        stdlib = getattr(sys, "stdlib_module_names", None)  # Python 3.10+
        if stdlib is None:
            import sysconfig
            roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}

            def in_stdlib(name):
                spec = importlib.util.find_spec(name)
                origin = (spec.origin or "") if spec else ""
                return name in sys.builtin_module_names or origin in ("built-in", "frozen") or (
                    any(origin.startswith(root) for root in roots)
                    and "site-packages" not in origin)
            stdlib = {name for name in modules if in_stdlib(name)}
        assert modules - set(stdlib) - {"__future__"} == set()

    def test_import_has_no_side_effects(self):
        code = ("import threading; before = set(sys.modules); n = threading.active_count();"
                "import zlayer_registry;"
                "heavy = {'sqlite3', 'ssl', 'http.client', 'concurrent.futures', 'tarfile',"
                " 'subprocess'} & (set(sys.modules) - before);"
                "assert threading.active_count() == n; print(sorted(heavy))")
        out = run_python(code, env={"PATH": os.environ.get("PATH", "")})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"

    def test_a_pull_imports_only_what_it_needs(self, registry, tmp_path):
        """Cold CLI runs pay for every import: the pull path leaves these out, and sqlite3
        waits until downloads run.  The reference is still in the index afterwards."""
        image = registry.add_image("app", "v1", [layer_bytes(1), layer_bytes(2)])
        # Site hooks may have imported some already: only what the pull adds counts.
        code = ("before = set(sys.modules);"
                f"import zlayer_registry as zr; c = zr.BlobCache.open({str(tmp_path / 'c')!r});"
                "print('sqlite3' in set(sys.modules) - before);"
                f"zr.ImagePuller(c, environ={{}}).pull('{registry.host}/app:v1');"
                "print(sorted({'concurrent.futures', 'tempfile', 'platform', 'tarfile'}"
                " & (set(sys.modules) - before)))")
        out = run_python(code, env={"PATH": os.environ.get("PATH", "")})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == ["False", "[]"]
        assert zr.BlobCache.open(tmp_path / "c").references() == {
            f"{registry.host}/app:v1": image["digest"]}

    def test_import_works_without_sqlite3_and_ssl(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        code = ("sys.modules['sqlite3'] = None; sys.modules['ssl'] = None;"
                f"import zlayer_registry as zr; c = zr.BlobCache.open({str(tmp_path)!r});"
                f"m, layers = zr.ImagePuller(c, environ={{}}).pull('{registry.host}/app:v1');"
                "print(m.digest, c.verify(), len(c.entries()))\n"
                "try:\n    zr.ImagePuller(c, environ={}).pull('example.com/app:v1')\n"
                "except zr.ZLayerError as e:\n    print(e)")
        out = run_python(code)
        assert out.returncode == 0, out.stderr
        first, second = out.stdout.strip().splitlines()
        assert first == f"{image['digest']} [] 3"
        assert "'ssl' module" in second
        assert not (tmp_path / "index.sqlite").exists()

    def test_each_section_uses_only_the_sections_above_it(self):
        """No top-level name (annotations included) uses a name defined in a later
        section; the CLI sections, last, may use everything."""
        text = (HERE / "zlayer_registry.py").read_text()
        lines = text.split("\n")
        banners = [(number, int(m.group(1)), m.group(2)) for number, m in
                   ((i + 1, re.match(r"^# (\d+)\. (.*)$", line)) for i, line in enumerate(lines))
                   if m and number > 1 and lines[number - 2].startswith("# =====")]
        assert len(banners) >= 25

        def section(lineno):
            return max((b for b in banners if b[0] <= lineno), default=(0, 0, "header"))

        tree = ast.parse(text)
        defined = {}
        for name, node in _top_level_names(tree):
            defined.setdefault(name, section(node.lineno))
        upward = []
        for node in tree.body:
            where = section(node.lineno)
            if where[2].startswith("CLI"):
                continue
            used = list(ast.walk(node))
            for sub in list(used):
                annotations = []
                if isinstance(sub, ast.FunctionDef):
                    annotations = [a.annotation for a in sub.args.args + sub.args.kwonlyargs]
                    annotations.append(sub.returns)
                elif isinstance(sub, ast.AnnAssign):
                    annotations = [sub.annotation]
                for annotation in annotations:
                    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                        used.extend(ast.walk(ast.parse(annotation.value, mode="eval")))
            for sub in used:
                if isinstance(sub, ast.Name) and sub.id in defined \
                        and defined[sub.id][1] > where[1]:
                    upward.append(f"{getattr(node, 'name', '?')} (section {where[1]}) uses "
                                  f"{sub.id} (section {defined[sub.id][1]})")
        assert upward == []

    def test_section_banners_are_numbered_in_order(self):
        text = (HERE / "zlayer_registry.py").read_text()
        import re
        numbers = [int(n) for n in re.findall(r"^# (\d+)\. ", text, re.M)]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10
        for number in numbers:
            assert f"    {number}. " in zr.__doc__


# -----------------------------------------------------------------------------
# DIGESTS AND DESCRIPTORS
# -----------------------------------------------------------------------------

class TestValues:
    """Descriptor, Reference, Platform, Manifest... are immutable values (``_value``)."""

    def test_values_compare_hash_copy_and_refuse_assignment(self):
        import copy
        import pickle
        ref = zr.Reference("ghcr.io", "org/app", "v1")
        same = zr.Reference(registry="ghcr.io", repository="org/app", tag="v1")
        assert ref == same and hash(ref) == hash(same) and ref != ref.replace(tag="v2")
        assert ref.replace(tag="v2").tag == "v2" and ref.tag == "v1" and ref.digest is None
        assert repr(ref) == ("Reference(registry='ghcr.io', repository='org/app', tag='v1', "
                             "digest=None)")
        with pytest.raises(AttributeError, match="immutable"):
            ref.tag = "v3"
        assert pickle.loads(pickle.dumps(ref)) == ref and copy.copy(ref) == ref
        with pytest.raises(TypeError):
            zr.Reference("ghcr.io")  # repository is required
        with pytest.raises(TypeError):
            zr.Reference("ghcr.io", "a", colour="red")
        manifest = zr.parse_manifest(json.dumps({
            "schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": zr.MEDIA_TYPE_OCI_CONFIG, "digest": SHA_A, "size": 2},
            "layers": []}).encode())
        assert "raw=" not in repr(manifest) and "data=" not in repr(manifest)
        assert zr.Descriptor("x", SHA_A, 1).annotations == {}  # a fresh dict each
        assert zr.Descriptor("x", SHA_A, 1).annotations is not zr.Descriptor("x", SHA_A, 1).annotations


class TestErrors:
    def test_a_digest_mismatch_names_the_digest_once(self):
        error = zr.DigestMismatchError(f"cached layer {SHA_A} is corrupt", SHA_A, SHA_B)
        assert str(error) == f"cached layer {SHA_A} is corrupt: got {SHA_B}"
        assert str(zr.DigestMismatchError("blob digest mismatch", SHA_A, SHA_B)) == \
            f"blob digest mismatch: expected {SHA_A}, got {SHA_B}"
        assert error.expected == SHA_A and error.actual == SHA_B


class TestDigests:
    def test_compute_and_validate(self):
        assert zr.compute_digest(b"") == \
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        assert zr.compute_digest(b"x", "sha512").startswith("sha512:")
        assert len(zr.compute_digest(b"x", "sha512")) == 7 + 128

    @pytest.mark.parametrize("digest", ["md5:" + "a" * 32, "sha256:" + "A" * 64,
                                        "sha256:abc", "sha256" + "a" * 64, 5])
    def test_bad_digests_in_descriptors_are_refused(self, digest):
        with pytest.raises(zr.ManifestError):
            zr.Descriptor.from_json({"mediaType": "x", "digest": digest, "size": 1})

    @pytest.mark.parametrize("size", [-1, True, "10", 1 << 41, None])
    def test_bad_sizes_are_refused(self, size):
        with pytest.raises(zr.ManifestError, match="size|limit"):
            zr.Descriptor.from_json({"mediaType": "x", "digest": SHA_A, "size": size})

    def test_descriptor_round_trip(self):
        data = {"mediaType": "m", "digest": SHA_A, "size": 3,
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
                "annotations": {"k": "v"}}
        desc = zr.Descriptor.from_json(data)
        assert desc.platform == zr.Platform("linux", "arm", "v7")
        assert desc.to_json() == data


# -----------------------------------------------------------------------------
# REFERENCES
# -----------------------------------------------------------------------------

class TestReferences:
    @pytest.mark.parametrize("text, expected", [
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
        ("user/app", "docker.io/user/app:latest"),
        ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("ghcr.io/org/team/app:v1.2_3", "ghcr.io/org/team/app:v1.2_3"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b@" + SHA_A, "localhost:5000/a/b@" + SHA_A),
        ("127.0.0.1:5000/a:t@" + SHA_A, "127.0.0.1:5000/a:t@" + SHA_A),
        ("[::1]:5000/a", "[::1]:5000/a:latest"),
        ("Registry/app", "Registry/app:latest"),
        ("a-b__c/e--f.g", "docker.io/a-b__c/e--f.g:latest"),
        ("a.b/c", "a.b/c:latest"),
    ])
    def test_normalises(self, text, expected):
        assert str(zr.parse_reference(text)) == expected

    def test_fields_and_identifier(self):
        ref = zr.parse_reference("quay.io/org/app:v1@" + SHA_B)
        assert (ref.registry, ref.repository, ref.tag, ref.digest) == \
            ("quay.io", "org/app", "v1", SHA_B)
        assert ref.identifier == SHA_B  # name:tag@digest pulls by digest
        assert zr.parse_reference("alpine").api_host == "registry-1.docker.io"
        assert zr.parse_reference("ghcr.io/a/b").api_host == "ghcr.io"

    @pytest.mark.parametrize("text, reason", [
        ("", "empty"),
        ("Ubuntu", "lowercase"),
        ("docker.io/Library/x", "lowercase"),
        ("app:-bad", "invalid tag"),
        ("app:" + "t" * 129, "invalid tag"),
        ("app@sha256:1234", "64 lowercase hex"),
        ("app@md5:" + "a" * 32, "unsupported algorithm"),
        ("https://ghcr.io/a/b", "scheme"),
        ("a b", "whitespace"),
        ("ghcr.io/", "missing repository"),
        ("a//b", "invalid path component"),
        ("-host.io/app", "invalid registry host"),
        ("x/" + "a" * 260, "longer than 255"),
    ])
    def test_rejects_with_reason(self, text, reason):
        with pytest.raises(zr.InvalidReferenceError, match=reason):
            zr.parse_reference(text)


# -----------------------------------------------------------------------------
# MANIFESTS AND PLATFORMS
# -----------------------------------------------------------------------------

def _index(*platforms):
    return zr.parse_manifest(json.dumps({
        "schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_INDEX,
        "manifests": [{"mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
                       "digest": "sha256:%064x" % i, "size": 10, "platform": p}
                      for i, p in enumerate(platforms)]}).encode())


class TestManifests:
    def test_media_type_from_field_header_or_shape(self):
        body = {"schemaVersion": 2, "config": {"mediaType": "c", "digest": SHA_A, "size": 1},
                "layers": []}
        raw = json.dumps(body).encode()
        assert zr.parse_manifest(raw).media_type == zr.MEDIA_TYPE_OCI_MANIFEST
        assert zr.parse_manifest(raw, zr.MEDIA_TYPE_DOCKER_MANIFEST).media_type == \
            zr.MEDIA_TYPE_DOCKER_MANIFEST
        raw = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
        assert zr.parse_manifest(raw).is_index

    @pytest.mark.parametrize("raw, message", [
        (b"not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
        (b'{"mediaType": "text/html"}', "unsupported mediaType"),
        (b'{"schemaVersion": 2}', "neither"),
        (json.dumps({"mediaType": zr.MEDIA_TYPE_OCI_MANIFEST, "layers": []}).encode(),
         "no 'config'"),
        (json.dumps({"mediaType": zr.MEDIA_TYPE_OCI_INDEX, "manifests": [
            {"mediaType": "x", "digest": "sha1:" + "a" * 40, "size": 1}]}).encode(),
         "unsupported algorithm"),
    ])
    def test_rejects_bad_manifests(self, raw, message):
        with pytest.raises(zr.ManifestError, match=message):
            zr.parse_manifest(raw)

    def test_size_cap_and_digest_check(self):
        with pytest.raises(zr.ManifestError, match="limit"):
            zr.parse_manifest(b" " * (zr.MAX_MANIFEST_SIZE_BYTES + 1))
        with pytest.raises(zr.DigestMismatchError):
            zr.parse_manifest(b'{"manifests": []}', digest=SHA_A)

    @pytest.mark.parametrize("text, expected", [
        ("linux/aarch64", zr.Platform("linux", "arm64")),
        ("linux/arm64/v8", zr.Platform("linux", "arm64")),
        ("linux/x86_64", zr.Platform("linux", "amd64")),
        ("linux/arm", zr.Platform("linux", "arm", "v7")),
        ("Linux/ARM/V6", zr.Platform("linux", "arm", "v6")),
    ])
    def test_parse_platform_normalises(self, text, expected):
        assert zr.parse_platform(text) == expected

    def test_parse_platform_rejects(self):
        with pytest.raises(zr.InvalidPlatformError, match="OS/ARCH"):
            zr.parse_platform("linux")
        with pytest.raises(ValueError):  # as a bad argument is, in Python
            zr.ImagePuller(platform="linux/")

    def test_select_exact_and_ladder(self):
        index = _index({"os": "linux", "architecture": "amd64"},
                       {"os": "linux", "architecture": "arm64", "variant": "v8"},
                       {"os": "linux", "architecture": "arm", "variant": "v6"},
                       {"os": "linux", "architecture": "arm", "variant": "v7"})
        digests = [d.digest for d in index.manifests]
        pick = lambda p: zr.select_platform(index, zr.parse_platform(p)).digest  # noqa: E731
        assert pick("linux/amd64") == digests[0]
        assert pick("linux/arm64") == digests[1]          # v8 or no variant: same
        assert pick("linux/aarch64") == digests[1]
        assert pick("linux/arm/v8") == digests[3]         # v8 -> v7 before v6
        assert pick("linux/arm/v7") == digests[3]
        assert pick("linux/arm/v6") == digests[2]

    def test_no_match_lists_what_is_offered(self):
        index = _index({"os": "linux", "architecture": "amd64"},
                       {"os": "linux", "architecture": "arm", "variant": "v7"},
                       {"os": "unknown", "architecture": "unknown"})
        with pytest.raises(zr.PlatformNotFoundError) as info:
            zr.select_platform(index, zr.parse_platform("linux/arm/v5"))
        assert "offers: linux/amd64, linux/arm/v7" in str(info.value)
        assert "unknown" not in str(info.value)

    def test_host_platform_is_normalised(self):
        host = zr.host_platform()
        assert host.os == "linux" and host.architecture in (
            "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")

    def test_deeply_nested_json_is_a_clean_error(self):
        with pytest.raises(zr.ManifestError, match="not valid JSON"):
            zr.parse_manifest(b"[" * 50000)
        assert zr._error_details(b"[" * 50000) == ([], "")


# -----------------------------------------------------------------------------
# CREDENTIALS and TOKEN AUTH
# -----------------------------------------------------------------------------

def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class TestCredentials:
    def test_repr_never_shows_secrets(self):
        for auth in (zr.RegistryAuth.basic("u", "hunter2"), zr.RegistryAuth.bearer("hunter2"),
                     zr.RegistryAuth.identity("hunter2")):
            assert "hunter2" not in repr(auth) and "hunter2" not in str(auth)

    def test_auths_entry_forms(self, tmp_path):
        _write_json(tmp_path / "config.json", {"auths": {
            "https://ghcr.io": {"auth": _b64("alice:pw1")},
            "quay.io": {"username": "bob", "password": "pw2"},
            "example.com/v1/": {"identitytoken": "refresh-me"}}})
        env = {"DOCKER_CONFIG": str(tmp_path)}
        ghcr = zr.RegistryAuth.from_docker_config("ghcr.io", environ=env)
        assert (ghcr.kind, ghcr.username, ghcr.password) == ("basic", "alice", "pw1")
        quay = zr.RegistryAuth.from_docker_config("quay.io", environ=env)
        assert (quay.username, quay.password) == ("bob", "pw2")
        example = zr.RegistryAuth.from_docker_config("example.com", environ=env)
        assert example.identity_token == "refresh-me"
        assert zr.RegistryAuth.from_docker_config("other.io", environ=env).kind == "anonymous"

    def test_docker_hub_legacy_key_and_home_default(self, tmp_path):
        _write_json(tmp_path / ".docker" / "config.json", {"auths": {
            "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpw")}}})
        auth = zr.RegistryAuth.from_docker_config("docker.io", environ={"HOME": str(tmp_path)})
        assert (auth.username, auth.password) == ("hubuser", "hubpw")

    def test_cred_helpers_and_store(self, tmp_path):
        _write_json(tmp_path / "config.json", {
            "credHelpers": {"123.dkr.ecr.us-east-1.amazonaws.com": "ecr-login"},
            "credsStore": "desktop"})
        calls = []

        def runner(name, server):
            calls.append((name, server))
            if name == "ecr-login":
                return {"Username": "AWS", "Secret": "ecr-token"}
            return {"Username": "<token>", "Secret": "identity"}

        env = {"DOCKER_CONFIG": str(tmp_path)}
        ecr = zr.RegistryAuth.from_docker_config("123.dkr.ecr.us-east-1.amazonaws.com",
                                                 environ=env, run_helper=runner)
        assert (ecr.username, ecr.password) == ("AWS", "ecr-token")
        hub = zr.RegistryAuth.from_docker_config("docker.io", environ=env, run_helper=runner)
        assert hub.identity_token == "identity"
        assert calls[-1] == ("desktop", "https://index.docker.io/v1/")

    def test_failing_or_missing_helper_means_anonymous_with_warning(self, tmp_path, capsys):
        _write_json(tmp_path / "config.json", {"credHelpers": {"a.io": "nosuch"},
                                               "credsStore": "broken"})
        env = {"DOCKER_CONFIG": str(tmp_path), "PATH": str(tmp_path)}

        def broken(name, server):
            raise OSError("exit 1: credentials not found")

        assert zr.RegistryAuth.from_docker_config("a.io", environ=env).kind == "anonymous"
        assert "not installed" in capsys.readouterr().err
        assert zr.RegistryAuth.from_docker_config("b.io", environ=env,
                                                  run_helper=broken).kind == "anonymous"
        assert "failed" in capsys.readouterr().err

    def test_real_helper_process(self, tmp_path):
        helper = tmp_path / "docker-credential-fake"
        helper.write_text("#!/bin/sh\nread server\n"
                          "echo '{\"ServerURL\":\"'$server'\",\"Username\":\"u\",\"Secret\":\"s\"}'\n")
        helper.chmod(0o755)
        _write_json(tmp_path / "config.json", {"credsStore": "fake"})
        old_path = os.environ["PATH"]
        os.environ["PATH"] = f"{tmp_path}:{old_path}"
        try:
            auth = zr.RegistryAuth.from_docker_config(
                "r.io", environ={"DOCKER_CONFIG": str(tmp_path)})
        finally:
            os.environ["PATH"] = old_path
        assert (auth.username, auth.password) == ("u", "s")

    def test_podman_auth_files(self, tmp_path):
        _write_json(tmp_path / "run" / "containers" / "auth.json",
                    {"auths": {"r.io": {"auth": _b64("p:q")}}})
        auth = zr.RegistryAuth.from_docker_config(
            "r.io", environ={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")})
        assert auth.password == "q"
        _write_json(tmp_path / "other.json", {"auths": {"r.io": {"auth": _b64("x:y")}}})
        auth = zr.RegistryAuth.from_docker_config(
            "r.io", environ={"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "other.json"),
                             "XDG_RUNTIME_DIR": str(tmp_path / "run")})
        assert auth.password == "y"

    def test_auth_file_replaces_every_default_file(self, tmp_path):
        _write_json(tmp_path / "dc" / "config.json", {"auths": {"r.io": {"auth": _b64("d:1")}}})
        _write_json(tmp_path / "podman.json", {"auths": {"s.io": {"auth": _b64("p:2")}}})
        _write_json(tmp_path / "mine.json", {"auths": {"https://r.io": {"auth": _b64("m:3")}}})
        env = {"DOCKER_CONFIG": str(tmp_path / "dc"),
               "REGISTRY_AUTH_FILE": str(tmp_path / "podman.json")}
        mine = str(tmp_path / "mine.json")
        auth = zr.RegistryAuth.from_docker_config("r.io", environ=env, auth_file=mine)
        assert (auth.username, auth.password, auth.source) == ("m", "3", mine)
        assert zr.RegistryAuth.from_docker_config("s.io", environ=env,
                                                  auth_file=mine).kind == "anonymous"

    @pytest.mark.parametrize("content, text", [
        (None, "no such file"), ('{"auths": {\n  "r.io": {"auth": "c2VjcmV0"},', "not JSON "
                                 "\\(line 2, column"), ("[1]", "not hold a JSON object")])
    def test_a_named_auth_file_must_be_readable(self, tmp_path, content, text):
        path = tmp_path / "auth.json"
        if content is not None:
            path.write_text(content)
        with pytest.raises(zr.AuthError, match=text) as info:
            zr.RegistryAuth.from_docker_config("r.io", environ={}, auth_file=str(path))
        assert "c2VjcmV0" not in str(info.value)  # never the file's text

    def test_broken_config_file_warns(self, tmp_path, capsys):
        (tmp_path / "config.json").write_text("{not json")
        auth = zr.RegistryAuth.from_docker_config("r.io", environ={"DOCKER_CONFIG": str(tmp_path)})
        assert auth.kind == "anonymous"
        assert "ignoring credentials file" in capsys.readouterr().err

    @pytest.mark.parametrize("header, expected", [
        ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/alpine:pull"',
         [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/alpine:pull"})]),
        ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
        ('Bearer realm="a\\"b", error="invalid_token", Basic realm=x',
         [("bearer", {"realm": 'a"b', "error": "invalid_token"}), ("basic", {"realm": "x"})]),
    ])
    def test_www_authenticate(self, header, expected):
        parsed = zr._parse_www_authenticate(header)
        assert [(c.scheme, dict(c.params)) for c in parsed] == expected

    def test_token_cache_expiry(self):
        now = [1000.0]
        cache = zr._TokenCache(clock=lambda: now[0])
        cache.put("r", "s", "t", 300)
        assert cache.get("r", "s") == "t"
        now[0] += 269
        assert cache.get("r", "s") == "t"
        now[0] += 2  # within 30 s of expiry: refreshed early
        assert cache.get("r", "s") is None


# -----------------------------------------------------------------------------
# HTTP/1.1, TRANSPORT and RETRIES: our own client, against scripted servers, TLS and a
# CONNECT proxy
# -----------------------------------------------------------------------------

import socket as _socket  # noqa: E402
import ssl as _ssl  # noqa: E402
import threading as _threading  # noqa: E402


def _pipe(a, b) -> None:
    """Copy bytes both ways between two sockets until either side closes."""
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    pass
    for args in ((a, b), (b, a)):
        _threading.Thread(target=pump, args=args, daemon=True).start()


class _Listener:
    """A TCP listener on 127.0.0.1:0 handing each connection to ``handle`` in a thread."""

    def __init__(self, handle) -> None:
        self.sock = _socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._handle = handle
        _threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            _threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_head(reader):
    """Read a request head: (request line, {lowercase name: value}), or None at EOF."""
    line = reader.readline()
    if not line:
        return None
    headers = {}
    while True:
        header = reader.readline()
        if header in (b"\r\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return line.decode("latin-1").rstrip("\r\n"), headers


class _Scripted(_Listener):
    """Answers request N with ``replies[N]`` (bytes; a (bytes, True) pair closes after it;
    None closes without answering).  Request bodies (Content-Length) are read and kept."""

    def __init__(self, replies) -> None:
        self.replies = list(replies)
        self.requests = []
        self.bodies = []
        self.hung_up = _threading.Semaphore(0)  # released as each connection is closed
        super().__init__(self._serve)

    def _serve(self, conn) -> None:
        try:
            self._answer(conn)
        finally:
            self.hung_up.release()

    def _answer(self, conn) -> None:
        reader = conn.makefile("rb")
        with conn:
            while self.replies:
                head = _read_head(reader)
                if head is None:
                    return
                self.requests.append(head)
                self.bodies.append(reader.read(int(head[1].get("content-length") or 0)))
                reply = self.replies.pop(0)
                if reply is None:
                    return
                data, close = reply if isinstance(reply, tuple) else (reply, False)
                conn.sendall(data)
                if close:
                    return

    def url(self, path: str = "/x") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _TlsFront(_Listener):
    """Terminates TLS and pipes the plain bytes to a test server on ``port``.

    Plain HTTP gets Go's answer (distribution's): 400, "Client sent an HTTP
    request to an HTTPS server."; ``plain_http_answers`` counts them.
    """

    def __init__(self, port: int, cert, key) -> None:
        self.context = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.target = port
        self.plain_http_answers = 0
        super().__init__(self._serve)

    def _serve(self, conn) -> None:
        first = conn.recv(1, _socket.MSG_PEEK)
        if first and first != b"\x16":  # not a TLS handshake record
            self.plain_http_answers += 1
            _read_head(conn.makefile("rb", buffering=0))  # unread bytes would reset the answer
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n"
                         b"Client sent an HTTP request to an HTTPS server.\n")
            conn.close()
            return
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        _pipe(tls, _socket.create_connection(("127.0.0.1", self.target)))


class _FirstBytes(_Listener):
    """Pipes to a test server on ``port``, noting each connection's first byte."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.first_bytes = []
        super().__init__(self._serve)

    def _serve(self, conn) -> None:
        self.first_bytes.append(conn.recv(1, _socket.MSG_PEEK))
        _pipe(conn, _socket.create_connection(("127.0.0.1", self.target)))


class _ConnectProxy(_Listener):
    """An HTTP proxy that only tunnels (CONNECT), recording each request head."""

    def __init__(self, hosts) -> None:
        self.hosts = hosts
        self.requests = []
        super().__init__(self._serve)

    def _serve(self, conn) -> None:
        head = _read_head(conn.makefile("rb", buffering=0))
        if head is None:
            conn.close()
            return
        self.requests.append(head)
        host, _, port = head[0].split()[1].rpartition(":")
        upstream = _socket.create_connection((self.hosts.get(host, host), int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _pipe(conn, upstream)


class TestHttp:
    def _body(self, response, size=65536) -> bytes:
        out, view = bytearray(), memoryview(bytearray(size))
        while True:
            count = response.readinto1(view)
            if not count:
                return bytes(out)
            out += view[:count]

    def test_chunked_body_with_extensions_and_trailers_then_reuse(self):
        server = _Scripted([
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
        transport = zr._Transport()
        with transport.send("GET", server.url(), {}) as response:
            assert self._body(response, size=3) == b"hello world"
        with transport.send("GET", server.url(), {}) as response:
            assert response.read() == b"ok"
        assert server.connections == 1
        server.close()

    def test_interim_answer_folded_header_and_repeated_headers(self):
        server = _Scripted([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized\r\n"
                            b"WWW-Authenticate: Basic realm=a\r\nWWW-Authenticate: Bearer\r\n"
                            b"X-Long: first\r\n  second\r\nContent-Length: 3\r\n\r\nabc"])
        with zr._Transport().send("GET", server.url(), {}) as response:
            assert response.status == 401
            assert response.header("x-long") == "first second"
            assert response.headers.get_all("www-authenticate") == ["Basic realm=a", "Bearer"]
            assert response.read() == b"abc"
        server.close()

    def test_body_until_close_and_connection_close_are_not_reused(self):
        server = _Scripted([(b"HTTP/1.1 200 OK\r\n\r\nto the end", True),
                            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                             True),
                            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\ny"])
        transport = zr._Transport()
        bodies = []
        for _ in range(3):
            with transport.send("GET", server.url(), {}) as response:
                bodies.append(response.read())
        assert bodies == [b"to the end", b"x", b"y"] and server.connections == 3
        server.close()

    def test_head_answer_has_no_body_and_the_connection_is_reused(self):
        server = _Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n"
                            b"Docker-Content-Digest: sha256:abc\r\n\r\n",
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"])
        transport = zr._Transport()
        with transport.send("HEAD", server.url(), {}) as response:
            assert response.header("Docker-Content-Digest") == "sha256:abc"
        with transport.send("GET", server.url(), {}) as response:
            assert response.read() == b"hi"
        assert server.connections == 1 and [r[0].split()[0] for r in server.requests] == [
            "HEAD", "GET"]
        server.close()

    def test_a_stale_keep_alive_connection_is_replaced_once(self):
        server = _Scripted([(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", True),
                            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])
        transport = zr._Transport()
        with transport.send("GET", server.url(), {}) as response:
            assert response.read() == b"a"
        with transport.send("GET", server.url(), {}) as response:
            assert response.read() == b"b"
        assert server.connections == 2
        server.close()

    @pytest.mark.parametrize("reply", [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        # Numbers str.isdigit() takes but int() does not, or past int()'s digit limit:
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
        b"HTTP/1.1 \xb200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\n\r\n",
    ], ids=["status", "code", "header", "two-lengths", "negative-length", "101-headers",
            "long-line", "superscript-length", "superscript-status", "5000-digit-length",
            "11-interim"])
    def test_malformed_answers_are_connection_errors(self, reply):
        server = _Scripted([(reply, True)])
        with pytest.raises(zr._HttpError):
            zr._Transport().send("GET", server.url(), {})
        server.close()

    def test_broken_chunk_framing_is_an_error_while_streaming(self):
        server = _Scripted([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\nhello\r\n0\r\n\r\n", True)])
        with zr._Transport().send("GET", server.url(), {}) as response:
            with pytest.raises(zr._HttpError, match="chunk size"):
                response.readinto1(memoryview(bytearray(10)))
        server.close()

    def test_header_and_target_injection_are_refused_before_sending(self):
        server = _Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
        transport = zr._Transport()
        with pytest.raises(zr.RegistryError, match="'X-Token' header holds a line break") as info:
            transport.send("GET", server.url(), {"X-Token": "s3cret\r\nEvil: 1"})
        assert "s3cret" not in str(info.value)
        with pytest.raises(zr.RegistryError, match="outside Latin-1") as info:
            transport.send("GET", server.url(), {"Authorization": "Bearer t\u20ac"})
        assert "\u20ac" not in str(info.value)
        with pytest.raises(zr.RegistryError, match="control characters or spaces") as info:
            transport.send("GET", server.url("/v2/a b?X-Amz-Signature=TOPSECRET"), {})
        assert "TOPSECRET" not in str(info.value)
        assert server.requests == []
        server.close()

    def test_tls_keep_alive_and_a_streamed_blob(self, registry, tls_files):
        data = layer_bytes(5, 300_000)
        digest = registry.add_image("app", "v1", [data])["layers"][0]["digest"]
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        transport = zr._Transport(ssl_context=_ssl.create_default_context(cafile=str(tls_files[0])))
        base = f"https://127.0.0.1:{front.port}/v2/app/blobs/{digest}"
        with transport.send("GET", base, {}) as response:
            assert response.status == 200 and self._body(response) == data
        with transport.send("HEAD", base, {}) as response:
            assert response.header("Content-Length") == str(len(data))
        assert front.connections == 1
        front.close()

    def test_pull_over_tls_through_a_connect_tunnel(self, registry, tls_files):
        image = registry.add_image("app", "v1", [layer_bytes(6), layer_bytes(7)])
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        proxy = _ConnectProxy({"registry.test": "127.0.0.1"})
        environ = {"HTTPS_PROXY": f"http://user:pw@127.0.0.1:{proxy.port}"}
        context = _ssl.create_default_context(cafile=str(tls_files[0]))
        manifest, layers = make_puller(environ=environ, ssl_context=context).pull(
            f"registry.test:{front.port}/app:v1")
        assert manifest.digest == image["digest"] and len(layers) == 2
        assert proxy.requests and {line for line, _ in proxy.requests} == {
            f"CONNECT registry.test:{front.port} HTTP/1.1"}
        assert {h.get("proxy-authorization") for _, h in proxy.requests} == {
            "Basic " + _b64("user:pw")}
        # The registry saw the requests through the tunnel, Host naming it, not the proxy.
        assert registry.requests and all(
            r["headers"].get("Host") == f"registry.test:{front.port}" for r in registry.requests)
        front.close()
        proxy.close()

    def test_untrusted_certificate_is_one_clear_error(self, registry, tls_files, sleeps):
        registry.add_image("app", "v1", [layer_bytes(8)])
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        proxy = _ConnectProxy({"registry.test": "127.0.0.1"})
        puller = make_puller(environ={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"},
                             sleeps=sleeps, retries=1)
        with pytest.raises(zr.RegistryError, match="registry.test:[0-9]+ presented a TLS "
                           "certificate that is not trusted") as info:
            puller.pull(f"registry.test:{front.port}/app:v1")
        message = str(info.value)
        assert "SSL_CERT_FILE" in message and "--insecure" in message
        assert registry.requests == []
        assert f"through the proxy http://127.0.0.1:{proxy.port} from HTTPS_PROXY" in message
        assert sleeps == [] and not info.value.temporary  # a certificate is not retried
        front.close()
        proxy.close()

    def test_insecure_skips_the_certificate_check_of_the_registry(self, registry, tls_files,
                                                                   sleeps):
        image = registry.add_image("app", "v1", [layer_bytes(9), layer_bytes(10)])
        registry.auth = "basic"
        registry.users = {"user": "pw-1234"}
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        proxy = _ConnectProxy({"registry.test": "127.0.0.1"})
        puller = make_puller(environ={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"},
                             sleeps=sleeps, insecure=True)
        manifest, layers = puller.pull(f"registry.test:{front.port}/app:v1",
                                       zr.RegistryAuth.basic("user", "pw-1234"))
        assert manifest.digest == image["digest"] and len(layers) == 2
        # Every request went over TLS: through the tunnel, to the TLS front.
        assert registry.requests and front.connections >= 1
        assert {line for line, _ in proxy.requests} == {
            f"CONNECT registry.test:{front.port} HTTP/1.1"}
        assert any(r["headers"].get("Authorization") for r in registry.requests)
        front.close()
        proxy.close()

    def test_insecure_falls_back_to_plain_http_once(self, registry, sleeps):
        image = registry.add_image("app", "v1", [layer_bytes(11), layer_bytes(12)])
        tunnel = _ConnectProxy({"registry.test": "127.0.0.1"})  # TLS meets plain HTTP
        forward = fake.ForwardProxy()
        forward.hosts["registry.test"] = "127.0.0.1"
        port = registry.host.split(":")[1]
        try:
            puller = make_puller(sleeps=sleeps, insecure=True, environ={
                "HTTPS_PROXY": f"http://127.0.0.1:{tunnel.port}", "HTTP_PROXY": forward.url})
            manifest, _ = puller.pull(f"registry.test:{port}/app:v1")
            assert manifest.digest == image["digest"]
            # https was tried once; the manifest and both layers and the config
            # then went over plain http, with no retry and no backoff.
            assert len(tunnel.requests) == 1 and sleeps == []
            assert len(forward.requests) == 4 and all(
                r.startswith(f"http://registry.test:{port}/v2/") for r in forward.requests)
        finally:
            forward.close()
            tunnel.close()

    def test_loopback_registry_that_only_speaks_tls(self, registry, tls_files, sleeps):
        # Loopback starts with plain http; a TLS-only server's 400 turns it to
        # https, with the certificate checked.
        image = registry.add_image("app", "v1", [layer_bytes(15), layer_bytes(16)])
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        reference = f"127.0.0.1:{front.port}/app:v1"
        trusted = _ssl.create_default_context(cafile=str(tls_files[0]))
        manifest, _ = make_puller(sleeps=sleeps, ssl_context=trusted).pull(reference)
        assert manifest.digest == image["digest"] and sleeps == []
        assert front.plain_http_answers == 1  # the scheme, once settled, stays https
        with pytest.raises(zr.RegistryError, match="presented a TLS certificate that is not "
                           "trusted .*SSL_CERT_FILE.* --insecure"):
            make_puller(sleeps=sleeps).pull(reference)
        front.close()

    def test_loopback_plain_http_400_stays_the_error(self, sleeps):
        body = b'{"errors": [{"code": "NAME_INVALID", "message": "bad name"}]}'
        server = _Scripted([b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body)])
        with pytest.raises(zr.RegistryError, match="answered 400 to GET http://.*: "
                           "NAME_INVALID \\(bad name\\)"):
            make_puller(sleeps=sleeps).pull(f"127.0.0.1:{server.port}/app:v1")
        # An ordinary 400 is the answer: no TLS attempt follows it.
        assert server.connections == 1 and sleeps == []
        server.close()

    @pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
    def test_insecure_loopback_registry_with_or_without_tls(self, registry, tls_files, sleeps,
                                                            tls):
        image = registry.add_image("app", "v1", [layer_bytes(13)])
        port = int(registry.host.split(":")[1])
        front = _TlsFront(port, *tls_files) if tls else _FirstBytes(port)
        manifest, _ = make_puller(sleeps=sleeps, insecure=True).pull(
            f"127.0.0.1:{front.port}/app:v1")
        assert manifest.digest == image["digest"] and sleeps == []
        if tls:
            assert front.plain_http_answers == 0 and front.connections >= 1
        else:  # https was tried first (a TLS handshake), then plain http
            assert front.first_bytes[0] == b"\x16" and set(front.first_bytes[1:]) == {b"G"}
        front.close()

    @pytest.mark.parametrize("tls", [True, False], ids=["loopback-tls", "insecure-plain"])
    def test_workers_wait_for_the_scheme_to_settle(self, registry, tls_files, sleeps, tls):
        # By digest with manifest and config cached, the layer downloads are the
        # first requests, all at once: one settles the scheme, the others wait.
        image = registry.add_image("app", "v1", [layer_bytes(30 + i, 20_000) for i in range(8)])
        front = _TlsFront(int(registry.host.split(":")[1]), *tls_files) if tls else None
        reference = f"{f'127.0.0.1:{front.port}' if front else registry.host}/app@{image['digest']}"
        options = dict(ssl_context=_ssl.create_default_context(cafile=str(tls_files[0]))) \
            if tls else dict(insecure=True)
        cache = zr.BlobCache()
        make_puller(cache, sleeps=sleeps, **options).pull(reference)
        for attempt in range(5):
            for layer in image["layers"]:
                cache.delete(layer["digest"])
            puller = make_puller(cache, sleeps=sleeps, max_workers=8, **options)
            manifest, layers = puller.pull(reference)
            assert manifest.digest == image["digest"] and len(layers) == 8
            assert all(cache.has(layer["digest"]) for layer in image["layers"])
            assert puller.request_count == 9  # the 8 layers and one try of the other scheme
            puller.close()
        assert sleeps == []  # no retry anywhere
        if front:
            front.close()

    def test_insecure_still_checks_the_certificate_of_a_blob_host(
            self, registry, object_store, tls_files, sleeps):
        image = registry.add_image("app", "v1", [layer_bytes(14)])
        digest = image["layers"][0]["digest"]
        object_store.blobs[digest[7:]] = layer_bytes(14)
        store_port = int(object_store.url.rsplit(":", 1)[1])
        registry_front = _TlsFront(int(registry.host.split(":")[1]), *tls_files)
        store_front = _TlsFront(store_port, *tls_files)
        proxy = _ConnectProxy({"registry.test": "127.0.0.1", "objects.test": "127.0.0.1"})
        registry.faults.append(lambda m, p, h: {"status": 307, "body": b"", "headers": {
            "Location": f"https://objects.test:{store_front.port}/bucket/{digest[7:]}"}}
            if p.endswith(digest) else None)
        puller = make_puller(environ={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"},
                             sleeps=sleeps, retries=1, insecure=True)
        with pytest.raises(zr.RegistryError, match=r"^registry\.test:[0-9]+ \(objects\.test\) "
                           "presented a TLS certificate that is not trusted") as info:
            puller.pull(f"registry.test:{registry_front.port}/app:v1")
        assert "--insecure" not in str(info.value)  # it was given: no use suggesting it
        assert object_store.requests == [] and sleeps == []
        for server in (registry_front, store_front, proxy):
            server.close()

    def test_plain_http_registry_reached_with_tls_gets_a_hint(self, registry, sleeps):
        registry.add_image("app", "v1", [layer_bytes(8)])
        proxy = _ConnectProxy({"registry.test": "127.0.0.1"})  # tunnels to plain HTTP
        port = registry.host.split(":")[1]
        puller = make_puller(environ={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"},
                             sleeps=sleeps)
        with pytest.raises(zr.RegistryError, match="does not speak TLS: it may serve plain "
                           "http \\(allow that with --insecure\\)"):
            puller.pull(f"registry.test:{port}/app:v1")
        assert sleeps == []
        proxy.close()

    def test_a_dead_proxy_is_named(self, sleeps):
        listener = _socket.socket()
        listener.bind(("127.0.0.1", 0))
        dead = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        proxy = f"http://user:secret@127.0.0.1:{dead}"
        puller = make_puller(environ={"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy},
                             sleeps=sleeps, retries=1, insecure=True)
        with pytest.raises(zr.RegistryError) as info:
            puller.pull("registry.test:5000/app:v1")
        message = str(info.value)
        # --insecure tried https, then http: both attempts are named.
        assert message.startswith("cannot reach registry.test:5000: https: ConnectionRefusedError")
        assert "; http: ConnectionRefusedError" in message
        assert message.endswith(f"(through the proxy http://127.0.0.1:{dead} from HTTP_PROXY)")
        assert "secret" not in message and len(sleeps) == 1

    def test_folded_header_lines_count_toward_the_limit(self):
        server = _Scripted([(b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n" + b" b\r\n" * 200
                             + b"Content-Length: 0\r\n\r\n", True)])
        with pytest.raises(zr._HttpError, match="more than 100 header lines"):
            zr._Transport().send("GET", server.url(), {})
        server.close()

    def test_odd_numbers_elsewhere(self):
        assert zr._parse_retry_after("\u00b2", lambda: 0) is None
        response = type("R", (), {"status": 206, "header": lambda self, name:
                                  "bytes " + "0" * 5000 + "1-2/3"})()
        assert zr._continues_at(response, 1) is False

    def test_redirect_or_realm_to_a_non_ascii_or_broken_host_is_refused(self):
        for url in ("https://\u00e9..example/x", "https://token.example\rX-Injected: 1/token"):
            with pytest.raises(zr.RegistryError, match="invalid host name"):
                zr._split_url(url)


class _Sink(_Listener):
    """Reads each request body in 64 KiB pieces, hashing it (nothing is kept), and
    answers 201 with the body's digest in Docker-Content-Digest."""

    def __init__(self) -> None:
        self.digests = []
        super().__init__(self._serve)

    def _serve(self, conn) -> None:
        reader = conn.makefile("rb")
        with conn:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                left, hasher = int(head[1].get("content-length") or 0), hashlib.sha256()
                while left:
                    chunk = reader.read(min(left, 65536))
                    if not chunk:
                        return
                    hasher.update(chunk)
                    left -= len(chunk)
                digest = "sha256:" + hasher.hexdigest()
                self.digests.append(digest)
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n"
                             b"Docker-Content-Digest: " + digest.encode() + b"\r\n\r\n")


class TestRequestBodies:
    """Request bodies: bytes, files (streamed: sendfile on plain sockets), iterators
    (sent once), and when a request with a body is sent again."""

    def test_a_file_body_streams_without_being_read_into_memory(self, tmp_path):
        import tracemalloc
        data = layer_bytes(71, 24 * 1024 * 1024)
        path = tmp_path / "blob"
        path.write_bytes(data)
        sink = _Sink()
        transport = zr._Transport()
        try:
            with open(path, "rb") as f:
                tracemalloc.start()
                response = transport.send("PUT", f"http://127.0.0.1:{sink.port}/upload", {},
                                          zr._FileBody(f))
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            response.read()
            assert response.status == 201
            assert response.header("Docker-Content-Digest") == zr.compute_digest(data)
            assert peak < 2 * 1024 * 1024, f"{peak} bytes held while sending a 24 MiB body"
            with open(path, "rb") as f:  # a part of a file, from an offset
                part = transport.send("PATCH", f"http://127.0.0.1:{sink.port}/upload", {},
                                      zr._FileBody(f, 1000, 5000))
                part.read()
            assert sink.digests[-1] == zr.compute_digest(data[1000:6000])
        finally:
            transport.close()
            sink.close()

    def test_a_file_body_goes_over_tls_in_pieces(self, tmp_path, tls_files):
        data = layer_bytes(72, 3 * 1024 * 1024 + 17)
        path = tmp_path / "blob"
        path.write_bytes(data)
        sink = _Sink()
        front = _TlsFront(sink.port, *tls_files)
        context = _ssl.create_default_context(cafile=str(tls_files[0]))
        transport = zr._Transport(ssl_context=context)
        try:
            with open(path, "rb") as f:
                response = transport.send("PUT", f"https://127.0.0.1:{front.port}/x", {},
                                          zr._FileBody(f))
                response.read()
            assert response.status == 201
            assert sink.digests == [zr.compute_digest(data)]
        finally:
            transport.close()
            front.close()
            sink.close()

    def test_an_iterator_body_must_have_its_declared_length(self):
        sink = _Sink()
        transport = zr._Transport()
        try:
            url = f"http://127.0.0.1:{sink.port}/x"
            ok = transport.send("PUT", url, {}, zr._IterBody(iter([b"ab", b"cd"]), 4))
            ok.read()
            assert ok.status == 201 and sink.digests == [zr.compute_digest(b"abcd")]
            for chunks, length in (([b"abc", b"de"], 4), ([b"ab"], 4)):
                with pytest.raises(zr.RegistryError, match="cannot send PUT .*the body"):
                    transport.send("PUT", url, {}, zr._IterBody(iter(chunks), length))
        finally:
            transport.close()
            sink.close()

    def test_a_body_that_cannot_be_sent_twice_is_not_resent_on_a_stale_connection(self):
        ok = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        # The server closes the first connection after its answer, without saying so.
        server = _Scripted([(ok, True), ok, ok])
        transport = zr._Transport()
        try:
            transport.send("GET", server.url(), {}).read()
            assert server.hung_up.acquire(timeout=10)
            response = transport.send("PATCH", server.url(), {},
                                      zr._IterBody(iter([b"chunk"]), 5))
            response.read()
            assert response.status == 201
            # Seen closed before the chunk went out: a fresh connection took it, once.
            assert server.bodies == [b"", b"chunk"] and server.connections == 2
            again = transport.send("PUT", server.url(), {}, b"bytes")
            assert again.status == 201 and server.bodies[-1] == b"bytes"
        finally:
            transport.close()
            server.close()

    def test_a_stale_connection_that_swallows_the_request_gets_only_replayable_bodies_again(
            self):
        ok = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        for body, replies, expected in (
                (b"bytes", [ok, None, ok], [b"", b"bytes", b"bytes"]),
                (zr._IterBody(iter([b"chunk"]), 5), [ok, None, ok], [b"", b"chunk"])):
            server = _Scripted(replies)
            transport = zr._Transport()
            try:
                transport.send("GET", server.url(), {}).read()
                if isinstance(body, bytes):
                    assert transport.send("PUT", server.url(), {}, body).status == 201
                else:
                    with pytest.raises(ConnectionError):
                        transport.send("PATCH", server.url(), {}, body)
                assert server.bodies == expected
            finally:
                transport.close()
                server.close()

    def test_an_answer_sent_before_the_body_was_read_is_returned(self, tmp_path, registry):
        registry.max_body_bytes = 1024
        path = tmp_path / "big"
        path.write_bytes(layer_bytes(73, 8 * 1024 * 1024))
        client = zr._RegistryClient(zr.parse_reference(f"{registry.host}/app"),
                                    zr.RegistryAuth.anonymous(), zr._Transport(),
                                    zr._TokenCache(), actions="pull,push", sleep=Sleeps())
        with open(path, "rb") as f, pytest.raises(zr.RegistryError) as caught:
            client.request("PUT", "/v2/app/blobs/uploads/x?digest=" + SHA_A, ok=(201,),
                           body=zr._FileBody(f))
        assert caught.value.status == 413


class TestRetryPolicy:
    """Which requests are sent again: GET, HEAD, DELETE, and PUT/POST with a body
    that can be replayed; never PATCH."""

    class _Answer:
        def __init__(self, status):
            self.status = status
            self.closed = False

        def header(self, name, default=""):
            return default

        def close(self):
            self.closed = True

    def _run(self, method, body, statuses):
        answers = [self._Answer(s) for s in statuses]
        sent, waits = [], []

        def send():
            sent.append(method)
            return answers[len(sent) - 1]

        response = zr._send_with_retries(send, method, retries=4,
                                         wait=lambda a, r: waits.append(a),
                                         unanswered=lambda exc, last: exc, body=body)
        return response.status, len(sent), waits

    def test_get_put_post_and_delete_are_retried_on_retryable_statuses(self):
        for method, body in (("GET", None), ("HEAD", None), ("DELETE", None),
                             ("PUT", zr._BytesBody(b"x")), ("POST", None)):
            assert self._run(method, body, [503, 502, 200]) == (200, 3, [0, 1]), method

    def test_patch_and_bodies_that_cannot_be_replayed_are_sent_once(self):
        assert self._run("PATCH", zr._BytesBody(b"x"), [503, 200]) == (503, 1, [])
        assert self._run("PUT", zr._IterBody(iter([b"x"]), 1), [503, 200]) == (503, 1, [])

    def test_a_connection_error_is_final_for_patch(self):
        seen = []

        def send():
            raise ConnectionResetError("reset")

        def unanswered(exc, last):
            seen.append(last)
            return zr.RegistryError("gave up") if last else None

        with pytest.raises(zr.RegistryError, match="gave up"):
            zr._send_with_retries(send, "PATCH", retries=4, wait=lambda a, r: None,
                                  unanswered=unanswered, body=zr._BytesBody(b"x"))
        assert seen == [True]
        seen.clear()
        with pytest.raises(zr.RegistryError, match="gave up"):
            zr._send_with_retries(send, "GET", retries=2, wait=lambda a, r: None,
                                  unanswered=unanswered)
        assert seen == [False, False, True]


class TestRegistryRequests:
    """The registry client's requests: bodies, absolute URLs (upload Locations),
    token scopes other than pull."""

    def _client(self, registry, actions="pull"):
        return zr._RegistryClient(zr.parse_reference(f"{registry.host}/app"),
                                  zr.RegistryAuth.anonymous(), zr._Transport(),
                                  zr._TokenCache(), actions=actions, sleep=Sleeps())

    def test_an_upload_session_with_a_streamed_body(self, registry, tmp_path):
        data = layer_bytes(74, 300_000)
        path = tmp_path / "blob"
        path.write_bytes(data)
        client = self._client(registry, "pull,push")
        started = client.request("POST", "/v2/app/blobs/uploads/", ok=(202,))
        started.close()
        location = started.header("Location")
        absolute = f"{client.base_url}{location}"
        with open(path, "rb") as f:
            done = client.request("PUT", f"{absolute}?digest={zr.compute_digest(data)}",
                                  ok=(201,), body=zr._FileBody(f))
        done.close()
        assert done.header("Docker-Content-Digest") == zr.compute_digest(data)
        assert registry.blobs[zr.compute_digest(data)] == data
        assert registry.body_sizes[-1] == len(data)

    def test_an_absolute_url_on_another_host_is_refused(self, registry):
        client = self._client(registry)
        with pytest.raises(zr.RegistryError, match="location on another host"):
            client.request("PUT", "http://127.0.0.2:1/v2/app/blobs/uploads/x", ok=(201,),
                           body=b"x")
        assert registry.requests == []

    def test_push_clients_and_requests_ask_for_their_scopes(self, registry):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(75, 100)])
        client = self._client(registry, "pull,push")
        client.request("HEAD", "/v2/app/manifests/v1", headers=ACCEPT).close()
        assert registry.token_requests[-1]["query"]["scope"] == ["repository:app:pull,push"]
        client.request("HEAD", "/v2/app/manifests/v1", headers=ACCEPT,
                       scope="repository:app:pull,push repository:other:pull").close()
        assert registry.token_requests[-1]["query"]["scope"] == [
            "repository:app:pull,push", "repository:other:pull"]


class TestBlobFraming:
    """Blob bodies framed in ways that end early or late: the digest decides."""

    def _blob(self, reply, close):
        data = layer_bytes(3, 5000)
        digest = zr.compute_digest(data)
        server = _Scripted([(reply(data), close)])
        cache = zr.BlobCache()
        puller = make_puller(cache, timeout_s=5)
        source = puller._session.source(zr.parse_reference(f"127.0.0.1:{server.port}/app:v1"),
                                        None)
        puller._fetcher.stream_blob(source, zr.Descriptor("application/octet-stream", digest,
                                                          len(data)), _threading.Event())
        assert cache.get(digest) == data
        assert [h.get("range") for _, h in server.requests] == [None]
        server.close()

    def test_a_complete_chunked_blob_is_kept_when_the_terminator_is_lost(self):
        self._blob(lambda d: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + f"{len(d):x}\r\n".encode() + d + b"\r\n", True)

    def test_a_complete_unframed_blob_does_not_wait_for_the_connection_to_close(self):
        self._blob(lambda d: b"HTTP/1.1 200 OK\r\n\r\n" + d, False)









# -----------------------------------------------------------------------------
# REGISTRY ANSWERS, REGISTRY CLIENT, BLOB SOURCES, FETCHER: against the fake registry
# -----------------------------------------------------------------------------

class TestProxies:
    def test_proxy_selection(self):
        settings = zr._ProxySettings.from_environ({
            "HTTPS_PROXY": "http://proxy:3128", "http_proxy": "proxy:8080",
            "NO_PROXY": "internal.corp,.svc,  registry.local:5000"})
        assert settings.proxy_for("https", "ghcr.io", 443) == "http://proxy:3128"
        assert settings.proxy_for("http", "example.com", 80) == "http://proxy:8080"
        assert settings.proxy_for("https", "a.internal.corp", 443) == ""
        assert settings.proxy_for("https", "x.svc", 443) == ""
        assert settings.proxy_for("https", "registry.local", 5000) == ""
        assert settings.proxy_for("https", "registry.local", 443) == "http://proxy:3128"
        assert settings.proxy_for("http", "127.0.0.1", 5000) == ""  # loopback: direct
        assert zr._ProxySettings.from_environ({"NO_PROXY": "*", "HTTPS_PROXY": "p:1"}) \
            .proxy_for("https", "x", 443) == ""

    @pytest.mark.parametrize("host, loopback", [
        ("127.0.0.1", True), ("127.0.0.1:5000", True), ("127.255.0.9", True),
        ("localhost", True), ("localhost:5000", True), ("a.localhost", True),
        ("::1", True), ("[::1]", True), ("[::1]:5000", True), ("0:0::1", True),
        ("::ffff:127.0.0.1", True), ("128.0.0.1", False), ("127.0.0.256", False),
        ("fd00::1", False), ("[fd00::1]:5000", False), ("127.0.0.\u00b2", False),
        ("\uff11\uff12\uff17.0.0.1", False), ("registry.local", False), ("[::1", False),
    ])
    def test_loopback_hosts(self, host, loopback):
        assert zr._is_loopback_host(host) is loopback
        if not host.startswith("[") and host.count(":") != 1:  # a host as URLs give it
            settings = zr._ProxySettings(http="http://proxy:3128")
            assert (settings.proxy_for("http", host, 80) == "") is loopback

    @pytest.mark.parametrize("no_proxy, host, port, direct", [
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("10.0.0.0/8", "registry.10.in", 443, False),
        ("fd00::/8", "fd12::5", 443, True),
        ("fd00::/8", "10.1.2.3", 443, False),
        ("fd12::5", "fd12::5", 443, True),
        ("fd12::5", "[fd12:0::5]", 5000, True),
        ("[fd12::5]:5000", "fd12::5", 5000, True),
        ("[fd12::5]:5000", "fd12::5", 443, False),
        ("fe80::1", "fe80::2", 443, False),
        ("192.168.1.7", "192.168.1.7", 443, True),
        ("192.168.1.7:5000", "192.168.1.7", 443, False),
        ("192.168.1.7", "192.168.1.70", 443, False),
        ("*.corp", "r.corp", 443, True),
        ("corp", "notcorp", 443, False),
        (".", "r.corp", 443, False),
        ("300.0.0.0/8", "10.1.2.3", 443, False),
        ("[fd12::5", "fd12::5", 443, False),
        ("10.0.0.0/8", "::ffff:10.0.0.1", 443, True),  # an IPv4-mapped address, as in Go
        ("10.0.0.1", "::ffff:10.0.0.1", 443, True),
    ])
    def test_no_proxy_ip_addresses_and_cidr_ranges(self, no_proxy, host, port, direct):
        settings = zr._ProxySettings.from_environ({"HTTPS_PROXY": "http://proxy:3128",
                                                   "NO_PROXY": no_proxy})
        assert (settings.proxy_for("https", host, port) == "") is direct

    def test_https_goes_through_a_connect_tunnel(self):
        transport = zr._Transport(proxies=zr._ProxySettings(https="http://user:pw@127.0.0.1:3128"))
        conn, absolute = transport._connect("https", "ghcr.io", 443)
        assert (conn.host, conn.port, absolute) == ("127.0.0.1", 3128, False)
        assert conn.tunnel == ("ghcr.io", 443, {"Proxy-Authorization": "Basic " + _b64("user:pw")})
        assert conn.context is not None and conn.proxy_headers == {}

    def test_plain_http_through_forward_proxy(self, registry):
        proxy = fake.ForwardProxy()
        proxy.hosts["registry.test"] = "127.0.0.1"
        try:
            image = registry.add_image("app", "v1", [layer_bytes(3)])
            port = registry.host.split(":")[1]
            puller = make_puller(environ={"HTTP_PROXY": proxy.url}, insecure=True)
            manifest, _ = puller.pull(f"registry.test:{port}/app:v1")
            assert manifest.digest == image["digest"]
            assert proxy.requests and all(r.startswith(f"http://registry.test:{port}/v2/")
                                          for r in proxy.requests)
        finally:
            proxy.close()

    def test_https_proxy_is_refused_before_anything_is_sent(self):
        seen = []
        listener = _Listener(lambda conn: seen.append(conn.recv(4096)))
        environ = {"HTTPS_PROXY": f"https://user:s3cret@127.0.0.1:{listener.port}"}
        with pytest.raises(zr.RegistryError, match="only http:// proxies") as info:
            make_puller(environ=environ, retries=0).pull("registry.example:443/app:v1")
        assert seen == [] and "s3cret" not in str(info.value)
        listener.close()


class TestPull:
    def test_pull_verifies_and_caches_every_blob(self, registry, tmp_path):
        layers = [layer_bytes(i, 300_000 + i) for i in range(3)]
        image = registry.add_image("team/app", "v1", layers)
        cache = zr.BlobCache.open(tmp_path)
        manifest, pulled = make_puller(cache).pull(f"{registry.host}/team/app:v1")
        assert manifest.digest == image["digest"]
        assert [l.digest for l in pulled] == [d["digest"] for d in image["layers"]]
        for layer, data in zip(pulled, layers):
            assert Path(layer.path).read_bytes() == data
            with layer.open() as f:
                assert f.read() == data
        assert cache.has(image["config"]["digest"])
        assert cache.verify() == []
        assert os.listdir(tmp_path / "tmp") == []

    def test_a_layer_changed_in_the_cache_cannot_be_read_to_its_end(self, registry, tmp_path):
        data = layer_bytes(91, 300_000)
        image = registry.add_image("app", "v1", [data])
        cache = zr.BlobCache.open(tmp_path)
        manifest, (layer,) = make_puller(cache).pull(f"{registry.host}/app:v1")
        path = Path(layer.path)
        path.chmod(0o644)
        path.write_bytes(data[:1000] + b"X" + data[1001:])
        # A warm pull trusts what the cache verified (right size): it succeeds ...
        again = make_puller(cache)
        assert again.pull(f"{registry.host}/app:v1")[0].digest == image["digest"]
        # ... but the bytes never reach the end of a read unchecked.
        with layer.open() as f:
            assert len(f.read(500)) == 500  # reads that stop short are not checked
        for read_all in (lambda f: f.read(), lambda f: [f.read(65536) for _ in range(10)],
                         lambda f: (f.read(7000), f.seek(0), f.read())):
            with layer.open() as f, pytest.raises(zr.DigestMismatchError, match="is corrupt"):
                read_all(f)
        with pytest.raises(zr.DigestMismatchError):
            layer.read_bytes()
        with layer.open() as f:  # read out of order: not checked, and not claimed to be
            f.seek(1000)
            assert f.read() == b"X" + data[1001:]

    def test_pull_verify_downloads_again_what_changed_in_the_cache(self, registry, tmp_path,
                                                                   capfd):
        data = layer_bytes(92, 300_000)
        image = registry.add_image("app", "v1", [data])
        cache = zr.BlobCache.open(tmp_path)
        layer = make_puller(cache).pull(f"{registry.host}/app:v1")[1][0]
        _spoil_cached(cache, layer.digest, lambda b: b.__setitem__(10, b[10] ^ 1))
        before = registry.count("GET", "blobs")
        result = make_puller(cache).pull_image(f"{registry.host}/app:v1", verify=True)
        assert result.bytes_downloaded == len(data)
        assert registry.count("GET", "blobs") == before + 1  # only the changed layer
        assert cache.verify() == [] and Path(layer.path).read_bytes() == data
        assert "is corrupt; downloading it again" in capfd.readouterr().err
        out = run_cli("pull", f"{registry.host}/app:v1", "--verify", "--cache", str(tmp_path),
                      "-q", cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.strip() == image["digest"]
        assert registry.count("GET", "blobs") == before + 1  # intact: nothing downloaded

    def test_a_config_changed_in_the_cache_is_an_error(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(93, 1000)])
        cache = zr.BlobCache.open(tmp_path)
        make_puller(cache).pull(f"{registry.host}/app:v1")
        _spoil_cached(cache, image["config"]["digest"], lambda b: b.__setitem__(2, ord("X")))
        with pytest.raises(zr.DigestMismatchError, match="cached config .* is corrupt"):
            make_puller(cache).pull(f"{registry.host}/app:v1")

    def test_an_interrupted_pull_is_recorded_as_incomplete(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(94, 50_000), layer_bytes(95, 5000)])
        missing = image["layers"][1]["digest"]
        registry.faults.append(lambda m, p, h: {"status": 404} if p.endswith(missing) else None)
        cache_dir = str(tmp_path / "c")
        # One worker, largest blob first: the first layer is stored before the 404.
        failed = run_cli("pull", f"{registry.host}/app:v1", "--cache", cache_dir,
                         "--max-workers", "1", cwd=tmp_path)
        assert failed.returncode == 1
        listed = run_cli("cache", "ls", "--cache", cache_dir, cwd=tmp_path)
        assert f"{registry.host}/app:v1  {image['digest']}  (incomplete" in listed.stdout
        listing = json.loads(run_cli("cache", "ls", "--json", "--cache", cache_dir,
                                     cwd=tmp_path).stdout)
        assert listing["incomplete"] == [f"{registry.host}/app:v1"]
        # gc keeps what the interrupted pull stored, so the next pull resumes from it.
        assert run_cli("cache", "gc", "--cache", cache_dir, cwd=tmp_path).returncode == 0
        assert zr.BlobCache.open(cache_dir).has(image["layers"][0]["digest"])
        assert run_cli("pull", f"{registry.host}/app:v1", "--cache", cache_dir,
                       cwd=tmp_path).returncode == 0
        listing = json.loads(run_cli("cache", "ls", "--json", "--cache", cache_dir,
                                     cwd=tmp_path).stdout)
        assert listing["incomplete"] == [] and listing["references"] == {
            f"{registry.host}/app:v1": image["digest"]}

    def test_inspect_records_no_reference(self, registry):
        registry.add_image("app", "v1", [layer_bytes(96, 1000)])
        cache = zr.BlobCache()
        make_puller(cache).inspect(f"{registry.host}/app:v1")
        assert cache.references() == {}

    def test_tag_into_an_empty_cache_is_one_get_else_head_then_get_by_digest(self, registry):
        registry.add_image("app", "v1", [layer_bytes(1)])
        second = registry.add_image("app", "v2", [layer_bytes(2)])
        cache = zr.BlobCache()
        make_puller(cache).pull(f"{registry.host}/app:v1")
        make_puller(cache).pull(f"{registry.host}/app:v2")
        manifest_requests = [r for r in registry.requests if "/manifests/" in r["path"]]
        assert [(r["method"], r["path"].rsplit("/", 1)[1]) for r in manifest_requests] == [
            ("GET", "v1"), ("HEAD", "v2"), ("GET", second["digest"])]
        for request in manifest_requests:
            accept = request["headers"]["Accept"]
            for media_type in (fake.OCI_MANIFEST, fake.OCI_INDEX, fake.DOCKER_MANIFEST,
                               fake.DOCKER_LIST):
                assert media_type in accept

    def test_single_platform_image_for_another_platform_is_refused_before_its_layers(
            self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        with pytest.raises(zr.ManifestError, match="single linux/amd64 image, not linux/arm64"):
            make_puller(platform="linux/arm64").pull(f"{registry.host}/app:v1")
        with pytest.raises(zr.ManifestError, match="single linux/amd64 image, not linux/arm64"):
            make_puller(platform="linux/arm64").inspect(f"{registry.host}/app:v1")
        assert not any(r["path"].endswith(image["layers"][0]["digest"]) for r in registry.requests)
        wasm = registry.add_image("plugin", "v1", [layer_bytes(2)], config={"name": "no platform"})
        assert make_puller(platform="linux/arm64").pull(f"{registry.host}/plugin:v1")[0].digest \
            == wasm["digest"]

    def test_prune_keeps_the_manifests_of_recently_used_images(self, registry, tmp_path):
        config = {"architecture": "amd64", "os": "linux"}
        old = registry.add_image("old", "v1", [layer_bytes(1, 5000)], config={**config, "n": 1})
        new = registry.add_image("new", "v1", [layer_bytes(2, 5000)], config={**config, "n": 2})
        cache = zr.BlobCache.open(tmp_path)
        make_puller(cache).pull(f"{registry.host}/new:v1")
        make_puller(cache).pull(f"{registry.host}/old:v1")
        make_puller(cache).pull(f"{registry.host}/new:v1")  # from the cache: a use all the same
        used = {e["digest"]: e["last_used_at"] for e in cache.entries()}
        assert used[new["digest"]] == used[new["config"]["digest"]] > used[old["digest"]]
        new_bytes = new["size"] + new["config"]["size"] + sum(l["size"] for l in new["layers"])
        removed = cache.prune(new_bytes)
        assert sorted(removed) == sorted([old["digest"], old["config"]["digest"],
                                          old["layers"][0]["digest"]])
        assert cache.gc() == [] and cache.has(new["digest"])

    def test_warm_pull_costs_one_request_and_by_digest_none(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1), layer_bytes(2)])
        cache = zr.BlobCache.open(tmp_path)
        first = make_puller(cache).pull_image(f"{registry.host}/app:v1")
        assert first.bytes_downloaded == sum(l["size"] for l in image["layers"]) + \
            image["config"]["size"]
        before = len(registry.requests)
        puller = make_puller(zr.BlobCache.open(tmp_path))
        again = puller.pull_image(f"{registry.host}/app:v1")
        assert len(registry.requests) - before == 1 == puller.request_count
        assert again.bytes_downloaded == 0 and again.bytes_from_cache == first.bytes_downloaded
        puller = make_puller(zr.BlobCache.open(tmp_path))
        puller.pull(f"{registry.host}/app@{image['digest']}")
        assert puller.request_count == 0

    def test_get_fallback_when_head_unsupported(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        registry.support_head = False
        manifest, _ = make_puller().pull(f"{registry.host}/app:v1")
        assert manifest.digest == image["digest"]
        assert registry.count("GET", "manifests") == 1

    def test_docker_schema2_image(self, registry):
        image = registry.add_image("app", "v2", [layer_bytes(5)], docker=True)
        manifest, layers = make_puller().pull(f"{registry.host}/app:v2")
        assert manifest.media_type == zr.MEDIA_TYPE_DOCKER_MANIFEST
        assert layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        assert manifest.digest == image["digest"]

    def test_index_resolves_platform(self, registry):
        amd = registry.add_image("multi", None, [layer_bytes(10)])
        arm = registry.add_image("multi", None, [layer_bytes(11)],
                                 config={"architecture": "arm64", "os": "linux"})
        armv7 = registry.add_image("multi", None, [layer_bytes(12)])
        index_digest = registry.add_index("multi", "latest", [
            ({"os": "linux", "architecture": "amd64"}, amd),
            ({"os": "linux", "architecture": "arm64", "variant": "v8"}, arm),
            ({"os": "linux", "architecture": "arm", "variant": "v7"}, armv7)])
        result = make_puller(platform="linux/aarch64").pull_image(f"{registry.host}/multi")
        assert result.manifest.digest == arm["digest"]
        assert result.index.digest == index_digest
        assert str(result.platform) == "linux/arm64"
        assert result.to_json()["index_digest"] == index_digest
        v8 = make_puller(platform="linux/arm/v8").pull_image(f"{registry.host}/multi")
        assert v8.manifest.digest == armv7["digest"]
        with pytest.raises(zr.PlatformNotFoundError,
                           match="offers: linux/amd64, linux/arm/v7, linux/arm64") as info:
            make_puller(platform="linux/s390x").pull(f"{registry.host}/multi")
        assert isinstance(info.value, zr.ManifestError) and info.value.platform == "linux/s390x"
        assert "linux/amd64" in info.value.offered

    def test_manifest_by_digest_is_verified(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        other = registry.add_image("app", "v2", [layer_bytes(2)])
        # The registry answers the first digest with the other manifest's bytes.
        registry.manifests[("app", image["digest"])] = registry.manifests[("app", other["digest"])]
        with pytest.raises(zr.DigestMismatchError, match="manifest digest mismatch"):
            make_puller().pull(f"{registry.host}/app@{image['digest']}")

    def test_tag_manifest_checked_against_docker_content_digest(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        registry.support_head = False
        registry.manifests[("app", "v1")] = (b'{"schemaVersion":2,"manifests":[]}', fake.OCI_INDEX)
        registry.send_digest_header = True
        original = registry._manifest

        def lying(h, repository, ref):  # header says the real digest, body differs
            if h.command == "HEAD":
                h.send_body(405, b"")
                return
            h.send_body(200, registry.manifests[(repository, ref)][0],
                        {"Docker-Content-Digest": image["digest"]}, content_type=fake.OCI_INDEX)
        registry._manifest = lying
        try:
            with pytest.raises(zr.DigestMismatchError):
                make_puller().pull(f"{registry.host}/app:v1")
        finally:
            registry._manifest = original

    def test_oversized_manifest_is_refused(self, registry):
        big = {"schemaVersion": 2, "mediaType": fake.OCI_INDEX, "manifests": [],
               "annotations": {"pad": "x" * (zr.MAX_MANIFEST_SIZE_BYTES + 10)}}
        registry.add_manifest("app", "big", big)
        cache = zr.BlobCache()
        with pytest.raises(zr.ManifestError, match="limit"):
            make_puller(cache).pull(f"{registry.host}/app:big")
        assert cache.entries() == []

    def test_not_found_carries_registry_error_codes(self, registry):
        with pytest.raises(zr.NotFoundError) as info:
            make_puller().pull(f"{registry.host}/nothing:here")
        assert info.value.status == 404
        registry.add_manifest("app", "gone", {"schemaVersion": 2, "mediaType": fake.OCI_MANIFEST,
                                              "config": {"mediaType": fake.OCI_CONFIG,
                                                         "digest": SHA_A, "size": 2},
                                              "layers": []})
        with pytest.raises(zr.NotFoundError) as info:
            make_puller().pull(f"{registry.host}/app:gone")
        assert info.value.codes == ("BLOB_UNKNOWN",) and "BLOB_UNKNOWN" in str(info.value)

    def test_blob_larger_than_descriptor_is_cut_off(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1, 1000)])
        registry.blobs[image["layers"][0]["digest"]] = layer_bytes(1, 5000)
        cache = zr.BlobCache()
        with pytest.raises(zr.DigestMismatchError, match="larger than announced"):
            make_puller(cache).pull(f"{registry.host}/app:v1")
        assert not cache.has(image["layers"][0]["digest"])

    def test_corrupted_byte_is_a_digest_mismatch_and_nothing_is_cached(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        digest = image["layers"][0]["digest"]
        for _ in range(2):  # once is downloaded again; twice is the error
            registry.faults.append(
                lambda m, p, h: {"corrupt_at": 1234} if p.endswith(digest) else None)
        cache = zr.BlobCache.open(tmp_path)
        with pytest.raises(zr.DigestMismatchError) as info:
            make_puller(cache).pull(f"{registry.host}/app:v1")
        assert info.value.expected == digest and info.value.actual != digest
        assert not cache.has(digest) and os.listdir(tmp_path / "tmp") == []
        assert not (tmp_path / "blobs" / "sha256" / digest[7:]).exists()

    def test_parallel_downloads_reuse_connections(self, registry):
        registry.add_image("app", "v1", [layer_bytes(i, 50_000) for i in range(12)])
        puller = make_puller(max_workers=3)
        puller.pull(f"{registry.host}/app:v1")
        requests = len(registry.requests)
        assert requests == 14  # GET manifest (empty cache: no HEAD) + config + 12 layers
        assert registry.server.connections <= 4  # one per worker + the main thread

    def test_blobs_are_fetched_largest_first(self, registry):
        sizes = [30_000, 90_000, 10_000, 60_000]
        image = registry.add_image("app", "v1", [layer_bytes(i, n) for i, n in enumerate(sizes)])
        make_puller(max_workers=1, platform=None).pull(f"{registry.host}/app:v1")
        fetched = [r["path"].rsplit("/", 1)[1] for r in registry.requests if "/blobs/" in r["path"]]
        by_size = sorted(image["layers"] + [image["config"]], key=lambda d: -d["size"])
        assert fetched == [d["digest"] for d in by_size]

    def test_layers_are_not_held_in_memory_by_the_result(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(1)])
        _, layers = make_puller(zr.BlobCache.open(tmp_path)).pull(f"{registry.host}/app:v1")
        assert not any(isinstance(v, (bytes, bytearray)) for v in vars(layers[0]).values())
        assert layers[0].path.startswith(str(tmp_path))

    def test_a_huge_cached_blob_named_as_config_or_child_is_not_read(self, registry, tmp_path):
        big = registry.add_image("app", "big", [layer_bytes(1, 5 * 1024 * 1024)])
        cache = zr.BlobCache.open(tmp_path)
        make_puller(cache).pull(f"{registry.host}/app:big")
        layer = big["layers"][0]
        hostile = {"schemaVersion": 2, "mediaType": fake.OCI_MANIFEST,
                   "config": {"mediaType": fake.OCI_CONFIG, "digest": layer["digest"], "size": 2},
                   "layers": []}
        registry.add_manifest("app", "hostile", hostile)
        with pytest.raises(zr.DigestMismatchError, match="wrong size"):
            make_puller(cache).pull(f"{registry.host}/app:hostile")
        assert cache.read_small(layer["digest"], 1024) is None
        index = {"schemaVersion": 2, "mediaType": fake.OCI_INDEX, "manifests": [
            {"mediaType": fake.OCI_MANIFEST, "digest": layer["digest"], "size": layer["size"],
             "platform": {"os": "linux", "architecture": "amd64"}}]}
        registry.add_manifest("app", "hostile-index", index)
        with pytest.raises(zr.ManifestError, match="no manifest"):
            make_puller(cache).pull(f"{registry.host}/app:hostile-index")

    @pytest.mark.parametrize("location", ["http://127.0.0.1:99999/x", "http://[::1/x",
                                          "http://[::1]:abc/x"])
    def test_malformed_redirect_locations_are_registry_errors(self, registry, location):
        image = registry.add_image("app", "v1", [layer_bytes(1, 100)])
        digest = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"status": 302, "body": b"", "headers": {
            "Location": location}} if p.endswith(digest) else None)
        with pytest.raises(zr.RegistryError):
            make_puller(retries=0).pull(f"{registry.host}/app:v1")

    def test_remote_registry_cannot_redirect_to_loopback_http(self):
        client = zr._RegistryClient(zr.parse_reference("registry.example/app"),
                                    zr.RegistryAuth.anonymous(), zr._Transport(),
                                    zr._TokenCache())

        class Redirecting:
            status, url, method = 302, "https://registry.example/v2/app/blobs/x", "GET"
            headers = {}

            def header(self, name, default=""):
                return "http://127.0.0.1:6379/" if name == "Location" else default

            def close(self):
                pass
        client.transport.send = lambda method, url, headers, body=None, verify=True: Redirecting()
        with pytest.raises(zr.RegistryError, match="refusing plain http to 127.0.0.1"):
            client._send_following_redirects("GET", "https://registry.example/v2/app/blobs/x", {})


class TestRetriesAndResume:
    def test_retries_5xx_with_backoff(self, registry, sleeps):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        for status in (503, 502):
            registry.faults.append(lambda m, p, h, s=status: {"status": s} if "/blobs/" in p else None)
        manifest, _ = make_puller(sleeps=sleeps).pull(f"{registry.host}/app:v1")
        assert manifest.digest == image["digest"]
        assert len(sleeps) == 2 and sleeps[0] <= zr.RETRY_BACKOFF_BASE_S
        assert sleeps[1] <= 2 * zr.RETRY_BACKOFF_BASE_S

    def test_429_honours_retry_after_seconds_and_date(self, registry, sleeps):
        registry.add_image("app", "v1", [layer_bytes(1)])
        registry.faults.append(lambda m, p, h: {"status": 429, "headers": {"Retry-After": "7"}})
        make_puller(sleeps=sleeps).pull(f"{registry.host}/app:v1")
        assert sleeps == [7.0]
        assert zr._parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", lambda: 1445412480.0) == 10.0
        assert zr._parse_retry_after("999999", lambda: 0) == 999999
        sleeps.clear()
        registry.faults.append(lambda m, p, h: {"status": 429, "headers": {"Retry-After": "99999"}})
        make_puller(sleeps=sleeps).pull(f"{registry.host}/app:v1")
        assert sleeps == [zr.RETRY_AFTER_MAX_S]

    def test_429_that_gives_up_says_so(self, registry, sleeps):
        registry.add_image("app", "v1", [layer_bytes(1)])
        registry.faults.append(lambda m, p, h: {"status": 429, "once": False, "headers": {
            "Retry-After": "1", "ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"}})
        with pytest.raises(zr.RateLimitedError) as info:
            make_puller(sleeps=sleeps, retries=2).pull(f"{registry.host}/app:v1")
        assert "ratelimit-remaining=0;w=21600" in str(info.value)
        assert info.value.retry_after_s == 1.0 and info.value.status == 429
        assert len(sleeps) == 2

    def test_dropped_connection_resumes_with_range(self, registry, sleeps, tmp_path):
        data = layer_bytes(7, 500_000)
        image = registry.add_image("app", "v1", [data])
        digest = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"drop_after": 200_000} if p.endswith(digest) else None)
        cache = zr.BlobCache.open(tmp_path)
        result = make_puller(cache, sleeps=sleeps).pull_image(f"{registry.host}/app:v1")
        blob_gets = [r for r in registry.requests if r["path"].endswith(digest)]
        assert len(blob_gets) == 2
        assert blob_gets[1]["headers"]["Range"] == "bytes=200000-"
        assert Path(result.layers[0].path).read_bytes() == data
        assert result.bytes_downloaded == len(data) + image["config"]["size"]

    def test_server_ignoring_range_restarts_from_zero(self, registry, sleeps):
        data = layer_bytes(8, 300_000)
        image = registry.add_image("app", "v1", [data])
        digest = image["layers"][0]["digest"]
        registry.honor_range = False
        registry.faults.append(lambda m, p, h: {"drop_after": 100_000} if p.endswith(digest) else None)
        cache = zr.BlobCache()
        make_puller(cache, sleeps=sleeps).pull(f"{registry.host}/app:v1")
        assert cache.get(digest) == data

    def test_wrong_content_range_is_not_spliced(self, registry, sleeps):
        data = layer_bytes(9, 300_000)
        image = registry.add_image("app", "v1", [data])
        digest = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"drop_after": 100_000} if p.endswith(digest) else None)
        registry.faults.append(lambda m, p, h: {"status": 206, "body": data[:10], "headers": {
            "Content-Range": "bytes 0-9/300000"}} if "Range" in h else None)
        cache = zr.BlobCache()
        make_puller(cache, sleeps=sleeps).pull(f"{registry.host}/app:v1")
        assert cache.get(digest) == data
        assert "Range" not in [r for r in registry.requests if r["path"].endswith(digest)][-1]["headers"]

    def test_stalled_body_hits_inactivity_timeout(self, registry, sleeps):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        digest = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"stall_after": 1000, "once": False}
                               if p.endswith(digest) else None)
        cache = zr.BlobCache()
        with pytest.raises(zr.RegistryError, match="kept failing") as info:
            make_puller(cache, sleeps=sleeps, timeout_s=0.3, retries=1).pull(
                f"{registry.host}/app:v1")
        assert info.value.temporary
        assert not cache.has(digest)

    def test_registry_down_is_one_clear_error(self, sleeps):
        import socket
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        with pytest.raises(zr.RegistryError, match=f"cannot reach 127.0.0.1:{port}"):
            make_puller(sleeps=sleeps, retries=2).pull(f"127.0.0.1:{port}/app:v1")
        assert len(sleeps) == 2


class TestAuthFlows:
    def test_bearer_token_flow_with_credentials(self, registry):
        registry.auth = "bearer"
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        manifest, _ = make_puller().pull(f"{registry.host}/app:v1",
                                         zr.RegistryAuth.basic("user", "secret"))
        assert manifest.digest == image["digest"]
        assert len(registry.token_requests) == 1
        token_request = registry.token_requests[0]
        assert token_request["query"]["scope"] == ["repository:app:pull"]
        assert token_request["query"]["service"] == ["fake-registry"]
        assert token_request["authorization"] == "Basic " + _b64("user:secret")

    def test_anonymous_bearer_and_wrong_password(self, registry):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1)])
        make_puller().pull(f"{registry.host}/app:v1")
        assert registry.token_requests[0]["authorization"] is None
        with pytest.raises(zr.AuthError, match="401") as info:
            make_puller().pull(f"{registry.host}/app:v1", zr.RegistryAuth.basic("user", "wrong"))
        assert "wrong" not in str(info.value)

    def test_identity_token_uses_refresh_grant(self, registry):
        registry.auth = "bearer"
        registry.refresh_tokens["user"] = "refresh-123"
        registry.add_image("app", "v1", [layer_bytes(1)])
        make_puller().pull(f"{registry.host}/app:v1", zr.RegistryAuth.identity("refresh-123"))
        form = registry.token_requests[0]["form"]
        assert registry.token_requests[0]["method"] == "POST"
        assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == ["refresh-123"]

    def test_token_expiring_mid_pull_is_refreshed(self, registry):
        registry.auth = "bearer"
        registry.token_max_uses = 3
        registry.add_image("app", "v1", [layer_bytes(i, 20_000) for i in range(6)])
        _, layers = make_puller(max_workers=1).pull(f"{registry.host}/app:v1")
        assert len(layers) == 6
        assert len(registry.token_requests) >= 3

    def test_token_reused_until_near_expiry(self, registry):
        registry.auth = "bearer"
        registry.token_lifetime_s = None  # spec default: 60 s
        registry.add_image("app", "v1", [layer_bytes(1)])
        now = [1000.0]
        puller = make_puller(clock=lambda: now[0])
        puller.pull(f"{registry.host}/app:v1")
        puller.pull(f"{registry.host}/app:v1")
        assert len(registry.token_requests) == 1
        now[0] += 55
        puller.pull(f"{registry.host}/app:v1")
        assert len(registry.token_requests) == 2

    def test_basic_challenge(self, registry, tmp_path):
        registry.auth = "basic"
        registry.add_image("app", "v1", [layer_bytes(1)])
        make_puller().pull(f"{registry.host}/app:v1", zr.RegistryAuth.basic("user", "secret"))
        assert registry.requests[-1]["headers"]["Authorization"] == "Basic " + _b64("user:secret")
        with pytest.raises(zr.AuthError, match="requires credentials") as info:
            make_puller().pull(f"{registry.host}/app:v1")
        assert "--creds" not in str(info.value)  # the library names no CLI flag ...
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path)
        assert out.returncode == 1 and "--creds or --authfile" in out.stderr  # ... the CLI does
        wrong = zr.RegistryAuth("basic", username="user", password="nope", source="config.json")
        with pytest.raises(zr.AuthError, match="rejected the credentials of 'user' "
                                               r"\(from config.json\)") as info:
            make_puller().pull(f"{registry.host}/app:v1", wrong)
        assert info.value.status == 401 and "nope" not in str(info.value)

    def test_configured_bearer_token_sent_directly(self, registry):
        registry.add_image("app", "v1", [layer_bytes(1)])
        make_puller().pull(f"{registry.host}/app:v1", zr.RegistryAuth.bearer("pat-xyz"))
        assert all(r["headers"].get("Authorization") == "Bearer pat-xyz" for r in registry.requests)

    def test_plain_http_realm_for_a_remote_host_is_refused(self, registry):
        registry.auth = "bearer"
        registry.realm = "http://auth.example.com/token"
        registry.add_image("app", "v1", [layer_bytes(1)])
        with pytest.raises(zr.AuthError, match="not https"):
            make_puller().pull(f"{registry.host}/app:v1", zr.RegistryAuth.basic("user", "secret"))
        registry.realm = "file:///etc/passwd"
        with pytest.raises(zr.AuthError, match="unusable token realm"):
            make_puller().pull(f"{registry.host}/app:v1")

    def test_redirected_blobs_never_get_authorization(self, registry, object_store):
        registry.auth = "bearer"
        registry.redirect_blobs_to = object_store
        image = registry.add_image("app", "v1", [layer_bytes(1), layer_bytes(2)])
        cache = zr.BlobCache()
        manifest, layers = make_puller(cache).pull(f"{registry.host}/app:v1",
                                                   zr.RegistryAuth.basic("user", "secret"))
        assert manifest.digest == image["digest"]
        assert len(object_store.requests) == 3
        assert all("Authorization" not in r["headers"] for r in object_store.requests)
        assert cache.verify() == []

    def test_error_urls_hide_presigned_query(self, registry, object_store):
        registry.redirect_blobs_to = object_store
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        object_store.blobs.pop(image["layers"][0]["digest"][7:])
        with pytest.raises(zr.NotFoundError) as info:
            make_puller().pull(f"{registry.host}/app:v1")
        assert "s3cr3t" not in str(info.value) and "X-Amz" not in info.value.url
        assert info.value.url.startswith(object_store.url)

    def test_redirect_loop_is_bounded(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        registry.redirect_loop = True
        with pytest.raises(zr.RegistryError, match="more than 10 times"):
            make_puller().pull(f"{registry.host}/app:v1")
        # Config and layer download in parallel; the first to give up cancels
        # the other, so only the one that failed must show every hop.
        hops = [sum(r["path"].endswith(blob["digest"]) for r in registry.requests)
                for blob in (image["config"], image["layers"][0])]
        assert max(hops) == zr.MAX_REDIRECTS + 1 and min(hops) <= zr.MAX_REDIRECTS + 1

    def test_redirect_to_plain_http_remote_is_refused(self, registry):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        digest = image["layers"][0]["digest"]
        registry.faults.append(lambda m, p, h: {"status": 302, "body": b"", "headers": {
            "Location": "http://blobs.example.com/x"}} if p.endswith(digest) else None)
        with pytest.raises(zr.RegistryError, match="refusing plain http to blobs.example.com"):
            make_puller().pull(f"{registry.host}/app:v1")

    def test_tokens_are_not_shared_between_credentials(self, registry):
        registry.auth = "bearer"
        registry.add_image("private", "v1", [layer_bytes(1, 500)])
        puller = make_puller()
        puller.fetch_manifest(f"{registry.host}/private:v1", zr.RegistryAuth.basic("user", "secret"))
        assert len(registry.token_requests) == 1
        puller.fetch_manifest(f"{registry.host}/private:v1", zr.RegistryAuth.anonymous())
        assert len(registry.token_requests) == 2  # the anonymous call got its own token
        assert registry.token_requests[1]["authorization"] is None

    def test_multiple_www_authenticate_headers(self, registry):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1, 100)])
        original = registry._challenge
        # A Basic challenge first, on its own header line, then the Bearer one.
        handler_send = fake._Base.send_body

        def send_body(h, status, body, headers=None, content_type="application/json"):
            if status == 401:
                h.send_response(401)
                h.send_header("WWW-Authenticate", 'Basic realm="reg"')
                h.send_header("WWW-Authenticate", original())
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            handler_send(h, status, body, headers, content_type)
        fake._Base.send_body = send_body
        try:
            manifest, _ = make_puller().pull(f"{registry.host}/app:v1")  # anonymous bearer works
        finally:
            fake._Base.send_body = handler_send
        assert manifest.media_type == fake.OCI_MANIFEST

    def test_several_scopes_are_separate_parameters(self, registry):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1, 100)])
        original = registry._challenge
        registry._challenge = lambda: original() + ',scope="repository:app:pull repository:base:pull"'
        make_puller().pull(f"{registry.host}/app:v1")
        assert registry.token_requests[0]["query"]["scope"] == ["repository:app:pull",
                                                                "repository:base:pull"]

    def test_a_token_with_control_characters_is_refused(self, registry):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1, 100)])
        original = registry._token

        def evil(h, body):
            h.send_body(200, json.dumps({"token": "abc\r\nX-Evil: 1"}).encode())
        registry._token = evil
        try:
            with pytest.raises(zr.AuthError, match="malformed token"):
                make_puller().pull(f"{registry.host}/app:v1")
        finally:
            registry._token = original


# -----------------------------------------------------------------------------
# BLOB STORES, CACHE FILES, CACHE INDEX, DIRECTORY and MEMORY CACHES, WORKER POOL
# -----------------------------------------------------------------------------

class TestCaches:
    @pytest.fixture(params=["memory", "directory", "directory-no-index"])
    def cache(self, request, tmp_path):
        if request.param == "memory":
            return zr.BlobCache()
        cache = zr.BlobCache.open(tmp_path / "c")
        if request.param == "directory-no-index":
            cache._index.sqlite = None
        return cache

    def test_is_empty_until_a_blob_is_stored(self, cache):
        assert cache.is_empty()
        cache.put(zr.compute_digest(b"x"), b"x", "text/plain")
        assert not cache.is_empty()

    def test_directory_with_a_stray_entry_is_not_taken_for_empty(self, tmp_path):
        cache = zr.BlobCache.open(tmp_path / "c")
        (tmp_path / "c" / "blobs" / "sha256").mkdir()
        assert cache.is_empty()
        (tmp_path / "c" / "blobs" / "stray").write_bytes(b"")
        assert not cache.is_empty()

    def test_put_get_has_and_miss_is_none(self, cache):
        data = b"hello"
        digest = zr.compute_digest(data)
        assert cache.get(digest) is None and cache.open_blob(digest) is None
        cache.put(digest, data, "text/plain")
        assert cache.has(digest) and cache.get(digest) == data
        with pytest.raises(zr.DigestMismatchError):
            cache.put(SHA_A, data)
        assert not cache.has(SHA_A)

    def test_writer_restart_and_abort(self, cache):
        data = b"x" * 100
        digest = zr.compute_digest(data)
        writer = cache.begin_write(digest, 100)
        writer.write(b"junk")
        writer.restart()
        writer.write(data)
        writer.commit()
        assert cache.get(digest) == data
        other = b"y" * 10
        writer = cache.begin_write(zr.compute_digest(other), 10)
        writer.write(other[:5])
        writer.abort()
        assert not cache.has(zr.compute_digest(other))

    def test_an_upload_names_its_digest_at_the_end(self, cache):
        data = layer_bytes(81, 70_000)
        digest = zr.compute_digest(data)
        writer = cache.begin_write(size=None)
        assert writer.digest is None
        for start in range(0, len(data), 10_000):
            writer.write(data[start:start + 10_000])
        assert writer.actual_digest() == digest
        assert writer.commit(digest) == digest
        assert cache.get(digest) == data and cache.verify() == []
        wrong = cache.begin_write()
        wrong.write(b"not what it claims")
        with pytest.raises(zr.DigestMismatchError):
            wrong.commit(SHA_A)
        assert not cache.has(SHA_A)
        other = cache.begin_write()
        other.write(b"x")
        with pytest.raises(zr.InvalidDigestError, match="hashed with sha256"):
            other.commit(zr.compute_digest(b"x", "sha512"))
        assert sorted(cache.digests()) == [digest]
        if isinstance(cache, zr.DirectoryBlobCache):
            assert os.listdir(Path(cache.root) / "tmp") == []  # nothing partial is left

    def test_sha512_blobs(self, cache):
        data = b"sha512 content"
        digest = zr.compute_digest(data, "sha512")
        cache.put(digest, data)
        assert cache.get(digest) == data and cache.verify() == []

    def test_prune_is_least_recently_used_first(self, cache):
        blobs = [bytes([i]) * 1000 for i in range(4)]
        digests = [zr.compute_digest(b) for b in blobs]
        for digest, data in zip(digests, blobs):
            cache.put(digest, data)
        if isinstance(cache, zr.DirectoryBlobCache):
            for age, digest in enumerate(digests):
                stamp = 1000 + age
                os.utime(cache.path(digest), (stamp, stamp))
                cache._index.execute("UPDATE blobs SET last_used_at = ? WHERE digest = ?", (stamp, digest))
        else:
            for age, digest in enumerate(digests):
                cache._meta[digest]["last_used_at"] = 1000 + age
        cache.touch([digests[0]])  # used just now: newest
        removed = cache.prune(2000)
        assert removed == [digests[1], digests[2]]
        assert cache.stats()["size_bytes"] == 2000

    def test_gc_keeps_what_references_reach(self, registry, cache):
        image = registry.add_image("app", "v1", [layer_bytes(1, 1000)])
        make_puller(cache).pull(f"{registry.host}/app:v1")
        stray = b"stray"
        cache.put(zr.compute_digest(stray), stray)
        # Reference records are files: without the index gc sees them all the same.
        assert cache.gc() == [zr.compute_digest(stray)]
        assert cache.has(image["digest"]) and cache.has(image["layers"][0]["digest"])

    def test_gc_keeps_images_pulled_by_digest(self, registry, cache):
        image = registry.add_image("app", None, [layer_bytes(2, 1000)])
        pinned = f"{registry.host}/app@{image['digest']}"
        make_puller(cache).pull(pinned)
        assert cache.references()[pinned] == image["digest"]
        assert cache.gc() == []
        assert cache.has(image["digest"]) and cache.has(image["layers"][0]["digest"])

    def test_gc_after_the_index_is_lost_keeps_every_pulled_image(self, registry, tmp_path):
        """The reference records are files: losing index.sqlite loses no reference, and
        the image is then served from the cache by digest with the registry gone."""
        image = registry.add_image("app", "v1", [layer_bytes(61, 3000), layer_bytes(62, 3000)])
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache).pull(f"{registry.host}/app:v1")
        cache.close()
        (tmp_path / "c" / "index.sqlite").unlink()
        for leftover in (tmp_path / "c").glob("index.sqlite-*"):
            leftover.unlink()
        cache = zr.BlobCache.open(tmp_path / "c")
        stray = b"nobody refers to this"
        cache.put(zr.compute_digest(stray), stray)
        assert cache.gc() == [zr.compute_digest(stray)]
        kept = {image["digest"], image["config"]["digest"]} | {
            layer["digest"] for layer in image["layers"]}
        assert set(cache.digests()) == kept
        registry.close()
        puller = make_puller(cache)
        manifest, layers = puller.pull(f"{registry.host}/app@{image['digest']}")
        assert manifest.digest == image["digest"] and len(layers) == 2
        assert puller.request_count == 0

    def test_gc_without_sqlite3_keeps_every_pulled_image(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(63, 3000)])
        code = ("sys.modules['sqlite3'] = None; import zlayer_registry as zr;"
                f"c = zr.BlobCache.open({str(tmp_path / 'c')!r});"
                f"zr.ImagePuller(c, environ={{}}).pull('{registry.host}/app:v1');"
                "c.put(zr.compute_digest(b'stray'), b'stray');"
                "print(c.gc() == [zr.compute_digest(b'stray')], len(list(c.digests())),"
                " sorted(c.references().values()))")
        out = run_python(code)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "3", f"['{image['digest']}']"]
        assert not (tmp_path / "c" / "index.sqlite").exists()
        registry.close()
        puller = make_puller(zr.BlobCache.open(tmp_path / "c"))
        assert puller.pull(f"{registry.host}/app@{image['digest']}")[0].digest == \
            image["digest"]
        assert puller.request_count == 0

    def test_gc_refuses_when_it_cannot_read_every_reference(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(64, 3000)])
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache).pull(f"{registry.host}/app:v1")
        record = next((tmp_path / "c" / "refs").iterdir())
        record.write_bytes(b"{not json")
        before = sorted(cache.digests())
        with pytest.raises(zr.CacheError, match="reference record .* is damaged"):
            cache.gc()
        record.unlink()
        (tmp_path / "c" / "refs").rmdir()
        with pytest.raises(zr.CacheError, match="no reference records"):
            zr.BlobCache.open(tmp_path / "c").gc()
        assert sorted(cache.digests()) == before

    def test_references_an_older_version_kept_in_the_index_become_files(self, tmp_path):
        cache = zr.BlobCache.open(tmp_path / "c")
        manifest = json.dumps({"schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
                               "config": {"mediaType": zr.MEDIA_TYPE_OCI_CONFIG,
                                          "digest": zr.compute_digest(b"{}"), "size": 2},
                               "layers": []}).encode()
        cache.put(zr.compute_digest(b"{}"), b"{}", zr.MEDIA_TYPE_OCI_CONFIG)
        cache.put(zr.compute_digest(manifest), manifest, zr.MEDIA_TYPE_OCI_MANIFEST)
        cache._index.execute("INSERT INTO refs VALUES (?, ?, ?, ?)",
                             ("example.com/old:v1", zr.compute_digest(manifest),
                              zr.MEDIA_TYPE_OCI_MANIFEST, 0.0))
        cache.close()
        shutil.rmtree(tmp_path / "c" / "refs")  # as the older version left the cache
        reopened = zr.BlobCache.open(tmp_path / "c")
        assert [p.name for p in (tmp_path / "c" / "refs").iterdir()] == [
            "example.com%2Fold%3Av1"]
        assert reopened.references() == {"example.com/old:v1": zr.compute_digest(manifest)}
        assert reopened._index.legacy_references() == []
        assert reopened.gc() == []

    def test_reference_records_have_readable_or_hashed_names(self, tmp_path):
        cache = zr.BlobCache.open(tmp_path / "c")
        long_reference = "oci:/" + "d" * 300 + ":v1"
        odd_reference = ".hidden/x y:ä%"
        for reference in (long_reference, odd_reference, "docker.io/library/alpine:3.20"):
            cache.record_reference(reference, SHA_A, zr.MEDIA_TYPE_OCI_MANIFEST)
        names = sorted(p.name for p in (tmp_path / "c" / "refs").iterdir())
        assert names == sorted([
            "%2Ehidden%2Fx%20y%3A%C3%A4%25", "docker.io%2Flibrary%2Falpine%3A3.20",
            "sha256-" + hashlib.sha256(long_reference.encode()).hexdigest()])
        assert zr.BlobCache.open(tmp_path / "c").references() == {
            long_reference: SHA_A, odd_reference: SHA_A, "docker.io/library/alpine:3.20": SHA_A}
        assert cache.forget_reference(odd_reference) and not cache.forget_reference(odd_reference)
        assert cache.lookup_reference(odd_reference) is None
        assert cache.lookup_reference(long_reference) == SHA_A

    def test_cache_rm_forgets_a_reference_so_gc_can_reclaim_it(self, registry, tmp_path):
        kept = registry.add_image("app", "v1", [layer_bytes(97, 2000)])
        gone = registry.add_image("app", "v2", [layer_bytes(98, 2000)])
        cache_dir = str(tmp_path / "c")
        for tag in ("v1", "v2"):
            assert run_cli("pull", f"{registry.host}/app:{tag}", "--cache", cache_dir,
                           cwd=tmp_path).returncode == 0
        out = run_cli("cache", "rm", f"{registry.host}/app:v2", "--cache", cache_dir,
                      cwd=tmp_path)
        assert out.returncode == 0 and f"forgot {registry.host}/app:v2" in out.stdout
        assert run_cli("cache", "gc", "--cache", cache_dir, cwd=tmp_path).returncode == 0
        cache = zr.BlobCache.open(cache_dir)
        assert cache.references() == {f"{registry.host}/app:v1": kept["digest"]}
        assert not cache.has(gone["layers"][0]["digest"]) and cache.has(kept["layers"][0]["digest"])
        again = run_cli("cache", "rm", f"{registry.host}/app:v2", "--cache", cache_dir,
                        cwd=tmp_path)
        assert again.returncode == 1 and "no reference" in again.stderr

    def test_verify_finds_corruption(self, tmp_path):
        cache = zr.BlobCache.open(tmp_path)
        data = b"z" * 1000
        digest = zr.compute_digest(data)
        cache.put(digest, data)
        path = Path(cache.path(digest))
        path.chmod(0o644)
        path.write_bytes(b"Z" + data[1:])
        assert cache.verify() == [digest]
        assert cache.verify(remove=True) == [digest] and not cache.has(digest)

    def test_stale_partial_files_of_dead_processes_are_removed(self, tmp_path):
        zr.BlobCache.open(tmp_path)
        dead = str(dead_pid())
        stale = tmp_path / "tmp" / f"abcd.{dead}.x.partial"
        stale.write_bytes(b"half")
        live = tmp_path / "tmp" / f"abcd.{os.getppid()}.y.partial"
        live.write_bytes(b"in progress")
        zr.BlobCache.open(tmp_path)
        assert not stale.exists() and live.exists()

    def test_unwritable_cache_is_a_cache_error(self, tmp_path):
        target = tmp_path / "file"
        target.write_text("not a directory")
        with pytest.raises(zr.CacheError, match="cannot create cache directory"):
            zr.BlobCache.open(target / "sub")

    def test_many_threads_and_processes_share_one_cache(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(i, 100_000) for i in range(4)])
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import zlayer_registry as zr;"
                f"c = zr.BlobCache.open({str(tmp_path)!r});"
                f"m, l = zr.ImagePuller(c, environ={{}}, platform='linux/amd64')"
                f".pull('{registry.host}/app:v1'); print(m.digest)")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, outputs
        assert {o[0].strip() for o in outputs} == {image["digest"]}
        cache = zr.BlobCache.open(tmp_path)
        assert cache.verify() == [] and os.listdir(tmp_path / "tmp") == []
        assert len(cache.entries()) == 6
        for blob in image["layers"] + [image["config"]]:  # one download per blob: a lock
            assert sum(r["path"].endswith(blob["digest"]) for r in registry.requests) == 1
        assert os.listdir(tmp_path / "locks") == []

    def test_default_path(self):
        assert zr.BlobCache.default_path({"ZLAYER_REGISTRY_CACHE": "/x"}) == "/x"
        assert zr.BlobCache.default_path({"XDG_CACHE_HOME": "/c"}) == "/c/zlayer-registry"
        assert zr.BlobCache.default_path({"HOME": "/h"}) == "/h/.cache/zlayer-registry"

    def test_partial_files_locked_by_a_writer_survive_cleanup(self, tmp_path):
        cache = zr.BlobCache.open(tmp_path)
        writer = cache.begin_write(SHA_A, 10)
        writer.write(b"12345")
        partial = next((tmp_path / "tmp").iterdir())
        # The same name, but as another PID namespace would see it: a dead PID.
        dead = str(dead_pid())
        parts = partial.name.split(".")
        foreign = partial.with_name(".".join([parts[0], dead] + parts[2:]))
        os.rename(partial, foreign)
        writer._tmp_path = str(foreign)
        zr.BlobCache.open(tmp_path)  # cleanup runs: the file is locked, so it stays
        assert foreign.exists()
        writer.abort()
        assert list((tmp_path / "tmp").iterdir()) == []


class TestWorkerPool:
    """The puller's own thread pool: results in order, first error wins, Ctrl-C cancels."""

    @staticmethod
    def _pool(size=3):
        import threading
        exits = []
        pool = zr._WorkerPool(size, "test-pool", lambda: exits.append(threading.current_thread().name))
        return pool, exits

    def test_results_in_order_and_threads_kept_between_batches(self):
        import threading
        pool, exits = self._pool()
        names = set()

        def work(n):
            names.add(threading.current_thread().name)
            return n * n

        assert pool.run(work, list(range(20)), threading.Event()) == [n * n for n in range(20)]
        first = set(pool._threads)
        assert pool.run(work, [5], threading.Event()) == [25]
        assert set(pool._threads) == first and len(first) <= 3
        assert names <= {t.name for t in first}
        pool.close()
        assert sorted(exits) == sorted(t.name for t in first)
        assert not any(t.is_alive() for t in first)

    def test_first_error_cancels_running_and_queued_tasks(self):
        import threading
        pool, _ = self._pool(size=2)
        cancel, started, stopped = threading.Event(), [], []

        def work(n):
            started.append(n)
            if n == 1:
                raise zr.RegistryError("boom")
            if n == 0:  # a running download: stops once cancelled
                assert cancel.wait(10)
                stopped.append(n)
                raise zr._Cancelled()
            return n

        with pytest.raises(zr.RegistryError, match="boom"):
            pool.run(work, list(range(10)), cancel)
        assert cancel.is_set() and stopped == [0]
        assert sorted(started) == [0, 1] and pool._queue == []
        assert pool.run(lambda n: n + 1, [1, 2], threading.Event()) == [2, 3]
        pool.close()

    def test_interrupted_caller_cancels_and_drops_the_queue(self):
        """Ctrl-C while waiting: the caller raises at once; nothing else starts."""
        import signal
        import threading
        pool, _ = self._pool(size=1)
        caller = threading.main_thread().ident
        cancel, release, started = threading.Event(), threading.Event(), []

        def work(n):
            started.append(n)
            if n == 1:
                signal.pthread_kill(caller, signal.SIGINT)  # Ctrl-C
                release.wait(10)
            return n

        with pytest.raises(KeyboardInterrupt):
            pool.run(work, [1, 2, 3], cancel)
        assert cancel.is_set() and pool._queue == []
        release.set()
        pool.close()
        assert started == [1]

    def test_puller_close_ends_its_workers(self, registry):
        registry.add_image("app", "v1", [layer_bytes(1), layer_bytes(2)])
        puller = make_puller()
        puller.pull(f"{registry.host}/app:v1")
        threads = list(puller._session._workers._threads)
        assert threads and all(t.is_alive() for t in threads)
        puller.close()
        assert not any(t.is_alive() for t in threads) and puller._session._workers is None

    def test_closing_the_pool_mid_run_ends_the_wait(self):
        import time as _time
        pool = zr._WorkerPool(1, "t", lambda: None)
        outcome = []

        def caller():
            try:
                pool.run(lambda n: _time.sleep(0.2) or n, [1, 2, 3], _threading.Event())
            except zr.ZLayerError as exc:
                outcome.append(str(exc))

        thread = _threading.Thread(target=caller)
        thread.start()
        while not pool._threads:
            _time.sleep(0.01)
        pool.close()
        thread.join(10)
        assert not thread.is_alive() and outcome == ["the puller was closed in the middle of a pull"]

    def test_a_thread_that_cannot_start_leaves_nothing_queued(self, monkeypatch):
        pool = zr._WorkerPool(2, "t", lambda: None)

        def refuse(self):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(_threading.Thread, "start", refuse)
        with pytest.raises(zr.ZLayerError, match="cannot start a download thread"):
            pool.run(lambda n: n, [1, 2, 3], _threading.Event())
        assert pool._queue == []


class TestDirectIoWriter:
    """Large blobs go through a staging buffer, written with O_DIRECT where the file system
    allows it; every path must store exactly the bytes received."""

    # More than one stage, and a tail that is not a multiple of the alignment.
    SIZE = zr._DIRECT_IO_MIN_BYTES + 3 * zr._DIRECT_IO_STAGE_BYTES // 2 + 1234
    PIECES = (1, 4095, 4097, 65536, zr._DIRECT_IO_STAGE_BYTES, 7, 300_001)

    @staticmethod
    def _receive(writer, data: bytes, pieces) -> None:
        """Feed ``data`` the way the puller does: into ``buffer()``, then ``filled(n)``."""
        position, turn = 0, 0
        while position < len(data):
            view = writer.buffer()
            count = min(pieces[turn % len(pieces)], len(view), len(data) - position)
            view[:count] = data[position:position + count]
            writer.filled(count)
            position, turn = position + count, turn + 1

    @staticmethod
    def _direct_flag(writer) -> bool:
        import fcntl
        return bool(fcntl.fcntl(writer._fd, fcntl.F_GETFL) & os.O_DIRECT)

    def _store(self, tmp_path, pieces=PIECES, restart_after: int = 0, faked: bool = False):
        data = layer_bytes(11, self.SIZE)
        digest = zr.compute_digest(data)
        cache = zr.BlobCache.open(tmp_path / "c")
        writer = cache.begin_write(digest, len(data), "application/octet-stream")
        staged = writer._stage is not None
        if hasattr(os, "O_DIRECT") and not faked:
            assert self._direct_flag(writer) == staged
        if restart_after:
            self._receive(writer, layer_bytes(12, restart_after), pieces)
            writer.restart()
        self._receive(writer, data, pieces)
        writer.commit()
        assert Path(cache.path(digest)).read_bytes() == data
        assert list((tmp_path / "c" / "tmp").iterdir()) == []
        return staged

    def test_uneven_pieces_and_an_unaligned_tail(self, tmp_path):
        self._store(tmp_path)

    def test_restart_in_the_middle_of_a_stage(self, tmp_path):
        self._store(tmp_path, restart_after=zr._DIRECT_IO_STAGE_BYTES + 5000)

    def test_plain_write_of_a_large_blob(self, tmp_path):
        data = layer_bytes(13, self.SIZE)
        cache = zr.BlobCache.open(tmp_path / "c")
        cache.put(zr.compute_digest(data), data)
        assert cache.get(zr.compute_digest(data)) == data

    def test_small_blobs_and_the_opt_out_are_not_staged(self, tmp_path, monkeypatch):
        cache = zr.BlobCache.open(tmp_path / "c")
        small = cache.begin_write(SHA_A, zr._DIRECT_IO_MIN_BYTES - 1)
        assert small._stage is None
        small.abort()
        monkeypatch.setenv("ZLAYER_NO_DIRECT_IO", "1")
        assert self._store(tmp_path / "off") is False

    def test_a_refused_direct_write_falls_back_to_buffered(self, tmp_path, monkeypatch):
        """A file system that takes the flag but refuses the write (EINVAL) still gets the blob."""
        import errno
        monkeypatch.setattr(zr, "_set_direct_io", lambda fd, enable: True)
        real_write, refused = os.write, []

        def write(fd, data):
            if len(data) >= zr._DIRECT_IO_ALIGN_BYTES and not refused:
                refused.append(len(data))
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)

        monkeypatch.setattr(zr.os, "write", write)
        assert self._store(tmp_path, faked=True) is True
        assert refused == [zr._DIRECT_IO_STAGE_BYTES]

    def test_short_direct_write_falls_back_to_buffered(self, tmp_path, monkeypatch):
        monkeypatch.setattr(zr, "_set_direct_io", lambda fd, enable: True)
        real_write, shortened = os.write, []

        def write(fd, data):
            if len(data) == zr._DIRECT_IO_STAGE_BYTES and not shortened:
                shortened.append(fd)
                return real_write(fd, data[:zr._DIRECT_IO_ALIGN_BYTES * 3])
            return real_write(fd, data)

        monkeypatch.setattr(zr.os, "write", write)
        assert self._store(tmp_path, faked=True) is True and len(shortened) == 1

    def test_a_failed_truncate_on_restart_is_a_cache_error_and_leaves_nothing(
            self, tmp_path, monkeypatch):
        import errno
        cache = zr.BlobCache.open(tmp_path / "c")
        writer = cache.begin_write(SHA_A, self.SIZE, "application/octet-stream")
        self._receive(writer, layer_bytes(15, 10_000), self.PIECES)

        def ftruncate(fd, length):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(zr.os, "ftruncate", ftruncate)
        with pytest.raises(zr.CacheError, match="Input/output error"):
            writer.restart()
        assert list((tmp_path / "c" / "tmp").iterdir()) == []

    def test_dropped_connection_in_the_middle_of_a_stage_resumes_there(self, registry, sleeps,
                                                                        tmp_path):
        data = layer_bytes(14, self.SIZE)
        image = registry.add_image("app", "v1", [data])
        digest = image["layers"][0]["digest"]
        cut = zr._DIRECT_IO_STAGE_BYTES * 2 + 100_001
        registry.faults.append(lambda m, p, h: {"drop_after": cut} if p.endswith(digest) else None)
        cache = zr.BlobCache.open(tmp_path)
        result = make_puller(cache, sleeps=sleeps).pull_image(f"{registry.host}/app:v1")
        blob_gets = [r for r in registry.requests if r["path"].endswith(digest)]
        assert [r["headers"].get("Range") for r in blob_gets] == [None, f"bytes={cut}-"]
        assert Path(result.layers[0].path).read_bytes() == data


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------

class TestCli:
    def test_quiet_prints_only_the_digest_or_nothing(self, registry, tmp_path):
        config = {"architecture": "amd64", "os": "linux", "created": "2026-01-02T03:04:05Z",
                  "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"],
                             "Env": ["PATH=/bin", "MODE=prod"], "WorkingDir": "/srv"}}
        image = registry.add_image("app", "v1", [make_layer([F("f", b"x")])], config=config)
        cache = ["--cache", str(tmp_path / "c")]
        ref = f"{registry.host}/app:v1"
        digest = image["digest"]
        for args, expected in ((["pull", ref], digest), (["inspect", ref], digest),
                               (["export", ref, f"oci:{tmp_path}/l:v1"], digest),
                               (["import", f"oci:{tmp_path}/l:v1"], digest),
                               (["unpack", ref, str(tmp_path / "root")], ""),
                               (["cache", "ls"], ref + "\n" + f"oci:{tmp_path}/l:v1"),
                               (["cache", "verify"], ""), (["cache", "gc"], "")):
            out = run_cli(*args, "-q", *cache, cwd=tmp_path)
            assert out.returncode == 0, (args, out.stderr)
            assert out.stdout.strip() == expected, args
        text = run_cli("inspect", ref, *cache, cwd=tmp_path).stdout
        for line in ("created:    2026-01-02T03:04:05Z", 'entrypoint: ["/bin/app"]',
                     'cmd:        ["--serve"]', "workdir:    /srv", "  env       MODE=prod"):
            assert line in text, line
        zr.BlobCache.open(tmp_path / "one").put(zr.compute_digest(b"x"), b"x")
        listed = run_cli("cache", "ls", "--cache", str(tmp_path / "one"), cwd=tmp_path).stdout
        assert listed.splitlines()[-1].startswith("1 blob, 1 B in ")

    def test_pull_json(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"),
                      "--json", "--platform", "linux/amd64", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["reference"] == f"{registry.host}/app:v1"
        assert data["digest"] == image["digest"]
        assert data["media_type"] == fake.OCI_MANIFEST
        assert data["config"]["digest"] == image["config"]["digest"]
        assert [l["digest"] for l in data["layers"]] == [l["digest"] for l in image["layers"]]
        assert data["artifact_type"] == "container"
        assert data["platform"] == "linux/amd64"  # a single image: from its config
        assert data["bytes_downloaded"] > 0 and data["bytes_from_cache"] == 0
        assert out.stderr == ""  # not a tty: no progress

    def test_exit_skips_teardown_but_closes_the_index_and_flushes(self, registry, tmp_path):
        """The CLI ends with os._exit: the cache index must be closed (its WAL checkpointed
        away) and every line of output written first."""
        image = registry.add_image("app", "v1", [layer_bytes(1), layer_bytes(2)])
        cache = tmp_path / "c"
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(cache), "--json",
                      cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["digest"] == image["digest"]
        assert (cache / "index.sqlite").exists()
        assert not (cache / "index.sqlite-wal").exists()
        listing = run_cli("cache", "ls", "--cache", str(cache), cwd=tmp_path)
        assert listing.returncode == 0 and image["digest"] in listing.stdout
        assert sum(d["digest"] in listing.stdout for d in image["layers"]) == 2

    def test_sizes_and_a_cache_path_that_is_a_file(self, tmp_path):
        assert [zr._parse_size(t) for t in ("1.5G", "500M", "2gib", "1024")] == [
            3 * 2 ** 29, 500 * 2 ** 20, 2 * 2 ** 30, 1024]
        (tmp_path / "afile").write_text("x")
        out = run_cli("cache", "ls", "--cache", str(tmp_path / "afile"), cwd=tmp_path)
        assert out.returncode == 1 and "is not a directory, so not a cache" in out.stderr

    def test_retries_after_a_slow_attempt_are_announced(self):
        now, slept, err = [100.0], [], io.StringIO()

        def sleep(seconds):
            slept.append(seconds)
            now[0] += seconds

        wait = zr._retry_announcer(clock=lambda: now[0], sleep=sleep, stream=err)
        now[0] += 0.2          # a refused connection: quick, retried quietly
        wait(0.25)
        assert err.getvalue() == ""
        now[0] += 30.0         # a stalled registry: the read timed out
        wait(0.5)
        assert err.getvalue() == "zlayer-registry: no answer for 30 s; retrying in 0.5 s\n"
        assert slept == [0.25, 0.5]

    def test_quiet_pull_and_env_cache(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1)])
        out = run_cli("pull", "-q", f"{registry.host}/app:v1", cwd=tmp_path,
                      env={"ZLAYER_REGISTRY_CACHE": str(tmp_path / "envcache")})
        assert out.returncode == 0 and out.stdout.strip() == image["digest"]
        assert (tmp_path / "envcache" / "blobs" / "sha256" / image["digest"][7:]).exists()

    def test_inspect_index_json(self, registry, tmp_path):
        amd = registry.add_image("multi", None, [layer_bytes(10)])
        arm = registry.add_image("multi", None, [layer_bytes(11)])
        registry.add_index("multi", "v1", [({"os": "linux", "architecture": "amd64"}, amd),
                                           ({"os": "linux", "architecture": "arm", "variant": "v7"},
                                            arm)])
        out = run_cli("inspect", f"{registry.host}/multi:v1", "--json", "--platform",
                      "linux/arm/v7", "--cache", str(tmp_path), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["platforms"] == [
            {"os": "linux", "architecture": "amd64", "variant": "", "digest": amd["digest"]},
            {"os": "linux", "architecture": "arm", "variant": "v7", "digest": arm["digest"]}]
        assert data["manifest_digest"] == arm["digest"]
        assert registry.count("GET", "blobs") == 1  # the config only, no layers
        # pull --json names the two digests with the same keys.
        pulled = json.loads(run_cli("pull", f"{registry.host}/multi:v1", "--json", "--platform",
                                    "linux/arm/v7", "--cache", str(tmp_path), cwd=tmp_path).stdout)
        assert data["index_digest"] == pulled["index_digest"] == data["digest"]
        assert data["manifest_digest"] == pulled["manifest_digest"] == pulled["digest"]
        single = registry.add_image("one", "v1", [layer_bytes(12)])
        for command in ("inspect", "pull"):
            data = json.loads(run_cli(command, f"{registry.host}/one:v1", "--json", "--cache",
                                      str(tmp_path), cwd=tmp_path).stdout)
            assert (data["platform"], data["index_digest"], data["manifest_digest"]) == (
                "linux/amd64", None, single["digest"]), command

    def test_cli_uses_docker_config_credentials(self, registry, tmp_path):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1)])
        _write_json(tmp_path / "dc" / "config.json",
                    {"auths": {registry.host: {"auth": _b64("user:secret")}}})
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path, env={"DOCKER_CONFIG": str(tmp_path / "dc")})
        assert out.returncode == 0, out.stderr
        assert registry.token_requests[0]["authorization"] == "Basic " + _b64("user:secret")

    @pytest.mark.parametrize("args, code, text", [
        (["pull"], 2, "required: REF"),
        (["pull", "x", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["frobnicate"], 2, "invalid choice"),
        (["cache"], 2, "cache needs an action"),
        (["cache", "prune", "--max-bytes", "lots"], 2, "invalid size"),
        (["pull", "Bad/Name:tag"], 1, "repository names must be lowercase"),
        (["pull", "app:-x"], 1, "invalid tag"),
        (["pull", "127.0.0.1:9/app", "--platform", "linux"], 2, "invalid platform"),
        (["export", "127.0.0.1:9/app", "bogus:dest"], 2, "unsupported location"),
        (["pull", "127.0.0.1:9/app", "--max-workers", "abc"], 2, "at least 1, got 'abc'"),
        (["pull", "--bogus", "127.0.0.1:9/app"], 2, "see 'zlayer-registry pull --help'"),
        (["pull", "127.0.0.1:9/app", "--creds", ":pw-secret"], 2, "expected USER[:PASS]"),
        (["pull", "127.0.0.1:9/app", "--creds", "u:p", "--authfile", "f"], 2, "not allowed"),
        (["pull", "127.0.0.1:9/app", "--authfile", "/no/such.json"], 1, "no such file"),
        (["pull", "127.0.0.1:9/app", "--creds", "user", "pw-secret"], 2,
         "1 unrecognized argument (not shown, as --creds is given"),
        (["pull", "127.0.0.1:9/app", "--creds=u:pw-secret", "--x", "--y"], 2,
         "2 unrecognized arguments (not shown"),
        (["pull", "127.0.0.1:9/app", "--creds", "alice:pw-secret", "--platform", "x"], 2,
         "invalid platform"),
        (["pull", "127.0.0.1:9/app", "--creds", "user:"], 2, "expected a password"),
    ])
    def test_bad_input_is_one_line_and_exit_code(self, args, code, text, tmp_path):
        out = run_cli(*args, "--cache", str(tmp_path), cwd=tmp_path) if args[0] == "pull" \
            else run_cli(*args, cwd=tmp_path)
        assert out.returncode == code
        assert text in out.stderr and "pw-secret" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr

    def test_a_creds_usage_error_keeps_the_user_name(self, tmp_path):
        out = run_cli("pull", "127.0.0.1:9/app", "--creds", "alice", "--cache", str(tmp_path),
                      input="", cwd=tmp_path)
        assert out.returncode == 2 and "--creds alice: no password given" in out.stderr

    @pytest.mark.parametrize("how", ["inline", "stdin", "authfile"])
    def test_cli_credentials_from_flags(self, registry, tmp_path, how):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1)])
        # The default config holds wrong credentials: the flags replace it.
        _write_json(tmp_path / "dc" / "config.json",
                    {"auths": {registry.host: {"auth": _b64("user:wrong")}}})
        _write_json(tmp_path / "auth.json", {"auths": {registry.host: {"auth": _b64("user:secret")}}})
        flags = {"inline": ["--creds", "user:secret"], "stdin": ["--creds", "user"],
                 "authfile": ["--authfile", str(tmp_path / "auth.json")]}[how]
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"), "-q",
                      *flags, input="secret\n", cwd=tmp_path,
                      env={"DOCKER_CONFIG": str(tmp_path / "dc")})
        assert out.returncode == 0, out.stderr
        assert [r["authorization"] for r in registry.token_requests] == ["Basic " + _b64("user:secret")]

    def test_cli_wrong_creds_name_their_source_not_the_password(self, registry, tmp_path):
        registry.auth = "basic"
        registry.users = {"user": "right-pw"}
        registry.add_image("app", "v1", [layer_bytes(1)])
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"),
                      "--creds", "user:wrong-pw-123", cwd=tmp_path)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
        assert "rejected the credentials of 'user' (from --creds)" in out.stderr
        assert "wrong-pw-123" not in out.stderr + out.stdout

    def test_auth_failure_never_prints_the_secret(self, registry, tmp_path):
        registry.auth = "bearer"
        registry.add_image("app", "v1", [layer_bytes(1)])
        _write_json(tmp_path / "dc" / "config.json",
                    {"auths": {registry.host: {"auth": _b64("user:topsecretpw")}}})
        out = run_cli("--debug", "pull", f"{registry.host}/app:v1", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path, env={"DOCKER_CONFIG": str(tmp_path / "dc")})
        assert out.returncode == 1
        assert "topsecretpw" not in out.stderr + out.stdout
        assert _b64("user:topsecretpw") not in out.stderr + out.stdout

    def test_cache_commands(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1, 5000)])
        cache_dir = str(tmp_path / "c")
        assert run_cli("pull", f"{registry.host}/app:v1", "--cache", cache_dir,
                       cwd=tmp_path).returncode == 0
        listing = json.loads(run_cli("cache", "ls", "--json", "--cache", cache_dir,
                                     cwd=tmp_path).stdout)
        assert {b["digest"] for b in listing["blobs"]} == {
            image["digest"], image["config"]["digest"], image["layers"][0]["digest"]}
        assert listing["references"] == {f"{registry.host}/app:v1": image["digest"]}
        ok = run_cli("cache", "verify", "--cache", cache_dir, cwd=tmp_path)
        assert ok.returncode == 0 and "0 corrupt" in ok.stdout
        layer_path = Path(cache_dir) / "blobs" / "sha256" / image["layers"][0]["digest"][7:]
        layer_path.chmod(0o644)
        layer_path.write_bytes(b"!" * 5000)
        bad = run_cli("cache", "verify", "--cache", cache_dir, cwd=tmp_path)
        assert bad.returncode == 1 and image["layers"][0]["digest"] in bad.stdout
        assert "3 blobs checked, 1 corrupt" in bad.stdout
        removed = run_cli("cache", "verify", "--remove", "--cache", cache_dir, cwd=tmp_path)
        assert removed.returncode == 1 and "3 blobs checked, 1 corrupt" in removed.stdout
        assert run_cli("pull", f"{registry.host}/app:v1", "--cache", cache_dir,
                       cwd=tmp_path).returncode == 0  # fetches just the removed layer
        pruned = run_cli("cache", "prune", "--max-bytes", "0", "--cache", cache_dir, cwd=tmp_path)
        assert pruned.returncode == 0 and "removed 3 blobs" in pruned.stdout
        assert run_cli("cache", "gc", "--cache", cache_dir, cwd=tmp_path).returncode == 0

    def test_help_has_examples_for_every_command(self, tmp_path):
        for command in ("pull", "inspect", "cache"):
            out = run_cli(command, "--help", cwd=tmp_path)
            assert out.returncode == 0 and "examples:" in out.stdout
            assert f"zlayer-registry {command}" in out.stdout

    def test_a_named_subcommand_builds_only_its_parser_with_the_same_help(self):
        full = zr._build_parser()
        full_subcommands = next(a for a in full._actions if a.dest == "command").choices
        assert sorted(full_subcommands) == sorted(zr._COMMANDS)
        for name in zr._COMMANDS:
            assert zr._named_subcommand([name, "x"]) == name
            assert zr._named_subcommand(["--debug", name]) == name
            lean = zr._build_parser(name)
            lean_subcommands = next(a for a in lean._actions if a.dest == "command").choices
            assert list(lean_subcommands) == [name]
            assert lean_subcommands[name].format_help() == full_subcommands[name].format_help()
        # Top-level help, --version and unknown commands need every subcommand.
        for args in ([], ["-h", "pull"], ["--version"], ["pul", "x"], ["--debug"]):
            assert zr._named_subcommand(args) is None

    def test_an_image_for_another_platform_is_pulled_with_a_warning(self, registry, tmp_path):
        host = zr.host_platform()
        foreign = "arm64" if host.architecture != "arm64" else "amd64"
        registry.add_image("app", "v1", [layer_bytes(1, 1000)],
                           config={"os": "linux", "architecture": foreign})
        registry.add_image("app", "native", [layer_bytes(2, 1000)],
                           config={"os": host.os, "architecture": host.architecture})
        cache = str(tmp_path / "c")
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", cache, "-q", cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == (
            f"zlayer-registry: warning: {registry.host}/app:v1 is a linux/{foreign} image; "
            f"this host is {host}\n")
        out = run_cli("pull", f"{registry.host}/app:v1", "--cache", cache, "-q",
                      "--platform", f"linux/{foreign}", cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == ""  # asked for: no warning
        out = run_cli("pull", f"{registry.host}/app:native", "--cache", cache, "-q", cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == ""

    def test_cache_commands_create_nothing_and_take_debug_after_the_action(self, tmp_path):
        out = run_cli("cache", "ls", "--debug", "--cache", str(tmp_path / "typo"), cwd=tmp_path)
        assert out.returncode == 1 and "Traceback" in out.stderr  # --debug was taken
        assert "error: no cache at" in out.stderr.splitlines()[-1]
        out = run_cli("cache", "verify", "--cache", str(tmp_path / "typo"), cwd=tmp_path)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no cache at" in out.stderr
        assert not (tmp_path / "typo").exists()

    def test_oci_location_without_a_directory_is_a_usage_error(self, tmp_path):
        out = run_cli("export", "127.0.0.1:9/app:v1", "oci::v1", cwd=tmp_path)
        assert out.returncode == 2 and "names no file or directory" in out.stderr
        assert os.listdir(tmp_path) == []

    def test_a_reader_that_goes_away_ends_the_command_quietly(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(i, 1000) for i in range(40)])
        cache = str(tmp_path / "c")
        assert run_cli("pull", f"{registry.host}/app:v1", "--cache", cache, "-q",
                       cwd=tmp_path).returncode == 0
        process = start_cli("cache", "ls", "--cache", cache, home=tmp_path, text=False)
        process.stdout.close()  # as `| head -0` would, before the first line
        _, err = process.communicate(timeout=60)
        assert process.returncode == 141 and err == b""

    def test_main_returns_codes_in_process(self, capsys):
        assert zr.main(["pull", "UPPER"]) == 1
        assert "lowercase" in capsys.readouterr().err
        assert zr.main([]) == 2


class TestProgress:
    def test_each_blob_ends_on_one_done_line(self):
        stream = io.StringIO()
        now = [0.0]
        progress = zr._Progress(stream, clock=lambda: now[0])
        a = zr.Descriptor("m", SHA_A, 2000)
        b = zr.Descriptor("m", SHA_B, 1000)
        for step in range(1, 11):
            now[0] += 0.5
            progress(a, 200 * step, 2000)
            if step <= 5:
                progress(b, 200 * step, 1000)
        text = stream.getvalue()
        assert text.count("done") == 2
        assert text.count(SHA_A[:19] + "     2.0 KiB / 2.0 KiB     done") == 1
        assert "KiB/s" in text  # a rate while in progress
        progress.finish()
        assert stream.getvalue().rstrip("\n").rsplit("\n", 1)[-1].endswith(
            "total 2 blobs     2.9 KiB / 2.9 KiB     667 B/s")

    def test_lines_fit_the_terminal_and_a_dumb_one_gets_plain_lines(self):
        for env, redrawn in (({"COLUMNS": "40"}, True), ({"TERM": "dumb", "COLUMNS": "200"},
                                                        False)):
            stream, now = io.StringIO(), [0.0]
            progress = zr._Progress(stream, clock=lambda: now[0], environ=env, verb="unpack")
            for step in range(1, 6):
                now[0] += 0.5
                progress(zr.Descriptor("m", SHA_A, 5000), 1000 * step, 5000)
            progress.finish()
            text = stream.getvalue()
            assert ("\x1b[" in text) is redrawn
            lines = [line for line in re.sub(r"\x1b\[\d*[A-Za-z]", "", text).split("\n") if line]
            assert all(line.startswith("unpack ") for line in lines)
            if redrawn:
                assert max(len(line) for line in lines) <= 39
            else:  # one line as the blob ends, one total
                assert lines == [f"unpack {SHA_A[:19]}     4.9 KiB / 4.9 KiB     done",
                                 "unpack total 1 blob     4.9 KiB / 4.9 KiB     2.4 KiB/s"]

    def test_unpack_reports_progress_per_layer(self, registry, tmp_path):
        registry.add_image("app", "v1", [make_layer([F(f"f{i}", layer_bytes(i, 5000))
                                                     for i in range(50)]),
                                         make_layer([F("g", b"g")])])
        seen = []
        make_puller(zr.BlobCache()).unpack(f"{registry.host}/app:v1", tmp_path / "root",
                                           progress=lambda d, done, total: seen.append(
                                               (d.digest, done, total)))
        finals = [entry for entry in seen if entry[1] == entry[2]]
        assert len(finals) == 2 and len({digest for digest, _, _ in finals}) == 2


# -----------------------------------------------------------------------------
# WASM DETECTION and WASM ARTIFACTS: detection, pull_wasm, export
# -----------------------------------------------------------------------------

CORE_MODULE = b"\0asm\x01\x00\x00\x00"            # the smallest valid core module
COMPONENT = b"\0asm\x0d\x00\x01\x00"              # component-model preamble
# A core module with one exported function: (module (func (export "f")))
CORE_WITH_FUNC = bytes.fromhex("0061736d01000000010401600000030201000705010166000"
                               "00a040102000b")


def _wasm_manifest(config_type=fake.OCI_CONFIG, layer_type=fake.OCI_LAYER_GZIP,
                   artifact_type=None, title=None):
    layer = {"mediaType": layer_type, "digest": SHA_B, "size": 8}
    if title:
        layer["annotations"] = {"org.opencontainers.image.title": title}
    data = {"schemaVersion": 2, "mediaType": fake.OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": SHA_A, "size": 2},
            "layers": [layer]}
    if artifact_type:
        data["artifactType"] = artifact_type
    return data


P1, P2, UNK = zr.WasiVersion.PREVIEW1, zr.WasiVersion.PREVIEW2, zr.WasiVersion.UNKNOWN


class TestWasmDetection:
    @pytest.mark.parametrize("manifest, config, expected", [
        # 1. artifactType
        (_wasm_manifest(artifact_type="application/vnd.wasm.component.v1+wasm"), None, P2),
        (_wasm_manifest(artifact_type="application/vnd.wasm.module.v1+wasm"), None, P1),
        # 2. config media types (CNCF v0 as pushed by wkg; wasm-to-oci v1)
        (_wasm_manifest(config_type="application/vnd.wasm.config.v0+json"), None, UNK),
        (_wasm_manifest(config_type="application/vnd.wasm.config.v1+json"), None, UNK),
        # 3. layer media types, including runwasi's
        (_wasm_manifest(layer_type="application/wasm"), None, UNK),
        (_wasm_manifest(layer_type="application/vnd.wasm.content.layer.v1+wasm"), None, UNK),
        (_wasm_manifest(layer_type="application/vnd.module.wasm.content.layer.v1+wasm"), None, UNK),
        (_wasm_manifest(layer_type="application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"),
         None, P2),
        # 4. config os/architecture (runwasi, ordinary image config type) and component
        (_wasm_manifest(), {"os": "wasip1", "architecture": "wasm"}, P1),
        (_wasm_manifest(), {"os": "wasip2", "architecture": "wasm"}, P2),
        (_wasm_manifest(), {"os": "wasi", "architecture": "wasm"}, UNK),
        (_wasm_manifest(config_type="application/vnd.wasm.config.v0+json"),
         {"architecture": "wasm", "os": "wasip1", "component": {"exports": []}}, P2),
        (_wasm_manifest(config_type="application/vnd.wasm.config.v0+json"),
         {"architecture": "wasm", "os": "wasip2"}, P2),
        # conflicts: the most specific signal wins
        (_wasm_manifest(artifact_type="application/vnd.wasm.module.v1+wasm"),
         {"os": "wasip2", "architecture": "wasm"}, P1),
        (_wasm_manifest(artifact_type="application/vnd.example.thing",
                        layer_type="application/wasm"), None, UNK),
        # containers, whatever the name says
        (_wasm_manifest(title="my-wasm-module.wasm"), {"os": "linux", "architecture": "amd64"},
         None),
        (_wasm_manifest(), None, None),
    ])
    def test_signals(self, manifest, config, expected):
        kind = zr.detect_artifact_type(manifest, config)
        parsed = zr.parse_manifest(json.dumps(manifest).encode())
        assert zr.detect_artifact_type(parsed, config) == kind  # object or JSON alike
        if expected is None:
            assert kind.is_container() and not kind.is_wasm() and kind.wasi_version() is None
            assert zr.extract_wasm_info(manifest, config) is None
        else:
            assert kind.is_wasm() and kind.wasi_version() is expected

    @pytest.mark.parametrize("data, expected", [
        (CORE_MODULE, P1), (CORE_WITH_FUNC, P1), (COMPONENT, P2),
        (b"\0asm\x02\x00\x00\x00", UNK), (b"\0asm\x01", None), (b"\x7fELF\x02\x01\x01\x00", None),
        (b"", None)])
    def test_bytes(self, data, expected):
        assert zr.wasi_version_from_bytes(data[:8]) is expected

    def test_value_types(self):
        assert [str(v) for v in (P1, P2, UNK)] == ["wasip1", "wasip2", "unknown"]
        assert [v.target_triple_suffix() for v in (P1, P2, UNK)] == \
            ["wasm32-wasip1", "wasm32-wasip2", "wasm32-wasi"]
        assert P1.is_preview1() and not P1.is_preview2() and P2.is_preview2()
        assert str(zr.ArtifactType.wasm(P2)) == "wasm" and str(zr.ArtifactType.container()) == \
            "container"
        from zlayer_registry import wasm  # the seed's `wasm` module, as a namespace
        assert wasm.detect_artifact_type is sys.modules["zlayer_registry"].detect_artifact_type
        assert zr.wasm.WasiVersion is zr.WasiVersion and "WasiVersion" in repr(wasm)

    def test_extract_info(self):
        manifest = _wasm_manifest(layer_type="application/wasm", title="hello.wasm")
        info = zr.extract_wasm_info(manifest)
        assert info == zr.WasmArtifactInfo(UNK, SHA_B, 8, "hello.wasm")
        untitled = _wasm_manifest(layer_type="application/wasm")
        assert zr.extract_wasm_info(untitled, {"os": "wasip1", "architecture": "wasm",
                                               "config": {"Labels": {
                                                   "org.opencontainers.image.title": "lbl"}}}
                                    ).module_name == "lbl"


def _push_wasm(registry, repository, tag, data, config=None, config_type=zr.WASM_CONFIG_V0,
               layer_type="application/wasm", artifact_type=None, title="mod.wasm"):
    config_blob = json.dumps(config if config is not None else {"architecture": "wasm"}).encode()
    config_desc = dict(registry.add_blob(config_blob), mediaType=config_type)
    layer = dict(registry.add_blob(data), mediaType=layer_type,
                 annotations={"org.opencontainers.image.title": title})
    manifest = {"schemaVersion": 2, "mediaType": fake.OCI_MANIFEST, "config": config_desc,
                "layers": [layer]}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    digest = registry.add_manifest(repository, tag, manifest)
    return {"digest": digest, "size": len(registry.manifests[(repository, digest)][0]),
            "mediaType": fake.OCI_MANIFEST, "layer": layer}


class TestWasmPull:
    def test_pull_wasm_resolves_unknown_version_from_bytes(self, registry):
        pushed = _push_wasm(registry, "fn", "v1", COMPONENT)
        data, info = make_puller().pull_wasm(f"{registry.host}/fn:v1")
        assert data == COMPONENT
        assert info == zr.WasmArtifactInfo(P2, pushed["layer"]["digest"], 8, "mod.wasm")

    def test_pull_wasm_of_a_container_is_an_error(self, registry):
        registry.add_image("app", "v1", [layer_bytes(1)])
        with pytest.raises(zr.ManifestError, match="container image, not a WebAssembly"):
            make_puller().pull_wasm(f"{registry.host}/app:v1")

    def test_layer_declared_wasm_that_is_not(self, registry):
        _push_wasm(registry, "fn", "bad", b"#!/bin/sh\necho hi\n")
        with pytest.raises(zr.ManifestError, match="declared as WebAssembly but its bytes are not"):
            make_puller().pull_wasm(f"{registry.host}/fn:bad")

    def test_mixed_index(self, registry, tmp_path):
        linux = registry.add_image("mixed", None, [layer_bytes(1)])
        p1 = _push_wasm(registry, "mixed", None, CORE_WITH_FUNC, config_type=fake.OCI_CONFIG,
                        config={"os": "wasip1", "architecture": "wasm"},
                        layer_type="application/vnd.wasm.content.layer.v1+wasm")
        p2 = _push_wasm(registry, "mixed", None, COMPONENT)
        registry.add_index("mixed", "v1", [
            ({"os": "linux", "architecture": "amd64"}, linux),
            ({"os": "wasip1", "architecture": "wasm"}, p1),
            ({"os": "wasip2", "architecture": "wasm"}, p2)])
        ref = f"{registry.host}/mixed:v1"
        assert make_puller(platform=None).pull_wasm(ref)[0] == COMPONENT  # wasip2 preferred
        data, info = make_puller(platform="wasip1/wasm").pull_wasm(ref)
        assert data == CORE_WITH_FUNC and info.wasi_version is P1
        assert make_puller().pull_image(ref).artifact_type.is_container()  # host: linux/amd64
        out = run_cli("inspect", ref, "--json", "--cache", str(tmp_path), "--platform",
                      "wasip2/wasm", cwd=tmp_path)
        data = json.loads(out.stdout)
        assert {(p["os"], p["architecture"]) for p in data["platforms"]} == {
            ("linux", "amd64"), ("wasip1", "wasm"), ("wasip2", "wasm")}
        assert data["artifact_type"] == "wasm" and data["wasi_version"] == "wasip2"

    def test_get_wasm_info_fetches_no_layer(self, registry):
        _push_wasm(registry, "fn", "v1", CORE_MODULE,
                   artifact_type="application/vnd.wasm.module.v1+wasm")
        info = make_puller().get_wasm_info(f"{registry.host}/fn:v1")
        assert info.wasi_version is P1 and info.wasm_size == 8
        assert registry.count("GET", "blobs") == 1  # the config
        registry.add_image("app", "v1", [layer_bytes(1)])
        assert make_puller().get_wasm_info(f"{registry.host}/app:v1") is None

    def test_cli_pull_json_and_pull_wasm(self, registry, tmp_path):
        pushed = _push_wasm(registry, "fn", "v1", CORE_WITH_FUNC, title="f.wasm")
        out = run_cli("pull", f"{registry.host}/fn:v1", "--json", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path)
        data = json.loads(out.stdout)
        assert data["artifact_type"] == "wasm" and data["wasi_version"] == "wasip1"
        assert data["wasm_layer_digest"] == pushed["layer"]["digest"]
        assert data["wasm_size"] == len(CORE_WITH_FUNC) and data["module_name"] == "f.wasm"
        target = tmp_path / "out.wasm"
        out = run_cli("pull-wasm", f"{registry.host}/fn:v1", "-o", str(target), "--cache",
                      str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert target.read_bytes() == CORE_WITH_FUNC and "wasip1" in out.stdout
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
        out = run_cli("pull-wasm", f"{registry.host}/fn:v1", "-o", str(target), "--json",
                      "--cache", str(tmp_path / "c"), cwd=tmp_path)
        data = json.loads(out.stdout)
        assert data["digest"] == pushed["digest"] and data["destination"] == str(target)
        # A cached module changed on disk is caught while it is copied out.
        layer_file = tmp_path / "c" / "blobs" / "sha256" / pushed["layer"]["digest"][7:]
        layer_file.chmod(0o644)
        layer_file.write_bytes(b"\0asm" + CORE_WITH_FUNC[4:-1] + b"\xff")
        spoiled = tmp_path / "spoiled.wasm"
        out = run_cli("pull-wasm", f"{registry.host}/fn:v1", "-o", str(spoiled),
                      "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 1 and "is corrupt" in out.stderr, out
        assert len(out.stderr.splitlines()) == 1 and not spoiled.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
        registry.add_image("app", "v1", [layer_bytes(1)])
        out = run_cli("pull-wasm", f"{registry.host}/app:v1", "-o", str(tmp_path / "no.wasm"),
                      "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 1 and not (tmp_path / "no.wasm").exists()
        assert "not a WebAssembly artifact" in out.stderr

    def test_cli_pull_wasm_to_stdout(self, registry, tmp_path):
        pushed = _push_wasm(registry, "fn", "v1", CORE_WITH_FUNC)
        cmd = [*CLI, "pull-wasm", f"{registry.host}/fn:v1", "-o", "-",
               "--cache", str(tmp_path / "c")]
        out = subprocess.run(cmd, capture_output=True, timeout=120, cwd=str(tmp_path),
                             env=cli_env(tmp_path))
        assert out.returncode == 0, out.stderr
        assert out.stdout == CORE_WITH_FUNC and b"stdout: wasip1" in out.stderr
        assert list(tmp_path.iterdir()) == [tmp_path / "c"]  # no file written
        # A cached module changed on disk: not one byte goes out.
        layer_file = tmp_path / "c" / "blobs" / "sha256" / pushed["layer"]["digest"][7:]
        layer_file.chmod(0o644)
        layer_file.write_bytes(CORE_WITH_FUNC[:-1] + b"\xff")
        out = subprocess.run(cmd, capture_output=True, timeout=120, cwd=str(tmp_path),
                             env=cli_env(tmp_path))
        assert out.returncode == 1 and out.stdout == b"" and b"is corrupt" in out.stderr
        layer_file.write_bytes(CORE_WITH_FUNC)  # mended: --json goes to stderr then
        out = subprocess.run(cmd + ["--json"], capture_output=True, timeout=120,
                             cwd=str(tmp_path), env=cli_env(tmp_path))
        assert out.returncode == 0 and out.stdout == CORE_WITH_FUNC
        assert json.loads(out.stderr)["destination"] == "-"

    def test_unpack_of_a_wasm_artifact_points_to_pull_wasm(self, registry, tmp_path):
        _push_wasm(registry, "fn", "v1", CORE_WITH_FUNC)
        out = run_cli("unpack", f"{registry.host}/fn:v1", str(tmp_path / "root"), "--cache",
                      str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 1 and "is a WebAssembly artifact" in out.stderr
        assert "use pull-wasm" in out.stderr and not (tmp_path / "root").exists()

    def test_cli_pull_wasm_read_error_names_the_cached_layer(self, registry, tmp_path,
                                                             monkeypatch, capsys):
        import errno
        import io
        _push_wasm(registry, "fn", "v1", CORE_WITH_FUNC)

        class Failing(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, buffer):
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(zr.Layer, "open", lambda self: Failing())
        target = tmp_path / "f.wasm"
        assert zr.main(["pull-wasm", f"{registry.host}/fn:v1", "-o", str(target),
                        "--cache", str(tmp_path / "c")]) == 1
        err = capsys.readouterr().err
        assert "cannot read cached layer sha256:" in err and "Input/output error" in err
        assert str(target) not in err and not target.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


class TestWasmExport:
    @pytest.mark.parametrize("data, version, artifact_type", [
        (CORE_WITH_FUNC, P1, "application/vnd.wasm.module.v1+wasm"),
        (COMPONENT, P2, "application/vnd.wasm.component.v1+wasm")])
    def test_cncf_layout(self, tmp_path, data, version, artifact_type):
        source = tmp_path / "plugin.wasm"
        source.write_bytes(data)
        manifest = zr.export_wasm_as_oci(source, tmp_path / "layout", tag="1.0")
        layout = tmp_path / "layout"
        assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads((layout / "index.json").read_text())
        entry = index["manifests"][0]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1.0"
        raw = (layout / "blobs" / "sha256" / entry["digest"][7:]).read_bytes()
        assert zr.compute_digest(raw) == entry["digest"] == manifest.digest
        stored = json.loads(raw)
        assert stored["artifactType"] == artifact_type
        assert stored["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
        config = json.loads((layout / "blobs" / "sha256" /
                             stored["config"]["digest"][7:]).read_bytes())
        assert config["architecture"] == "wasm" and config["os"] == str(version)
        assert config["layerDigests"] == [stored["layers"][0]["digest"]]
        assert stored["layers"][0]["mediaType"] == "application/wasm"
        assert stored["layers"][0]["annotations"]["org.opencontainers.image.title"] == "plugin.wasm"
        # Every detection signal agrees, with and without the artifactType.
        assert zr.detect_artifact_type(stored, config) == zr.ArtifactType.wasm(version)
        del stored["artifactType"]
        assert zr.detect_artifact_type(stored, config) == zr.ArtifactType.wasm(version)

    def test_second_export_adds_to_index_and_retag_replaces(self, tmp_path):
        (tmp_path / "a.wasm").write_bytes(CORE_MODULE)
        (tmp_path / "b.wasm").write_bytes(COMPONENT)
        zr.export_wasm_as_oci(tmp_path / "a.wasm", tmp_path / "l", tag="a")
        zr.export_wasm_as_oci(tmp_path / "b.wasm", tmp_path / "l", tag="b")
        zr.export_wasm_as_oci(tmp_path / "b.wasm", tmp_path / "l", tag="a")
        index = json.loads((tmp_path / "l" / "index.json").read_text())
        names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        assert sorted(names) == ["a", "b"]
        assert len({m["digest"] for m in index["manifests"]}) == 1

    def test_cli_refuses_non_wasm_and_bad_destination(self, tmp_path):
        (tmp_path / "x.wasm").write_bytes(b"not wasm at all")
        out = run_cli("wasm-export", str(tmp_path / "x.wasm"), f"oci:{tmp_path}/l", cwd=tmp_path)
        assert out.returncode == 1 and "not a WebAssembly module" in out.stderr
        assert not (tmp_path / "l").exists()
        (tmp_path / "y.wasm").write_bytes(CORE_MODULE)
        for destination in ("docker://x/y", f"oci-archive:{tmp_path}/h.tar"):
            out = run_cli("wasm-export", str(tmp_path / "y.wasm"), destination, cwd=tmp_path)
            assert out.returncode == 2 and "expected oci:DIR[:TAG]" in out.stderr  # usage
        assert not (tmp_path / "h.tar").exists()
        out = run_cli("wasm-export", str(tmp_path / "y.wasm"), f"oci:{tmp_path}/l:v9", "--json",
                      cwd=tmp_path)
        assert out.returncode == 0 and json.loads(out.stdout)["wasi_version"] == "wasip1"


# -----------------------------------------------------------------------------
# UNPACK
# -----------------------------------------------------------------------------

import stat as _stat  # noqa: E402
import tarfile as _tarfile  # noqa: E402
import gzip as _gzip  # noqa: E402


def F(name, data=b"", mode=0o644, mtime=1_600_000_000, **pax):
    return ("file", name, data, mode, mtime, pax)


def D(name, mode=0o755, mtime=1_600_000_000):
    return ("dir", name, None, mode, mtime, {})


def S(name, target):
    return ("symlink", name, target, 0o777, 1_600_000_000, {})


def H(name, target):
    return ("hardlink", name, target, 0o644, 1_600_000_000, {})


def FIFO(name):
    return ("fifo", name, None, 0o644, 1_600_000_000, {})


def CHR(name):
    return ("chr", name, None, 0o666, 1_600_000_000, {})


def W(name):
    """A whiteout for ``name`` (``dir/.wh.name``)."""
    head, _, base = name.rpartition("/")
    return F(f"{head}/.wh.{base}" if head else f".wh.{base}")


def OPQ(directory):
    return F(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def _gunzip(data: bytes) -> bytes:
    return _gzip.decompress(data)


def make_layer(entries, compression="gzip") -> bytes:
    raw = io.BytesIO()
    with _tarfile.open(fileobj=raw, mode="w", format=_tarfile.PAX_FORMAT) as tar:
        for kind, name, payload, mode, mtime, pax in entries:
            info = _tarfile.TarInfo(name)
            info.mode, info.mtime = mode, mtime
            if pax:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in pax.items()}
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": _tarfile.DIRTYPE, "symlink": _tarfile.SYMTYPE,
                         "hardlink": _tarfile.LNKTYPE, "fifo": _tarfile.FIFOTYPE,
                         "chr": _tarfile.CHRTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            if kind == "chr":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    data = raw.getvalue()
    if compression == "gzip":
        return _gzip.compress(data)
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout
    return data


MT = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
      "tar": "application/vnd.oci.image.layer.v1.tar",
      "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def _spoil_cached(cache, digest: str, spoil) -> None:
    """Let ``spoil`` change a cached blob's bytes (a bytearray) on disk."""
    path = Path(cache.path(digest))
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    spoil(data)
    path.write_bytes(bytes(data))


def unpack(tmp_path, *layers, as_root=None, name="rootfs"):
    """Unpack gzip layers (lists of entries) into tmp_path/name; return the path."""
    rootfs = tmp_path / name
    unpacker = zr.LayerUnpacker(rootfs, as_root=as_root)
    unpacker.unpack_layers([io.BytesIO(make_layer(entries)) for entries in layers])
    return rootfs


def tree(root: Path):
    """Map each path under root to (type, mode, link target or content)."""
    result = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        if _stat.S_ISLNK(st.st_mode):
            result[rel] = ("l", os.readlink(path))
        elif _stat.S_ISDIR(st.st_mode):
            result[rel] = ("d", _stat.S_IMODE(st.st_mode))
        elif _stat.S_ISREG(st.st_mode):
            result[rel] = ("f", _stat.S_IMODE(st.st_mode), path.read_bytes())
        else:
            result[rel] = ("other", _stat.S_IFMT(st.st_mode))
    return result


def snapshot(directory: Path):
    return {str(p): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in directory.rglob("*")}


class TestUnpackEntries:
    def test_every_entry_type_with_modes_and_mtimes(self, tmp_path):
        rootfs = unpack(tmp_path, [
            D("bin", 0o755), F("bin/busybox", b"BB", 0o755), S("bin/sh", "/bin/busybox"),
            H("bin/ash", "bin/busybox"), FIFO("run.fifo"), D("ro", 0o555, mtime=1_500_000_000),
            F("ro/file", b"x", 0o400)])
        t = tree(rootfs)
        assert t["bin/busybox"] == ("f", 0o755, b"BB")
        assert t["bin/sh"] == ("l", "/bin/busybox")       # absolute targets kept as they are
        assert os.stat(rootfs / "bin/ash").st_ino == os.stat(rootfs / "bin/busybox").st_ino
        assert _stat.S_ISFIFO(os.lstat(rootfs / "run.fifo").st_mode)
        assert t["ro"] == ("d", 0o555) and t["ro/file"] == ("f", 0o400, b"x")
        assert os.stat(rootfs / "ro").st_mtime == 1_500_000_000  # set after its contents
        assert os.stat(rootfs / "bin/busybox").st_mtime == 1_600_000_000

    def test_implied_parents_and_later_writes_into_read_only_dirs(self, tmp_path):
        rootfs = unpack(tmp_path, [D("etc", 0o555), F("a/b/c/deep", b"1")],
                        [F("etc/new", b"2")])
        t = tree(rootfs)
        assert t["a"] == ("d", 0o755) and t["a/b/c/deep"][2] == b"1"
        assert t["etc"] == ("d", 0o555) and t["etc/new"][2] == b"2"

    def test_replacements_between_layers(self, tmp_path):
        rootfs = unpack(tmp_path,
                        [F("f2d", b"file"), D("d2f"), F("d2f/inner", b"i"), D("d2l"),
                         F("d2l/x", b"x"), S("l2f", "/nowhere"), F("keep", b"k")],
                        [D("f2d"), F("f2d/now", b"dir"), F("d2f", b"now a file"),
                         S("d2l", "keep"), F("l2f", b"real")])
        t = tree(rootfs)
        assert t["f2d"][0] == "d" and t["f2d/now"][2] == b"dir"
        assert t["d2f"] == ("f", 0o644, b"now a file") and "d2f/inner" not in t
        assert t["d2l"] == ("l", "keep") and "d2l/x" not in t
        assert t["l2f"] == ("f", 0o644, b"real")

    def test_writes_follow_links_inside_the_root(self, tmp_path):
        rootfs = unpack(tmp_path, [D("usr/lib"), S("lib", "usr/lib"), S("lib64", "/usr/lib")],
                        [F("lib/a.so", b"a"), F("lib64/b.so", b"b")])
        t = tree(rootfs)
        assert t["usr/lib/a.so"][2] == b"a" and t["usr/lib/b.so"][2] == b"b"
        assert t["lib"] == ("l", "usr/lib")

    def test_root_entry_and_backslash_names(self, tmp_path):
        rootfs = unpack(tmp_path, [D("./", 0o750, mtime=1_400_000_000), F("back\\slash", b"b")])
        assert _stat.S_IMODE(os.stat(rootfs).st_mode) == 0o750
        assert os.stat(rootfs).st_mtime == 1_400_000_000
        assert (rootfs / "back\\slash").read_bytes() == b"b"

    def test_setuid_kept_as_root_stripped_otherwise(self, tmp_path):
        layer = [F("su", b"s", 0o4755), F("sg", b"g", 0o2755)]
        assert tree(unpack(tmp_path, layer, as_root=False, name="user"))["su"][1] == 0o755
        assert tree(unpack(tmp_path, layer, as_root=False, name="user2"))["sg"][1] == 0o755
        if os.geteuid() == 0:
            assert tree(unpack(tmp_path, layer, as_root=True, name="root"))["su"][1] == 0o4755

    def test_device_nodes_skipped_without_root(self, tmp_path, capsys):
        rootfs = unpack(tmp_path, [CHR("dev/null"), F("dev/ok", b"")], as_root=False)
        assert not (rootfs / "dev/null").exists() and (rootfs / "dev/ok").exists()
        assert "skipping device node dev/null" in capsys.readouterr().err

    @pytest.mark.skipif(not hasattr(os, "setxattr") or os.geteuid() != 0, reason="needs root")
    def test_xattrs_as_root(self, tmp_path):
        rootfs = unpack(tmp_path, [F("cap", b"c", **{"user.zlayer": "v1"})], as_root=True)
        assert os.getxattr(rootfs / "cap", "user.zlayer") == b"v1"


class TestWhiteouts:
    def test_whiteout_removes_lower_and_can_be_re_added(self, tmp_path):
        rootfs = unpack(tmp_path,
                        [F("etc/a", b"a"), F("etc/b", b"b"), D("var/cache"), F("var/cache/x")],
                        [W("etc/a"), W("var/cache")],
                        [F("var/cache/new", b"n")])
        t = tree(rootfs)
        assert "etc/a" not in t and t["etc/b"][2] == b"b"
        assert "var/cache/x" not in t and t["var/cache/new"][2] == b"n"
        assert not any(".wh." in p for p in t)

    def test_whiteout_spares_what_the_same_layer_adds(self, tmp_path):
        rootfs = unpack(tmp_path, [F("x", b"old")], [F("x", b"new"), W("x")])
        assert tree(rootfs)["x"][2] == b"new"

    @pytest.mark.parametrize("marker_first", [True, False])
    def test_opaque_hides_lower_keeps_same_layer_in_any_order(self, tmp_path, marker_first):
        upper = [F("d/new", b"n"), F("d/sub/added", b"s"), D("d/kept")]
        upper = [OPQ("d")] + upper if marker_first else upper + [OPQ("d")]
        rootfs = unpack(tmp_path,
                        [F("d/old", b"o"), F("d/sub/lower", b"l"), D("d/kept"),
                         F("d/kept/lower", b"l"), F("other", b"x")],
                        upper)
        t = tree(rootfs)
        assert sorted(p for p in t if p.startswith("d/")) == ["d/kept", "d/new", "d/sub",
                                                              "d/sub/added"]
        assert t["other"][2] == b"x" and not any(".wh." in p for p in t)

    @pytest.mark.parametrize("whiteout_first", [True, False])
    def test_whiteout_of_a_directory_the_layer_declares_hides_the_lower_one(
            self, tmp_path, whiteout_first):
        """layer.md: whiteouts apply to lower layers only; what the same layer holds
        (x/ and x/new) stays, and the lower x/old goes, whichever comes first."""
        upper = [D("x"), F("x/new", b"n")]
        upper = [W("x")] + upper if whiteout_first else upper + [W("x")]
        rootfs = unpack(tmp_path, [D("x"), F("x/old", b"o"), F("y", b"y")], upper)
        t = tree(rootfs)
        assert sorted(p for p in t if p.startswith("x")) == ["x", "x/new"]
        assert t["x/new"][2] == b"n" and t["y"][2] == b"y"

    def test_whiteout_after_the_layers_own_child_spares_it(self, tmp_path):
        rootfs = unpack(tmp_path, [F("d/old", b"o")], [F("d/new", b"n"), W("d")])
        assert sorted(p for p in tree(rootfs) if p.startswith("d")) == ["d", "d/new"]

    def test_directory_re_implied_after_whiteout_is_new(self, tmp_path):
        rootfs = unpack(tmp_path, [D("d", 0o700, mtime=1000), F("d/old")],
                        [W("d"), F("d/new", b"n")])
        assert tree(rootfs)["d"] == ("d", 0o755) and os.stat(rootfs / "d").st_mtime != 1000

    def test_opaque_at_root(self, tmp_path):
        rootfs = unpack(tmp_path, [F("a"), F("b/c")], [F("z", b"z"), OPQ("")])
        assert list(tree(rootfs)) == ["z"]


class TestUnpackAttacks:
    """No entry may create, change or delete anything outside the root."""

    @pytest.fixture
    def outside(self, tmp_path):
        directory = tmp_path / "outside"
        directory.mkdir()
        (directory / "victim").write_bytes(b"precious")
        return directory

    def check_untouched(self, outside):
        assert snapshot(outside) == {str(outside / "victim"): b"precious"}

    @pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../x", "a/b/../../../x"])
    def test_dotdot_names_are_refused(self, tmp_path, outside, name):
        with pytest.raises(zr.UnpackError) as info:
            unpack(tmp_path, [F(name, b"evil")])
        assert info.value.member == name and name in str(info.value)
        assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
        assert not (tmp_path / "rootfs").exists()
        self.check_untouched(outside)

    def test_absolute_names_stay_inside(self, tmp_path, outside):
        rootfs = unpack(tmp_path, [F(f"{outside}/victim", b"evil"), F("/etc/abs", b"a")])
        assert (rootfs / str(outside).lstrip("/") / "victim").read_bytes() == b"evil"
        assert (rootfs / "etc/abs").read_bytes() == b"a"
        self.check_untouched(outside)

    @pytest.mark.parametrize("target", ["ABS", "../../../../../../..{outside}", "../" * 30])
    def test_write_through_escaping_symlink_same_layer(self, tmp_path, outside, target):
        target = str(outside) if target == "ABS" else target.format(outside=outside)
        rootfs = unpack(tmp_path, [S("link", target), F("link/victim", b"evil"),
                                   F("link/new", b"evil")])
        self.check_untouched(outside)
        assert b"evil" in [p.read_bytes() for p in rootfs.rglob("new") if p.is_file()]

    def test_write_through_escaping_symlink_from_lower_layer(self, tmp_path, outside):
        unpack(tmp_path, [S("link", str(outside))], [F("link/victim", b"evil")],
               [D("link"), F("link/x", b"x")])
        self.check_untouched(outside)

    def test_hardlink_to_outside_file(self, tmp_path, outside):
        with pytest.raises(zr.UnpackError, match="not a file inside the image"):
            unpack(tmp_path, [H("stolen", f"{outside}/victim")])
        with pytest.raises(zr.UnpackError, match="'..' in its path"):
            unpack(tmp_path, [H("stolen", "../outside/victim")])
        self.check_untouched(outside)

    def test_hardlink_through_escaping_symlink(self, tmp_path, outside):
        with pytest.raises(zr.UnpackError):
            unpack(tmp_path, [S("link", str(outside)), H("stolen", "link/victim")])
        with pytest.raises(zr.UnpackError):
            unpack(tmp_path, [S("link", "../outside"), H("stolen", "link/victim")])
        self.check_untouched(outside)
        assert os.stat(outside / "victim").st_nlink == 1

    def test_whiteouts_cannot_delete_outside(self, tmp_path, outside):
        unpack(tmp_path, [S("link", str(outside))], [W("link/victim")])
        self.check_untouched(outside)
        unpack(tmp_path, [S("link", str(outside))], [OPQ("link")], name="r2")
        self.check_untouched(outside)
        with pytest.raises(zr.UnpackError):
            unpack(tmp_path, [F("a")], [F("../.wh.outside")], name="r3")
        self.check_untouched(outside)

    @pytest.mark.parametrize("name", [".wh...", ".wh..", ".wh.", "a/.wh..."])
    def test_whiteouts_naming_no_entry_are_refused(self, tmp_path, outside, name):
        canary = tmp_path / "canary"
        canary.write_text("sibling of the rootfs")
        with pytest.raises(zr.UnpackError) as info:
            unpack(tmp_path, [F("a/f", b"x")], [F(name)])
        assert info.value.member == name
        assert canary.read_text() == "sibling of the rootfs" and not (tmp_path / "rootfs").exists()
        self.check_untouched(outside)

    @pytest.mark.parametrize("split", [False, True])
    def test_deferred_directory_metadata_never_follows_a_later_symlink(self, tmp_path, outside,
                                                                       split):
        (outside / "etc").mkdir()
        os.chmod(outside / "etc", 0o700)
        entries = [D("d"), D("d/etc", 0o777, mtime=1234567890), S("d", str(outside))]
        layers = [entries[:2], entries[2:]] if split else [entries]
        unpack(tmp_path, *layers)
        assert _stat.S_IMODE(os.stat(outside / "etc").st_mode) == 0o700
        assert os.stat(outside / "etc").st_mtime != 1234567890

    def test_deferred_opaque_whiteout_never_follows_a_later_symlink(self, tmp_path, outside):
        unpack(tmp_path, [D("x"), OPQ("x"), S("x", str(outside))])
        self.check_untouched(outside)

    def test_symlink_loop_is_refused(self, tmp_path):
        with pytest.raises(zr.UnpackError, match="too many levels"):
            unpack(tmp_path, [S("a", "b"), S("b", "a"), F("a/x")])

    def test_chmod_through_symlink_does_not_escape(self, tmp_path, outside):
        os.chmod(outside / "victim", 0o600)
        unpack(tmp_path, [S("link", str(outside / "victim")), D("link", 0o777)])
        assert _stat.S_IMODE(os.stat(outside / "victim").st_mode) == 0o600
        self.check_untouched(outside)


class TestUnpackFormats:
    @pytest.mark.parametrize("compression", ["gzip", "tar", "zstd"])
    def test_compressions(self, tmp_path, compression):
        layer = make_layer([F("hello", b"world")], compression)
        rootfs = tmp_path / "r"
        zr.LayerUnpacker(rootfs).unpack_layers([])  # an empty image is an empty dir
        assert list(rootfs.iterdir()) == []
        zr.LayerUnpacker(rootfs).unpack_layer(io.BytesIO(layer), MT[compression])
        assert (rootfs / "hello").read_bytes() == b"world"

    def test_docker_zstd_media_type_and_path_input(self, tmp_path):
        path = tmp_path / "layer.tar.zst"
        path.write_bytes(make_layer([F("z", b"z")], "zstd"))
        rootfs = tmp_path / "r"
        rootfs.mkdir()
        zr.LayerUnpacker(rootfs).unpack_layer(path, "application/vnd.docker.image.rootfs.diff.tar.zstd")
        assert (rootfs / "z").read_bytes() == b"z"

    def test_zstd_without_any_decoder_names_both(self, tmp_path, monkeypatch):
        layer = make_layer([F("z")], "zstd")
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(zr.UnpackError, match="compression.zstd or a 'zstd' program"):
            zr.LayerUnpacker(tmp_path / "r").unpack_layers([io.BytesIO(layer)])
        assert os.listdir(tmp_path) == []

    def test_media_type_and_magic_must_agree(self, tmp_path):
        with pytest.raises(zr.UnpackError, match="declared as gzip"):
            zr.LayerUnpacker(tmp_path).unpack_layer(io.BytesIO(make_layer([F("a")], "tar")),
                                                    MT["gzip"])

    @pytest.mark.parametrize("damage", ["truncate", "garbage"])
    def test_corrupt_layers_are_errors_and_leave_nothing(self, tmp_path, damage):
        good = make_layer([F("a", layer_bytes(1, 100_000))])
        bad = good[:len(good) // 2] if damage == "truncate" else b"\x1f\x8b" + b"\x00" * 100
        with pytest.raises(zr.UnpackError):
            zr.LayerUnpacker(tmp_path / "r").unpack_layers([io.BytesIO(make_layer([F("ok")])),
                                                            io.BytesIO(bad)])
        assert os.listdir(tmp_path) == []  # no rootfs, no staging directory

    def test_existing_non_empty_target_is_refused(self, tmp_path):
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "mine").write_text("keep")
        with pytest.raises(zr.UnpackError, match="not an empty directory"):
            zr.LayerUnpacker(tmp_path / "r").unpack_layers([io.BytesIO(make_layer([F("a")]))])
        assert os.listdir(tmp_path / "r") == ["mine"]


class TestUnpackImage:
    def test_puller_unpack_and_cli(self, registry, tmp_path):
        layers = [make_layer([F("etc/os-release", b"ID=test\n"), S("bin/sh", "/bin/busybox"),
                              F("bin/busybox", b"BB", 0o755)]),
                  make_layer([W("etc/os-release"), F("etc/hostname", b"h")])]
        registry.add_image("app", "v1", layers)
        cache = zr.BlobCache.open(tmp_path / "c")
        result = make_puller(cache).unpack(f"{registry.host}/app:v1", tmp_path / "rootfs")
        assert len(result.layers) == 2
        t = tree(tmp_path / "rootfs")
        assert t["etc/hostname"][2] == b"h" and "etc/os-release" not in t
        assert t["bin/sh"] == ("l", "/bin/busybox")
        out = run_cli("unpack", f"{registry.host}/app:v1", str(tmp_path / "cli"), "--cache",
                      str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert tree(tmp_path / "cli") == t
        again = run_cli("unpack", f"{registry.host}/app:v1", str(tmp_path / "cli"), "--cache",
                        str(tmp_path / "c"), cwd=tmp_path)
        assert again.returncode == 1 and "not an empty directory" in again.stderr

    def test_leftovers_of_a_killed_unpack_or_export_are_swept_live_ones_kept(self, registry,
                                                                              tmp_path):
        import fcntl
        registry.add_image("app", "v1", [make_layer([F("etc/hostname", b"h")])])
        old = 1_600_000_000
        dead_dir = tmp_path / ".rootfs.staging-dead1234"
        (dead_dir / "usr").mkdir(parents=True)
        live_dir = tmp_path / ".rootfs.staging-live1234"
        live_dir.mkdir()
        layout = tmp_path / "layout"
        layout.mkdir()
        dead_file = layout / ".tmp-dead1234.partial"
        dead_file.write_bytes(b"x" * 100)
        young_file = layout / ".tmp-young123.partial"  # made a moment ago: maybe not locked yet
        young_file.write_bytes(b"y")
        for path in (dead_dir, live_dir, dead_file):
            os.utime(path, (old, old))
        live_fd = os.open(live_dir, os.O_RDONLY)
        fcntl.flock(live_fd, fcntl.LOCK_EX)  # another process still unpacking
        try:
            puller = make_puller(zr.BlobCache.open(tmp_path / "c"))
            puller.unpack(f"{registry.host}/app:v1", tmp_path / "rootfs")
            puller.export_image(f"{registry.host}/app:v1", f"oci:{layout}:v1")
        finally:
            os.close(live_fd)
        assert not dead_dir.exists() and not dead_file.exists()
        assert live_dir.exists() and young_file.exists()
        assert (tmp_path / "rootfs" / "etc" / "hostname").read_bytes() == b"h"

    @staticmethod
    def _pulled_then_spoiled(registry, tmp_path, layer: bytes, spoil):
        """Pull a one-layer image into a directory cache, then let ``spoil`` change the
        cached layer's bytes (a bytearray) on disk; return the cache and the layer digest."""
        image = registry.add_image("app", "v1", [layer])
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache).pull(f"{registry.host}/app:v1")
        digest = image["layers"][0]["digest"]
        _spoil_cached(cache, digest, spoil)
        return cache, digest

    def test_a_cached_layer_changed_since_its_pull_is_not_unpacked(self, registry, tmp_path):
        """The gzip header's mtime bytes change the digest, not the files: only the digest
        check made while streaming can notice."""

        def flip_mtime_byte(data):
            data[4] ^= 0xFF

        cache, digest = self._pulled_then_spoiled(
            registry, tmp_path, make_layer([F("etc/hostname", b"h")]), flip_mtime_byte)
        with pytest.raises(zr.DigestMismatchError, match=f"cached layer {digest} is corrupt"):
            make_puller(cache).unpack(f"{registry.host}/app:v1", tmp_path / "rootfs")
        assert sorted(os.listdir(tmp_path)) == ["c"]  # no rootfs, no staging directory
        out = run_cli("unpack", f"{registry.host}/app:v1", str(tmp_path / "cli"), "--cache",
                      str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 1 and "cache verify --remove" in out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr

    def test_a_cached_layer_whose_damage_breaks_gzip_is_reported_as_corrupt(
            self, registry, tmp_path):
        files = [F(f"data/{i}", layer_bytes(i, 20_000)) for i in range(5)]

        def garble_deflate_data(data):  # inflating fails before the end
            for offset in range(len(data) // 3, len(data) // 3 + 64):
                data[offset] ^= 0x5A

        cache, digest = self._pulled_then_spoiled(
            registry, tmp_path, make_layer(files), garble_deflate_data)
        with pytest.raises(zr.DigestMismatchError, match=f"cached layer {digest} is corrupt"):
            make_puller(cache).unpack(f"{registry.host}/app:v1", tmp_path / "rootfs")
        assert sorted(os.listdir(tmp_path)) == ["c"]

    def test_a_layer_file_that_is_no_tar_is_named_in_the_error(self, tmp_path):
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(_gzip.compress(b"not a tar archive" * 100))
        with pytest.raises(zr.UnpackError, match=f"layer {bad} is not a valid tar stream"):
            zr.LayerUnpacker(tmp_path / "root").unpack_layer(str(bad))

    def test_a_tar_that_ends_right_after_its_last_data(self, tmp_path):
        # umoci 0.4's insert writes layers like this (no padding, no end blocks).
        whole = _gunzip(make_layer([D("etc"), F("etc/a", b"first"), F("etc/motd", b"hello")]))
        cut = whole[:whole.index(b"hello") + 5]
        zr.LayerUnpacker(tmp_path / "root").unpack_layers([io.BytesIO(cut)])
        assert (tmp_path / "root/etc/motd").read_bytes() == b"hello"
        assert (tmp_path / "root/etc/a").read_bytes() == b"first"
        # Data cut short is still an error, and nothing is left behind.
        with pytest.raises(zr.UnpackError, match="is not a valid tar stream"):
            zr.LayerUnpacker(tmp_path / "root2").unpack_layers([io.BytesIO(cut[:-2])])
        assert sorted(os.listdir(tmp_path)) == ["root"]


# -----------------------------------------------------------------------------
# OCI LAYOUT: export and import
# -----------------------------------------------------------------------------

def _multi(registry):
    amd = registry.add_image("multi", None, [layer_bytes(20, 5000)])
    arm = registry.add_image("multi", None, [layer_bytes(21, 5000), layer_bytes(22, 100)])
    digest = registry.add_index("multi", "v1", [
        ({"os": "linux", "architecture": "amd64"}, amd),
        ({"os": "linux", "architecture": "arm64"}, arm)])
    return digest, amd, arm


def _layout_files(layout: Path):
    return {p.name for p in (layout / "blobs" / "sha256").iterdir()}


def _check_layout_blobs(layout: Path):
    for path in (layout / "blobs" / "sha256").iterdir():
        assert zr.compute_digest(path.read_bytes()) == f"sha256:{path.name}"


class TestExport:
    def test_single_image_to_layout_hardlinks_from_cache(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1, 5000)])
        cache = zr.BlobCache.open(tmp_path / "c")
        info = make_puller(cache).export_image(f"{registry.host}/app:v1",
                                               f"oci:{tmp_path}/layout:mytag")
        layout = tmp_path / "layout"
        assert info.digest == image["digest"] and info.blobs == 3 and info.tag == "mytag"
        index = json.loads((layout / "index.json").read_text())
        assert index["manifests"][0]["digest"] == image["digest"]
        assert index["manifests"][0]["annotations"] == {zr.ANNOTATION_REF_NAME: "mytag"}
        assert _layout_files(layout) == {image["digest"][7:], image["config"]["digest"][7:],
                                         image["layers"][0]["digest"][7:]}
        _check_layout_blobs(layout)
        layer = image["layers"][0]["digest"]
        assert os.stat(layout / "blobs/sha256" / layer[7:]).st_ino == \
            os.stat(cache.path(layer)).st_ino

    @pytest.mark.parametrize("dest", ["oci:{}/layout:t", "oci-archive:{}/a.tar",
                                      "docker-archive:{}/d.tar"])
    def test_a_corrupt_cached_blob_is_never_exported(self, registry, tmp_path, dest):
        image = registry.add_image("app", "v1", [layer_bytes(1, 5000), layer_bytes(2, 5000)])
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache).pull(f"{registry.host}/app:v1")
        layer = image["layers"][1]["digest"]
        _spoil_cached(cache, layer, lambda data: data.__setitem__(100, data[100] ^ 1))
        (tmp_path / "out").mkdir()
        with pytest.raises(zr.DigestMismatchError, match=f"cached blob {layer} is corrupt"):
            make_puller(cache).export_image(f"{registry.host}/app:v1",
                                            dest.format(tmp_path / "out"))
        assert list((tmp_path / "out").iterdir()) == []  # nothing written, not even a layout

    def test_memory_cache_copies_and_second_export_adds(self, registry, tmp_path):
        a = registry.add_image("app", "a", [layer_bytes(1, 500)])
        b = registry.add_image("app", "b", [layer_bytes(2, 500)])
        puller = make_puller(zr.BlobCache())
        puller.export_image(f"{registry.host}/app:a", str(tmp_path / "l"))   # tag from the ref
        puller.export_image(f"{registry.host}/app:b", f"oci:{tmp_path}/l")
        index = json.loads((tmp_path / "l" / "index.json").read_text())
        assert {(m["annotations"][zr.ANNOTATION_REF_NAME], m["digest"]) for m in
                index["manifests"]} == {("a", a["digest"]), ("b", b["digest"])}
        _check_layout_blobs(tmp_path / "l")

    def test_index_keeps_every_platform_or_one(self, registry, tmp_path):
        digest, amd, arm = _multi(registry)
        puller = make_puller()
        info = puller.export_image(f"{registry.host}/multi:v1", f"oci:{tmp_path}/all:v1")
        assert info.digest == digest and info.media_type == zr.MEDIA_TYPE_OCI_INDEX
        files = _layout_files(tmp_path / "all")
        for child in (amd, arm):
            assert {child["digest"][7:], child["config"]["digest"][7:]} <= files
            assert {l["digest"][7:] for l in child["layers"]} <= files
        one = puller.export_image(f"{registry.host}/multi:v1", f"oci:{tmp_path}/one:v1",
                                  platform="linux/arm64")
        assert one.digest == arm["digest"]
        assert amd["layers"][0]["digest"][7:] not in _layout_files(tmp_path / "one")

    def test_oci_archive_is_the_layout_as_a_tar(self, registry, tmp_path):
        digest, _, _ = _multi(registry)
        make_puller().export_image(f"{registry.host}/multi:v1", f"oci-archive:{tmp_path}/a.tar:v1")
        with _tarfile.open(tmp_path / "a.tar") as tar:
            names = set(tar.getnames())
            index = json.loads(tar.extractfile("index.json").read())
            for name in names:
                if name.startswith("blobs/"):
                    assert zr.compute_digest(tar.extractfile(name).read()) == \
                        "sha256:" + name.rsplit("/", 1)[1]
        assert {"oci-layout", "index.json"} <= names
        assert index["manifests"][0]["digest"] == digest
        assert os.listdir(tmp_path) == ["a.tar"]

    def test_docker_archive(self, registry, tmp_path):
        _, amd, _ = _multi(registry)
        make_puller().export_image(f"{registry.host}/multi:v1", f"docker-archive:{tmp_path}/d.tar")
        with _tarfile.open(tmp_path / "d.tar") as tar:
            listing = json.loads(tar.extractfile("manifest.json").read())
            repositories = json.loads(tar.extractfile("repositories").read())
            assert zr.compute_digest(tar.extractfile(listing[0]["Config"]).read()) == \
                amd["config"]["digest"]
            for name, layer in zip(listing[0]["Layers"], amd["layers"]):
                assert zr.compute_digest(tar.extractfile(name).read()) == layer["digest"]
        assert listing[0]["RepoTags"] == [f"{registry.host}/multi:v1"]
        assert repositories == {f"{registry.host}/multi": {"v1": amd["layers"][-1]["digest"][7:]}}
        assert zr._docker_load_name(zr.parse_reference("alpine:3.20")) == "alpine:3.20"
        assert zr._docker_load_name(zr.parse_reference("user/app")) == "user/app:latest"
        # docker-archive:FILE:NAME[:TAG] names the image for docker load, as skopeo does.
        for name, loaded in (("app:2", "app:2"), ("foo", "foo:latest"),
                             ("reg.example/team/app:v9", "reg.example/team/app:v9")):
            info = make_puller().export_image(f"{registry.host}/multi:v1",
                                              f"docker-archive:{tmp_path}/{name[:3]}.tar:{name}")
            assert os.path.isfile(info.destination)
            with _tarfile.open(info.destination) as tar:
                assert json.loads(tar.extractfile("manifest.json").read())[0]["RepoTags"] == \
                    [loaded]
        for bad in ("docker-archive:x.tar:Bad/Name", "docker-archive:x.tar:app@sha256:" + "0" * 64):
            with pytest.raises(zr.LayoutError, match="image name"):
                zr._parse_location(bad)

    def test_a_layout_with_a_broken_oci_layout_file_is_a_layout_error(self, registry, tmp_path,
                                                                       capsys):
        registry.add_image("app", "v1", [layer_bytes(1, 500)])
        (tmp_path / "l").mkdir()
        (tmp_path / "l" / "oci-layout").write_bytes(b"{broken")
        with pytest.raises(zr.LayoutError, match="oci-layout is not a readable JSON object"):
            make_puller().export_image(f"{registry.host}/app:v1", f"oci:{tmp_path}/l:v1")
        assert "credentials" not in capsys.readouterr().err

    def test_an_archive_may_name_its_image_name_and_tag(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1, 500)])
        archive = tmp_path / "a.tar"
        info = make_puller().export_image(f"{registry.host}/app:v1",
                                          f"oci-archive:{archive}:localhost/app:v1")
        assert info.tag == "localhost/app:v1"
        with _tarfile.open(archive) as tar:
            index = json.loads(tar.extractfile("index.json").read())
        assert index["manifests"][0]["annotations"][zr.ANNOTATION_REF_NAME] == "localhost/app:v1"
        imported = make_puller().import_image(f"oci-archive:{archive}:localhost/app:v1")
        assert [i.digest for i in imported] == [image["digest"]]
        odd = tmp_path / "with:colon"
        odd.mkdir()  # a path that exists is taken whole
        assert zr._parse_location(f"oci:{odd}").path == str(odd)
        with pytest.raises(zr.LayoutError, match="invalid tag"):
            zr._parse_location(f"oci:{tmp_path}/x:Bad Tag")

    def test_bad_destinations(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(1, 500)])
        with pytest.raises(zr.LayoutError, match="unknown export format 'zip'"):
            make_puller().export_image(f"{registry.host}/app:v1", str(tmp_path / "x"),
                                       transport="zip")
        out = run_cli("export", f"{registry.host}/app:v1", "tar:x", "--cache", str(tmp_path),
                      cwd=tmp_path)
        assert out.returncode == 2 and "unsupported location" in out.stderr
        assert registry.count() == 0  # refused before any request

    def test_an_index_listing_children_many_times_is_walked_once(self, registry, tmp_path):
        child = registry.add_image("fan", None, [layer_bytes(1, 100)])
        entry = {"mediaType": child["mediaType"], "digest": child["digest"], "size": child["size"],
                 "platform": {"os": "linux", "architecture": "amd64"}}
        inner = registry.add_manifest("fan", None, {"schemaVersion": 2, "mediaType": fake.OCI_INDEX,
                                                    "manifests": [entry] * 300})
        inner_size = len(registry.manifests[("fan", inner)][0])
        registry.add_manifest("fan", "v1", {"schemaVersion": 2, "mediaType": fake.OCI_INDEX,
                                            "manifests": [{"mediaType": fake.OCI_INDEX,
                                                           "digest": inner, "size": inner_size}] * 300})
        info = make_puller().export_image(f"{registry.host}/fan:v1", f"oci-archive:{tmp_path}/a.tar")
        assert info.blobs == 5  # outer, inner, child, config, layer
        with _tarfile.open(tmp_path / "a.tar") as tar:
            names = tar.getnames()
        assert len(names) == len(set(names))


def _tree_state(root: Path):
    """Every file under root with its size and mtime (to show nothing was written)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


class TestReadOnlyCache:
    def test_serves_what_it_holds_and_writes_nothing(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(40, 5000)])
        other = registry.add_image("app", "v2", [layer_bytes(41, 5000)])
        writer = zr.BlobCache.open(tmp_path / "c")
        make_puller(writer).pull(f"{registry.host}/app:v1")
        writer.close()
        before = _tree_state(tmp_path / "c")
        cache = zr.BlobCache.open(tmp_path / "c", read_only=True)
        puller = make_puller(cache)
        manifest, layers = puller.pull(f"{registry.host}/app@{image['digest']}")
        assert manifest.digest == image["digest"] and puller.request_count == 0
        assert make_puller(cache).pull(f"{registry.host}/app:v1")[0].digest == image["digest"]
        assert {e["digest"] for e in cache.entries()} >= {image["layers"][0]["digest"]}
        assert cache.references() == {f"{registry.host}/app:v1": image["digest"]}
        with pytest.raises(zr.CacheError, match="is read-only: cannot store blob"):
            make_puller(cache).pull(f"{registry.host}/app:v2")
        with pytest.raises(zr.CacheError, match="is read-only: cannot collect garbage"):
            cache.gc()
        cache.close()
        assert _tree_state(tmp_path / "c") == before  # not a byte, not an mtime, no -shm
        assert other["digest"] not in str(before)

    def test_an_index_its_writer_left_in_the_wal_is_read_from_the_files(self, registry,
                                                                         tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(44, 5000)])
        writer = zr.BlobCache.open(tmp_path / "c")  # left open: its rows sit in the WAL
        make_puller(writer).pull(f"{registry.host}/app:v1")
        reader = zr.BlobCache.open(tmp_path / "c", read_only=True)
        puller = make_puller(reader)
        assert puller.pull(f"{registry.host}/app@{image['digest']}")[0].digest == \
            image["digest"]
        # References are files, so the reader sees them though the index rows wait in the WAL.
        assert puller.request_count == 0
        assert reader.references() == {f"{registry.host}/app:v1": image["digest"]}
        writer.close()

    def test_the_cli_reads_a_cache_it_cannot_write(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(42, 5000)])
        registry.add_image("app", "v2", [layer_bytes(43, 5000)])
        import tempfile as _tempfile
        shared = Path(_tempfile.mkdtemp())  # others may enter it (pytest's are 0700)
        try:
            os.chmod(shared, 0o755)
            shutil.copy(HERE / "zlayer_registry.py", shared)
            cache = shared / "cache"
            assert run_cli("pull", f"{registry.host}/app:v1", "--cache", str(cache), "-q",
                           cwd=tmp_path).returncode == 0
            python = sys.executable
            if os.geteuid() == 0:  # root writes anywhere: read it as nobody instead,
                as_reader = {"preexec_fn": lambda: os.setuid(65534)}
                python = "/usr/bin/python3"  # with a Python nobody may run
            else:
                as_reader = {}
                for path in [cache] + [p for p in cache.rglob("*") if p.is_dir()]:
                    path.chmod(0o555)
            before = _tree_state(cache)

            def cli(*args):
                return subprocess.run([python, "-m", "zlayer_registry",
                                       *args, "--cache", str(cache)], capture_output=True,
                                      text=True, timeout=120, cwd=str(shared),
                                      env=dict(os.environ, HOME=str(shared)), **as_reader)

            out = cli("cache", "ls")
            assert out.returncode == 0 and image["digest"] in out.stdout, out.stderr
            out = cli("pull", f"{registry.host}/app@{image['digest']}", "-q")
            assert out.returncode == 0 and out.stdout.strip() == image["digest"], out.stderr
            out = cli("pull", f"{registry.host}/app:v2", "-q")
            assert out.returncode == 1 and "is read-only: cannot store blob" in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
            assert _tree_state(cache) == before
        finally:
            for path in [shared] + list(shared.rglob("*")):
                if path.is_dir():
                    path.chmod(0o755)
            shutil.rmtree(shared)


class TestUnpackLayout:
    def test_unpack_of_an_exported_index_needs_no_registry(self, registry, tmp_path):
        amd = registry.add_image("multi", None, [make_layer([F("which", b"amd64")])])
        arm = registry.add_image("multi", None, [make_layer([F("which", b"arm64")])],
                                 config={"architecture": "arm64", "os": "linux"})
        registry.add_index("multi", "v1", [({"os": "linux", "architecture": "amd64"}, amd),
                                           ({"os": "linux", "architecture": "arm64"}, arm)])
        make_puller(zr.BlobCache()).export_image(f"{registry.host}/multi:v1",
                                                 f"oci:{tmp_path}/layout:v1")
        before = len(registry.requests)
        puller = make_puller(zr.BlobCache.open(tmp_path / "c"), platform="linux/arm64")
        manifest = puller.unpack_layout(f"oci:{tmp_path}/layout:v1", tmp_path / "root")
        assert manifest.digest == arm["digest"]
        assert (tmp_path / "root" / "which").read_bytes() == b"arm64"
        assert puller.request_count == 0 and len(registry.requests) == before
        out = run_cli("unpack", f"oci:{tmp_path}/layout:v1", str(tmp_path / "root2"),
                      "--platform", "linux/amd64", "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"oci:{tmp_path}/layout:v1: {amd['digest']}\n1 layer "
                                     "unpacked into")
        assert (tmp_path / "root2" / "which").read_bytes() == b"amd64"

    def test_a_layout_of_several_images_needs_a_tag(self, registry, tmp_path):
        for tag in ("a", "b"):
            registry.add_image("app", tag, [make_layer([F(tag, b"x")])])
            make_puller().export_image(f"{registry.host}/app:{tag}", f"oci:{tmp_path}/l:{tag}")
        puller = make_puller(zr.BlobCache.open(tmp_path / "c"))
        with pytest.raises(zr.LayoutError, match="holds 2 images: name one with :TAG"):
            puller.unpack_layout(f"oci:{tmp_path}/l", tmp_path / "root")
        assert not (tmp_path / "root").exists()
        puller.unpack_layout(f"oci:{tmp_path}/l:b", tmp_path / "root")
        assert os.listdir(tmp_path / "root") == ["b"]

    def test_a_wasm_layout_is_not_unpacked(self, tmp_path):
        (tmp_path / "m.wasm").write_bytes(CORE_MODULE)
        zr.export_wasm_as_oci(tmp_path / "m.wasm", tmp_path / "l", tag="v1")
        with pytest.raises(zr.UnpackError, match="WebAssembly artifact"):
            make_puller(zr.BlobCache()).unpack_layout(f"oci:{tmp_path}/l:v1", tmp_path / "r")
        assert not (tmp_path / "r").exists()

    @pytest.mark.parametrize("text, layout", [
        ("oci:./dir:v1", True), ("oci:/abs/dir", True), ("oci-archive:app.tar:v1", True),
        ("oci:5000/app:v1", False), ("oci-archive:443/x", False), ("oci", False),
        ("ghcr.io/org/app:v1", False), ("oci:", False), ("oci:latest", False),
        ("oci:no-such-dir:v1", True)])
    def test_which_refs_name_a_layout(self, text, layout, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        try:
            is_layout = zr._parse_location(text).is_layout
        except zr.InvalidReferenceError:  # no layout, and no valid reference either
            is_layout = False
        assert is_layout is layout
        (tmp_path / "latest").mkdir()
        assert zr._parse_location("oci:latest").is_layout  # a directory of that name is one

    def test_a_missing_layout_taken_for_a_registry_image_is_said(self, tmp_path):
        out = run_cli("pull", "oci:latest", "--cache", str(tmp_path / "c"), cwd=tmp_path,
                      env={"HTTPS_PROXY": "http://127.0.0.1:9"})
        assert out.returncode == 1
        assert ("warning: no layout latest here; taken as the image "
                "docker.io/library/oci:latest") in out.stderr

    def test_archives_that_are_no_tar_are_one_line(self, tmp_path):
        (tmp_path / "empty.tar").write_bytes(b"")
        (tmp_path / "text.tar").write_bytes(b"hello\n")
        for name, text in (("empty.tar", "is not a tar archive (empty file)"),
                           ("text.tar", "is not a tar archive")):
            out = run_cli("import", f"oci-archive:{tmp_path}/{name}", "--cache",
                          str(tmp_path / "c"), cwd=tmp_path)
            assert out.returncode == 1 and out.stderr.strip().endswith(text)
            assert len(out.stderr.strip().splitlines()) == 1

    @pytest.mark.parametrize("command", [["pull"], ["inspect"], ["pull-wasm", "-o", "x.wasm"],
                                         ["export", "REF", "oci:out"]])
    def test_commands_that_read_no_layout_say_so(self, tmp_path, command):
        args = [a if a != "REF" else "oci:./l:v1" for a in command]
        if "oci:./l:v1" not in args:
            args.insert(1, "oci:./l:v1")
        out = run_cli(*args, "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 2 and "import and unpack read layouts" in out.stderr
        assert not (tmp_path / "c").exists()  # refused before any cache is made

    def test_a_layout_with_two_tags_of_one_image_needs_none(self, registry, tmp_path):
        registry.add_image("app", "v1", [make_layer([F("f", b"x")])])
        for tag in ("a", "b"):
            make_puller().export_image(f"{registry.host}/app:v1", f"oci:{tmp_path}/l:{tag}")
        make_puller(zr.BlobCache()).unpack_layout(f"oci:{tmp_path}/l", tmp_path / "root")
        assert os.listdir(tmp_path / "root") == ["f"]

    def test_a_foreign_image_unpacked_without_platform_is_warned_about(self, registry,
                                                                       tmp_path):
        host = zr.host_platform()
        foreign = "arm64" if host.architecture != "arm64" else "amd64"
        registry.add_image("app", "v1", [make_layer([F("f", b"x")])],
                           config={"os": "linux", "architecture": foreign})
        make_puller(platform=f"linux/{foreign}").export_image(f"{registry.host}/app:v1",
                                                              f"oci:{tmp_path}/l:v1")
        out = run_cli("unpack", f"oci:{tmp_path}/l:v1", str(tmp_path / "root"), "-q",
                      "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == (
            f"zlayer-registry: warning: oci:{tmp_path}/l:v1 is a linux/{foreign} image; "
            f"this host is {host}\n")
        out = run_cli("unpack", f"oci:{tmp_path}/l:v1", str(tmp_path / "root2"), "-q",
                      "--platform", f"linux/{foreign}", "--cache", str(tmp_path / "c"),
                      cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == ""  # asked for: no warning

    def test_an_imported_layout_unpacks_after_it_is_gone(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [make_layer([F("kept", b"x")])])
        make_puller().export_image(f"{registry.host}/app:v1", f"oci:{tmp_path}/l:v1")
        cache = zr.BlobCache.open(tmp_path / "c")
        make_puller(cache).import_image(f"oci:{tmp_path}/l:v1")
        shutil.rmtree(tmp_path / "l")
        manifest = make_puller(cache).unpack_layout(f"oci:{tmp_path}/l:v1", tmp_path / "root")
        assert manifest.digest == image["digest"]
        assert (tmp_path / "root" / "kept").read_bytes() == b"x"
        for src in (f"oci:{tmp_path}/l:v2", f"oci:{tmp_path}/l"):
            with pytest.raises(zr.LayoutError, match="does not exist \\(nor was it imported"):
                make_puller(cache).unpack_layout(src, tmp_path / "root2")

    def test_a_single_image_for_another_platform_is_refused(self, registry, tmp_path):
        registry.add_image("app", "v1", [make_layer([F("f", b"x")])])
        make_puller().export_image(f"{registry.host}/app:v1", f"oci:{tmp_path}/l:v1")
        puller = make_puller(zr.BlobCache(), platform="linux/arm64")
        with pytest.raises(zr.ManifestError, match="is a single linux/amd64 image, not "
                           "linux/arm64"):
            puller.unpack_layout(f"oci:{tmp_path}/l:v1", tmp_path / "root")
        assert not (tmp_path / "root").exists()


class TestImport:
    def _export(self, registry, tmp_path, transport="oci", name="layout"):
        digest, amd, arm = _multi(registry)
        image = registry.add_image("app", "v1", [layer_bytes(3, 700)])
        puller = make_puller(zr.BlobCache.open(tmp_path / "src-cache"))
        target = tmp_path / name
        puller.export_image(f"{registry.host}/multi:v1", f"{transport}:{target}:multi")
        puller.export_image(f"{registry.host}/app:v1", f"{transport}:{target}:app"
                            if transport == "oci" else f"{transport}:{tmp_path}/other.tar:app")
        return target, digest, image

    def test_same_tag_in_two_layouts_and_untagged_images_survive_gc(self, tmp_path):
        (tmp_path / "a.wasm").write_bytes(CORE_MODULE)
        (tmp_path / "b.wasm").write_bytes(COMPONENT)
        first = zr.export_wasm_as_oci(tmp_path / "a.wasm", tmp_path / "one", tag="t1")
        second = zr.export_wasm_as_oci(tmp_path / "b.wasm", tmp_path / "two", tag="t1")
        untagged = zr.export_wasm_as_oci(tmp_path / "a.wasm", tmp_path / "three", tag=None,
                                         module_name="other")
        cache = zr.BlobCache.open(tmp_path / "c")
        puller = make_puller(cache)
        for name in ("one", "two", "three"):
            puller.import_image(f"oci:{tmp_path / name}")
        assert cache.references() == {
            f"oci:{tmp_path / 'one'}:t1": first.digest,
            f"oci:{tmp_path / 'two'}:t1": second.digest,
            f"oci:{tmp_path / 'three'}@{untagged.digest}": untagged.digest}
        assert cache.gc() == [] and cache.verify() == []

    def test_round_trip_with_tags(self, registry, tmp_path):
        layout, index_digest, image = self._export(registry, tmp_path)
        cache = zr.BlobCache.open(tmp_path / "dst")
        infos = make_puller(cache).import_image(f"oci:{layout}")
        assert sorted((i.reference, i.digest) for i in infos) == [
            ("app", image["digest"]), ("multi", index_digest)]
        assert cache.verify() == [] and len(cache.entries()) == len(_layout_files(layout))
        assert cache.references() == {f"oci:{layout}:app": image["digest"],
                                      f"oci:{layout}:multi": index_digest}
        only = make_puller(zr.BlobCache()).import_image(f"oci:{layout}:app")
        assert [i.digest for i in only] == [image["digest"]]
        with pytest.raises(zr.LayoutError, match="no image tagged 'nope'.*app, multi"):
            make_puller(zr.BlobCache()).import_image(f"oci:{layout}:nope")

    def test_archive_import(self, registry, tmp_path):
        archive, index_digest, _ = self._export(registry, tmp_path, "oci-archive", "a.tar")
        cache = zr.BlobCache()
        infos = make_puller(cache).import_image(f"oci-archive:{archive}")
        assert [(i.reference, i.digest) for i in infos] == [("multi", index_digest)]
        assert cache.verify() == [] and cache.has(index_digest)

    @pytest.mark.parametrize("damage, message", [
        ("missing", "is missing"), ("corrupt", "is corrupt"), ("version", "imageLayoutVersion"),
        ("index", "index.json in .* is not valid JSON"), ("truncated", "is corrupt")])
    def test_bad_layouts_are_refused_and_nothing_is_cached(self, registry, tmp_path, damage,
                                                           message):
        layout, _, image = self._export(registry, tmp_path)
        blob = layout / "blobs" / "sha256" / image["layers"][0]["digest"][7:]
        if damage == "missing":
            blob.unlink()
        elif damage in ("corrupt", "truncated"):
            data = blob.read_bytes()
            blob.unlink()
            blob.write_bytes(data[:-1] if damage == "truncated" else b"X" + data[1:])
        elif damage == "version":
            (layout / "oci-layout").write_text('{"imageLayoutVersion": "9.9.9"}')
        else:
            (layout / "index.json").write_text("{broken")
        cache = zr.BlobCache.open(tmp_path / "dst")
        with pytest.raises(zr.LayoutError, match=message):
            make_puller(cache).import_image(f"oci:{layout}")
        assert cache.entries() == [] and cache.references() == {}
        assert os.listdir(tmp_path / "dst" / "tmp") == []
        out = run_cli("import", f"oci:{layout}", "--cache", str(tmp_path / "cli"), cwd=tmp_path)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1

    def test_cli_export_import_and_pull_output(self, registry, tmp_path):
        image = registry.add_image("app", "v1", [layer_bytes(1, 900)])
        out = run_cli("pull", f"{registry.host}/app:v1", "--output", f"oci:{tmp_path}/p:x",
                      "--cache", str(tmp_path / "c"), "-q", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / "p" / "index.json").read_text())["manifests"][0][
            "digest"] == image["digest"]
        out = run_cli("export", f"{registry.host}/app:v1", f"oci-archive:{tmp_path}/e.tar",
                      "--json", "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert json.loads(out.stdout)["format"] == "oci-archive"
        out = run_cli("import", f"oci-archive:{tmp_path}/e.tar", "--json", "--cache",
                      str(tmp_path / "c2"), cwd=tmp_path)
        assert json.loads(out.stdout) == [{"reference": f"oci-archive:{tmp_path}/e.tar:v1",
                                           "tag": "v1", "digest": image["digest"],
                                           "media_type": fake.OCI_MANIFEST}]
        listing = json.loads(run_cli("cache", "ls", "--json", "--cache", str(tmp_path / "c2"),
                                     cwd=tmp_path).stdout)
        assert listing["references"] == {f"oci-archive:{tmp_path}/e.tar:v1": image["digest"]}
        # oci: names a directory and oci-archive: a file; docker-archive is not imported.
        for src, text in ((f"oci:{tmp_path}/e.tar", "is not a directory"),
                          (f"oci-archive:{tmp_path}/p", "is a directory"),
                          (f"docker-archive:{tmp_path}/e.tar", "are not imported")):
            out = run_cli("import", src, "--cache", str(tmp_path / "c3"), cwd=tmp_path)
            assert out.returncode in (1, 2) and text in out.stderr, (src, out.stderr)

    def test_layouts_with_odd_index_or_corrupt_blobs_are_handled(self, tmp_path):
        layout = tmp_path / "l"
        (tmp_path / "m.wasm").write_bytes(CORE_MODULE)
        zr.export_wasm_as_oci(tmp_path / "m.wasm", layout, tag="a")
        index = json.loads((layout / "index.json").read_text())
        index["manifests"].append({"mediaType": "x", "digest": SHA_A, "size": 1,
                                   "annotations": ["not", "a", "dict"]})
        (layout / "index.json").write_text(json.dumps(index))
        wasm_blob = layout / "blobs" / "sha256" / zr.compute_digest(CORE_MODULE)[7:]
        wasm_blob.chmod(0o644)
        wasm_blob.write_bytes(b"garbage!")
        zr.export_wasm_as_oci(tmp_path / "m.wasm", layout, tag="b")
        assert wasm_blob.read_bytes() == CORE_MODULE  # rewritten, not trusted

    def test_layout_blobs_must_be_regular_files(self, registry, tmp_path):
        registry.add_image("app", "v1", [layer_bytes(1, 100)])
        make_puller().export_image(f"{registry.host}/app:v1", f"oci:{tmp_path}/l:v1")
        blobs = sorted((tmp_path / "l" / "blobs" / "sha256").iterdir(),
                       key=lambda p: p.stat().st_size)
        victim = blobs[-1]
        victim.unlink()
        os.mkfifo(victim)  # would hang a reader that opens it blindly
        with pytest.raises(zr.LayoutError, match="is missing"):
            make_puller(zr.BlobCache()).import_image(f"oci:{tmp_path}/l")
        victim.unlink()
        victim.symlink_to("/dev/zero")
        with pytest.raises(zr.LayoutError, match="is missing"):
            make_puller(zr.BlobCache()).import_image(f"oci:{tmp_path}/l")


# -----------------------------------------------------------------------------
# 38-39. PUSH: uploads, mounts, manifests; ImagePusher and the push/copy commands
# -----------------------------------------------------------------------------

import _oci_testkit as kit  # noqa: E402


def _pusher(cache=None, **kwargs):
    kwargs.setdefault("environ", {})
    kwargs.setdefault("platform", "linux/amd64")
    return zr.ImagePusher(cache if cache is not None else zr.BlobCache(), sleep=Sleeps(),
                          **kwargs)


def _small_image(layout, tag="v1", seed=1):
    return kit.build_image(layout, tag, layers=kit.default_layers(2, random_bytes=300_000,
                                                                  small_files=3, seed=seed))


class TestPush:
    def test_push_layout_uploads_each_blob_in_one_put_and_the_manifest_byte_for_byte(
            self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        with _pusher() as pusher:
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        raw = (tmp_path / "layout" / "blobs" / "sha256" / image.digest[7:]).read_bytes()
        assert registry.manifests[("team/app", "v1")][0] == raw
        assert result.digest == image.digest
        assert sorted(d.digest for d in result.uploaded) == sorted(
            [image.config.digest] + [l.digest for l in image.layers])
        for blob in [image.config, *image.layers]:
            assert zr.compute_digest(registry.blobs[blob.digest]) == blob.digest
        assert registry.count("PATCH") == 0
        # Blob PUTs and one manifest PUT; the largest blob went first.
        puts = [r for r in registry.requests if r["method"] == "PUT"]
        assert len(puts) == 3 + 1
        assert puts[-1]["path"].endswith("/manifests/v1")

    def test_re_push_sends_one_head_per_blob_and_no_blob_bytes(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        before = len(registry.requests)
        with _pusher() as pusher:
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        again = registry.requests[before:]
        assert [r["method"] for r in again].count("HEAD") == 3
        assert not [r for r in again if "/blobs/uploads/" in r["path"]]
        assert len(result.skipped) == 3 and not result.uploaded

    def test_chunks_are_at_least_the_registrys_minimum(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        registry.chunk_min_length = 250_000
        with _pusher(chunk_bytes=100_000) as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        sizes = [int(r["headers"]["Content-Length"]) for r in registry.requests
                 if r["method"] == "PATCH"]
        # Every chunk but each blob's last is the registry's minimum, not the 100 kB asked.
        assert sizes and max(sizes) == 250_000
        assert len(sizes) == sum(-(-b.size // 250_000) for b in [image.config, *image.layers])
        for blob in [image.config, *image.layers]:
            assert zr.compute_digest(registry.blobs[blob.digest]) == blob.digest

    def test_chunked_upload_sends_ranges_in_order(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        with _pusher(chunk_bytes=100_000) as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        patches = [r for r in registry.requests if r["method"] == "PATCH"]
        expected = sum(-(-b.size // 100_000) for b in [image.config, *image.layers])
        assert len(patches) == expected
        ranges = [p["headers"]["Content-Range"] for p in patches]
        assert "0-99999" in ranges and "100000-199999" in ranges
        for blob in [image.config, *image.layers]:
            assert zr.compute_digest(registry.blobs[blob.digest]) == blob.digest

    def test_a_413_turns_the_upload_into_chunks(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        registry.max_body_bytes = 64 * 1024
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert registry.count("PATCH") > 0
        for blob in image.layers:
            assert registry.blobs[blob.digest] == kit.read_blob(tmp_path / "layout", blob.digest)

    def test_copy_within_a_registry_mounts_every_blob(self, registry, tmp_path):
        registry.strict_repositories = True
        registry.add_image("src/app", "v1", [layer_bytes(1), layer_bytes(2)])
        with _pusher() as pusher:
            result = pusher.copy(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:v1")
        mounts = [r for r in registry.requests if "mount=" in r["path"]]
        assert len(result.mounted) == 3 and not result.uploaded
        assert all("from=src%2Fapp" in r["path"] or "from=src/app" in r["path"] for r in mounts)
        assert not [r for r in registry.requests if r["method"] in ("PATCH",) or
                    (r["method"] == "PUT" and "/blobs/" in r["path"])]
        assert registry.manifests[("dst/app", "v1")] == registry.manifests[("src/app", "v1")]

    def test_a_pushed_blob_is_mounted_into_the_next_repository(self, registry, tmp_path):
        registry.strict_repositories = True
        _small_image(tmp_path / "layout")
        cache = zr.BlobCache()
        with _pusher(cache) as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/one/app:v1")
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/two/app:v1")
        assert len(result.mounted) == 3 and not result.uploaded
        assert all("from=one" in r["path"] for r in registry.requests if "mount=" in r["path"]
                   and "/two/" in r["path"] and "from=" in r["path"])

    def test_a_registry_that_ignores_mount_gets_the_upload_in_its_session(self, registry,
                                                                          tmp_path):
        registry.support_mount = False
        registry.strict_repositories = True
        registry.add_image("src/app", "v1", [layer_bytes(3)])
        with _pusher() as pusher:
            result = pusher.copy(f"{registry.host}/src/app:v1", f"{registry.host}/dst/app:v1")
        assert len(result.uploaded) == 2
        # One POST per blob: the mount's 202 session was used, not a second POST.
        posts = [r for r in registry.requests if r["method"] == "POST"]
        assert len(posts) == 2

    def test_sessions_of_failed_mounts_and_failed_uploads_are_deleted(self, registry, tmp_path):
        registry.support_mount = False
        registry.strict_repositories = True
        _small_image(tmp_path / "layout")
        cache = zr.BlobCache()
        with _pusher(cache) as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/one/app:v1")
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/two/app:v1")
            before = len(registry.requests)
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1",
                                 f"{registry.host}/three/app:v1")
        assert len(result.uploaded) == 3
        # Two known locations, two refused mounts per blob: the first session is
        # deleted, the second carries the upload; none is left open.
        deletes = [r for r in registry.requests[before:] if r["method"] == "DELETE"]
        assert len(deletes) == 3 and not registry.uploads
        registry.faults.append(lambda m, p, h: {"status": 400, "once": False}
                               if m == "PUT" and "/blobs/uploads/" in p else None)
        with _pusher(cache) as pusher, pytest.raises(zr.RegistryError):
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/four/app:v1")
        assert not registry.uploads

    def test_anonymous_mount_is_tried_where_the_registry_allows_it(self, registry, tmp_path):
        registry.support_anonymous_mount = True
        registry.strict_repositories = True
        _small_image(tmp_path / "layout")
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/one/app:v1")
        with _pusher() as pusher:  # a new cache: no known location
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/two/app:v1")
        assert len(result.mounted) == 3

    def test_an_interrupted_put_resumes_from_what_the_session_holds(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        big = max(image.layers, key=lambda b: b.size)
        # The fault is aimed at the big layer's PUT: the config and the small
        # layer go up in parallel and would otherwise take it, whole.
        registry.faults.append(lambda m, p, h: {"status": 500, "keep_bytes": 120_000}
                               if m == "PUT" and "/blobs/uploads/" in p
                               and int(h.get("Content-Length") or 0) == big.size else None)
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        patches = [r for r in registry.requests if r["method"] == "PATCH"]
        assert patches and patches[0]["headers"]["Content-Range"].startswith("120000-")
        assert any(r["method"] == "GET" and "/blobs/uploads/" in r["path"]
                   for r in registry.requests)
        assert registry.blobs[big.digest] == kit.read_blob(tmp_path / "layout", big.digest)

    def test_a_416_resyncs_from_the_range_the_session_reports(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        calls = []

        def once(method, path, headers):
            if method == "PATCH" and headers.get("Content-Range", "").startswith("100000-") \
                    and not calls:
                calls.append(1)
                return {"status": 416, "headers": {"Range": "0-99999"}}
            return None
        registry.faults.append(once)
        with _pusher(chunk_bytes=100_000) as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert calls
        for blob in image.layers:
            assert registry.blobs[blob.digest] == kit.read_blob(tmp_path / "layout", blob.digest)

    def test_an_upload_location_on_another_host_is_refused(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        registry.faults.append(lambda m, p, h: {
            "status": 202, "headers": {"Location": "http://127.0.0.2:9/v2/x/blobs/uploads/1"},
            "body": b""} if m == "POST" else None)
        with _pusher() as pusher, pytest.raises(zr.RegistryError) as info:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert "127.0.0.2" in str(info.value) or "another host" in str(info.value)

    def test_an_upload_location_with_credentials_is_refused(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        registry.faults.append(lambda m, p, h: {
            "status": 202, "headers": {"Location": f"http://u:pw@{registry.host}/v2/x/up/1"},
            "body": b"", "once": False} if m == "POST" else None)
        with _pusher() as pusher, pytest.raises(zr.RegistryError) as info:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert "credentials" in str(info.value) and "pw" not in str(info.value)

    def test_a_201_naming_another_digest_is_refused(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        registry.faults.append(lambda m, p, h: {
            "status": 201, "headers": {"Docker-Content-Digest": SHA_A}, "body": b"",
            "once": False} if m == "PUT" and "/blobs/uploads/" in p else None)
        with _pusher() as pusher, pytest.raises(zr.RegistryError) as info:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert SHA_A in str(info.value)
        assert ("team/app", "v1") not in registry.manifests

    def test_an_index_goes_children_first_and_its_tag_last(self, registry, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        with _pusher() as pusher:
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/multi:v1")
        puts = [r["path"] for r in registry.requests
                if r["method"] == "PUT" and "/manifests/" in r["path"]]
        assert puts[-1].endswith("/manifests/v1") and len(puts) == 4
        assert {p.rsplit("/", 1)[1] for p in puts[:-1]} == {
            i.digest for i in index.images.values()}
        assert result.digest == index.digest and result.manifests == 4

    def test_platform_pushes_one_image_of_an_index(self, registry, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        with _pusher() as pusher:
            result = pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/one:v1",
                                 platform="linux/arm64")
        assert result.digest == index.images["linux/arm64/v8"].digest
        assert registry.manifests[("one", "v1")][0] == kit.read_blob(
            tmp_path / "layout", result.digest)

    def test_a_rejected_manifest_names_the_registrys_answer(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        registry.faults.append(lambda m, p, h: {
            "status": 400, "body": json.dumps({"errors": [{"code": "MANIFEST_INVALID",
                                                           "message": "artifactType refused"}]
                                              }).encode()}
            if m == "PUT" and "/manifests/" in p else None)
        with _pusher() as pusher, pytest.raises(zr.RegistryError) as info:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert "MANIFEST_INVALID" in str(info.value) or "artifactType refused" in str(info.value)

    def test_registry_to_layout_copy_equals_the_source(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
            result = pusher.copy(f"{registry.host}/team/app:v1", f"oci:{tmp_path / 'back'}:v1")
        for blob in result.uploaded:
            assert kit.read_blob(tmp_path / "back", blob.digest) == kit.read_blob(
                tmp_path / "layout", blob.digest)
        assert kit.describe_layout(tmp_path / "back", "v1") == kit.describe_layout(
            tmp_path / "layout", "v1")

    def test_docker_archive_source_becomes_a_docker_v2_manifest(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        with _pusher() as pusher:
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1",
                        f"docker-archive:{tmp_path / 'saved.tar'}:app:v1")
            result = pusher.copy(f"docker-archive:{tmp_path / 'saved.tar'}",
                                 f"{registry.host}/saved:v1")
        raw, media_type = registry.manifests[("saved", "v1")]
        assert media_type == zr.MEDIA_TYPE_DOCKER_MANIFEST
        assert zr.compute_digest(raw) == result.digest
        manifest = json.loads(raw)
        for layer in manifest["layers"]:
            assert layer["digest"] in registry.blobs
        # And it pulls back as an image.
        with make_puller() as puller:
            pulled = puller.pull_image(f"{registry.host}/saved:v1")
        assert len(pulled.layers) == 2

    def test_a_corrupt_layout_blob_is_never_pushed(self, registry, tmp_path):
        image = _small_image(tmp_path / "layout")
        path = tmp_path / "layout" / "blobs" / "sha256" / image.layers[0].digest[7:]
        data = bytearray(path.read_bytes())
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))
        with _pusher() as pusher, pytest.raises(zr.DigestMismatchError):
            pusher.copy(f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/team/app:v1")
        assert image.layers[0].digest not in registry.blobs
        assert ("team/app", "v1") not in registry.manifests


class TestPushCli:
    def test_push_json_reports_each_blob(self, registry, tmp_path):
        registry.strict_repositories = True
        _small_image(tmp_path / "layout")
        done = run_cli("push", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/cli/app:v1",
                       "--cache", str(tmp_path / "cache"), "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["destination"] == f"{registry.host}/cli/app:v1"
        assert len(data["uploaded"]) == 3 and data["bytes_uploaded"] > 300_000
        again = run_cli("push", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/cli/b:v1",
                        "--cache", str(tmp_path / "cache"), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "3 mounted" in again.stdout

    def test_progress_json_is_one_object_per_line(self, registry, tmp_path):
        _small_image(tmp_path / "layout")
        done = run_cli("copy", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/cli/app:v1",
                       "--cache", str(tmp_path / "cache"), "--progress=json", "-q",
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stderr.splitlines()]
        events = {(r["event"], r.get("digest")) for r in records}
        assert {e for e, _ in events} >= {"start", "done", "total"}
        assert records[-1]["event"] == "total" and records[-1]["blobs"] == 3
        assert done.stdout.strip().startswith("sha256:")

    def test_progress_json_says_which_blobs_were_mounted_or_skipped(self, registry, tmp_path):
        registry.strict_repositories = True
        _small_image(tmp_path / "layout")
        cache = str(tmp_path / "cache")
        first = run_cli("copy", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/cli/a:v1",
                        "--cache", cache, "-q", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        for target, event in (("cli/b:v1", "mounted"), ("cli/b:v1", "skipped")):
            done = run_cli("copy", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/{target}",
                           "--cache", cache, "--progress=json", "-q", cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            records = [json.loads(line) for line in done.stderr.splitlines()]
            assert [r["event"] for r in records] == [event] * 3 + ["total"]
            assert records[-1][event] == 3 and records[-1]["bytes"] == 0
            assert all(r["total"] > 0 for r in records[:3])

    def test_pull_takes_progress_json_too(self, registry, tmp_path):
        registry.add_image("p/app", "v1", [layer_bytes(5)])
        done = run_cli("pull", f"{registry.host}/p/app:v1", "--cache", str(tmp_path / "c"),
                       "--progress", "json", "-q", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        actions = {json.loads(line)["action"] for line in done.stderr.splitlines()}
        assert actions == {"download"}

    @pytest.mark.parametrize("args, expected", [
        (["push", "oci:./missing:v1", "127.0.0.1:1/x:v1"], "does not exist"),
        (["push", "oci:./layout:v1", "oci:./other"], "unsupported destination"),
        (["copy", "oci:./layout:v1", "127.0.0.1:1/x:v1", "--all", "--platform", "linux/amd64"],
         "contradict"),
        (["copy", "oci:./layout:v1"], "required"),
        (["push", "oci:./layout:v1", "127.0.0.1:1/x:v1"], "127.0.0.1:1"),
    ])
    def test_bad_input_is_one_line(self, tmp_path, args, expected):
        _small_image(tmp_path / "layout")
        done = run_cli(*args, "--cache", str(tmp_path / "cache"), cwd=tmp_path, timeout=60)
        assert done.returncode in (1, 2)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
        assert "Traceback" not in done.stderr

    def test_dest_creds_password_is_never_printed(self, registry, tmp_path):
        registry.auth = "basic"
        _small_image(tmp_path / "layout")
        done = run_cli("copy", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/c/app:v1",
                       "--dest-creds", "user:wrongpass", "--cache", str(tmp_path / "c"),
                       cwd=tmp_path)
        assert done.returncode == 1
        assert "wrongpass" not in done.stderr + done.stdout
        ok = run_cli("copy", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/c/app:v1",
                     "--dest-creds", "user:secret", "--cache", str(tmp_path / "c"), "-q",
                     cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert ("c/app", "v1") in registry.manifests


# -----------------------------------------------------------------------------
# 41. PUSH: referrers (copy --referrers)
# -----------------------------------------------------------------------------

def _add_referrer(registry, repository, subject, artifact_type, note, tag_schema):
    """Put an artifact whose subject is ``subject`` into a fake registry; list it in the
    subject's sha256-<hex> index too when ``tag_schema`` (a registry without the API)."""
    empty = registry.add_blob(b"{}")
    body = registry.add_blob(note.encode())
    manifest = {"schemaVersion": 2, "mediaType": fake.OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": dict(empty, mediaType="application/vnd.oci.empty.v1+json"),
                "layers": [dict(body, mediaType="text/plain")],
                "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"],
                            "size": subject["size"]}}
    digest = registry.add_manifest(repository, None, manifest)
    raw = registry.manifests[(repository, digest)][0]
    if tag_schema:
        tag = subject["digest"].replace(":", "-")
        listed = json.loads(registry.manifests[(repository, tag)][0])["manifests"] \
            if (repository, tag) in registry.manifests else []
        listed.append({"mediaType": fake.OCI_MANIFEST, "digest": digest, "size": len(raw),
                       "artifactType": artifact_type})
        registry.add_manifest(repository, tag, {"schemaVersion": 2, "mediaType": fake.OCI_INDEX,
                                                "manifests": listed})
    return {"mediaType": fake.OCI_MANIFEST, "digest": digest, "size": len(raw)}


@pytest.fixture
def destination():
    server = fake.FakeRegistry()
    yield server
    server.close()


class TestCopyReferrers:
    def test_tag_schema_source_to_an_api_destination(self, registry, destination):
        image = registry.add_image("src/app", "v1", [layer_bytes(1, 1000)])
        sbom = _add_referrer(registry, "src/app", image, "application/spdx+json", "sbom", True)
        signature = _add_referrer(registry, "src/app", sbom, "application/vnd.dev.sig", "sig",
                                  True)
        destination.support_referrers = True
        with _pusher() as pusher:
            result = pusher.copy(f"{registry.host}/src/app:v1", f"{destination.host}/dst/app:v1",
                                 referrers=True)
        assert result.referrers == [sbom["digest"], signature["digest"]]
        for digest in (sbom["digest"], signature["digest"]):
            assert destination.manifests[("dst/app", digest)][0] == \
                registry.manifests[("src/app", digest)][0]
        # The destination indexes subjects itself: no fallback tag is written.
        assert ("dst/app", image["digest"].replace(":", "-")) not in destination.manifests

    def test_api_source_to_a_tag_schema_destination(self, registry, destination):
        registry.support_referrers = True
        image = registry.add_image("src/app", "v1", [layer_bytes(1, 1000)])
        sbom = _add_referrer(registry, "src/app", image, "application/spdx+json", "sbom", False)
        with _pusher() as pusher:
            result = pusher.copy(f"{registry.host}/src/app:v1", f"{destination.host}/dst/app:v1",
                                 referrers=True)
        assert result.referrers == [sbom["digest"]]
        tagged = json.loads(destination.manifests[
            ("dst/app", image["digest"].replace(":", "-"))][0])
        assert tagged["mediaType"] == fake.OCI_INDEX
        assert [(d["digest"], d["artifactType"]) for d in tagged["manifests"]] == [
            (sbom["digest"], "application/spdx+json")]
        # Copying again adds nothing to the fallback index.
        with _pusher() as pusher:
            pusher.copy(f"{registry.host}/src/app:v1", f"{destination.host}/dst/app:v1",
                        referrers=True)
        again = json.loads(destination.manifests[
            ("dst/app", image["digest"].replace(":", "-"))][0])
        assert len(again["manifests"]) == 1

    def test_without_the_flag_no_referrer_is_copied(self, registry, destination):
        image = registry.add_image("src/app", "v1", [layer_bytes(1, 1000)])
        sbom = _add_referrer(registry, "src/app", image, "application/spdx+json", "sbom", True)
        with _pusher() as pusher:
            result = pusher.copy(f"{registry.host}/src/app:v1", f"{destination.host}/dst/app:v1")
        assert result.referrers == []
        assert ("dst/app", sbom["digest"]) not in destination.manifests
        assert not [r for r in registry.requests if "/referrers/" in r["path"]]

    def test_registry_to_local_and_back(self, registry, destination, tmp_path):
        image = registry.add_image("src/app", "v1", [layer_bytes(1, 1000)])
        sbom = _add_referrer(registry, "src/app", image, "application/spdx+json", "sbom", True)
        cache = zr.BlobCache.open(tmp_path / "cache")
        with _pusher(cache) as pusher:
            into = pusher.copy(f"{registry.host}/src/app:v1", "local:app:v1", referrers=True)
            assert into.referrers == [sbom["digest"]]
            store = zr.LocalRegistry(cache)
            listed = store.referrers("app", image["digest"])
            assert [(d.digest, d.artifact_type) for d in listed] == [
                (sbom["digest"], "application/spdx+json")]
            out = pusher.copy("local:app:v1", f"{destination.host}/dst/app:v1", referrers=True)
        assert out.referrers == [sbom["digest"]]
        assert destination.manifests[("dst/app", sbom["digest"])][0] == \
            registry.manifests[("src/app", sbom["digest"])][0]

    def test_referrers_to_a_layout_is_one_line(self, registry, tmp_path):
        registry.add_image("src/app", "v1", [layer_bytes(1, 1000)])
        done = run_cli("copy", f"{registry.host}/src/app:v1", f"oci:{tmp_path / 'out'}",
                       "--referrers", "--cache", str(tmp_path / "c"), cwd=tmp_path)
        assert done.returncode == 1 and "referrers are copied between registries" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
