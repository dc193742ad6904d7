"""Hermetic tests of the local registry (LocalRegistry and the local: locations).

Stores are made in tmp_path; registries are `_fake_registry` servers on
127.0.0.1:0.  No peer is needed.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from _testsupport import Sleeps, layer_bytes, run_cli, zr

import _oci_testkit as kit  # noqa: E402


@pytest.fixture
def store(tmp_path):
    with zr.LocalRegistry(tmp_path / "store") as opened:
        yield opened


def _image(store, seed=1, layers=1, size=1000):
    """Put a config and layers as blobs; return (manifest bytes, [config, *layers])."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    blobs = [(zr.MEDIA_TYPE_OCI_CONFIG, config)] + [
        ("application/vnd.oci.image.layer.v1.tar", layer_bytes(seed * 100 + n, size))
        for n in range(layers)]
    descriptors = []
    for media_type, data in blobs:
        descriptors.append({"mediaType": media_type, "digest": store.put_blob(data),
                            "size": len(data)})
    manifest = {"schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
                "config": descriptors[0], "layers": descriptors[1:]}
    return json.dumps(manifest, indent=2).encode(), descriptors


def _index(*children):
    return json.dumps({"schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_INDEX, "manifests": [
        {"mediaType": zr.MEDIA_TYPE_OCI_MANIFEST, "digest": zr.compute_digest(raw),
         "size": len(raw), "platform": {"os": "linux", "architecture": arch}}
        for raw, arch in children]}).encode()


def _files_under(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class TestBlobs:
    def test_put_get_has_by_bytes_and_by_stream(self, store, tmp_path):
        data = layer_bytes(1, 3 * 1024 * 1024 + 7)
        digest = store.put_blob(data)
        assert digest == zr.compute_digest(data)
        assert store.has_blob(digest) and store.get_blob(digest) == data
        assert store.blob_size(digest) == len(data)
        source = tmp_path / "big"
        source.write_bytes(layer_bytes(2, 2 * 1024 * 1024))
        with open(source, "rb") as f:
            streamed = store.put_blob(f)
        assert streamed == zr.compute_digest(source.read_bytes())
        with store.open_blob(streamed) as f:
            assert f.read() == source.read_bytes()

    def test_a_wrong_digest_stores_nothing(self, store, tmp_path):
        wrong = zr.compute_digest(b"other")
        with pytest.raises(zr.DigestMismatchError):
            store.put_blob(b"data", wrong)
        source = tmp_path / "f"
        source.write_bytes(b"streamed bytes")
        with open(source, "rb") as f, pytest.raises(zr.DigestMismatchError):
            store.put_blob(f, wrong)
        assert not store.has_blob(wrong)
        assert store.cache.is_empty()
        assert not list((Path(store.root) / "tmp").iterdir())

    def test_same_blob_from_many_threads_is_stored_once(self, store):
        data = layer_bytes(3, 500_000)
        results, errors = [], []

        def put():
            try:
                results.append(store.put_blob(data))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=put) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and set(results) == {zr.compute_digest(data)}
        assert [e["digest"] for e in store.cache.entries()] == [zr.compute_digest(data)]


class TestManifests:
    def test_put_and_get_by_tag_and_digest_byte_for_byte(self, store):
        raw, _ = _image(store)
        digest = store.put_manifest("team/app", "v1", raw)
        assert digest == zr.compute_digest(raw)
        assert store.get_manifest("team/app", "v1").raw == raw
        assert store.get_manifest("team/app", digest).raw == raw
        assert store.has_manifest("team/app", "v1") and not store.has_manifest("team/app", "v2")
        assert store.get_manifest("other", "v1") is None
        assert store.list_tags("team/app") == ["v1"]
        assert store.list_images() == ["team/app"]

    def test_an_index_needs_its_children_first(self, store):
        amd64, _ = _image(store, 1)
        arm64, _ = _image(store, 2)
        index = _index((amd64, "amd64"), (arm64, "arm64"))
        with pytest.raises(zr.ManifestBlobUnknownError) as caught:
            store.put_manifest("multi", "v1", index)
        assert caught.value.digest in (zr.compute_digest(amd64), zr.compute_digest(arm64))
        store.put_manifest("multi", zr.compute_digest(amd64), amd64)
        store.put_manifest("multi", zr.compute_digest(arm64), arm64)
        assert store.put_manifest("multi", "v1", index) == zr.compute_digest(index)
        assert sorted(store.list_manifests("multi")) == sorted(
            zr.compute_digest(r) for r in (amd64, arm64, index))

    @pytest.mark.parametrize("spoil, error, match", [
        (lambda m, d: b"{not json", zr.ManifestError, "not valid JSON"),
        (lambda m, d: json.dumps(dict(m, mediaType="application/x-unknown")).encode(),
         zr.ManifestError, "unsupported mediaType"),
        (lambda m, d: json.dumps(dict(m, layers=[dict(d[1], digest=zr.compute_digest(b"x"))])
                                 ).encode(), zr.ManifestBlobUnknownError, "not in the store"),
        (lambda m, d: json.dumps(dict(m, layers=[dict(d[1], size=d[1]["size"] + 1)])).encode(),
         zr.ManifestError, "bytes; the stored blob has"),
        (lambda m, d: json.dumps(dict(m, schemaVersion=1)).encode(), zr.ManifestError,
         "schema 1"),
    ])
    def test_what_distribution_refuses_is_refused_and_nothing_is_recorded(
            self, store, spoil, error, match):
        raw, descriptors = _image(store)
        with pytest.raises(error, match=match):
            store.put_manifest("app", "v1", spoil(json.loads(raw), descriptors))
        assert store.list_images() == [] and store.list_tags("app") == []

    def test_a_digest_reference_must_be_the_manifests_digest(self, store):
        raw, _ = _image(store)
        with pytest.raises(zr.DigestMismatchError):
            store.put_manifest("app", zr.compute_digest(b"other"), raw)
        assert store.put_manifest("app", zr.compute_digest(raw), raw) == zr.compute_digest(raw)
        assert store.list_tags("app") == []  # by digest: untagged

    def test_a_content_type_that_contradicts_the_body_is_refused(self, store):
        raw, _ = _image(store)
        with pytest.raises(zr.ManifestError, match="declares"):
            store.put_manifest("app", "v1", raw, zr.MEDIA_TYPE_DOCKER_MANIFEST)
        with pytest.raises(zr.ManifestError, match="unsupported manifest media type"):
            store.put_manifest("app", "v1", raw, "text/plain")
        assert store.put_manifest("app", "v1", raw, zr.MEDIA_TYPE_OCI_MANIFEST + "; charset=x")

    @pytest.mark.parametrize("name", ["../escape", "a/../../b", "UPPER", "_hidden", "a//b",
                                      "a/", "/abs", "x" * 256, "a/.git", "9/app"])
    def test_hostile_names_are_refused_and_nothing_is_written_outside(self, store, tmp_path,
                                                                      name):
        raw, _ = _image(store)
        before = _files_under(tmp_path)
        with pytest.raises(zr.InvalidReferenceError):
            store.put_manifest(name, "v1", raw)
        assert _files_under(tmp_path) == before

    @pytest.mark.parametrize("tag", ["../x", ".hidden", "-x", "a/b", "x" * 129, ""])
    def test_hostile_tags_are_refused(self, store, tag):
        raw, _ = _image(store)
        with pytest.raises(zr.InvalidReferenceError):
            store.put_manifest("app", tag, raw)
        assert store.list_tags("app") == []

    def test_delete_tag_keeps_the_manifest_delete_manifest_drops_its_tags(self, store):
        raw, _ = _image(store)
        digest = store.put_manifest("app", "v1", raw)
        store.put_manifest("app", "stable", raw)
        assert store.delete_tag("app", "v1") and not store.delete_tag("app", "v1")
        assert store.get_manifest("app", digest).raw == raw
        assert store.delete_manifest("app", digest)
        assert store.list_tags("app") == [] and store.get_manifest("app", "stable") is None
        assert store.list_images() == []

    def test_delete_image_leaves_nested_repositories(self, store):
        raw, _ = _image(store)
        store.put_manifest("org", "v1", raw)
        store.put_manifest("org/app", "v1", raw)
        assert store.delete_image("org")
        assert store.list_images() == ["org/app"]
        assert not store.delete_image("org")

    def test_a_tag_moved_by_many_threads_ends_whole(self, store):
        images = [_image(store, seed)[0] for seed in range(6)]
        errors = []

        def put(raw):
            try:
                for _ in range(5):
                    store.put_manifest("app", "latest", raw)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(raw,)) for raw in images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert store.get_manifest("app", "latest").raw in images
        assert len(store.list_manifests("app")) == 6


class TestReferrers:
    def _artifact(self, store, subject_raw, artifact_type, annotation):
        empty = store.put_blob(b"{}")
        body = store.put_blob(annotation.encode())
        return json.dumps({
            "schemaVersion": 2, "mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty,
                       "size": 2},
            "layers": [{"mediaType": "text/plain", "digest": body,
                        "size": len(annotation)}],
            "subject": {"mediaType": zr.MEDIA_TYPE_OCI_MANIFEST,
                        "digest": zr.compute_digest(subject_raw), "size": len(subject_raw)},
            "annotations": {"note": annotation}}).encode()

    def test_referrers_are_listed_and_filtered_by_artifact_type(self, store):
        raw, _ = _image(store)
        subject = store.put_manifest("app", "v1", raw)
        sbom = self._artifact(store, raw, "application/spdx+json", "sbom")
        sig = self._artifact(store, raw, "application/vnd.dev.cosign", "sig")
        store.put_manifest("app", zr.compute_digest(sbom), sbom)
        store.put_manifest("app", zr.compute_digest(sig), sig)
        found = store.referrers("app", subject)
        assert sorted(d.digest for d in found) == sorted(zr.compute_digest(r) for r in (sbom, sig))
        assert {d.artifact_type for d in found} == {"application/spdx+json",
                                                    "application/vnd.dev.cosign"}
        only = store.referrers("app", subject, "application/spdx+json")
        assert [d.digest for d in only] == [zr.compute_digest(sbom)]
        assert only[0].annotations == {"note": "sbom"} and only[0].size == len(sbom)
        assert store.referrers("other", subject) == []

    def test_a_referrer_may_come_before_its_subject_and_goes_with_its_manifest(self, store):
        raw, _ = _image(store)
        sbom = self._artifact(store, raw, "application/spdx+json", "sbom")
        digest = store.put_manifest("app", zr.compute_digest(sbom), sbom)
        assert [d.digest for d in store.referrers("app", zr.compute_digest(raw))] == [digest]
        store.delete_manifest("app", digest)
        assert store.referrers("app", zr.compute_digest(raw)) == []


class TestGarbageCollection:
    def test_gc_frees_what_nothing_reaches_and_reports_bytes(self, store):
        kept, kept_blobs = _image(store, 1)
        gone, gone_blobs = _image(store, 2, size=5000)
        store.put_manifest("keep", "v1", kept)
        store.put_manifest("drop", "v1", gone)
        assert store.garbage_collect(grace_s=0) == 0
        store.delete_image("drop")
        expected = sum(d["size"] for d in gone_blobs) + len(gone)
        assert store.garbage_collect(grace_s=0, dry_run=True) == expected
        assert store.has_blob(gone_blobs[1]["digest"])
        assert store.garbage_collect(grace_s=0) == expected
        assert not store.has_blob(gone_blobs[1]["digest"])
        assert all(store.has_blob(d["digest"]) for d in kept_blobs)
        assert store.get_manifest("keep", "v1").raw == kept

    def test_a_blob_younger_than_the_grace_is_spared(self, store):
        digest = store.put_blob(b"uploaded, its manifest not yet")
        assert store.garbage_collect() == 0  # the default grace: an hour
        assert store.has_blob(digest)
        assert store.garbage_collect(grace_s=0) == len(b"uploaded, its manifest not yet")

    def test_cache_references_keep_their_blobs_too(self, store, registry):
        registry.add_image("pulled", "v1", [layer_bytes(9, 2000)])
        with zr.ImagePuller(store.cache, environ={}, platform="linux/amd64",
                            sleep=Sleeps()) as puller:
            _, layers = puller.pull(f"{registry.host}/pulled:v1")
        assert store.garbage_collect(grace_s=0) == 0
        assert store.has_blob(layers[0].digest)

    def test_prune_never_drops_what_the_local_registry_keeps(self, store, registry):
        raw, blobs = _image(store, 1, size=50_000)
        store.put_manifest("built", "v1", raw)
        registry.add_image("pulled", "v1", [layer_bytes(9, 50_000)])
        with zr.ImagePuller(store.cache, environ={}, platform="linux/amd64",
                            sleep=Sleeps()) as puller:
            _, layers = puller.pull(f"{registry.host}/pulled:v1")
        removed = store.cache.prune(0)
        assert layers[0].digest in removed
        assert all(store.has_blob(d["digest"]) for d in blobs)
        assert store.get_manifest("built", "v1").raw == raw

    def test_gc_racing_manifest_puts_never_leaves_a_manifest_without_its_blobs(self, store):
        stop = threading.Event()
        errors = []

        def collect():
            while not stop.is_set():
                try:
                    store.garbage_collect(grace_s=0)
                except Exception as exc:  # reported below
                    errors.append(exc)

        collector = threading.Thread(target=collect)
        collector.start()
        try:
            stored = []
            for seed in range(40):
                raw, _ = _image(store, seed, size=100)
                try:
                    store.put_manifest("race", f"t{seed}", raw)
                    stored.append(raw)
                except zr.ManifestBlobUnknownError:
                    pass  # collected between its upload and its manifest: a grace of 0
        finally:
            stop.set()
            collector.join()
        assert not errors and stored
        for tag in store.list_tags("race"):
            manifest = store.get_manifest("race", tag)
            for child in manifest.children:
                assert store.has_blob(child.digest), (tag, child.digest)


class TestCacheView:
    def test_tags_are_reference_records_cache_rm_and_gc_share(self, store, tmp_path):
        raw, blobs = _image(store)
        digest = store.put_manifest("team/app", "v1", raw)
        store.close()
        root = str(tmp_path / "store")
        listed = run_cli("cache", "ls", "--cache", root, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert f"local:team/app:v1  {digest}" in listed.stdout
        assert "local:team/app@" not in listed.stdout  # by digest: --json only
        data = json.loads(run_cli("cache", "ls", "--json", "--cache", root, cwd=tmp_path).stdout)
        assert data["references"][f"local:team/app@{digest}"] == digest
        gc = run_cli("cache", "gc", "--cache", root, cwd=tmp_path)
        assert gc.returncode == 0 and "removed 0" in gc.stdout
        removed = run_cli("cache", "rm", "local:team/app:v1", "--cache", root, cwd=tmp_path)
        assert removed.returncode == 0, removed.stderr
        assert zr.LocalRegistry(root).list_tags("team/app") == []

    def test_cache_gc_grace_and_dry_run(self, store, tmp_path):
        digest = store.put_blob(b"an upload waiting for its manifest")
        store.close()
        root = str(tmp_path / "store")
        spared = run_cli("cache", "gc", "--cache", root, cwd=tmp_path)
        assert spared.returncode == 0 and "removed 0" in spared.stdout  # 1 h by default
        dry = run_cli("cache", "gc", "--grace", "0", "--dry-run", "--cache", root, cwd=tmp_path)
        assert dry.returncode == 0 and f"would remove {digest}" in dry.stdout
        assert zr.LocalRegistry(root).has_blob(digest)
        done = run_cli("cache", "gc", "--grace", "0s", "--cache", root, cwd=tmp_path)
        assert done.returncode == 0 and "removed 1 unreferenced blob" in done.stdout
        assert not zr.LocalRegistry(root).has_blob(digest)
        bad = run_cli("cache", "gc", "--grace", "soon", "--cache", root, cwd=tmp_path)
        assert bad.returncode == 2 and "invalid duration" in bad.stderr

    def test_a_registry_reference_on_host_local_is_not_the_local_registry(self, store,
                                                                           registry):
        assert not zr._is_local_record("local:5000/app:v1")
        assert zr._is_local_record("local:app:v1")
        location = zr._parse_location("local:5000/app:v1")
        assert location.reference is not None and location.reference.registry == "local:5000"
        with pytest.raises(ValueError):
            store.cache.record_reference("local:app:v1", zr.compute_digest(b"x"), "")


def _small_layout(layout, tag="v1", seed=1):
    return kit.build_image(layout, tag, layers=kit.default_layers(2, random_bytes=20_000,
                                                                  small_files=3, seed=seed))


class TestLocalLocations:
    def test_layout_to_local_to_layout_keeps_every_byte(self, tmp_path):
        image = _small_layout(tmp_path / "in")
        cache = str(tmp_path / "cache")
        done = run_cli("copy", f"oci:{tmp_path / 'in'}:v1", "local:team/app:v1",
                       "--cache", cache, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "3 written" in done.stdout
        with zr.LocalRegistry(cache) as store:
            assert store.get_manifest("team/app", "v1").digest == image.digest
        out = run_cli("copy", "local:team/app:v1", f"oci:{tmp_path / 'out'}:v2", "--cache", cache,
                      cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert kit.describe_layout(tmp_path / "out", "v2") == \
            kit.describe_layout(tmp_path / "in", "v1")
        again = run_cli("copy", f"oci:{tmp_path / 'in'}:v1", "local:team/app:v1", "--json",
                        "--cache", cache, cwd=tmp_path)
        assert len(json.loads(again.stdout)["skipped"]) == 3

    def test_an_index_is_stored_whole_with_its_children(self, tmp_path):
        index = kit.build_index(tmp_path / "in", "v1")
        cache = str(tmp_path / "cache")
        done = run_cli("copy", f"oci:{tmp_path / 'in'}:v1", "local:multi", "--cache", cache,
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        with zr.LocalRegistry(cache) as store:
            assert store.resolve("multi", "latest") == index.index.digest
            assert len(store.list_manifests("multi")) == 1 + len(index.images)

    def test_registry_to_local_to_registry(self, registry, tmp_path):
        image = registry.add_image("src/app", "v1", [layer_bytes(1, 30_000), layer_bytes(2)])
        cache = str(tmp_path / "cache")
        into = run_cli("copy", f"{registry.host}/src/app:v1", "local:app:v1", "--cache", cache,
                       cwd=tmp_path)
        assert into.returncode == 0, into.stderr
        out = run_cli("push", "local:app:v1", f"{registry.host}/dst/app:v1", "--cache", cache,
                      cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert registry.manifests[("dst/app", "v1")][0] == registry.manifests[("src/app", "v1")][0]
        assert image["layers"][0]["digest"] in registry.blobs

    def test_pull_output_and_import_store_into_the_local_registry(self, registry, tmp_path):
        registry.add_image("src/app", "v1", [layer_bytes(3, 10_000)])
        cache = str(tmp_path / "cache")
        pulled = run_cli("pull", f"{registry.host}/src/app:v1", "--output", "local:mirror/app:v1",
                         "--cache", cache, "-q", cwd=tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        image = _small_layout(tmp_path / "built")
        imported = run_cli("import", f"oci:{tmp_path / 'built'}:v1", "local:built:v1",
                           "--cache", cache, cwd=tmp_path)
        assert imported.returncode == 0, imported.stderr
        assert "stored as local:built:v1" in imported.stdout
        with zr.LocalRegistry(cache) as store:
            assert store.resolve("mirror/app", "v1") == pulled.stdout.strip()
            assert store.resolve("built", "v1") == image.digest
            assert store.list_images() == ["built", "mirror/app"]

    @pytest.mark.parametrize("args, expected", [
        (["copy", "local:nope", "oci:./out"], "no image local:nope:latest"),
        (["copy", "local:Bad", "oci:./out"], "must be lowercase"),
        (["copy", "local:a/../b", "oci:./out"], "invalid path component"),
        (["pull", "local:app"], "not the local registry's image"),
        (["import", "oci:./layout:v1", "oci:./x"], "unsupported destination"),
        (["copy", "oci:./layout:v1", f"local:app@{'sha256:' + 'a' * 64}"], "but the image"),
    ])
    def test_bad_input_is_one_line(self, tmp_path, args, expected):
        _small_layout(tmp_path / "layout")
        done = run_cli(*args, "--cache", str(tmp_path / "cache"), cwd=tmp_path, timeout=60)
        assert done.returncode in (1, 2)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
        assert "Traceback" not in done.stderr
