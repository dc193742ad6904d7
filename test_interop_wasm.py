"""Interop tests: WebAssembly artifacts of every packaging style, through CNCF distribution.

Modules are assembled from WAT written here (wabt's ``wat2wasm``); components wrap such a
module in the component-model preamble (wabt cannot build components). Each packaging
style's manifest, config and layer are built by hand (``_oci_testkit``, section 4) and
pushed into ``docker-registry serve`` on 127.0.0.1 through the distribution HTTP API, which
stores them byte for byte (``artifactType`` and unknown config media types included). The
artifacts are then detected and pulled through the public API and the CLI. A missing tool
skips these tests, unless ``ZLAYER_REQUIRE_INTEROP=1``, which turns the skip into a failure.

Styles:
    cncf-*          CNCF "Wasm OCI Artifact" as wkg writes it (config v0, application/wasm),
                    with and without the OCI 1.1 manifest artifactType
    wasm-to-oci-*   config v1 ``{}``, content.layer.v1 layer, no mediaType field: no WASI
                    level anywhere but in the bytes
    runwasi-*       ordinary OCI image config with os/architecture wasm and a raw module
                    layer, as containerd/runwasi's oci-tar-builder writes it
    docker-wasi     ordinary image, os wasi, the module as /app.wasm in a gzip tar layer
    mixed index     linux/amd64 container + wasip1/wasm + wasip2/wasm entries
    publisher       ``zlayer_registry wasm-export`` then ``skopeo copy``

Blocks:
    FIXTURES        the registry, the modules, the artifacts and their pushes
    TOOLS           the fixtures without zlayer_registry: wabt, raw pushes, skopeo
    STYLES          every single-manifest style through the API and the CLI
    MIXED INDEX     choosing the WASM entry, by preference and by --platform
    PUBLISHER       wasm-export, skopeo copy, pull back
    ERRORS          layers declared as WebAssembly whose bytes are not
    DOCKER WASI     ``docker buildx --platform wasi/wasm`` images: the module in a tar layer
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Dict, Optional

import pytest

HERE = Path(__file__).resolve().parent
# The helper sits beside this file; --import-mode=importlib would not put it on sys.path.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _oci_testkit as kit  # noqa: E402

pytestmark = pytest.mark.interop
TAG = "v1"


_unavailable = kit.unavailable  # skip, or fail under ZLAYER_REQUIRE_INTEROP=1


def _require(tool: str) -> str:
    try:
        return kit.require_tool(tool)
    except kit.ToolMissing as exc:
        missing = str(exc)
    _unavailable(missing)  # outside the except block: no chained traceback in the report


# =============================================================================
# FIXTURES
# =============================================================================


@pytest.fixture(scope="session")
def wasm_registry(tmp_path_factory):
    """Runs an open ``docker-registry serve`` on 127.0.0.1 for the WASM tests."""
    yield from kit.running_registry(tmp_path_factory.mktemp("distribution-wasm"))


@pytest.fixture(scope="session")
def modules(tmp_path_factory) -> Dict[str, bytes]:
    """Returns distinct WASI core modules and components, by name, built with wat2wasm.

    Every artifact gets its own greeting, so no two share a layer digest and a mix-up
    between artifacts shows up as wrong bytes.
    """
    _require("wat2wasm")
    workdir = tmp_path_factory.mktemp("wat")
    out = {}
    for name in ("cncf-module-at", "cncf-module", "cncf-component-at", "cncf-component",
                 "wasm-to-oci-module", "wasm-to-oci-component", "runwasi-module",
                 "runwasi-module-layer", "runwasi-component-os-wasi", "runwasi-component",
                 "index-wasip1", "index-wasip2", "publisher"):
        core = kit.wat2wasm(kit.wasi_hello_wat("hello from %s\n" % name), workdir)
        is_component = "component" in name or "wasip2" in name
        out[name] = kit.component_from_core(core) if is_component else core
    # The first function of the task, on its own.
    out["add"] = kit.wat2wasm(
        '(module (func (export "add") (param i32 i32) (result i32)'
        ' local.get 0 local.get 1 i32.add))', workdir)
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    """One single-manifest artifact and what a client should make of it.

    ``wasi`` is the level after the bytes were read (pull_wasm, pull, inspect);
    ``declared`` the level the manifest and config alone give (get_wasm_info), None
    where the test does not pin it.
    """

    artifact: kit.RawArtifact
    wasi: str
    declared: Optional[str]
    module_name: Optional[str]


@pytest.fixture(scope="session")
def cases(modules) -> Dict[str, Case]:
    """Builds every single-manifest style, by case id."""
    m = modules
    component_info = {"exports": ["wasi:cli/run@0.2.0"], "imports": [],
                      "target": None}  # oci-wasm's WasmConfig.component
    return {
        "cncf-module-at": Case(kit.cncf_wasm_artifact(
            m["cncf-module-at"], "wasip1", "hello-p1.wasm",
            artifact_type=kit.ARTIFACT_TYPE_WASM_MODULE), "wasip1", "wasip1", "hello-p1.wasm"),
        "cncf-component-at": Case(kit.cncf_wasm_artifact(
            m["cncf-component-at"], "wasip2", "hello-p2.wasm",
            artifact_type=kit.ARTIFACT_TYPE_WASM_COMPONENT, component=component_info),
            "wasip2", "wasip2", "hello-p2.wasm"),
        "cncf-module": Case(kit.cncf_wasm_artifact(
            m["cncf-module"], "wasip1", "plain-p1.wasm"), "wasip1", "wasip1", "plain-p1.wasm"),
        "cncf-component": Case(kit.cncf_wasm_artifact(
            m["cncf-component"], "wasip2", "plain-p2.wasm", component=component_info),
            "wasip2", "wasip2", "plain-p2.wasm"),
        "cncf-add": Case(kit.cncf_wasm_artifact(
            m["add"], "wasip1", "add.wasm", artifact_type=kit.ARTIFACT_TYPE_WASM_MODULE),
            "wasip1", "wasip1", "add.wasm"),
        # Nothing but the bytes says which level: get_wasm_info cannot know.
        "wasm-to-oci-module": Case(kit.wasm_to_oci_artifact(m["wasm-to-oci-module"]),
                                   "wasip1", "unknown", "module.wasm"),
        "wasm-to-oci-component": Case(kit.wasm_to_oci_artifact(
            m["wasm-to-oci-component"], title="component.wasm"),
            "wasip2", "unknown", "component.wasm"),
        # oci-tar-builder -m: os wasip1 and the *component* layer type for a core module.
        "runwasi-module": Case(kit.runwasi_image(
            m["runwasi-module"], "wasip1", kit.MEDIA_TYPE_RUNWASI_COMPONENT_LAYER),
            "wasip1", "wasip1", None),
        "runwasi-module-layer": Case(kit.runwasi_image(
            m["runwasi-module-layer"], "wasip1", kit.MEDIA_TYPE_RUNWASI_MODULE_LAYER),
            "wasip1", "wasip1", None),
        # Older oci-tar-builder: os "wasi"; the component layer type settles it.
        "runwasi-component-os-wasi": Case(kit.runwasi_image(
            m["runwasi-component-os-wasi"], "wasi", kit.MEDIA_TYPE_RUNWASI_COMPONENT_LAYER),
            "wasip2", "wasip2", None),
        # oci-tar-builder -c today: os wasip1 (hard-coded) around a component.
        "runwasi-component": Case(kit.runwasi_image(
            m["runwasi-component"], "wasip1", kit.MEDIA_TYPE_RUNWASI_COMPONENT_LAYER),
            "wasip2", None, None),
    }


ALL_CASES = ["cncf-module-at", "cncf-component-at", "cncf-module", "cncf-component", "cncf-add",
             "wasm-to-oci-module", "wasm-to-oci-component", "runwasi-module",
             "runwasi-module-layer", "runwasi-component-os-wasi", "runwasi-component"]
BYTES_CASES = ALL_CASES  # tests whose answer comes from the pulled bytes


def _pushed_ns(registry, repository: str, artifact: kit.RawArtifact, digest: str):
    return types.SimpleNamespace(registry=registry, repository=repository, tag=TAG,
                                 artifact=artifact, digest=digest,
                                 reference=registry.reference(repository, TAG))


@pytest.fixture(scope="session")
def pushed_cases(wasm_registry, cases):
    """Pushes every case as ``wasm/<case id>:v1`` through the distribution API."""
    out = {}
    for case_id, case in cases.items():
        repository = "wasm/" + case_id
        digest = kit.push_artifact(wasm_registry, repository, TAG, case.artifact)
        out[case_id] = _pushed_ns(wasm_registry, repository, case.artifact, digest)
    return out


@pytest.fixture(scope="session")
def container(tmp_path_factory) -> kit.RawArtifact:
    """Returns a small linux/amd64 container image as raw bytes."""
    layout = tmp_path_factory.mktemp("layout-container")
    info = kit.build_image(layout, tag=TAG, layers=kit.default_layers(2, random_bytes=2048))
    return kit.raw_image_from_layout(layout, info)


@pytest.fixture(scope="session")
def mixed_index(wasm_registry, modules, container):
    """Pushes an index of linux/amd64 + wasip1/wasm + wasip2/wasm as ``wasm/mixed:v1``.

    The container comes first and wasip1 before wasip2, so neither index order nor the
    first entry decides the choice. wasip1 is a runwasi image, wasip2 a CNCF component
    whose index entry carries artifactType. Pushed by the API: skopeo 1.9 rewrites an
    index whose entries have artifactType (it drops the field), changing its digest.
    """
    wasip1 = kit.runwasi_image(modules["index-wasip1"], "wasip1",
                               kit.MEDIA_TYPE_RUNWASI_COMPONENT_LAYER)
    wasip2 = kit.cncf_wasm_artifact(modules["index-wasip2"], "wasip2", "index-p2.wasm",
                                    artifact_type=kit.ARTIFACT_TYPE_WASM_COMPONENT)
    index = kit.raw_index([container, wasip1, wasip2])
    digest = kit.push_artifact(wasm_registry, "wasm/mixed", TAG, index)
    pushed = _pushed_ns(wasm_registry, "wasm/mixed", index, digest)
    pushed.children = {"linux/amd64": container, "wasip1/wasm": wasip1, "wasip2/wasm": wasip2}
    return pushed


@pytest.fixture(scope="session")
def pushed_container(wasm_registry, container):
    """Pushes the container image on its own as ``wasm/container:v1``."""
    digest = kit.push_artifact(wasm_registry, "wasm/container", TAG, container)
    return _pushed_ns(wasm_registry, "wasm/container", container, digest)


def _isolated_env(tmp_path: Path, **extra: str) -> dict:
    """Returns an environment that finds this checkout and no credentials of the machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                        "XDG_CONFIG_HOME", "PYTHONPATH", "ZLAYER_REGISTRY_CACHE")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(HERE), PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zlayer_registry"] + list(args),
        cwd=str(HERE), env=_isolated_env(tmp_path), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
    )


def _cli_json(tmp_path: Path, *args: str) -> dict:
    proc = _run_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _puller(zr, tmp_path: Path, platform: Optional[str] = None):
    return zr.ImagePuller(zr.BlobCache.open(str(tmp_path / "cache")), platform=platform)


def _assert_module(data: bytes, info, artifact: kit.RawArtifact) -> None:
    """Checks pulled bytes and WasmArtifactInfo against the artifact pushed."""
    assert data == artifact.module
    assert kit.sha256_bytes(data) == info.wasm_layer_digest == artifact.layer_digest
    assert info.wasm_size == len(artifact.module)


# =============================================================================
# TOOLS: the fixtures without zlayer_registry
# =============================================================================


def _core_of_component(component: bytes) -> bytes:
    """Returns the one core module a component_from_core() binary holds."""
    assert component[:9] == kit.COMPONENT_PREAMBLE + b"\x01"  # then a core:module section
    size, shift, pos = 0, 0, 9
    while True:
        byte = component[pos]
        size |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if not byte & 0x80:
            break
    assert len(component) == pos + size
    return component[pos:]



class TestTools:
    def test_modules_are_valid_and_of_the_right_kind(self, tmp_path, modules):
        validate = _require("wasm-validate")
        for name, data in modules.items():
            core = _core_of_component(data) if data.startswith(kit.COMPONENT_PREAMBLE) else data
            assert core.startswith(kit.CORE_MODULE_PREAMBLE), name
            assert ("component" in name or "wasip2" in name) == (core != data), name
            path = tmp_path / (name + ".wasm")
            path.write_bytes(core)
            proc = subprocess.run([validate, str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True)
            assert proc.returncode == 0, (name, proc.stderr)
        assert len(set(modules.values())) == len(modules)

    def test_component_section_length_is_leb128(self):
        core = kit.CORE_MODULE_PREAMBLE + b"\0" * 200  # 208 bytes: a two-byte LEB128
        component = kit.component_from_core(core)
        assert component[:9] == kit.COMPONENT_PREAMBLE + b"\x01"
        assert component[9:11] == bytes([208 & 0x7F | 0x80, 208 >> 7])
        assert component[11:] == core
        with pytest.raises(ValueError):
            kit.component_from_core(kit.COMPONENT_PREAMBLE)

    def test_docker_wasi_layer_holds_the_module(self, modules):
        image = kit.docker_wasi_image(modules["runwasi-module"])
        layer = image.blobs[image.data["layers"][0]["digest"]]
        plain = gzip.decompress(layer)
        assert json.loads(image.config)["rootfs"]["diff_ids"] == [kit.sha256_bytes(plain)]
        with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
            assert tar.getnames() == ["app.wasm"]
            assert tar.extractfile("app.wasm").read() == modules["runwasi-module"]
        assert image.module is None and image.layer_digest is None

    @pytest.mark.parametrize("case_id", ALL_CASES)
    def test_registry_stores_artifact_byte_for_byte(self, pushed_cases, case_id):
        pushed = pushed_cases[case_id]
        digest, content_type, body = pushed.registry.manifest(pushed.repository, TAG)
        assert body == pushed.artifact.manifest
        assert digest == pushed.digest == pushed.artifact.digest
        assert content_type == kit.MEDIA_TYPE_OCI_MANIFEST
        for blob_digest, data in pushed.artifact.blobs.items():
            status, headers, got = pushed.registry.request(
                "GET", "/v2/%s/blobs/%s" % (pushed.repository, blob_digest))
            assert (status, got) == (200, data)
            assert headers["Docker-Content-Digest"] == blob_digest

    def test_registry_keeps_artifact_type_and_index_entries(self, mixed_index):
        digest, content_type, body = mixed_index.registry.manifest("wasm/mixed", TAG)
        assert (digest, content_type, body) == (
            mixed_index.artifact.digest, kit.MEDIA_TYPE_OCI_INDEX, mixed_index.artifact.manifest)
        entries = json.loads(body)["manifests"]
        assert [e["platform"]["os"] for e in entries] == ["linux", "wasip1", "wasip2"]
        assert entries[2]["artifactType"] == kit.ARTIFACT_TYPE_WASM_COMPONENT
        wasip2 = mixed_index.children["wasip2/wasm"]
        _, _, child = mixed_index.registry.manifest("wasm/mixed", wasip2.digest)
        assert json.loads(child)["artifactType"] == kit.ARTIFACT_TYPE_WASM_COMPONENT

    @pytest.mark.parametrize("case_id", ["cncf-component-at", "wasm-to-oci-module",
                                         "runwasi-module"])
    def test_skopeo_copies_single_manifest_artifacts_verbatim(self, tmp_path, wasm_registry,
                                                               cases, case_id):
        # skopeo 1.9 keeps a single artifact manifest (artifactType, wasm config types, no
        # mediaType field) byte for byte; only indexes with artifactType entries change.
        artifact = cases[case_id].artifact
        kit.write_raw_to_layout(tmp_path / "layout", TAG, artifact)
        digest = wasm_registry.push(tmp_path / "layout", TAG, "skopeo/" + case_id)
        assert digest == artifact.digest
        assert wasm_registry.manifest("skopeo/" + case_id, TAG)[2] == artifact.manifest


# =============================================================================
# STYLES: every single-manifest style through the API and the CLI
# =============================================================================


class TestStyles:
    @pytest.mark.parametrize("case_id", BYTES_CASES)
    def test_pull_wasm_returns_verified_module(self, zr, tmp_path, cases, pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        data, info = _puller(zr, tmp_path).pull_wasm(pushed.reference)
        _assert_module(data, info, case.artifact)
        assert isinstance(info, zr.WasmArtifactInfo)
        assert isinstance(info.wasi_version, zr.WasiVersion)
        assert str(info.wasi_version) == case.wasi
        assert info.module_name == case.module_name

    @pytest.mark.parametrize("case_id", ALL_CASES)
    def test_manifest_digest_and_detection(self, zr, tmp_path, cases, pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        manifest = _puller(zr, tmp_path).fetch_manifest(pushed.reference)
        registry_digest = pushed.registry.manifest(pushed.repository, TAG)[0]
        assert manifest.digest == registry_digest == case.artifact.digest
        assert manifest.data == case.artifact.data
        assert zr.detect_artifact_type(manifest).is_wasm()
        assert zr.detect_artifact_type(manifest.data).is_wasm()
        config = json.loads(case.artifact.config)
        kind = zr.detect_artifact_type(manifest, config)
        assert kind.is_wasm() and not kind.is_container()
        if case.declared is not None:
            assert str(kind.wasi_version()) == case.declared

    @pytest.mark.parametrize("case_id", ALL_CASES)
    def test_get_wasm_info_reads_manifest_and_config_only(self, zr, tmp_path, cases,
                                                          pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        puller = _puller(zr, tmp_path)
        info = puller.get_wasm_info(pushed.reference)
        assert info is not None
        if case.declared is not None:
            assert str(info.wasi_version) == case.declared
        assert info.wasm_layer_digest == case.artifact.layer_digest
        assert info.wasm_size == len(case.artifact.module)
        assert info.module_name == case.module_name
        assert not puller.cache.has(case.artifact.layer_digest)  # the module stays remote

    @pytest.mark.parametrize("case_id", BYTES_CASES)
    def test_cli_pull_json(self, tmp_path, cases, pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        out = _cli_json(tmp_path, "pull", pushed.reference, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert out["artifact_type"] == "wasm"
        assert out["digest"] == pushed.digest == case.artifact.digest
        assert out["wasi_version"] == case.wasi
        assert out["wasm_layer_digest"] == case.artifact.layer_digest
        assert out["wasm_size"] == len(case.artifact.module)
        assert out["module_name"] == case.module_name
        assert out["index_digest"] is None

    @pytest.mark.parametrize("case_id", BYTES_CASES)
    def test_cli_pull_wasm_writes_module(self, tmp_path, cases, pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        output = tmp_path / "out" / "module.wasm"
        output.parent.mkdir()
        out = _cli_json(tmp_path, "pull-wasm", pushed.reference, "-o", str(output), "--json",
                        "--cache", str(tmp_path / "cache"))
        assert output.read_bytes() == case.artifact.module
        assert out["destination"] == str(output)
        assert out["wasi_version"] == case.wasi
        assert out["wasm_layer_digest"] == kit.sha256_file(output)

    @pytest.mark.parametrize("case_id", BYTES_CASES)
    def test_cli_inspect_json(self, tmp_path, cases, pushed_cases, case_id):
        case, pushed = cases[case_id], pushed_cases[case_id]
        out = _cli_json(tmp_path, "inspect", pushed.reference, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert out["digest"] == case.artifact.digest
        assert out["artifact_type"] == "wasm"
        assert out["wasi_version"] == case.wasi
        assert out["config"]["media_type"] == case.artifact.data["config"]["mediaType"]
        assert out.get("manifest_artifact_type") == case.artifact.data.get("artifactType")

    def test_second_pull_wasm_is_served_from_cache(self, zr, tmp_path, cases, pushed_cases):
        pushed = pushed_cases["cncf-component-at"]
        first = _puller(zr, tmp_path)
        first.pull_wasm(pushed.reference)
        second = _puller(zr, tmp_path)
        data, info = second.pull_wasm(pushed.reference)
        _assert_module(data, info, pushed.artifact)
        assert second.request_count == 1  # HEAD of the tag; the rest is cached

    def test_container_is_not_wasm(self, zr, tmp_path, pushed_container):
        puller = _puller(zr, tmp_path)
        assert puller.get_wasm_info(pushed_container.reference) is None
        assert zr.detect_artifact_type(puller.fetch_manifest(pushed_container.reference)
                                       ).is_container()
        with pytest.raises(zr.ManifestError):
            puller.pull_wasm(pushed_container.reference)
        out = _cli_json(tmp_path, "pull", pushed_container.reference, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert out["artifact_type"] == "container"
        assert out["digest"] == pushed_container.digest
        assert "wasi_version" not in out


# =============================================================================
# MIXED INDEX: a container and two WASM entries under one tag
# =============================================================================


class TestMixedIndex:
    def test_pull_wasm_prefers_wasip2(self, zr, tmp_path, mixed_index):
        wasip2 = mixed_index.children["wasip2/wasm"]
        puller = _puller(zr, tmp_path)
        data, info = puller.pull_wasm(mixed_index.reference)
        _assert_module(data, info, wasip2)
        assert info.wasi_version is zr.WasiVersion.PREVIEW2
        assert info.module_name == "index-p2.wasm"
        # Nothing of the other entries was downloaded.
        for other in ("linux/amd64", "wasip1/wasm"):
            for digest in mixed_index.children[other].blobs:
                assert not puller.cache.has(digest), (other, digest)

    @pytest.mark.parametrize("platform, expected", [("wasip1/wasm", "wasip1"),
                                                    ("wasip2/wasm", "wasip2")])
    def test_pull_wasm_with_platform(self, zr, tmp_path, mixed_index, platform, expected):
        child = mixed_index.children[platform]
        data, info = _puller(zr, tmp_path, platform).pull_wasm(mixed_index.reference)
        _assert_module(data, info, child)
        assert str(info.wasi_version) == expected

    def test_get_wasm_info_follows_the_same_choice(self, zr, tmp_path, mixed_index):
        info = _puller(zr, tmp_path).get_wasm_info(mixed_index.reference)
        assert info.wasi_version is zr.WasiVersion.PREVIEW2
        assert info.wasm_layer_digest == mixed_index.children["wasip2/wasm"].layer_digest
        info = _puller(zr, tmp_path, "wasip1/wasm").get_wasm_info(mixed_index.reference)
        assert info.wasi_version is zr.WasiVersion.PREVIEW1
        assert info.wasm_layer_digest == mixed_index.children["wasip1/wasm"].layer_digest
        assert _puller(zr, tmp_path, "linux/amd64").get_wasm_info(mixed_index.reference) is None

    def test_container_platform_gets_the_container(self, zr, tmp_path, mixed_index):
        container = mixed_index.children["linux/amd64"]
        puller = _puller(zr, tmp_path, "linux/amd64")
        result = puller.pull_image(mixed_index.reference)
        assert result.manifest.digest == container.digest
        assert result.index.digest == mixed_index.digest
        assert result.artifact_type.is_container()
        with pytest.raises(zr.ManifestError):
            puller.pull_wasm(mixed_index.reference)

    def test_fetch_manifest_resolves_wasm_platform(self, zr, tmp_path, mixed_index):
        child = mixed_index.children["wasip1/wasm"]
        manifest = _puller(zr, tmp_path, "wasip1/wasm").fetch_manifest(mixed_index.reference)
        assert manifest.digest == child.digest
        kind = zr.detect_artifact_type(manifest, json.loads(child.config))
        assert kind.is_wasm() and kind.wasi_version() is zr.WasiVersion.PREVIEW1

    def test_cli_inspect_lists_wasm_platforms(self, tmp_path, mixed_index):
        out = _cli_json(tmp_path, "inspect", mixed_index.reference, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert out["digest"] == mixed_index.digest
        seen = {(p["os"], p["architecture"]): p["digest"] for p in out["platforms"]}
        assert seen == {("linux", "amd64"): mixed_index.children["linux/amd64"].digest,
                        ("wasip1", "wasm"): mixed_index.children["wasip1/wasm"].digest,
                        ("wasip2", "wasm"): mixed_index.children["wasip2/wasm"].digest}

    @pytest.mark.parametrize("platform", ["wasip1/wasm", "wasip2/wasm"])
    def test_cli_inspect_platform(self, tmp_path, mixed_index, platform):
        out = _cli_json(tmp_path, "inspect", mixed_index.reference, "--json",
                        "--platform", platform, "--cache", str(tmp_path / "cache"))
        assert out["manifest_digest"] == mixed_index.children[platform].digest
        assert out["artifact_type"] == "wasm"
        assert out["wasi_version"] == platform.split("/")[0]

    @pytest.mark.parametrize("platform", [None, "wasip1/wasm", "wasip2/wasm"])
    def test_cli_pull_wasm(self, tmp_path, mixed_index, platform):
        child = mixed_index.children[platform or "wasip2/wasm"]
        output = tmp_path / "module.wasm"
        args = ["pull-wasm", mixed_index.reference, "-o", str(output),
                "--cache", str(tmp_path / "cache"), "--json"]
        if platform:
            args += ["--platform", platform]
        out = _cli_json(tmp_path, *args)
        assert output.read_bytes() == child.module
        assert out["wasm_layer_digest"] == child.layer_digest
        assert out["wasi_version"] == (platform or "wasip2/wasm").split("/")[0]

    @pytest.mark.parametrize("platform, kind", [("linux/amd64", "container"),
                                                ("wasip1/wasm", "wasm"),
                                                ("wasip2/wasm", "wasm")])
    def test_cli_pull_json_platform(self, tmp_path, mixed_index, platform, kind):
        out = _cli_json(tmp_path, "pull", mixed_index.reference, "--json",
                        "--platform", platform, "--cache", str(tmp_path / "cache"))
        assert out["digest"] == mixed_index.children[platform].digest
        assert out["index_digest"] == mixed_index.digest
        assert out["artifact_type"] == kind
        if kind == "wasm":
            assert out["wasi_version"] == platform.split("/")[0]
            assert out["wasm_layer_digest"] == mixed_index.children[platform].layer_digest


# =============================================================================
# PUBLISHER: wasm-export, skopeo copy, pull back
# =============================================================================


class TestPublisher:
    @pytest.mark.parametrize("kind, expected", [("module", "wasip1"), ("component", "wasip2")])
    def test_wasm_export_then_skopeo_copy_round_trips(self, zr, tmp_path, wasm_registry,
                                                      modules, kind, expected):
        module = modules["publisher"] if kind == "module" \
            else kit.component_from_core(modules["publisher"])
        source = tmp_path / ("plugin-%s.wasm" % kind)
        source.write_bytes(module)
        layout = tmp_path / "layout"
        exported = _cli_json(tmp_path, "wasm-export", str(source),
                             "oci:%s:%s" % (layout, TAG), "--json")
        assert exported["wasi_version"] == expected
        assert exported["module_name"] == source.name
        assert kit.describe_layout(layout, TAG)["digest"] == exported["digest"]

        repository = "publisher/" + kind
        pushed_digest = wasm_registry.push(layout, TAG, repository)
        registry_digest, _, body = wasm_registry.manifest(repository, TAG)
        assert pushed_digest == registry_digest == exported["digest"]
        assert body == kit.read_blob(layout, exported["digest"])  # skopeo kept the bytes
        manifest = json.loads(body)
        assert manifest["artifactType"] == (kit.ARTIFACT_TYPE_WASM_MODULE if kind == "module"
                                            else kit.ARTIFACT_TYPE_WASM_COMPONENT)
        assert manifest["config"]["mediaType"] == kit.MEDIA_TYPE_WASM_CONFIG_V0
        assert [layer["mediaType"] for layer in manifest["layers"]] == [kit.MEDIA_TYPE_WASM_LAYER]
        config = json.loads(kit.read_blob(layout, manifest["config"]["digest"]))
        assert (config["os"], config["architecture"]) == (expected, "wasm")
        assert config["layerDigests"] == [kit.sha256_bytes(module)]

        reference = wasm_registry.reference(repository, TAG)
        data, info = _puller(zr, tmp_path).pull_wasm(reference)
        assert data == module
        assert info.wasm_layer_digest == kit.sha256_bytes(module) == exported["wasm_layer_digest"]
        assert (str(info.wasi_version), info.module_name) == (expected, source.name)
        assert info.wasi_version is _puller(zr, tmp_path).get_wasm_info(reference).wasi_version

        output = tmp_path / "pulled.wasm"
        out = _cli_json(tmp_path, "pull-wasm", reference, "-o", str(output),
                        "--cache", str(tmp_path / "cli-cache"), "--json")
        assert output.read_bytes() == module
        assert out["wasi_version"] == expected


# =============================================================================
# ERRORS: layers declared as WebAssembly whose bytes are not
# =============================================================================

NOT_WASM = {
    "shell-script": b"#!/bin/sh\necho this is not WebAssembly\n",
    "truncated-preamble": b"\0asm\x01",
    "empty": b"",
}


@pytest.fixture(scope="session")
def not_wasm(wasm_registry):
    """Pushes application/wasm (CNCF), wasm-to-oci and runwasi layers of non-wasm bytes."""
    out = {}
    for name, data in NOT_WASM.items():
        for style, artifact in (
                ("cncf", kit.cncf_wasm_artifact(data, "wasip1", "bad.wasm",
                                                artifact_type=kit.ARTIFACT_TYPE_WASM_MODULE)),
                ("wasm-to-oci", kit.wasm_to_oci_artifact(data)),
                ("runwasi", kit.runwasi_image(data, "wasip1",
                                              kit.MEDIA_TYPE_RUNWASI_COMPONENT_LAYER))):
            repository = "bad/%s-%s" % (style, name)
            digest = kit.push_artifact(wasm_registry, repository, TAG, artifact)
            out[style, name] = _pushed_ns(wasm_registry, repository, artifact, digest)
    return out


_NOT_WASM_PARAMS = [(style, name) for style in ("cncf", "wasm-to-oci", "runwasi")
                    for name in NOT_WASM]


class TestErrors:
    @pytest.mark.parametrize("style, name", _NOT_WASM_PARAMS)
    def test_pull_wasm_refuses_non_wasm_bytes(self, zr, tmp_path, not_wasm, style, name):
        pushed = not_wasm[style, name]
        with pytest.raises(zr.ManifestError) as excinfo:
            _puller(zr, tmp_path).pull_wasm(pushed.reference)
        assert isinstance(excinfo.value, zr.ZLayerError)
        assert pushed.artifact.layer_digest in str(excinfo.value)

    @pytest.mark.parametrize("style, name", _NOT_WASM_PARAMS)
    def test_cli_pull_wasm_fails_cleanly(self, tmp_path, not_wasm, style, name):
        pushed = not_wasm[style, name]
        output = tmp_path / "module.wasm"
        proc = _run_cli(tmp_path, "pull-wasm", pushed.reference, "-o", str(output),
                        "--cache", str(tmp_path / "cache"))
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not output.exists()
        assert proc.stdout == ""


# =============================================================================
# DOCKER WASI: the module inside an ordinary rootfs layer
# =============================================================================


@pytest.fixture(scope="session")
def docker_wasi(wasm_registry, modules):
    """Pushes a ``docker buildx --platform wasi/wasm`` image (module in a tar layer)."""
    image = kit.docker_wasi_image(modules["runwasi-module"])
    digest = kit.push_artifact(wasm_registry, "wasm/docker-wasi", TAG, image)
    return _pushed_ns(wasm_registry, "wasm/docker-wasi", image, digest)


class TestDockerWasiImage:
    """Docker's wasi/wasm images keep the module inside an ordinary rootfs layer."""

    def test_pull_api_gets_the_image(self, zr, tmp_path, docker_wasi):
        manifest, layers = _puller(zr, tmp_path).pull(docker_wasi.reference)
        assert manifest.digest == docker_wasi.digest
        assert [layer.digest for layer in layers] == [
            d["digest"] for d in docker_wasi.artifact.data["layers"]]

    def test_pull_wasm_does_not_return_the_tarball(self, zr, tmp_path, docker_wasi):
        layer_digest = docker_wasi.artifact.data["layers"][0]["digest"]
        try:
            data, info = _puller(zr, tmp_path).pull_wasm(docker_wasi.reference)
        except zr.ManifestError:
            return
        assert data.startswith(kit.CORE_MODULE_PREAMBLE)
        assert info.wasm_layer_digest != layer_digest

    @pytest.mark.parametrize("command", ["pull", "inspect"])
    def test_cli_pull_and_inspect_succeed(self, tmp_path, docker_wasi, command):
        out = _cli_json(tmp_path, command, docker_wasi.reference, "--json",
                        "--cache", str(tmp_path / "cache"))
        assert out["digest"] == docker_wasi.digest

    def test_pull_result_to_json(self, zr, tmp_path, docker_wasi):
        result = _puller(zr, tmp_path).pull_image(docker_wasi.reference)
        try:
            out = result.to_json()
        except zr.ManifestError as exc:
            raise AssertionError("PullResult.to_json() raised: %s" % exc) from None
        assert out["digest"] == docker_wasi.digest
