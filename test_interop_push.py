"""Interop tests of push and copy against the CNCF distribution registry and skopeo.

What our ``push``/``copy`` puts into Debian's ``docker-registry`` (distribution 2.8)
is read back by skopeo with the same manifest digests: a single image, a
multi-platform index, a Docker v2s2 image and a WASM artifact with artifactType.
The reverse direction, registry to an ``oci:`` layout, writes the blobs skopeo's
own copy writes, byte for byte; a ``docker-archive:`` skopeo wrote is read by
our ``copy``.  Missing tools skip (fail under ZLAYER_REQUIRE_INTEROP=1).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh distribution registry for this module (no blob known to it at start)."""
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution-push"))


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                        "PYTHONPATH", "ZLAYER_REGISTRY_CACHE")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(HERE))
    return env


def _cli(tmp_path: Path, *args: str) -> dict:
    """Run our CLI with --json and a cache of the test's own; return its JSON."""
    cache = [] if args[0] == "wasm-export" else ["--cache", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "-m", "zlayer_registry", *args, "--json", *cache],
                          cwd=str(HERE),
                          env=_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _skopeo(registry, *args: str) -> str:
    return registry._run([registry._skopeo_bin, "--insecure-policy", *args])


def _blob_files(layout: Path) -> dict:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


class TestPushInterop:
    def test_single_image_reads_back_with_the_same_digest(self, registry, tmp_path):
        image = kit.build_image(tmp_path / "layout", "v1")
        result = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1",
                      f"{registry.host}/push/single:v1")
        assert result["digest"] == image.digest
        assert registry.raw_manifest_digest("push/single", "v1") == image.digest
        inspected = registry.inspect("push/single", "v1")
        assert inspected["Layers"] == [layer.digest for layer in image.layers]
        # skopeo copies it back out: every blob is the layout's.
        kit.skopeo_to_layout(registry, "push/single", "v1", tmp_path / "back")
        ours = _blob_files(tmp_path / "layout")
        for name, data in _blob_files(tmp_path / "back").items():
            assert ours[name] == data

    def test_re_push_and_new_repository_send_no_blob(self, registry, tmp_path):
        kit.build_image(tmp_path / "layout", "v1")
        first = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1",
                     f"{registry.host}/push/again:v1")
        assert first["uploaded"] and not first["skipped"]
        again = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1",
                     f"{registry.host}/push/again:v1")
        assert len(again["skipped"]) == len(first["uploaded"]) and not again["uploaded"]
        other = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1",
                     f"{registry.host}/push/elsewhere:v1")
        assert len(other["mounted"]) == len(first["uploaded"]) and not other["uploaded"]
        assert registry.raw_manifest_digest("push/elsewhere", "v1") == first["digest"]

    def test_multi_platform_index_keeps_every_platform(self, registry, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        result = _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1",
                      f"{registry.host}/push/index:v1")
        assert result["digest"] == index.digest and result["manifests"] == 1 + len(index.images)
        assert registry.raw_manifest_digest("push/index", "v1") == index.digest
        raw = json.loads(_skopeo(registry, "inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/push/index:v1"))
        assert {m["digest"] for m in raw["manifests"]} == {
            i.digest for i in index.images.values()}
        for image in index.images.values():
            digest, _, body = registry.manifest("push/index", image.digest,
                                                accept=(kit.MEDIA_TYPE_OCI_MANIFEST,))
            assert digest == image.digest and kit.sha256_bytes(body) == image.digest

    def test_docker_v2s2_image_copied_between_repositories_is_mounted(self, registry,
                                                                       tmp_path):
        kit.build_image(tmp_path / "layout", "v1")
        digest = registry.push(tmp_path / "layout", "v1", "push/v2s2", fmt="v2s2")
        result = _cli(tmp_path, "copy", f"{registry.host}/push/v2s2:v1",
                      f"{registry.host}/push/v2s2-copy:v1")
        assert result["digest"] == digest
        assert result["mounted"] and not result["uploaded"]
        assert registry.raw_manifest_digest("push/v2s2-copy", "v1") == digest
        inspected = registry.inspect("push/v2s2-copy", "v1", raw=True)
        assert inspected["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"

    def test_wasm_artifact_keeps_its_artifact_type(self, registry, tmp_path):
        module = tmp_path / "plugin.wasm"
        module.write_bytes(b"\0asm\x01\0\0\0" + b"\x00\x04\x03zla")  # a custom section
        exported = _cli(tmp_path, "wasm-export", str(module), f"oci:{tmp_path / 'wasm'}:1.0")
        result = _cli(tmp_path, "push", f"oci:{tmp_path / 'wasm'}:1.0",
                      f"{registry.host}/push/wasm:1.0")
        assert result["digest"] == exported["digest"]
        raw = json.loads(_skopeo(registry, "inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/push/wasm:1.0"))
        assert raw.get("artifactType", "").startswith("application/vnd.wasm")
        assert registry.raw_manifest_digest("push/wasm", "1.0") == exported["digest"]

    def test_copy_into_a_layout_writes_what_skopeo_writes(self, registry, tmp_path):
        kit.build_image(tmp_path / "layout", "v1")
        registry.push(tmp_path / "layout", "v1", "push/reverse")
        _cli(tmp_path, "copy", f"{registry.host}/push/reverse:v1", f"oci:{tmp_path / 'ours'}:v1")
        kit.skopeo_to_layout(registry, "push/reverse", "v1", tmp_path / "theirs")
        assert _blob_files(tmp_path / "ours") == _blob_files(tmp_path / "theirs")
        ours = json.loads((tmp_path / "ours" / "index.json").read_text())
        theirs = json.loads((tmp_path / "theirs" / "index.json").read_text())
        assert [m["digest"] for m in ours["manifests"]] == [m["digest"] for m in theirs["manifests"]]
        assert (tmp_path / "ours" / "oci-layout").exists()

    def test_a_docker_archive_skopeo_wrote_is_read_by_copy(self, registry, tmp_path):
        image = kit.build_image(tmp_path / "layout", "v1")
        archive = tmp_path / "saved.tar"
        _skopeo(registry, "copy", f"oci:{tmp_path / 'layout'}:v1",
                f"docker-archive:{archive}:saved/app:v1")
        result = _cli(tmp_path, "copy", f"docker-archive:{archive}",
                      f"{registry.host}/push/from-archive:v1")
        inspected = registry.inspect("push/from-archive", "v1")
        assert len(inspected["Layers"]) == len(image.layers)
        raw = registry.inspect("push/from-archive", "v1", raw=True)
        assert raw["config"]["digest"] == image.config.digest
        assert registry.raw_manifest_digest("push/from-archive", "v1") == result["digest"]
        # skopeo reads it back out as the same image (its layers unchanged).
        kit.skopeo_to_layout(registry, "push/from-archive", "v1", tmp_path / "back")
        back = kit.describe_layout(tmp_path / "back", "v1")
        assert back is not None

    def test_referrers_travel_by_the_tag_schema_distribution_reads(self, registry, tmp_path):
        """distribution 2.8 has no referrers API: the source's referrers are found by
        their sha256-<hex> tag, and the destination gets one (skopeo reads both)."""
        sys.path.insert(0, str(HERE))
        import zlayer_registry as zr
        image = kit.build_image(tmp_path / "layout", "v1")
        _cli(tmp_path, "push", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/ref/src:v1")
        # An SBOM whose subject is the image, pushed with the library, listed in the
        # subject's fallback tag as oras and regclient list it there.
        sbom_body = b'{"spdxVersion": "SPDX-2.3"}'
        empty = b"{}"
        sbom = json.dumps({
            "schemaVersion": 2, "mediaType": kit.MEDIA_TYPE_OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": zr.compute_digest(empty), "size": 2},
            "layers": [{"mediaType": "application/spdx+json",
                        "digest": zr.compute_digest(sbom_body), "size": len(sbom_body)}],
            "subject": {"mediaType": kit.MEDIA_TYPE_OCI_MANIFEST, "digest": image.digest,
                        "size": len((tmp_path / "layout" / "blobs" / "sha256" /
                                     image.digest[7:]).read_bytes())}}).encode()
        with zr.ImagePusher(environ={}, insecure=True) as pusher:
            for data, media_type in ((empty, "application/vnd.oci.empty.v1+json"),
                                     (sbom_body, "application/spdx+json")):
                pusher.push_blob(f"{registry.host}/ref/src:v1",
                                 zr.Descriptor(media_type, zr.compute_digest(data), len(data)),
                                 io.BytesIO(data))
            sbom_manifest = zr.parse_manifest(sbom)
            pusher.push_manifest(f"{registry.host}/ref/src@{sbom_manifest.digest}", sbom_manifest)
            tag_index = zr.parse_manifest(json.dumps({
                "schemaVersion": 2, "mediaType": kit.MEDIA_TYPE_OCI_INDEX, "manifests": [
                    {"mediaType": kit.MEDIA_TYPE_OCI_MANIFEST, "digest": sbom_manifest.digest,
                     "size": len(sbom), "artifactType": "application/spdx+json"}]}).encode())
            pusher.push_manifest(f"{registry.host}/ref/src:{image.digest.replace(':', '-')}",
                                 tag_index)
        result = _cli(tmp_path, "copy", f"{registry.host}/ref/src:v1",
                      f"{registry.host}/ref/dst:v1", "--referrers")
        assert result["referrers"] == [sbom_manifest.digest]
        listed = json.loads(_skopeo(registry, "inspect", "--raw", "--tls-verify=false",
                                    f"docker://{registry.host}/ref/dst:"
                                    f"{image.digest.replace(':', '-')}"))
        assert [(m["digest"], m["artifactType"]) for m in listed["manifests"]] == [
            (sbom_manifest.digest, "application/spdx+json")]
        copied = _skopeo(registry, "inspect", "--raw", "--tls-verify=false",
                         f"docker://{registry.host}/ref/dst@{sbom_manifest.digest}")
        assert copied.encode() == sbom

    def test_local_registry_image_pushed_and_read_back(self, registry, tmp_path):
        index = kit.build_index(tmp_path / "layout", "v1")
        _cli(tmp_path, "copy", f"oci:{tmp_path / 'layout'}:v1", "local:built/app:v1")
        result = _cli(tmp_path, "push", "local:built/app:v1", f"{registry.host}/local/app:v1")
        assert result["digest"] == index.digest
        assert registry.raw_manifest_digest("local/app", "v1") == index.digest
        back = _cli(tmp_path, "copy", f"{registry.host}/local/app:v1", "local:back:v1")
        assert back["digest"] == index.digest and len(back["skipped"]) == len(result["uploaded"])
