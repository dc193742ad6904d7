"""Interop tests: zlayer_registry against CNCF distribution, with images pushed by skopeo.

Every image is built by hand (``_oci_testkit``) as an OCI image layout, pushed with
``skopeo copy`` into ``docker-registry serve`` listening on 127.0.0.1, and pulled back
through the public API and the CLI. A missing tool skips these tests, unless
``ZLAYER_REQUIRE_INTEROP=1`` (set by .ci/run), which turns the skip into a failure so an
interop test can never go silently missing in CI.

Blocks:
    FIXTURES        registries, layouts and pushed images, shared by the session
    TOOLS           the fixtures themselves against distribution and skopeo
    PULL            ImagePuller.pull / pull_image / fetch_manifest
    PLATFORMS       picking a child of a multi-platform index
    AUTH            htpasswd basic auth, via RegistryAuth and a Docker config file
    TLS             an https-only registry with a self-signed certificate
    ERRORS          unknown tags and repositories, from the API and the CLI
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The helper sits beside this file; --import-mode=importlib would not put it on sys.path.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402

pytestmark = pytest.mark.interop
USERNAME, PASSWORD = "zlayer", "s3cret-interop"


_unavailable = kit.unavailable  # skip, or fail under ZLAYER_REQUIRE_INTEROP=1


# =============================================================================
# FIXTURES
# =============================================================================


@pytest.fixture(scope="session")
def distribution_registry(tmp_path_factory):
    """Runs an open ``docker-registry serve`` on 127.0.0.1 for the session.

    The object has ``.host`` (``127.0.0.1:PORT``) and ``.push(layout_dir, tag, repo,
    fmt=None)``; the process is terminated by PID at teardown.
    """
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution"))


@pytest.fixture(scope="session")
def distribution_registry_basic_auth(tmp_path_factory):
    """Runs ``docker-registry serve`` with htpasswd (bcrypt) basic auth for the session."""
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution-auth"),
                               username=USERNAME, password=PASSWORD)


@pytest.fixture(scope="session")
def distribution_registry_tls(tmp_path_factory):
    """Runs ``docker-registry serve`` over https only, with a self-signed certificate."""
    root = tmp_path_factory.mktemp("distribution-tls")
    try:
        tls = kit.self_signed_certificate(root / "certs")
    except kit.ToolMissing as exc:
        missing = str(exc)
    else:
        yield from kit.running_registry(root, tls=tls)
        return
    _unavailable(missing)


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory):
    """Returns (layout dir, ImageInfo) of a linux/amd64 image of three small layers."""
    layout = tmp_path_factory.mktemp("layout-image")
    return layout, kit.build_image(layout, tag="v1")


@pytest.fixture(scope="session")
def index_layout(tmp_path_factory):
    """Returns (layout dir, IndexInfo) of a linux/amd64 + arm64/v8 + arm/v7 index."""
    layout = tmp_path_factory.mktemp("layout-index")
    return layout, kit.build_index(layout, tag="multi")


def _pushed(registry, layout, info, tag, repository, fmt=None):
    digest = registry.push(layout, tag, repository, fmt=fmt)
    return types.SimpleNamespace(
        registry=registry, repository=repository, tag=tag, info=info, digest=digest,
        reference=registry.reference(repository, tag),
    )


@pytest.fixture(scope="session")
def pushed_image(distribution_registry, image_layout):
    """Pushes the single-platform OCI image as ``interop/single:v1``."""
    return _pushed(distribution_registry, *image_layout, "v1", "interop/single")


@pytest.fixture(scope="session")
def pushed_v2s2(distribution_registry, image_layout):
    """Pushes the same image converted to Docker schema 2 as ``interop/docker:v1``."""
    return _pushed(distribution_registry, *image_layout, "v1", "interop/docker", fmt="v2s2")


@pytest.fixture(scope="session")
def pushed_index(distribution_registry, index_layout):
    """Pushes the three-platform index, every child included, as ``interop/multi:multi``."""
    return _pushed(distribution_registry, *index_layout, "multi", "interop/multi")


@pytest.fixture(scope="session")
def pushed_tls(distribution_registry_tls, image_layout):
    """Pushes the single-platform image to the https-only registry as ``tls/single:v1``."""
    return _pushed(distribution_registry_tls, *image_layout, "v1", "tls/single")


@pytest.fixture(scope="session")
def pushed_private(distribution_registry_basic_auth, image_layout):
    """Pushes the single-platform image to the auth registry as ``private/single:v1``."""
    return _pushed(distribution_registry_basic_auth, *image_layout, "v1", "private/single")


def _isolated_env(tmp_path: Path, **extra: str) -> dict:
    """Returns an environment that finds this checkout and no credentials of the machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                        "XDG_CONFIG_HOME", "PYTHONPATH")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(HERE), PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zlayer_registry"] + list(args),
        cwd=str(HERE), env=_isolated_env(tmp_path, **env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
    )


def _docker_config_dir(tmp_path: Path, host: str, user: str, password: str) -> Path:
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return config_dir


def _digests(items) -> list:
    """Returns the digests of descriptors, layer objects or CLI JSON dicts, in order."""
    return [item["digest"] if isinstance(item, dict) else item.digest for item in items]


def _assert_cached_and_verified(cache, info: kit.ImageInfo) -> None:
    for blob in info.layers:
        assert cache.has(blob.digest), blob.digest
        path = cache.path(blob.digest)
        assert path is not None, blob.digest
        assert kit.sha256_file(Path(path)) == blob.digest
    assert cache.verify() == []


# =============================================================================
# TOOLS: the fixtures against distribution and skopeo, without zlayer_registry
# =============================================================================


class TestTools:
    def test_layout_is_deterministic_and_content_addressed(self, tmp_path, image_layout):
        _, info = image_layout
        again = kit.build_image(tmp_path, tag="v1")
        assert again == info
        for path in (tmp_path / "blobs" / "sha256").iterdir():
            assert kit.sha256_file(path) == "sha256:" + path.name
        described = kit.describe_layout(tmp_path, "v1")
        assert described["digest"] == info.digest
        assert described["layers"] == [b.digest for b in info.layers]

    def test_umoci_accepts_the_layout(self, image_layout):
        umoci = shutil.which("umoci")
        if umoci is None:
            _unavailable("umoci is not installed (apt-get install umoci)")
        layout, info = image_layout
        out = subprocess.run([umoci, "stat", "--json", "--image", "%s:v1" % layout],
                             check=True, stdout=subprocess.PIPE).stdout
        history = json.loads(out)["history"]
        assert [h["layer"]["digest"] for h in history] == [b.digest for b in info.layers]

    def test_big_layer_is_incompressible(self, tmp_path):
        kit.init_layout(tmp_path)
        blob, diff_id = kit.write_layer(tmp_path, kit.LayerSpec(seed=7, random_bytes=kit.MIB))
        assert blob.size > kit.MIB
        assert diff_id != blob.digest
        assert kit.sha256_file(tmp_path / "blobs" / "sha256" / blob.digest[7:]) == blob.digest

    def test_pushed_oci_manifest_keeps_its_digest(self, pushed_image):
        registry, info = pushed_image.registry, pushed_image.info
        digest, content_type, body = registry.manifest("interop/single", "v1")
        assert digest == pushed_image.digest == info.digest
        assert content_type == kit.MEDIA_TYPE_OCI_MANIFEST
        assert registry.raw_manifest_digest("interop/single", "v1") == info.digest
        inspected = registry.inspect("interop/single", "v1")
        assert inspected["Layers"] == [b.digest for b in info.layers]
        assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")

    def test_v2s2_push_has_docker_media_types(self, pushed_v2s2):
        digest, content_type, body = pushed_v2s2.registry.manifest("interop/docker", "v1")
        manifest = json.loads(body)
        assert content_type == manifest["mediaType"] == kit.MEDIA_TYPE_DOCKER_MANIFEST
        assert manifest["config"]["mediaType"] == kit.MEDIA_TYPE_DOCKER_CONFIG
        assert {layer["mediaType"] for layer in manifest["layers"]} == {kit.MEDIA_TYPE_DOCKER_LAYER_GZIP}
        # Conversion rewrites the manifest only: config and layer blobs are the same bytes.
        assert digest == pushed_v2s2.digest != pushed_v2s2.info.digest
        assert manifest["config"]["digest"] == pushed_v2s2.info.config.digest
        assert _digests(manifest["layers"]) == [b.digest for b in pushed_v2s2.info.layers]

    def test_index_push_keeps_every_platform(self, pushed_index):
        digest, content_type, body = pushed_index.registry.manifest("interop/multi", "multi")
        assert digest == pushed_index.digest == pushed_index.info.digest
        assert content_type == kit.MEDIA_TYPE_OCI_INDEX
        children = {d["platform"]["architecture"] + d["platform"].get("variant", ""): d["digest"]
                    for d in json.loads(body)["manifests"]}
        images = pushed_index.info.images
        assert children == {"amd64": images["linux/amd64"].digest,
                            "arm64v8": images["linux/arm64/v8"].digest,
                            "armv7": images["linux/arm/v7"].digest}
        for image in images.values():
            assert pushed_index.registry.manifest("interop/multi", image.digest)[0] == image.digest

    def test_distribution_answers_only_accepted_manifest_types(self, pushed_image, pushed_v2s2):
        # distribution 2.8 negotiates on Accept: without the OCI type an OCI manifest is a
        # 404, and without the Docker v2 type a schema 2 manifest is down-converted to
        # signed schema 1. A client must list every type it understands.
        registry = pushed_image.registry
        status, _, body = registry.request("GET", "/v2/interop/single/manifests/v1",
                                           accept=[kit.MEDIA_TYPE_DOCKER_MANIFEST])
        assert status == 404 and b"MANIFEST_UNKNOWN" in body
        status, headers, _ = registry.request("GET", "/v2/interop/docker/manifests/v1")
        assert status == 200
        assert headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v1+prettyjws"

    def test_basic_auth_registry_requires_credentials(self, pushed_private):
        registry = pushed_private.registry
        status, headers, _ = registry.request("GET", "/v2/", auth=False)
        assert status == 401
        assert headers["Www-Authenticate"] == 'Basic realm="test"'
        assert registry.request("GET", "/v2/")[0] == 200
        assert registry.manifest("private/single", "v1")[0] == pushed_private.info.digest


# =============================================================================
# PULL: one platform, OCI and Docker media types, the cache
# =============================================================================


class TestPull:
    def test_pull_returns_registry_digest_and_verified_layers(self, zr, tmp_path, pushed_image):
        info = pushed_image.info
        cache = zr.BlobCache.open(str(tmp_path / "cache"))
        manifest, layers = zr.ImagePuller(cache).pull(pushed_image.reference)

        assert manifest.digest == pushed_image.digest == info.digest
        assert manifest.digest == pushed_image.registry.raw_manifest_digest("interop/single", "v1")
        assert manifest.media_type == kit.MEDIA_TYPE_OCI_MANIFEST
        assert (manifest.config.digest, manifest.config.size, manifest.config.media_type) == (
            info.config.digest, info.config.size, kit.MEDIA_TYPE_OCI_CONFIG)
        assert _digests(manifest.layers) == _digests(layers) == [b.digest for b in info.layers]
        for layer, blob in zip(layers, info.layers):
            assert (layer.size, layer.media_type) == (blob.size, kit.MEDIA_TYPE_OCI_LAYER_GZIP)
            assert kit.sha256_file(Path(layer.path)) == blob.digest
            with layer.open() as f:
                assert kit.sha256_bytes(f.read()) == blob.digest
        _assert_cached_and_verified(cache, info)

    def test_second_pull_downloads_nothing(self, zr, tmp_path, pushed_image):
        layer_bytes = sum(b.size for b in pushed_image.info.layers)
        cache_dir = str(tmp_path / "cache")
        first = zr.ImagePuller(zr.BlobCache.open(cache_dir)).pull_image(pushed_image.reference)
        assert first.bytes_downloaded >= layer_bytes
        assert first.manifest.digest == pushed_image.digest
        assert first.index is None

        # A new cache object over the same directory: the cache is on disk, not in memory.
        second = zr.ImagePuller(zr.BlobCache.open(cache_dir)).pull_image(pushed_image.reference)
        assert second.bytes_downloaded == 0
        assert second.bytes_from_cache >= layer_bytes
        assert _digests(second.layers) == _digests(first.layers)

    def test_pull_docker_schema2(self, zr, tmp_path, pushed_v2s2):
        cache = zr.BlobCache.open(str(tmp_path / "cache"))
        manifest, layers = zr.ImagePuller(cache).pull(pushed_v2s2.reference)
        assert manifest.digest == pushed_v2s2.digest
        assert manifest.media_type == kit.MEDIA_TYPE_DOCKER_MANIFEST
        assert manifest.config.media_type == kit.MEDIA_TYPE_DOCKER_CONFIG
        assert {layer.media_type for layer in layers} == {kit.MEDIA_TYPE_DOCKER_LAYER_GZIP}
        assert _digests(layers) == [b.digest for b in pushed_v2s2.info.layers]
        _assert_cached_and_verified(cache, pushed_v2s2.info)

    def test_pull_by_digest(self, zr, tmp_path, pushed_image):
        reference = pushed_image.registry.reference("interop/single", pushed_image.digest)
        manifest, layers = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "c"))).pull(reference)
        assert manifest.digest == pushed_image.digest
        assert _digests(layers) == [b.digest for b in pushed_image.info.layers]

    def test_cli_pull_json(self, zr, tmp_path, pushed_image):
        proc = _run_cli(tmp_path, "pull", pushed_image.reference,
                        "--cache", str(tmp_path / "cache"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        info = pushed_image.info
        assert out["digest"] == info.digest
        assert out["media_type"] == kit.MEDIA_TYPE_OCI_MANIFEST
        assert out["config"] == {"digest": info.config.digest, "size": info.config.size,
                                 "media_type": kit.MEDIA_TYPE_OCI_CONFIG}
        assert _digests(out["layers"]) == [b.digest for b in info.layers]
        assert out["index_digest"] is None
        assert out["bytes_downloaded"] >= sum(b.size for b in info.layers)


# =============================================================================
# PLATFORMS: children of a multi-platform index
# =============================================================================


class TestPlatforms:
    @pytest.mark.parametrize("wanted, child", [
        ("linux/amd64", "linux/amd64"),
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/arm64/v8", "linux/arm64/v8"),
        ("linux/arm/v7", "linux/arm/v7"),
    ])
    def test_pull_picks_platform_child(self, zr, tmp_path, pushed_index, wanted, child):
        expected = pushed_index.info.images[child]
        cache = zr.BlobCache.open(str(tmp_path / "cache"))
        result = zr.ImagePuller(cache, platform=wanted).pull_image(pushed_index.reference)
        assert result.manifest.digest == expected.digest
        assert result.index is not None and result.index.digest == pushed_index.digest
        assert _digests(result.layers) == [b.digest for b in expected.layers]
        assert expected.architecture in str(result.platform)
        _assert_cached_and_verified(cache, expected)
        # Nothing of the other platforms is downloaded.
        for other in pushed_index.info.images.values():
            if other is not expected:
                assert not any(cache.has(b.digest) for b in other.layers)

    def test_fetch_manifest_resolves_index(self, zr, tmp_path, pushed_index):
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")), platform="linux/arm/v7")
        manifest = puller.fetch_manifest(pushed_index.reference)
        assert manifest.digest == pushed_index.info.images["linux/arm/v7"].digest
        assert manifest.media_type == kit.MEDIA_TYPE_OCI_MANIFEST

    def test_cli_inspect_lists_platforms(self, zr, tmp_path, pushed_index):
        proc = _run_cli(tmp_path, "inspect", pushed_index.reference, "--json")
        assert proc.returncode == 0, proc.stderr
        platforms = json.loads(proc.stdout)["platforms"]
        seen = {(p["os"], p["architecture"], p.get("variant") or None): p["digest"] for p in platforms}
        assert seen == {(i.os, i.architecture, i.variant): i.digest
                        for i in pushed_index.info.images.values()}

    def test_cli_pull_platform(self, zr, tmp_path, pushed_index):
        proc = _run_cli(tmp_path, "pull", pushed_index.reference, "--platform", "linux/arm64",
                        "--cache", str(tmp_path / "cache"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["digest"] == pushed_index.info.images["linux/arm64/v8"].digest
        assert out["index_digest"] == pushed_index.digest


# =============================================================================
# AUTH: htpasswd basic auth
# =============================================================================


class TestAuth:
    def test_pull_with_basic_auth(self, zr, tmp_path, pushed_private):
        cache = zr.BlobCache.open(str(tmp_path / "cache"))
        auth = zr.RegistryAuth.basic(USERNAME, PASSWORD)
        manifest, layers = zr.ImagePuller(cache).pull(pushed_private.reference, auth=auth)
        assert manifest.digest == pushed_private.info.digest
        _assert_cached_and_verified(cache, pushed_private.info)

    @pytest.mark.parametrize("auth_args", [(USERNAME, "wrong-password"), None],
                             ids=["wrong-password", "anonymous"])
    def test_bad_credentials_raise_auth_error(self, zr, tmp_path, pushed_private, auth_args):
        auth = zr.RegistryAuth.anonymous() if auth_args is None else zr.RegistryAuth.basic(*auth_args)
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")))
        with pytest.raises(zr.AuthError) as excinfo:
            puller.pull(pushed_private.reference, auth=auth)
        assert isinstance(excinfo.value, zr.ZLayerError)
        assert "wrong-password" not in str(excinfo.value)

    def test_cli_uses_docker_config(self, zr, tmp_path, pushed_private):
        registry = pushed_private.registry
        config_dir = _docker_config_dir(tmp_path, registry.host, USERNAME, PASSWORD)
        proc = _run_cli(tmp_path, "pull", pushed_private.reference,
                        "--cache", str(tmp_path / "cache"), "--json",
                        DOCKER_CONFIG=str(config_dir))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["digest"] == pushed_private.info.digest

    def test_cli_without_credentials_fails_cleanly(self, zr, tmp_path, pushed_private):
        proc = _run_cli(tmp_path, "pull", pushed_private.reference,
                        "--cache", str(tmp_path / "cache"), "--json")
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


# =============================================================================
# TLS: an https-only registry with a self-signed certificate
# =============================================================================


class TestTls:
    def test_cli_insecure_pulls_without_checking_the_certificate(self, zr, tmp_path,
                                                                 pushed_tls):
        cache = str(tmp_path / "cache")
        for round_ in ("cold", "warm"):  # warm: a HEAD first, which gets no body
            proc = _run_cli(tmp_path, "pull", pushed_tls.reference, "--insecure",
                            "--cache", cache, "--json")
            assert proc.returncode == 0, (round_, proc.stderr)
            assert json.loads(proc.stdout)["digest"] == pushed_tls.info.digest
        _assert_cached_and_verified(zr.BlobCache.open(cache), pushed_tls.info)

    def test_cli_without_insecure_names_the_untrusted_certificate(self, zr, tmp_path,
                                                                   pushed_tls):
        proc = _run_cli(tmp_path, "pull", pushed_tls.reference, "--cache", str(tmp_path / "c"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "TLS certificate that is not trusted" in lines[0]
        assert "SSL_CERT_FILE" in lines[0] and "--insecure" in lines[0]
        assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file() and "blobs" in p.parts]

    def test_cli_trusts_the_certificate_from_ssl_cert_file(self, zr, tmp_path, pushed_tls):
        cert = str(pushed_tls.registry.tls[0])
        cache = str(tmp_path / "cache")
        for round_ in ("cold", "warm"):
            proc = _run_cli(tmp_path, "pull", pushed_tls.reference, "--cache", cache, "--json",
                            SSL_CERT_FILE=cert)
            assert proc.returncode == 0, (round_, proc.stderr)
            assert json.loads(proc.stdout)["digest"] == pushed_tls.info.digest


# =============================================================================
# ERRORS: unknown tags and repositories
# =============================================================================


class TestErrors:
    @pytest.mark.parametrize("repository, tag", [
        ("interop/single", "no-such-tag"),
        ("interop/no-such-repository", "v1"),
    ])
    def test_missing_manifest_raises_not_found(self, zr, tmp_path, pushed_image, repository, tag):
        reference = pushed_image.registry.reference(repository, tag)
        puller = zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")))
        with pytest.raises(zr.NotFoundError):
            puller.pull(reference)
        with pytest.raises(zr.NotFoundError):
            puller.fetch_manifest(reference)

    def test_cli_missing_tag_exits_1_with_one_line(self, zr, tmp_path, pushed_image):
        reference = pushed_image.registry.reference("interop/single", "no-such-tag")
        proc = _run_cli(tmp_path, "pull", reference, "--cache", str(tmp_path / "cache"), "--json")
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "no-such-tag" in lines[0]
        assert proc.stdout == ""
