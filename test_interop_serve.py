"""Interop tests of ``serve`` with real clients, and a differential test against
the CNCF distribution registry 2.8 (Debian ``docker-registry``).

skopeo pushes into our server (one image; ``--all --preserve-digests`` of an
index; a WASM artifact with artifactType) and reads back identical digests and
bytes; our puller pulls what skopeo pushed.  The same raw requests go to
distribution and to ours, and the status codes and the headers that matter are
compared.  Missing tools skip (fail under ZLAYER_REQUIRE_INTEROP=1).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402
import zlayer_registry as zr  # noqa: E402


@pytest.fixture(scope="module")
def distribution(tmp_path_factory):
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution-diff"))


@pytest.fixture
def ours(tmp_path):
    store = zr.LocalRegistry(tmp_path / "store")
    server = zr.RegistryServer(store, "127.0.0.1", 0).start()
    yield server
    server.shutdown()
    store.close()


def _skopeo(*args: str) -> str:
    try:
        binary = kit.require_tool("skopeo")
    except kit.ToolMissing as exc:
        kit.unavailable(str(exc))
    proc = subprocess.run([binary, "--insecure-policy", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _host(server) -> str:
    return "%s:%d" % server.address


def _cli(tmp_path: Path, *args: str) -> dict:
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(HERE))
    cache = [] if args[0] == "wasm-export" else ["--cache", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "-m", "zlayer_registry", *args, "--json", *cache],
                          capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(HERE))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _blob_files(layout: Path) -> dict:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


class TestSkopeoAgainstOurServer:
    def test_single_image_pushed_by_skopeo_reads_back_the_same(self, ours, tmp_path):
        image = kit.build_image(tmp_path / "layout", "v1")
        host = _host(ours)
        _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1",
                f"docker://{host}/sk/app:v1")
        raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{host}/sk/app:v1")
        assert kit.sha256_bytes(raw.encode()) == image.digest
        inspected = json.loads(_skopeo("inspect", "--tls-verify=false",
                                       f"docker://{host}/sk/app:v1"))
        assert inspected["Layers"] == [layer.digest for layer in image.layers]
        _skopeo("copy", "--src-tls-verify=false", f"docker://{host}/sk/app:v1",
                f"oci:{tmp_path / 'back'}:v1")
        assert _blob_files(tmp_path / "back") == {
            name: data for name, data in _blob_files(tmp_path / "layout").items()
            if name in _blob_files(tmp_path / "back")}
        # Our puller pulls what skopeo pushed.
        pulled = _cli(tmp_path, "pull", f"{host}/sk/app:v1")
        assert pulled["digest"] == image.digest

    def test_an_index_copied_all_with_preserved_digests(self, ours, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        host = _host(ours)
        _skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                f"oci:{tmp_path / 'layout'}:v1", f"docker://{host}/sk/multi:v1")
        raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{host}/sk/multi:v1")
        assert kit.sha256_bytes(raw.encode()) == index.digest
        _skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                f"docker://{host}/sk/multi:v1", f"oci:{tmp_path / 'back'}:v1")
        assert _blob_files(tmp_path / "back") == _blob_files(tmp_path / "layout")
        assert sorted(ours.store.list_manifests("sk/multi")) == sorted(
            [index.digest] + [i.digest for i in index.images.values()])

    def test_a_wasm_artifact_survives_byte_for_byte(self, ours, tmp_path):
        module = tmp_path / "plugin.wasm"
        module.write_bytes(b"\0asm\x01\0\0\0" + b"\x00\x04\x03zla")
        exported = _cli(tmp_path, "wasm-export", str(module), f"oci:{tmp_path / 'wasm'}:1.0")
        host = _host(ours)
        _skopeo("copy", "--preserve-digests", "--dest-tls-verify=false",
                f"oci:{tmp_path / 'wasm'}:1.0", f"docker://{host}/wasm/plugin:1.0")
        raw = _skopeo("inspect", "--raw", "--tls-verify=false",
                      f"docker://{host}/wasm/plugin:1.0")
        assert kit.sha256_bytes(raw.encode()) == exported["digest"]
        assert json.loads(raw)["artifactType"].startswith("application/vnd.wasm")
        out = tmp_path / "pulled.wasm"
        env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(HERE))
        done = subprocess.run([sys.executable, "-m", "zlayer_registry", "pull-wasm",
                               f"{host}/wasm/plugin:1.0", "-o", str(out), "--cache",
                               str(tmp_path / "cache")], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == module.read_bytes()

    def test_a_push_with_our_client_reads_back_in_skopeo(self, ours, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        host = _host(ours)
        result = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1", f"{host}/ours/multi:v1",
                      "--chunk-size", "64K")
        assert result["digest"] == index.digest
        raw = _skopeo("inspect", "--raw", "--tls-verify=false",
                      f"docker://{host}/ours/multi:v1")
        assert kit.sha256_bytes(raw.encode()) == index.digest


def _ask(host: str, method: str, path: str, body: bytes = b"", headers=None):
    """One request on a fresh connection: (status, headers by lower-case name, body)."""
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def _codes(data: bytes):
    try:
        return [e["code"] for e in json.loads(data)["errors"]]
    except (ValueError, KeyError, TypeError):
        return None


def _upload(host: str, digest: str, data: bytes):
    status, head, _ = _ask(host, "POST", "/v2/diff/app/blobs/uploads/")
    assert status == 202
    location = head["location"].split(host, 1)[-1]
    sep = "&" if "?" in location else "?"
    return _ask(host, "PUT", f"{location}{sep}digest={digest}", data)


class TestDifferentialAgainstDistribution:
    """The same requests to distribution 2.8 and to ours: same status codes, error codes
    and the headers clients rely on."""

    def _both(self, distribution, ours, method, path, body=b"", headers=None):
        theirs = _ask(distribution.host, method, path, body, headers)
        mine = _ask(_host(ours), method, path, body, headers)
        return theirs, mine

    def test_the_same_answers(self, distribution, ours, tmp_path):
        config = b'{"architecture":"amd64","os":"linux"}'
        layer = b"layer bytes for the differential test"
        digests = {name: zr.compute_digest(data) for name, data in
                   (("config", config), ("layer", layer))}
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": zr.MEDIA_TYPE_OCI_CONFIG, "digest": digests["config"],
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digests["layer"], "size": len(layer)}]}).encode()
        oci = {"Content-Type": zr.MEDIA_TYPE_OCI_MANIFEST}
        steps = [
            ("GET", "/v2/", b"", None, ()),
            ("GET", "/v2/diff/app/manifests/v1", b"", None, ()),
            ("HEAD", f"/v2/diff/app/blobs/{digests['layer']}", b"", None, ()),
            ("PUT", "/v2/diff/app/manifests/v1", manifest, oci, ()),      # blobs missing
            ("UPLOAD", digests["config"], config, None, ()),
            ("UPLOAD", digests["layer"], layer, None, ()),
            ("PUT", "/v2/diff/app/manifests/v1", manifest, oci, ("docker-content-digest",)),
            ("GET", "/v2/diff/app/manifests/v1", b"", {"Accept": zr.MEDIA_TYPE_OCI_MANIFEST},
             ("docker-content-digest", "content-type", "content-length")),
            ("HEAD", f"/v2/diff/app/blobs/{digests['layer']}", b"", None,
             ("docker-content-digest", "content-length")),
            ("GET", f"/v2/diff/app/blobs/{digests['layer']}", b"", {"Range": "bytes=0-4"},
             ("content-length",)),
            ("GET", "/v2/diff/app/tags/list", b"", None, ()),
            ("GET", "/v2/diff/nope/tags/list", b"", None, ()),
            ("PUT", "/v2/diff/app/manifests/v2", b"{not json", oci, ()),
            ("GET", "/v2/diff/app/blobs/sha256:" + "1" * 64, b"", None, ()),
            ("DELETE", "/v2/diff/app/manifests/sha256:" + "2" * 64, b"", None, ()),
        ]
        for method, path, body, headers, compared in steps:
            if method == "UPLOAD":  # POST a session, PUT the bytes with ?digest=
                theirs, mine = (_upload(host, path, body) for host in
                                (distribution.host, _host(ours)))
                assert mine[0] == theirs[0] == 201
                assert mine[1]["docker-content-digest"] == theirs[1]["docker-content-digest"]
                continue
            theirs, mine = self._both(distribution, ours, method, path, body, headers)
            assert mine[0] == theirs[0], (method, path, theirs[0], mine[0], mine[2][:200])
            assert _codes(mine[2]) == _codes(theirs[2]) or method == "HEAD", (
                method, path, _codes(theirs[2]), _codes(mine[2]))
            for header in compared + ("docker-distribution-api-version",):
                if header in theirs[1]:
                    assert mine[1].get(header) == theirs[1][header], (method, path, header)
        # Known difference: a monolithic POST ?digest= (optional in the spec) stores the
        # blob here (201); distribution 2.8 ignores it and opens a session (202).
        blob = b"monolithic"
        path = f"/v2/diff/mono/blobs/uploads/?digest={zr.compute_digest(blob)}"
        theirs, mine = self._both(distribution, ours, "POST", path, blob)
        assert (theirs[0], mine[0]) == (202, 201)
        # An upload session: both answer with Location, Range and Docker-Upload-UUID.
        # Known difference: a chunk that does not start where the session ends is 416
        # here, as the spec says; distribution 2.8 ignores Content-Range on PATCH (a TODO
        # in its handler) and appends it.
        for host, out_of_order in ((distribution.host, 202), (_host(ours), 416)):
            status, head, _ = _ask(host, "POST", "/v2/diff/up/blobs/uploads/")
            assert status == 202
            assert {"location", "range", "docker-upload-uuid"} <= set(head)
            location = head["location"]
            location = location.split(host, 1)[-1] if host in location else location
            status, head, _ = _ask(host, "PATCH", location, b"abc", {"Content-Range": "0-2"})
            assert status == 202 and head["range"] == "0-2"
            location = head["location"].split(host, 1)[-1] if host in head["location"] \
                else head["location"]
            status, head, _ = _ask(host, "PATCH", location, b"xyz", {"Content-Range": "7-9"})
            assert status == out_of_order, (host, status)


@pytest.fixture
def runroot():
    """A short run directory (podman refuses one longer than 50 characters)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="zlrun", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _containers_tool(name: str, tmp_path: Path, runroot: str):
    """Return the argv prefix of podman or buildah, as root with a private vfs store."""
    try:
        binary = kit.require_tool(name)
    except kit.ToolMissing as exc:
        kit.unavailable(str(exc))
    return [binary, "--root", str(tmp_path / "containers"), "--runroot", runroot,
            "--storage-driver", "vfs"]


def _run(argv, **kwargs) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert proc.returncode == 0, (argv[:4], proc.stderr[-2000:])
    return proc.stdout


class TestContainerToolsAgainstOurServer:
    def test_podman_pulls_and_pushes(self, ours, tmp_path, runroot):
        image = kit.build_image(tmp_path / "layout", "v1")
        host = _host(ours)
        _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1",
                f"docker://{host}/pod/src:v1")
        podman = _containers_tool("podman", tmp_path, runroot)
        _run(podman + ["pull", "--tls-verify=false", f"{host}/pod/src:v1"])
        _run(podman + ["push", "--tls-verify=false", f"{host}/pod/src:v1",
                       f"docker://{host}/pod/pushed:v1"])
        assert ours.store.list_tags("pod/pushed") == ["v1"]
        pushed = ours.store.get_manifest("pod/pushed", "v1")
        source = json.loads((tmp_path / "layout" / "blobs" / "sha256" /
                             image.config.digest[7:]).read_text())
        config = json.loads(ours.store.get_blob(pushed.config.digest))
        assert config["rootfs"]["diff_ids"] == source["rootfs"]["diff_ids"]

    def test_buildah_commits_pushes_and_pushes_a_manifest_list_all(self, ours, tmp_path,
                                                                   runroot):
        kit.build_image(tmp_path / "layout", "v1")
        host = _host(ours)
        _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1",
                f"docker://{host}/bd/base:v1")
        buildah = _containers_tool("buildah", tmp_path, runroot)
        container = _run(buildah + ["from", "--tls-verify=false", f"{host}/bd/base:v1"]).strip()
        note = tmp_path / "note.txt"
        note.write_text("built on top\n")
        _run(buildah + ["copy", container, str(note), "/note.txt"])
        _run(buildah + ["commit", container, "localhost/built:v1"])
        _run(buildah + ["push", "--tls-verify=false", "localhost/built:v1",
                        f"docker://{host}/bd/built:v1"])
        built = ours.store.get_manifest("bd/built", "v1")
        base = ours.store.get_manifest("bd/base", "v1")
        assert len(built.layers) == len(base.layers) + 1
        _run(buildah + ["manifest", "create", "localhost/list:v1"])
        _run(buildah + ["manifest", "add", "localhost/list:v1", "localhost/built:v1"])
        _run(buildah + ["manifest", "push", "--all", "--tls-verify=false", "localhost/list:v1",
                        f"docker://{host}/bd/list:v1"])
        index = ours.store.get_manifest("bd/list", "v1")
        assert index.is_index and len(index.manifests) == 1
        child = ours.store.get_manifest("bd/list", index.manifests[0].digest)
        assert child is not None and len(child.layers) == len(built.layers)

    def test_oras_pushes_lists_and_pulls(self, ours, tmp_path):
        try:
            import oras.client
        except ImportError:
            kit.unavailable("oras is not installed (pip install oras)")
        host = _host(ours)
        artifact = tmp_path / "notes.txt"
        artifact.write_text("an artifact, not an image\n")
        client = oras.client.OrasClient(hostname=host, insecure=True)
        cwd = os.getcwd()
        os.chdir(tmp_path)  # oras-py names the layer after the path it is given
        try:
            response = client.push(files=["notes.txt"], target=f"{host}/oras/notes:v1")
            assert response.status_code == 201
            assert client.get_tags(f"{host}/oras/notes") == ["v1"]
            out = tmp_path / "out"
            out.mkdir()
            files = client.pull(target=f"{host}/oras/notes:v1", outdir=str(out))
        finally:
            os.chdir(cwd)
        assert [Path(f).read_text() for f in files] == [artifact.read_text()]

    def test_oras_with_basic_auth(self, tmp_path):
        try:
            import oras.client
        except ImportError:
            kit.unavailable("oras is not installed (pip install oras)")
        try:
            htpasswd = kit.require_tool("htpasswd")
        except kit.ToolMissing as exc:
            kit.unavailable(str(exc))
        users = tmp_path / "htpasswd"
        _run([htpasswd, "-Bbc", "-C", "5", str(users), "ci", "s3cret"])
        store = zr.LocalRegistry(tmp_path / "store")
        with zr.RegistryServer(store, "127.0.0.1", 0, htpasswd=str(users)).start() as server:
            host = _host(server)
            (tmp_path / "notes.txt").write_text("behind a password\n")
            # oras-py's default backend wants a token service; "basic" is its own for
            # registries that take basic credentials (distribution with htpasswd too).
            client = oras.client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
            client.login(username="ci", password="s3cret", hostname=host,
                         config_path=str(tmp_path / "docker-config.json"))
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                assert client.push(files=["notes.txt"],
                                   target=f"{host}/oras/auth:v1").status_code == 201
            finally:
                os.chdir(cwd)
            assert client.get_tags(f"{host}/oras/auth") == ["v1"]
            anonymous = http.client.HTTPConnection(*server.address, timeout=30)
            anonymous.request("GET", "/v2/oras/auth/tags/list")
            assert anonymous.getresponse().status == 401
            anonymous.close()
        store.close()


class TestMirrorOfDistribution:
    """``serve --upstream`` in front of distribution 2.8: skopeo and podman pull through it."""

    @pytest.fixture
    def mirror(self, distribution, tmp_path):
        store = zr.LocalRegistry(tmp_path / "mirror-store")
        server = zr.RegistryServer(store, "127.0.0.1", 0,
                                   upstreams=[f"http://{distribution.host}"]).start()
        yield server
        server.shutdown()
        store.close()

    def test_skopeo_copies_an_index_all_through_the_mirror_byte_for_byte(
            self, distribution, mirror, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        _skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                f"oci:{tmp_path / 'layout'}:v1", f"docker://{distribution.host}/mirrored/multi:v1")
        host = _host(mirror)
        _skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                f"docker://{host}/mirrored/multi:v1", f"oci:{tmp_path / 'back'}:v1")
        assert _blob_files(tmp_path / "back") == _blob_files(tmp_path / "layout")
        stored = f"{distribution.host.replace(':', '-')}/mirrored/multi"
        assert mirror.store.list_tags(stored) == ["v1"]
        # everything is in the mirror's store now: a second copy needs no upstream blob
        for name, data in _blob_files(tmp_path / "layout").items():
            assert mirror.store.get_blob(f"sha256:{name}") == data
        raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{host}/mirrored/multi:v1")
        assert kit.sha256_bytes(raw.encode()) == index.digest

    def test_podman_pulls_through_the_mirror_its_registries_conf_names(
            self, distribution, mirror, tmp_path, runroot):
        image = kit.build_image(tmp_path / "layout", "v1")
        _skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1",
                f"docker://{distribution.host}/mirrored/app:v1")
        # podman asks the mirror first for the upstream's images
        conf = tmp_path / "registries.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{distribution.host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{_host(mirror)}"\ninsecure = true\n')
        podman = _containers_tool("podman", tmp_path, runroot)
        _run(podman + ["pull", f"{distribution.host}/mirrored/app:v1"],
             env=dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(conf)))
        stored = f"{distribution.host.replace(':', '-')}/mirrored/app"
        assert mirror.store.resolve(stored, "v1") == image.digest
        for layer in image.layers:
            assert mirror.store.has_blob(layer.digest)
