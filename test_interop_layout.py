"""Interop tests: OCI layout export and import against skopeo, umoci and CNCF distribution.

Images are built by hand (``_oci_testkit``), pushed with ``skopeo copy`` into
``docker-registry serve`` on 127.0.0.1, then moved between the registry, our cache and
on-disk layouts in both directions: we export and skopeo/umoci read, skopeo writes and we
import. docker and podman are not installed here, so ``skopeo copy docker-archive:...``
stands in for ``docker load``. A missing tool skips these tests, unless
``ZLAYER_REQUIRE_INTEROP=1``, which turns the skip into a failure.

Blocks:
    FIXTURES        a registry, layouts and pushed images shared by the session
    HELPERS         skopeo runs, layout readers, expected root filesystems
    EXPORT OCI      our ``oci:DIR:TAG`` read by skopeo inspect, umoci unpack, skopeo copy
    IMPORT          skopeo-written ``oci:`` and ``oci-archive:`` imported into our cache
    ARCHIVES        our ``oci-archive:`` and ``docker-archive:`` read by skopeo
    CORRUPT         a damaged skopeo-written layout is refused and leaves the cache empty
    CLI             export, import and ``pull --output`` from the command line
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The helper sits beside this file; --import-mode=importlib would not put it on sys.path.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402

pytestmark = pytest.mark.interop

PLATFORMS = kit.DEFAULT_INDEX_PLATFORMS


_unavailable = kit.unavailable  # skip, or fail under ZLAYER_REQUIRE_INTEROP=1


def _tool(name: str) -> str:
    """Returns the path of an external program, or skips (fails under CI) without it."""
    path = shutil.which(name)
    if path is None:
        _unavailable("%s is not installed (apt-get install %s)" % (name, name))
    return path


# =============================================================================
# FIXTURES
# =============================================================================


@pytest.fixture(scope="session")
def layout_registry(tmp_path_factory):
    """Runs an open ``docker-registry serve`` on 127.0.0.1 for this module's session.

    The process is terminated by its PID at teardown.
    """
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution-layout"))


def _pushed(registry, layout, info, tag, repository):
    digest = registry.push(layout, tag, repository)
    return types.SimpleNamespace(
        registry=registry, repository=repository, tag=tag, info=info, digest=digest,
        layout=layout, reference=registry.reference(repository, tag),
    )


@pytest.fixture(scope="session")
def single(layout_registry, tmp_path_factory):
    """A linux/amd64 image of three layers, pushed as ``layout/single:v1``."""
    layout = tmp_path_factory.mktemp("src-single")
    info = kit.build_image(layout, tag="v1")
    return _pushed(layout_registry, layout, info, "v1", "layout/single")


@pytest.fixture(scope="session")
def multi(layout_registry, tmp_path_factory):
    """An amd64 + arm64/v8 + arm/v7 index, every child pushed, as ``layout/multi:multi``."""
    layout = tmp_path_factory.mktemp("src-index")
    info = kit.build_index(layout, tag="multi")
    return _pushed(layout_registry, layout, info, "multi", "layout/multi")


@pytest.fixture
def puller(zr, tmp_path):
    """An ImagePuller over a fresh directory cache, closed at teardown."""
    with zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache"))) as p:
        yield p


# =============================================================================
# HELPERS
# =============================================================================


def _isolated_env(workdir: Path, **extra: str) -> dict:
    """Returns an environment with no credentials or registries.conf of the machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                        "XDG_CONFIG_HOME", "PYTHONPATH", "CONTAINERS_REGISTRIES_CONF")}
    home = workdir / "home"
    tmp = workdir / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(HERE),
               PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _skopeo(workdir: Path, *args: str, raw: bool = False):
    """Runs ``skopeo --insecure-policy ARGS``; returns stdout (bytes when ``raw``)."""
    cmd = [_tool("skopeo"), "--insecure-policy"] + list(args)
    proc = subprocess.run(cmd, env=_isolated_env(workdir), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if proc.returncode != 0:
        raise AssertionError("skopeo %s failed (exit %d): %s" % (
            " ".join(args), proc.returncode, proc.stderr.decode(errors="replace").strip()))
    return proc.stdout if raw else proc.stdout.decode()


def _skopeo_inspect(workdir: Path, location: str) -> dict:
    return json.loads(_skopeo(workdir, "inspect", "--retry-times", "0", location))


def _skopeo_raw(workdir: Path, location: str) -> bytes:
    """Returns the manifest bytes as stored (``skopeo inspect --raw``)."""
    return _skopeo(workdir, "inspect", "--retry-times", "0", "--raw", location, raw=True)


def _skopeo_copy(workdir: Path, src: str, dest: str, *flags: str) -> None:
    """Copies between transports; the docker:// side is our plain-HTTP loopback registry."""
    args = ["copy", "--retry-times", "0"] + list(flags)
    if src.startswith("docker://"):
        args += ["--src-tls-verify=false", "--src-no-creds"]
    if dest.startswith("docker://"):
        args += ["--dest-tls-verify=false", "--dest-no-creds"]
    _skopeo(workdir, *(args + [src, dest]))


def _run_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zlayer_registry"] + list(args),
        cwd=str(HERE), env=_isolated_env(workdir), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300,
    )


def _index_json(layout: Path) -> list:
    return json.loads((Path(layout) / "index.json").read_text())["manifests"]


def _layout_blob(layout: Path, digest: str) -> Path:
    algorithm, encoded = digest.split(":", 1)
    return Path(layout) / "blobs" / algorithm / encoded


def _layout_digests(layout: Path) -> set:
    blobs = Path(layout) / "blobs" / "sha256"
    return {"sha256:" + p.name for p in blobs.iterdir()} if blobs.is_dir() else set()


def _image_digests(info: kit.ImageInfo) -> set:
    return {info.digest, info.config.digest} | {b.digest for b in info.layers}


def _expected_tree(layout: Path, info: kit.ImageInfo) -> dict:
    """Returns {path: ("dir",) or ("file", sha256)} for the union of an image's layers.

    The testkit's layers hold only directories and regular files, and never whiteouts,
    so the root filesystem is the plain union of the tar members.
    """
    tree = {}
    for path in kit.layer_blob_paths(layout, info):
        with tarfile.open(str(path), mode="r:*") as tar:
            for member in tar:
                name = member.name.rstrip("/")
                if member.isdir():
                    tree[name] = ("dir",)
                else:
                    assert member.isfile(), member.name
                    with tar.extractfile(member) as f:
                        tree[name] = ("file", kit.sha256_bytes(f.read()))
    return tree


def _rootfs_tree(rootfs: Path) -> dict:
    """Returns the same shape as ``_expected_tree`` for an unpacked root filesystem."""
    tree = {}
    for path, item in kit.snapshot_tree(rootfs).items():
        if path == ".":
            continue
        tree[path] = ("file", item["sha256"]) if item["type"] == "file" else (item["type"],)
    return tree


def _umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    _tool("umoci")
    return kit.umoci_unpack(layout, tag, bundle, rootless=True)


def _uncompressed_digest(path: Path) -> str:
    """Returns sha256 of a layer blob after gzip decompression (as is when not gzip)."""
    with open(str(path), "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    h = hashlib.sha256()
    with (gzip.open(str(path), "rb") if gzipped else open(str(path), "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_layout_image(layout: Path, tag: str) -> tuple:
    """Returns (manifest dict, config dict) of the image ``tag`` names in a layout."""
    entry = [m for m in _index_json(layout)
             if m.get("annotations", {}).get(kit.ANNOTATION_REF_NAME) == tag]
    assert len(entry) == 1, _index_json(layout)
    manifest = json.loads(kit.read_blob(layout, entry[0]["digest"]))
    config = json.loads(kit.read_blob(layout, manifest["config"]["digest"]))
    return manifest, config


def _platform_key(platform: dict) -> str:
    return "/".join([platform["os"], platform["architecture"]]
                    + ([platform["variant"]] if platform.get("variant") else []))


def _assert_cache_empty(cache) -> None:
    assert cache.entries() == []
    assert cache.references() == {}
    assert os.listdir(os.path.join(cache.root, "tmp")) == []


# =============================================================================
# EXPORT OCI: our oci:DIR:TAG read by skopeo and umoci
# =============================================================================


class TestExportOciLayout:
    def test_image_export_matches_registry_for_skopeo(self, tmp_path, puller, single):
        dest = tmp_path / "out"
        exported = puller.export_image(single.reference, "oci:%s:v1" % dest)
        assert exported.digest == single.digest == single.info.digest
        assert exported.media_type == kit.MEDIA_TYPE_OCI_MANIFEST
        assert (exported.format, exported.tag) == ("oci", "v1")
        assert exported.blobs == 2 + len(single.info.layers)

        raw = _skopeo_raw(tmp_path, "oci:%s:v1" % dest)
        assert kit.sha256_bytes(raw) == single.digest
        assert raw == single.registry.manifest(single.repository, single.tag)[2]
        inspected = _skopeo_inspect(tmp_path, "oci:%s:v1" % dest)
        assert inspected["Digest"] == single.digest
        assert inspected["Layers"] == [b.digest for b in single.info.layers]
        assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
        # Exactly the image's blobs, each content-addressed.
        assert _layout_digests(dest) == _image_digests(single.info)
        for digest in _layout_digests(dest):
            assert kit.sha256_file(_layout_blob(dest, digest)) == digest

    def test_image_export_unpacks_with_umoci(self, tmp_path, puller, single):
        dest = tmp_path / "out"
        puller.export_image(single.reference, "oci:%s:v1" % dest)
        rootfs = _umoci_unpack(dest, "v1", tmp_path / "bundle")
        try:
            expected = _expected_tree(single.layout, single.info)
            assert len(expected) > 5
            assert _rootfs_tree(rootfs) == expected
        finally:
            kit.rmtree(tmp_path / "bundle")

    def test_image_export_copied_back_keeps_digest(self, tmp_path, puller, single):
        dest = tmp_path / "out"
        puller.export_image(single.reference, "oci:%s:v1" % dest)
        registry = single.registry
        _skopeo_copy(tmp_path, "oci:%s:v1" % dest,
                     "docker://%s/roundtrip/single:copied" % registry.host)
        digest, content_type, _ = registry.manifest("roundtrip/single", "copied")
        assert digest == single.digest  # Docker-Content-Digest of the copy
        assert content_type == kit.MEDIA_TYPE_OCI_MANIFEST

    def test_index_export_keeps_every_platform(self, tmp_path, puller, multi):
        dest = tmp_path / "out"
        exported = puller.export_image(multi.reference, "oci:%s:multi" % dest)
        assert exported.digest == multi.digest == multi.info.digest
        assert exported.media_type == kit.MEDIA_TYPE_OCI_INDEX
        assert exported.blobs == 1 + sum(len(_image_digests(i)) for i in multi.info.images.values())

        raw = _skopeo_raw(tmp_path, "oci:%s:multi" % dest)
        assert kit.sha256_bytes(raw) == multi.digest
        index = json.loads(raw)
        assert index["mediaType"] == kit.MEDIA_TYPE_OCI_INDEX
        children = {_platform_key(d["platform"]): d["digest"] for d in index["manifests"]}
        assert children == {p: i.digest for p, i in multi.info.images.items()}
        assert set(children) == set(PLATFORMS)
        # Every child and blob is in the layout, so any platform can be read from it.
        expected = {multi.digest}.union(*(_image_digests(i) for i in multi.info.images.values()))
        assert _layout_digests(dest) == expected
        # skopeo resolves the index to its own platform (linux/amd64) when not --raw.
        inspected = _skopeo_inspect(tmp_path, "oci:%s:multi" % dest)
        assert inspected["Layers"] == [b.digest for b in multi.info.images["linux/amd64"].layers]

    def test_index_export_copied_back_with_every_platform(self, tmp_path, puller, multi):
        dest = tmp_path / "out"
        puller.export_image(multi.reference, "oci:%s:multi" % dest)
        registry = multi.registry
        _skopeo_copy(tmp_path, "oci:%s:multi" % dest,
                     "docker://%s/roundtrip/multi:copied" % registry.host, "--multi-arch", "all")
        digest, content_type, body = registry.manifest("roundtrip/multi", "copied")
        assert digest == multi.digest
        assert content_type == kit.MEDIA_TYPE_OCI_INDEX
        for image in multi.info.images.values():
            assert registry.manifest("roundtrip/multi", image.digest)[0] == image.digest
            for blob in (image.config,) + image.layers:
                status = registry.request("HEAD", "/v2/roundtrip/multi/blobs/" + blob.digest)[0]
                assert status == 200, blob.digest

    @pytest.mark.parametrize("wanted, child", [
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/amd64", "linux/amd64"),
    ])
    def test_index_export_with_platform_picks_one_child(self, tmp_path, puller, multi,
                                                        wanted, child):
        image = multi.info.images[child]
        dest = tmp_path / "out"
        exported = puller.export_image(multi.reference, "oci:%s:one" % dest, platform=wanted)
        assert exported.digest == image.digest
        assert exported.media_type == kit.MEDIA_TYPE_OCI_MANIFEST
        entries = _index_json(dest)
        assert [(e["digest"], e["annotations"][kit.ANNOTATION_REF_NAME]) for e in entries] == [
            (image.digest, "one")]
        assert _layout_digests(dest) == _image_digests(image)
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:one" % dest)) == image.digest
        inspected = _skopeo_inspect(tmp_path, "oci:%s:one" % dest)
        assert (inspected["Os"], inspected["Architecture"]) == (image.os, image.architecture)
        assert inspected["Layers"] == [b.digest for b in image.layers]

    def test_platform_child_unpacks_with_umoci(self, tmp_path, puller, multi):
        image = multi.info.images["linux/arm/v7"]
        dest = tmp_path / "out"
        puller.export_image(multi.reference, "oci:%s:arm" % dest, platform="linux/arm/v7")
        rootfs = _umoci_unpack(dest, "arm", tmp_path / "bundle")
        try:
            assert _rootfs_tree(rootfs) == _expected_tree(multi.layout, image)
        finally:
            kit.rmtree(tmp_path / "bundle")

    def test_export_without_tag_uses_the_reference_tag(self, tmp_path, puller, single):
        dest = tmp_path / "out"
        exported = puller.export_image(single.reference, "oci:%s" % dest)
        assert exported.tag == "v1"
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:v1" % dest)) == single.digest

    def test_export_into_skopeo_layout_keeps_its_tags(self, tmp_path, puller, single, multi):
        dest = tmp_path / "mixed"
        _skopeo_copy(tmp_path, "docker://%s" % multi.reference, "oci:%s:theirs" % dest,
                     "--multi-arch", "all")
        puller.export_image(single.reference, "oci:%s:ours" % dest)
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:theirs" % dest)) == multi.digest
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:ours" % dest)) == single.digest
        _skopeo_copy(tmp_path, "oci:%s:theirs" % dest,
                     "docker://%s/roundtrip/mixed:theirs" % multi.registry.host,
                     "--multi-arch", "all")
        assert multi.registry.manifest("roundtrip/mixed", "theirs")[0] == multi.digest

    def test_untagged_export_twice_stays_one_entry(self, tmp_path, puller, single):
        by_digest = single.registry.reference(single.repository, single.digest)
        dest = tmp_path / "out"
        for _ in range(2):
            exported = puller.export_image(by_digest, "oci:%s" % dest)
            assert exported.tag is None
        assert [e["digest"] for e in _index_json(dest)] == [single.digest]
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s" % dest)) == single.digest

    def test_two_tags_in_one_layout(self, tmp_path, puller, single, multi):
        dest = tmp_path / "out"
        puller.export_image(single.reference, "oci:%s:a" % dest)
        puller.export_image(multi.reference, "oci:%s:b" % dest)
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:a" % dest)) == single.digest
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:b" % dest)) == multi.digest
        tags = sorted(e["annotations"][kit.ANNOTATION_REF_NAME] for e in _index_json(dest))
        assert tags == ["a", "b"]


# =============================================================================
# IMPORT: layouts and archives written by skopeo, imported into our cache
# =============================================================================


def _skopeo_fetch(workdir: Path, pushed, location: str) -> None:
    """Copies a pushed image from the registry to ``location``; an index with every child."""
    flags = ("--multi-arch", "all") if isinstance(pushed.info, kit.IndexInfo) else ()
    _skopeo_copy(workdir, "docker://%s" % pushed.reference, location, *flags)


def _pulled_platforms(pushed) -> list:
    if isinstance(pushed.info, kit.IndexInfo):
        return list(pushed.info.images)
    return [None]


class TestImportSkopeoLayouts:
    @pytest.mark.parametrize("which", ["single", "multi"])
    @pytest.mark.parametrize("transport", ["oci", "oci-archive"])
    def test_import_matches_registry_and_pull_downloads_nothing(
            self, zr, tmp_path, request, which, transport):
        pushed = request.getfixturevalue(which)
        target = tmp_path / ("layout" if transport == "oci" else "image.tar")
        location = "%s:%s:%s" % (transport, target, pushed.tag)
        _skopeo_fetch(tmp_path, pushed, location)

        cache_dir = str(tmp_path / "cache")
        with zr.ImagePuller(zr.BlobCache.open(cache_dir)) as importer:
            infos = importer.import_image(location)
        assert [(i.reference, i.digest, i.media_type) for i in infos] == [
            (pushed.tag, pushed.digest,
             kit.MEDIA_TYPE_OCI_INDEX if which == "multi" else kit.MEDIA_TYPE_OCI_MANIFEST)]
        assert pushed.registry.manifest(pushed.repository, pushed.tag)[0] == infos[0].digest

        cache = zr.BlobCache.open(cache_dir)
        assert cache.verify() == []
        images = pushed.info.images.values() if which == "multi" else [pushed.info]
        for image in images:
            for digest in _image_digests(image):
                assert cache.has(digest), digest

        for platform in _pulled_platforms(pushed):
            with zr.ImagePuller(zr.BlobCache.open(cache_dir), platform=platform) as again:
                result = again.pull_image(pushed.reference)
            image = pushed.info.images[platform] if platform else pushed.info
            assert result.manifest.digest == image.digest
            assert result.bytes_downloaded == 0, platform
            assert result.bytes_from_cache == sum(b.size for b in (image.config,) + image.layers)

    def test_import_without_tag_takes_every_entry(self, zr, tmp_path, single, multi):
        layout = tmp_path / "layout"
        _skopeo_fetch(tmp_path, single, "oci:%s:one" % layout)
        _skopeo_fetch(tmp_path, multi, "oci:%s:many" % layout)
        with zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache"))) as importer:
            infos = importer.import_image("oci:%s" % layout)
            assert sorted((i.reference, i.digest) for i in infos) == sorted(
                [("one", single.digest), ("many", multi.digest)])
            assert importer.cache.verify() == []

    def test_import_of_our_export_round_trips(self, zr, tmp_path, puller, multi):
        dest = tmp_path / "out"
        puller.export_image(multi.reference, "oci:%s:multi" % dest)
        with zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "other"))) as importer:
            infos = importer.import_image("oci:%s:multi" % dest)
            assert [(i.reference, i.digest) for i in infos] == [("multi", multi.digest)]
            assert importer.cache.verify() == []


# =============================================================================
# ARCHIVES: our oci-archive and docker-archive read by skopeo
# =============================================================================


class TestArchives:
    @pytest.mark.parametrize("which", ["single", "multi"])
    def test_oci_archive_inspected_by_skopeo(self, tmp_path, puller, request, which):
        pushed = request.getfixturevalue(which)
        archive = tmp_path / "image.tar"
        exported = puller.export_image(pushed.reference, "oci-archive:%s:t1" % archive)
        assert exported.format == "oci-archive" and exported.digest == pushed.digest
        raw = _skopeo_raw(tmp_path, "oci-archive:%s:t1" % archive)
        assert kit.sha256_bytes(raw) == pushed.digest
        # The same archive copied into the registry keeps the digest.
        flags = ("--multi-arch", "all") if which == "multi" else ()
        _skopeo_copy(tmp_path, "oci-archive:%s:t1" % archive,
                     "docker://%s/archive/%s:t1" % (pushed.registry.host, which), *flags)
        assert pushed.registry.manifest("archive/" + which, "t1")[0] == pushed.digest

    def test_oci_archive_has_layout_members(self, tmp_path, puller, single):
        archive = tmp_path / "image.tar"
        puller.export_image(single.reference, "oci-archive:%s:t1" % archive)
        with tarfile.open(str(archive)) as tar:
            names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names
        assert {"blobs/sha256/" + d[7:] for d in _image_digests(single.info)} <= names

    def test_docker_archive_inspected_by_skopeo(self, tmp_path, puller, single):
        archive = tmp_path / "image.tar"
        exported = puller.export_image(single.reference, "docker-archive:%s" % archive)
        assert exported.format == "docker-archive"
        assert exported.digest == single.digest
        inspected = _skopeo_inspect(tmp_path, "docker-archive:%s" % archive)
        assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
        # docker-archive sources serve layers uncompressed, named by their diff_ids.
        assert inspected["Layers"] == list(single.info.diff_ids)
        with tarfile.open(str(archive)) as tar:
            listing = json.load(tar.extractfile("manifest.json"))
        assert listing[0]["RepoTags"] == ["%s/layout/single:v1" % single.registry.host]
        assert listing[0]["Config"] == "blobs/sha256/" + single.info.config.digest[7:]

    def test_docker_archive_loads_with_same_layer_contents(self, tmp_path, puller, single):
        # docker load's stand-in: skopeo reads the archive and writes an OCI layout.
        archive = tmp_path / "image.tar"
        puller.export_image(single.reference, "docker-archive:%s" % archive)
        loaded = tmp_path / "loaded"
        _skopeo_copy(tmp_path, "docker-archive:%s" % archive, "oci:%s:t" % loaded)
        manifest, config = _read_layout_image(loaded, "t")
        assert config["rootfs"]["diff_ids"] == list(single.info.diff_ids)
        assert (config["os"], config["architecture"]) == ("linux", "amd64")
        # skopeo may recompress: compare the uncompressed tar bytes, not the blobs.
        uncompressed = [_uncompressed_digest(_layout_blob(loaded, layer["digest"]))
                        for layer in manifest["layers"]]
        assert uncompressed == list(single.info.diff_ids)
        rootfs = _umoci_unpack(loaded, "t", tmp_path / "bundle")
        try:
            assert _rootfs_tree(rootfs) == _expected_tree(single.layout, single.info)
        finally:
            kit.rmtree(tmp_path / "bundle")

    def test_docker_archive_of_index_with_platform(self, tmp_path, puller, multi):
        image = multi.info.images["linux/arm/v7"]
        archive = tmp_path / "arm.tar"
        exported = puller.export_image(multi.reference, "docker-archive:%s" % archive,
                                       platform="linux/arm/v7")
        assert exported.digest == image.digest
        inspected = _skopeo_inspect(tmp_path, "docker-archive:%s" % archive)
        assert (inspected["Os"], inspected["Architecture"]) == ("linux", "arm")
        # skopeo 1.9 prints no Variant; the config it reads from the archive has it.
        config = json.loads(_skopeo(tmp_path, "inspect", "--config", "docker-archive:%s" % archive))
        assert config["variant"] == "v7"
        assert inspected["Layers"] == list(image.diff_ids)


# =============================================================================
# CORRUPT: a damaged layout never reaches the cache
# =============================================================================


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(str(path), 0o644)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.chmod(str(path), 0o644)
    with open(str(path), "r+b") as f:
        f.truncate(path.stat().st_size - 1)


def _damage(layout: Path, info: kit.ImageInfo, how: str) -> None:
    last_layer = _layout_blob(layout, info.layers[-1].digest)
    if how == "flipped-layer":
        _flip_last_byte(last_layer)
    elif how == "truncated-layer":
        _truncate(last_layer)
    elif how == "missing-layer":
        last_layer.unlink()
    elif how == "flipped-config":
        _flip_last_byte(_layout_blob(layout, info.config.digest))
    elif how == "flipped-manifest":
        _flip_last_byte(_layout_blob(layout, info.digest))
    else:
        raise ValueError(how)


DAMAGES = ["flipped-layer", "truncated-layer", "missing-layer", "flipped-config",
           "flipped-manifest"]


class TestCorruptLayouts:
    @pytest.mark.parametrize("how", DAMAGES)
    def test_damaged_image_raises_and_cache_stays_empty(self, zr, tmp_path, puller, single, how):
        layout = tmp_path / "layout"
        _skopeo_fetch(tmp_path, single, "oci:%s:v1" % layout)
        _damage(layout, single.info, how)
        with pytest.raises(zr.LayoutError) as excinfo:
            puller.import_image("oci:%s:v1" % layout)
        assert isinstance(excinfo.value, zr.ZLayerError)
        _assert_cache_empty(puller.cache)

    def test_one_bad_child_keeps_the_whole_index_out(self, zr, tmp_path, puller, multi):
        # The last child's last layer is damaged: nothing of the good children is kept.
        layout = tmp_path / "layout"
        _skopeo_fetch(tmp_path, multi, "oci:%s:multi" % layout)
        _damage(layout, multi.info.images["linux/arm/v7"], "flipped-layer")
        with pytest.raises(zr.LayoutError):
            puller.import_image("oci:%s:multi" % layout)
        _assert_cache_empty(puller.cache)

    def test_damaged_oci_archive_raises_and_cache_stays_empty(self, zr, tmp_path, puller, single):
        archive = tmp_path / "image.tar"
        _skopeo_fetch(tmp_path, single, "oci-archive:%s:v1" % archive)
        damaged = tmp_path / "damaged.tar"
        target = "blobs/sha256/" + single.info.layers[0].digest[7:]
        with tarfile.open(str(archive)) as src, tarfile.open(str(damaged), "w") as dst:
            found = False
            for member in src:
                data = src.extractfile(member).read() if member.isfile() else None
                if member.name.lstrip("./") == target:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                    found = True
                dst.addfile(member, None if data is None else io.BytesIO(data))
        assert found, "skopeo's archive has no %s" % target
        with pytest.raises(zr.LayoutError):
            puller.import_image("oci-archive:%s:v1" % damaged)
        _assert_cache_empty(puller.cache)

    def test_cli_import_of_damaged_layout_fails_cleanly(self, zr, tmp_path, single):
        layout = tmp_path / "layout"
        _skopeo_fetch(tmp_path, single, "oci:%s:v1" % layout)
        _damage(layout, single.info, "flipped-layer")
        proc = _run_cli(tmp_path, "import", "oci:%s:v1" % layout, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        _assert_cache_empty(zr.BlobCache.open(str(tmp_path / "cache")))


# =============================================================================
# CLI: export, import and pull --output
# =============================================================================


class TestCli:
    def test_cli_export_json_then_skopeo(self, zr, tmp_path, multi):
        dest = tmp_path / "out"
        proc = _run_cli(tmp_path, "export", multi.reference, "oci:%s:multi" % dest, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert (out["digest"], out["media_type"], out["format"], out["tag"]) == (
            multi.digest, kit.MEDIA_TYPE_OCI_INDEX, "oci", "multi")
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:multi" % dest)) == multi.digest

    def test_cli_export_platform_to_docker_archive(self, zr, tmp_path, multi):
        archive = tmp_path / "arm64.tar"
        proc = _run_cli(tmp_path, "export", multi.reference, "docker-archive:%s" % archive,
                        "--platform", "linux/arm64", "--json", "--cache", str(tmp_path / "cache"))
        assert proc.returncode == 0, proc.stderr
        image = multi.info.images["linux/arm64/v8"]
        assert json.loads(proc.stdout)["digest"] == image.digest
        inspected = _skopeo_inspect(tmp_path, "docker-archive:%s" % archive)
        assert inspected["Architecture"] == "arm64"
        assert inspected["Layers"] == list(image.diff_ids)

    def test_cli_import_json_then_pull_from_cache(self, zr, tmp_path, single):
        archive = tmp_path / "image.tar"
        _skopeo_fetch(tmp_path, single, "oci-archive:%s:v1" % archive)
        cache = str(tmp_path / "cache")
        proc = _run_cli(tmp_path, "import", "oci-archive:%s:v1" % archive, "--json",
                        "--cache", cache)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [{"reference": "oci-archive:%s:v1" % archive,
                                            "tag": "v1", "digest": single.digest,
                                            "media_type": kit.MEDIA_TYPE_OCI_MANIFEST}]
        proc = _run_cli(tmp_path, "pull", single.reference, "--json", "--cache", cache)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["digest"] == single.digest
        assert out["bytes_downloaded"] == 0

    def test_cli_pull_output_platform_child(self, zr, tmp_path, multi):
        dest = tmp_path / "out"
        proc = _run_cli(tmp_path, "pull", multi.reference, "--platform", "linux/arm/v7",
                        "--output", "oci:%s:arm" % dest, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert proc.returncode == 0, proc.stderr
        image = multi.info.images["linux/arm/v7"]
        assert json.loads(proc.stdout)["digest"] == image.digest
        assert kit.sha256_bytes(_skopeo_raw(tmp_path, "oci:%s:arm" % dest)) == image.digest
        assert _layout_digests(dest) == _image_digests(image)
        rootfs = _umoci_unpack(dest, "arm", tmp_path / "bundle")
        try:
            assert _rootfs_tree(rootfs) == _expected_tree(multi.layout, image)
        finally:
            kit.rmtree(tmp_path / "bundle")
