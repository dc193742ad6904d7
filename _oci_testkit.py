"""Builds OCI image layouts by hand and runs CNCF distribution for the interop tests.

Test-only helper, standard library only. It is not part of the public package.

Contents:
    1. LAYOUT BUILDERS: deterministic layers, configs, manifests and indexes written
       as an OCI image layout (image-spec ``image-layout.md``), streamed to disk
    2. EXPECTED VALUES: what a client should see after a registry round trip
    3. DISTRIBUTION: ``docker-registry serve`` on 127.0.0.1 and ``skopeo copy`` into it
    4. WASM ARTIFACTS: modules from ``wat2wasm``, the manifests of each WebAssembly
       packaging style built by hand, and ``push_raw`` through the distribution API

Specs followed:
    OCI image layout      https://github.com/opencontainers/image-spec/blob/main/image-layout.md
    OCI image manifest    https://github.com/opencontainers/image-spec/blob/main/manifest.md
    OCI image index       https://github.com/opencontainers/image-spec/blob/main/image-index.md
    OCI image config      https://github.com/opencontainers/image-spec/blob/main/config.md
    Distribution config   https://distribution.github.io/distribution/about/configuration/
    Distribution API      https://distribution.github.io/distribution/spec/api/
    Wasm OCI Artifact     https://tag-runtime.cncf.io/wgs/wasm/deliverables/wasm-oci-artifact/
    Component binary      https://github.com/WebAssembly/component-model/blob/main/design/mvp/Binary.md
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# =============================================================================
# 1. LAYOUT BUILDERS: deterministic OCI image layouts written to disk
# =============================================================================

MEDIA_TYPE_OCI_LAYOUT_VERSION = "1.0.0"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# A fixed timestamp keeps every tar header, gzip header and config byte-identical across
# runs, so a given spec always yields the same digests.
_EPOCH_S = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"
_CHUNK_BYTES = 1 << 20
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Describes the content of one generated layer.

    ``random_bytes`` goes into one file of incompressible bytes, ``small_files`` files of
    ``small_file_bytes`` each hold compressible text. ``seed`` makes the bytes distinct per
    layer while staying the same across runs.
    """

    seed: int
    random_bytes: int = 0
    small_files: int = 0
    small_file_bytes: int = 64
    compresslevel: int = 6


@dataclasses.dataclass(frozen=True)
class Blob:
    """Is a blob written into ``blobs/sha256``: its digest, size and media type."""

    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: object) -> dict:
        """Returns the OCI descriptor JSON object for this blob."""
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        d.update(extra)
        return d


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """Holds the digests of one image manifest written into a layout."""

    manifest: Blob
    config: Blob
    layers: Tuple[Blob, ...]
    diff_ids: Tuple[str, ...]
    os: str
    architecture: str
    variant: Optional[str] = None

    @property
    def platform(self) -> str:
        """Returns ``os/architecture[/variant]``, the form the CLI and ImagePuller take."""
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @property
    def digest(self) -> str:
        """Returns the digest of the image manifest."""
        return self.manifest.digest


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """Holds the digest of an image index and the images it lists, by platform string."""

    index: Blob
    images: Dict[str, ImageInfo]

    @property
    def digest(self) -> str:
        """Returns the digest of the image index."""
        return self.index.digest


class _HashingWriter:
    """Counts and hashes bytes on their way to an underlying binary file."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        if self._raw is not None:
            self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        if self._raw is not None:
            self._raw.flush()


class _RandomReader:
    """Yields ``size`` deterministic pseudo-random bytes in chunks, never all at once."""

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        n = min(n, _CHUNK_BYTES)
        self._left -= n
        # Random.randbytes is 3.9+; getrandbits works on 3.8 and is as fast.
        return self._rng.getrandbits(n * 8).to_bytes(n, "little") if n else b""


def _blobs_dir(layout: Path) -> Path:
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    return d


def init_layout(layout: Path) -> Path:
    """Creates an empty OCI image layout (``oci-layout`` and an empty ``index.json``)."""
    layout = Path(layout)
    _blobs_dir(layout)
    (layout / "oci-layout").write_text(
        json.dumps({"imageLayoutVersion": MEDIA_TYPE_OCI_LAYOUT_VERSION})
    )
    if not (layout / "index.json").exists():
        _write_index_json(layout, [])
    return layout


def _write_index_json(layout: Path, manifests: List[dict]) -> None:
    body = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": manifests}
    (layout / "index.json").write_text(json.dumps(body, indent=2))


def write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    """Stores ``data`` as a content-addressed blob and returns its descriptor fields."""
    hex_digest = hashlib.sha256(data).hexdigest()
    path = _blobs_dir(Path(layout)) / hex_digest
    if not path.exists():
        path.write_bytes(data)
    return Blob("sha256:" + hex_digest, len(data), media_type)


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_layer(layout: Path, spec: LayerSpec, name: str = "layer") -> Tuple[Blob, str]:
    """Streams one gzip tar layer into the layout; returns the blob and its diff_id.

    Memory stays at about one chunk whatever the size: tar writes into gzip, which writes
    into a temporary file in ``blobs/sha256`` that is renamed to its digest at the end.
    """
    blobs = _blobs_dir(Path(layout))
    fd, tmp_name = tempfile.mkstemp(dir=str(blobs), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as raw:
            stored = _HashingWriter(raw)
            # filename="" and mtime fixed: the gzip header must not vary between runs.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=stored, mtime=_EPOCH_S,
                compresslevel=spec.compresslevel,
            ) as gz:
                plain = _HashingWriter(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    _add_layer_members(tar, spec, name)
        hex_digest = stored.sha256.hexdigest()
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; other blobs are 0644
        os.replace(tmp_name, str(blobs / hex_digest))
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    blob = Blob("sha256:" + hex_digest, stored.size, MEDIA_TYPE_OCI_LAYER_GZIP)
    return blob, "sha256:" + plain.sha256.hexdigest()


def _tarinfo(name: str, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = _EPOCH_S
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.size = size
    return info


def _add_layer_members(tar: tarfile.TarFile, spec: LayerSpec, name: str) -> None:
    root = "%s-%d" % (name, spec.seed)
    tar.addfile(_tarinfo(root + "/", is_dir=True))
    if spec.random_bytes:
        tar.addfile(
            _tarinfo(root + "/random.bin", spec.random_bytes),
            _RandomReader(spec.seed, spec.random_bytes),
        )
    if spec.small_files:
        tar.addfile(_tarinfo(root + "/files/", is_dir=True))
        for i in range(spec.small_files):
            line = ("seed %d file %d\n" % (spec.seed, i)).encode()
            body = (line * (spec.small_file_bytes // len(line) + 1))[: spec.small_file_bytes]
            tar.addfile(_tarinfo("%s/files/f%05d.txt" % (root, i), len(body)), io.BytesIO(body))


def _write_image(
    layout: Path, layer_specs: Sequence[LayerSpec], os_name: str, architecture: str,
    variant: Optional[str], annotations: Optional[dict] = None,
) -> ImageInfo:
    layers, diff_ids = [], []
    for i, spec in enumerate(layer_specs):
        blob, diff_id = write_layer(layout, spec, name="%s-%s-%d" % (os_name, architecture, i))
        layers.append(blob)
        diff_ids.append(diff_id)
    config = {
        "created": _CREATED,
        "architecture": architecture,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": _CREATED, "created_by": "_oci_testkit layer %d" % i}
                    for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    config_blob = write_blob(layout, _canonical_json(config), MEDIA_TYPE_OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    if annotations:
        manifest["annotations"] = annotations
    manifest_blob = write_blob(layout, _canonical_json(manifest), MEDIA_TYPE_OCI_MANIFEST)
    return ImageInfo(manifest_blob, config_blob, tuple(layers), tuple(diff_ids),
                     os_name, architecture, variant)


def _tag_in_index_json(layout: Path, blob: Blob, tag: str, platform: Optional[dict] = None) -> None:
    """Points ``tag`` at ``blob`` in index.json, replacing an older entry with that tag."""
    index = json.loads((layout / "index.json").read_text())
    kept = [m for m in index.get("manifests", [])
            if m.get("annotations", {}).get(ANNOTATION_REF_NAME) != tag]
    extra = {"annotations": {ANNOTATION_REF_NAME: tag}}
    if platform:
        extra["platform"] = platform
    kept.append(blob.descriptor(**extra))
    _write_index_json(layout, kept)


def default_layers(count: int = 3, random_bytes: int = 8 * 1024, small_files: int = 20,
                   seed: int = 1) -> List[LayerSpec]:
    """Returns ``count`` small layer specs: incompressible ones, then one of small files."""
    specs = [LayerSpec(seed=seed + i, random_bytes=random_bytes) for i in range(count - 1)]
    specs.append(LayerSpec(seed=seed + count - 1, small_files=small_files))
    return specs


def benchmark_layers(big_layers: int = 6, big_layer_bytes: int = 48 * MIB,
                     small_files: int = 10_000, compresslevel: int = 1) -> List[LayerSpec]:
    """Returns the ~300 MB benchmark shape: big incompressible layers plus many small files."""
    specs = [LayerSpec(seed=1000 + i, random_bytes=big_layer_bytes, compresslevel=compresslevel)
             for i in range(big_layers)]
    specs.append(LayerSpec(seed=2000, small_files=small_files, small_file_bytes=256,
                           compresslevel=compresslevel))
    return specs


def build_image(layout: Path, tag: str = "latest",
                layers: Optional[Sequence[LayerSpec]] = None,
                platform: str = "linux/amd64") -> ImageInfo:
    """Writes a single-platform image into ``layout`` under ``tag`` and returns its digests."""
    layout = init_layout(Path(layout))
    os_name, architecture, variant = parse_platform(platform)
    info = _write_image(layout, default_layers() if layers is None else layers,
                        os_name, architecture, variant)
    _tag_in_index_json(layout, info.manifest, tag)
    return info


DEFAULT_INDEX_PLATFORMS = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7")


def build_index(layout: Path, tag: str = "latest",
                platforms: Iterable[str] = DEFAULT_INDEX_PLATFORMS,
                layers_per_image: int = 2, layer_bytes: int = 4 * 1024) -> IndexInfo:
    """Writes a multi-platform image index under ``tag``; each child has its own blobs.

    The index is a blob and index.json points at it, so the tag names the whole index
    (image-layout.md allows an index descriptor in index.json).
    """
    layout = init_layout(Path(layout))
    images: Dict[str, ImageInfo] = {}
    descriptors = []
    for n, plat in enumerate(platforms):
        os_name, architecture, variant = parse_platform(plat)
        # Distinct seeds per platform: no layer is shared, so picking the wrong child
        # shows up as wrong layer digests too.
        specs = default_layers(layers_per_image, random_bytes=layer_bytes, small_files=5,
                               seed=100 * (n + 1))
        info = _write_image(layout, specs, os_name, architecture, variant)
        images[info.platform] = info
        platform_obj = {"architecture": architecture, "os": os_name}
        if variant:
            platform_obj["variant"] = variant
        descriptors.append(info.manifest.descriptor(platform=platform_obj))
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": descriptors}
    index_blob = write_blob(layout, _canonical_json(index), MEDIA_TYPE_OCI_INDEX)
    _tag_in_index_json(layout, index_blob, tag)
    return IndexInfo(index_blob, images)


def parse_platform(platform: str) -> Tuple[str, str, Optional[str]]:
    """Splits ``os/architecture[/variant]``."""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError("platform %r is not os/architecture[/variant]" % platform)
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


# =============================================================================
# 2. EXPECTED VALUES: reading a layout back, hashing files
# =============================================================================


def sha256_file(path: Path) -> str:
    """Returns ``sha256:<hex>`` of a file, read in chunks."""
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Returns ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_blob(layout: Path, digest: str) -> bytes:
    """Returns the bytes of a blob of the layout."""
    algorithm, hex_digest = digest.split(":", 1)
    return (Path(layout) / "blobs" / algorithm / hex_digest).read_bytes()


def describe_layout(layout: Path, tag: str) -> dict:
    """Returns the digests a tag of the layout resolves to, read back from disk.

    For an image: ``{"digest", "media_type", "config", "layers"}``; for an index the same
    top level plus ``"manifests"``, a dict from platform string to such an image dict.
    """
    layout = Path(layout)
    for entry in json.loads((layout / "index.json").read_text())["manifests"]:
        if entry.get("annotations", {}).get(ANNOTATION_REF_NAME) == tag:
            return _describe_descriptor(layout, entry)
    raise KeyError("tag %r not in %s/index.json" % (tag, layout))


def _describe_descriptor(layout: Path, descriptor: dict) -> dict:
    body = json.loads(read_blob(layout, descriptor["digest"]))
    out = {"digest": descriptor["digest"], "media_type": descriptor["mediaType"]}
    if descriptor["mediaType"] in (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST):
        out["manifests"] = {}
        for child in body["manifests"]:
            p = child["platform"]
            key = "/".join([p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else []))
            out["manifests"][key] = _describe_descriptor(layout, child)
        return out
    out["config"] = body["config"]["digest"]
    out["layers"] = [layer["digest"] for layer in body["layers"]]
    return out


# =============================================================================
# 3. DISTRIBUTION: a throwaway registry on loopback, and pushes with skopeo
# =============================================================================


def unavailable(reason: str) -> None:
    """Skips the test, or fails it when CI demands that interop tests run."""
    import pytest
    if os.environ.get("ZLAYER_REQUIRE_INTEROP") == "1":
        pytest.fail("%s (ZLAYER_REQUIRE_INTEROP=1 forbids skipping)" % reason, pytrace=False)
    pytest.skip(reason)


def running_registry(root: Path, **options: Any):
    """Yields a started DistributionRegistry, stopped by PID afterwards (a fixture body).

    A missing tool skips the test, or fails it under ZLAYER_REQUIRE_INTEROP=1.
    """
    try:
        registry = DistributionRegistry(root, **options)
    except ToolMissing as exc:
        missing = str(exc)
    else:
        registry.start()
        try:
            yield registry
        finally:
            registry.stop()
        return
    unavailable(missing)  # outside the except block: no chained traceback in the report


def self_signed_certificate(directory: Path) -> Tuple[Path, Path]:
    """Writes a self-signed certificate for 127.0.0.1 and localhost; returns (cert, key)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return cert, key


class ToolMissing(Exception):
    """Says that an external program the interop tests need is not installed."""


def require_tool(name: str) -> str:
    """Returns the path of ``name`` on PATH, or raises ToolMissing."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissing("%s is not installed (apt-get install %s)" % (name, _APT_PACKAGE.get(name, name)))
    return path


_APT_PACKAGE = {"docker-registry": "docker-registry", "skopeo": "skopeo",
                "htpasswd": "apache2-utils", "umoci": "umoci",
                "wat2wasm": "wabt", "wasm-validate": "wabt"}


def stop_process(proc: Optional[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """Ends a process this suite started (SIGTERM, then SIGKILL after ``timeout_s``)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def free_port() -> int:
    """Returns a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registry_config(root: Path, port: int, htpasswd: Optional[Path],
                     tls: Optional[Tuple[Path, Path]] = None,
                     storage: Optional[Dict[str, Any]] = None) -> str:
    # JSON is valid YAML, which spares a YAML writer. The config points at the temporary
    # root only: the packaged /etc/docker/registry/config.yml is never read.
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": "127.0.0.1:%d" % port, "secret": "zlayer-interop-test-secret"},
    }
    if storage is not None:  # another driver (s3) instead of the filesystem
        config["storage"] = dict(storage, delete={"enabled": True})
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "test", "path": str(htpasswd)}}
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    return json.dumps(config, indent=2)


# The registry is on loopback: an http_proxy in the environment must not see this traffic.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DistributionRegistry:
    """Runs ``docker-registry serve`` on 127.0.0.1 with storage in ``root``.

    ``start()`` waits until ``/v2/`` answers; ``stop()`` ends the process it started, by
    its PID. With ``username``/``password`` the registry requires htpasswd basic auth; with
    ``tls`` (certificate and key files) it serves https only.
    """

    def __init__(self, root: Path, username: Optional[str] = None,
                 password: Optional[str] = None, start_timeout_s: float = 20.0,
                 tls: Optional[Tuple[Path, Path]] = None,
                 storage: Optional[Dict[str, Any]] = None) -> None:
        self.root = Path(root)
        self.tls = tls
        self.storage = storage
        self.username = username
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self._registry_bin = require_tool("docker-registry")
        self._skopeo_bin = require_tool("skopeo")
        self._htpasswd_bin = require_tool("htpasswd") if username is not None else None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Returns ``127.0.0.1:PORT``, the registry part of a reference."""
        return "127.0.0.1:%d" % self.port

    @property
    def url(self) -> str:
        """Returns the base URL, ``http://127.0.0.1:PORT`` (https with ``tls``)."""
        return ("https://" if self.tls else "http://") + self.host

    @property
    def creds(self) -> Optional[str]:
        """Returns ``user:pass`` for skopeo, or None for an open registry."""
        return None if self.username is None else "%s:%s" % (self.username, self.password)

    def start(self) -> "DistributionRegistry":
        """Starts the registry on a free port; retries if another process took the port."""
        self.root.mkdir(parents=True, exist_ok=True)
        htpasswd = self._write_htpasswd() if self.username is not None else None
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            config_path = self.root / "config.yml"
            config_path.write_text(_registry_config(self.root, self.port, htpasswd, self.tls,
                                                    self.storage))
            log_path = self.root / "registry.log"
            with open(str(log_path), "wb") as log:
                # No AWS_* of the host's (AWS_CA_BUNDLE breaks the s3 driver's setup).
                environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
                self.process = subprocess.Popen(
                    [self._registry_bin, "serve", str(config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=environment,
                )
            if self._wait_ready():
                return self
            last_error = log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError("docker-registry did not answer on /v2/; log tail:\n" + last_error)

    def _write_htpasswd(self) -> Path:
        # distribution's htpasswd accepts bcrypt entries only, hence -B.
        out = subprocess.run(
            [self._htpasswd_bin, "-Bbn", self.username, self.password],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ).stdout
        path = self.root / "htpasswd"
        path.write_bytes(out.strip() + b"\n")
        return path

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        delay_s = 0.02
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                status, _headers, _body = self.request("GET", "/v2/", auth=False, timeout_s=2)
            except OSError:
                status = 0
            # 401 counts as up: the auth-enabled registry answers /v2/ that way.
            if status in (200, 401):
                return True
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.25)
        return False

    def stop(self) -> None:
        """Terminates the registry process this object started, then reaps it."""
        proc, self.process = self.process, None
        stop_process(proc)

    def __enter__(self) -> "DistributionRegistry":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- talking to it -----------------------------------------------------------------

    def reference(self, repository: str, tag_or_digest: str) -> str:
        """Returns ``127.0.0.1:PORT/repository:tag`` or ``...@sha256:...``."""
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return "%s/%s%s%s" % (self.host, repository, sep, tag_or_digest)

    def request(self, method: str, path: str, accept: Sequence[str] = (), auth: bool = True,
                timeout_s: float = 10, data: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict, bytes]:
        """Sends one HTTP request to the registry; returns status, headers and body.

        ``path`` is a path on the registry, or an absolute URL on it (an upload's
        ``Location``); ``data`` is sent as the body, with ``headers`` added.
        """
        url = path if path.startswith(("http://", "https://")) else self.url + path
        if not url.startswith(self.url + "/"):
            raise ValueError("%s is not on the registry %s" % (url, self.url))
        req = urllib.request.Request(url, data=data, method=method)
        if accept:
            req.add_header("Accept", ", ".join(accept))
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        if auth and self.username is not None:
            token = base64.b64encode(self.creds.encode()).decode()
            req.add_header("Authorization", "Basic " + token)
        opener = _NO_PROXY_OPENER
        if self.tls:  # its own self-signed certificate, trusted for this request only
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(
                    context=ssl.create_default_context(cafile=str(self.tls[0]))))
        try:
            with opener.open(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), exc.read()

    def manifest(self, repository: str, reference: str,
                 accept: Sequence[str] = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX,
                                          MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST),
                 ) -> Tuple[str, str, bytes]:
        """Returns (Docker-Content-Digest, Content-Type, body) of a manifest in the registry.

        distribution 2.8 serves a manifest only in the formats the Accept header lists; an
        OCI manifest asked for without its media type is answered 404 (MANIFEST_UNKNOWN).
        """
        status, headers, body = self.request(
            "GET", "/v2/%s/manifests/%s" % (repository, reference), accept=accept)
        if status != 200:
            raise LookupError("GET manifest %s:%s -> %d %s" % (repository, reference, status, body[:200]))
        digest = headers.get("Docker-Content-Digest", "")
        if digest != sha256_bytes(body):
            raise AssertionError("registry digest %s != sha256 of body %s" % (digest, sha256_bytes(body)))
        return digest, headers.get("Content-Type", ""), body

    def push(self, layout_dir: Path, tag: str, repo: str, fmt: Optional[str] = None,
             all_platforms: Optional[bool] = None) -> str:
        """Copies ``oci:layout_dir:tag`` to ``repo:tag`` with skopeo; returns the digest stored.

        ``fmt="v2s2"`` converts to Docker schema 2 on the way. An index in the layout is
        copied whole (every platform), detected from index.json unless ``all_platforms``
        says otherwise.
        """
        if all_platforms is None:
            all_platforms = describe_layout(layout_dir, tag)["media_type"] == MEDIA_TYPE_OCI_INDEX
        cmd = [self._skopeo_bin, "--insecure-policy", "copy", "--retry-times", "0",
               "--dest-tls-verify=false"]
        if self.creds:
            cmd += ["--dest-creds", self.creds]
        else:
            cmd += ["--dest-no-creds"]
        if fmt is not None:
            cmd += ["--format", fmt]
        if all_platforms:
            cmd += ["--multi-arch", "all"]
        digest_file = Path(tempfile.mkdtemp(dir=str(self.root))) / "digest"
        cmd += ["--digestfile", str(digest_file),
                "oci:%s:%s" % (layout_dir, tag), "docker://%s/%s:%s" % (self.host, repo, tag)]
        self._run(cmd)
        return digest_file.read_text().strip()

    def inspect(self, repository: str, tag: str, raw: bool = False) -> dict:
        """Runs ``skopeo inspect`` (``--raw`` for the manifest as stored) and parses its JSON."""
        cmd = [self._skopeo_bin, "--insecure-policy", "inspect", "--retry-times", "0",
               "--tls-verify=false"]
        if self.creds:
            cmd += ["--creds", self.creds]
        else:
            cmd += ["--no-creds"]
        if raw:
            cmd += ["--raw"]
        cmd += ["docker://%s/%s:%s" % (self.host, repository, tag)]
        return json.loads(self._run(cmd))

    def raw_manifest_digest(self, repository: str, tag: str) -> str:
        """Returns the sha256 of ``skopeo inspect --raw``: the digest of the manifest as stored."""
        cmd = [self._skopeo_bin, "--insecure-policy", "inspect", "--retry-times", "0",
               "--tls-verify=false", "--raw"]
        cmd += ["--creds", self.creds] if self.creds else ["--no-creds"]
        cmd += ["docker://%s/%s:%s" % (self.host, repository, tag)]
        return sha256_bytes(self._run(cmd, text=False))

    @staticmethod
    def _run(cmd: List[str], text: bool = True):
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s" % (
                " ".join(cmd[:3]), proc.returncode, proc.stderr.decode(errors="replace").strip()))
        return proc.stdout.decode() if text else proc.stdout


# =============================================================================
# 4. WASM ARTIFACTS: modules, the manifests of each packaging style, raw pushes
# =============================================================================
# Each builder returns a RawArtifact: the exact manifest bytes and every blob they
# name, kept in memory (WebAssembly artifacts are small). push_artifact() sends them
# through the distribution HTTP API, so the registry stores the bytes built here and
# nothing in between (skopeo, a layout) can rewrite them.

MEDIA_TYPE_WASM_CONFIG_V0 = "application/vnd.wasm.config.v0+json"      # CNCF, wkg
MEDIA_TYPE_WASM_CONFIG_V1 = "application/vnd.wasm.config.v1+json"      # wasm-to-oci
MEDIA_TYPE_WASM_LAYER = "application/wasm"                              # CNCF, wkg
MEDIA_TYPE_WASM_TO_OCI_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
MEDIA_TYPE_RUNWASI_COMPONENT_LAYER = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
MEDIA_TYPE_RUNWASI_MODULE_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
ARTIFACT_TYPE_WASM_COMPONENT = "application/vnd.wasm.component.v1+wasm"
ARTIFACT_TYPE_WASM_MODULE = "application/vnd.wasm.module.v1+wasm"
ANNOTATION_TITLE = "org.opencontainers.image.title"
CORE_MODULE_PREAMBLE = b"\0asm\x01\x00\x00\x00"
# Component-model preamble: magic, version 0x0d 0x00, layer 0x01 0x00 (Binary.md).
COMPONENT_PREAMBLE = b"\0asm\x0d\x00\x01\x00"
_COMPONENT_CORE_MODULE_SECTION = 0x01


@dataclasses.dataclass(frozen=True)
class RawArtifact:
    """Is one manifest (or index) as exact bytes, with the blobs and children it names.

    ``blobs`` maps digest to bytes (config and layers); ``children`` are the manifests an
    index lists, pushed before it. ``module`` is the WebAssembly layer's bytes, None for a
    container image or an index. ``platform`` is the index entry's platform object.
    """

    manifest: bytes
    media_type: str
    blobs: Dict[str, bytes]
    module: Optional[bytes] = None
    layer_media_type: Optional[str] = None
    platform: Optional[dict] = None
    children: Tuple["RawArtifact", ...] = ()

    @property
    def digest(self) -> str:
        """Returns the digest of the manifest bytes."""
        return sha256_bytes(self.manifest)

    @property
    def data(self) -> dict:
        """Returns the manifest parsed."""
        return json.loads(self.manifest)

    @property
    def layer_digest(self) -> Optional[str]:
        """Returns the digest of the module's layer, None when there is no module."""
        return None if self.module is None else sha256_bytes(self.module)

    @property
    def config(self) -> bytes:
        """Returns the config blob's bytes (manifests only)."""
        return self.blobs[self.data["config"]["digest"]]

    def descriptor(self, **extra: object) -> dict:
        """Returns the descriptor of this manifest, as an index lists it."""
        d = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}
        artifact_type = self.data.get("artifactType")
        if artifact_type:
            d["artifactType"] = artifact_type
        if self.platform:
            d["platform"] = self.platform
        d.update(extra)
        return d


def wat2wasm(wat: str, workdir: Path) -> bytes:
    """Assembles WebAssembly text with wabt's ``wat2wasm``; returns the binary module."""
    tool = require_tool("wat2wasm")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd, wat_name = tempfile.mkstemp(dir=str(workdir), suffix=".wat")
    wasm_path = Path(wat_name[:-4] + ".wasm")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(wat)
        proc = subprocess.run([tool, wat_name, "-o", str(wasm_path)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError("wat2wasm failed (exit %d): %s" % (
                proc.returncode, proc.stderr.decode(errors="replace").strip()))
        return wasm_path.read_bytes()
    finally:
        for path in (Path(wat_name), wasm_path):
            if path.exists():
                path.unlink()


def wasi_hello_wat(greeting: str) -> str:
    """Returns the WAT of a WASI preview 1 command that writes ``greeting`` to stdout.

    It imports ``wasi_snapshot_preview1.fd_write``, exports ``memory``, ``_start`` and an
    ``add`` function; the greeting sits in a data segment, so distinct greetings give
    distinct modules (and distinct layer digests).
    """
    text = greeting.encode()
    escaped = "".join("\\%02x" % b for b in text)
    return """(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "%s")
  (func (export "_start")
    ;; one iovec at 0: {buf = 16, len = %d}; bytes written go to 8
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const %d))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "add") (param i32 i32) (result i32)
    local.get 0
    local.get 1
    i32.add))
""" % (escaped, len(text), len(text))


def _uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def component_from_core(core: bytes) -> bytes:
    """Wraps a core module as the one core-module section of a component binary.

    wabt cannot build components, so this writes the component preamble
    (``\\0asm 0d 00 01 00``) and a ``core:module`` section (id 1) holding ``core``.
    """
    if not core.startswith(CORE_MODULE_PREAMBLE):
        raise ValueError("not a core WebAssembly module")
    return (COMPONENT_PREAMBLE + bytes([_COMPONENT_CORE_MODULE_SECTION])
            + _uleb128(len(core)) + core)


def _pretty_json(obj: object) -> bytes:
    # Pushers write manifests indented and in their own key order; the registry and a
    # client must keep these bytes, so the builders do not canonicalize them.
    return json.dumps(obj, indent=3).encode() + b"\n"


def _manifest(config_media_type: str, config: bytes, layer_descriptor: dict, module: bytes,
              media_type_field: bool = True, artifact_type: Optional[str] = None,
              annotations: Optional[dict] = None, platform: Optional[dict] = None,
              ) -> RawArtifact:
    config_digest = sha256_bytes(config)
    body: dict = {"schemaVersion": 2}
    if media_type_field:
        body["mediaType"] = MEDIA_TYPE_OCI_MANIFEST
    if artifact_type:
        body["artifactType"] = artifact_type
    body["config"] = {"mediaType": config_media_type, "digest": config_digest, "size": len(config)}
    body["layers"] = [layer_descriptor]
    if annotations:
        body["annotations"] = annotations
    return RawArtifact(
        manifest=_pretty_json(body), media_type=MEDIA_TYPE_OCI_MANIFEST,
        blobs={config_digest: config, layer_descriptor["digest"]: module},
        module=module, layer_media_type=layer_descriptor["mediaType"], platform=platform,
    )


def _layer_descriptor(media_type: str, module: bytes, title: Optional[str]) -> dict:
    d = {"mediaType": media_type, "digest": sha256_bytes(module), "size": len(module)}
    if title:
        d["annotations"] = {ANNOTATION_TITLE: title}
    return d


def cncf_wasm_artifact(module: bytes, os_name: str, title: str,
                       artifact_type: Optional[str] = None,
                       component: Optional[dict] = None) -> RawArtifact:
    """Builds a CNCF "Wasm OCI Artifact" as wkg (wasm-pkg-tools, oci-wasm) writes it.

    Config ``application/vnd.wasm.config.v0+json`` with ``architecture: wasm``, ``os``
    (wasip1 or wasip2) and ``layerDigests``; one ``application/wasm`` layer titled
    ``title``; ``artifactType`` only when given (wkg leaves it out).
    """
    layer = _layer_descriptor(MEDIA_TYPE_WASM_LAYER, module, title)
    config_obj = {"created": _CREATED, "architecture": "wasm", "os": os_name,
                  "layerDigests": [layer["digest"]]}
    if component is not None:
        config_obj["component"] = component
    return _manifest(MEDIA_TYPE_WASM_CONFIG_V0, _canonical_json(config_obj), layer, module,
                     artifact_type=artifact_type,
                     annotations={"org.opencontainers.image.created": _CREATED},
                     platform={"architecture": "wasm", "os": os_name})


def wasm_to_oci_artifact(module: bytes, title: str = "module.wasm") -> RawArtifact:
    """Builds an artifact as wasm-to-oci (oras-go v0) pushed it.

    Config ``application/vnd.wasm.config.v1+json`` holding ``{}``, one
    ``application/vnd.wasm.content.layer.v1+wasm`` layer, and no ``mediaType`` field in
    the manifest (oras-go v0 left it out; the Content-Type of the PUT says what it is).
    Nothing in it names a WASI level.
    """
    layer = _layer_descriptor(MEDIA_TYPE_WASM_TO_OCI_LAYER, module, title)
    return _manifest(MEDIA_TYPE_WASM_CONFIG_V1, b"{}", layer, module, media_type_field=False)


def runwasi_image(module: bytes, os_name: str, layer_media_type: str,
                  entrypoint: str = "app.wasm") -> RawArtifact:
    """Builds a containerd/runwasi image as runwasi's oci-tar-builder writes it.

    An ordinary OCI image config (``application/vnd.oci.image.config.v1+json``) with
    ``os``/``architecture: wasm``, no diff_ids, the ``containerd.runwasi.layers`` label,
    and the module as a raw (not tar) layer of ``layer_media_type``, untitled.
    oci-tar-builder writes ``os: wasip1`` (``wasi`` before 2024) and the component
    layer type for modules and components alike.
    """
    layer = _layer_descriptor(layer_media_type, module, None)
    config_obj = {
        "created": _CREATED, "architecture": "wasm", "os": os_name,
        "config": {"Entrypoint": [entrypoint],
                   "Labels": {"containerd.runwasi.layers": layer["digest"][7:]}},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return _manifest(MEDIA_TYPE_OCI_CONFIG, _canonical_json(config_obj), layer, module,
                     platform={"architecture": "wasm", "os": os_name})


def docker_wasi_image(module: bytes, os_name: str = "wasi", path: str = "app.wasm") -> RawArtifact:
    """Builds an image as ``docker buildx build --platform wasi/wasm`` writes it.

    ``FROM scratch``, ``COPY app.wasm /``: an ordinary OCI image whose config says
    ``os: wasi``, ``architecture: wasm`` and whose one layer is a gzip tar
    (``application/vnd.oci.image.layer.v1.tar+gzip``) holding the module as ``/app.wasm``.
    ``module`` is left None: no layer is the module itself.
    """
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo(path, len(module)), io.BytesIO(module))
    stored = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=stored, mtime=_EPOCH_S) as gz:
        gz.write(plain.getvalue())
    layer = stored.getvalue()
    config_obj = {
        "created": _CREATED, "architecture": "wasm", "os": os_name,
        "config": {"Entrypoint": ["/" + path]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_bytes(plain.getvalue())]},
    }
    config = _canonical_json(config_obj)
    body = {
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": sha256_bytes(config),
                   "size": len(config)},
        "layers": [{"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": sha256_bytes(layer),
                    "size": len(layer)}],
    }
    return RawArtifact(manifest=_pretty_json(body), media_type=MEDIA_TYPE_OCI_MANIFEST,
                       blobs={sha256_bytes(config): config, sha256_bytes(layer): layer},
                       platform={"architecture": "wasm", "os": os_name})


def raw_image_from_layout(layout: Path, info: ImageInfo) -> RawArtifact:
    """Returns an image written by build_image() as a RawArtifact (its blobs read back)."""
    blobs = {b.digest: read_blob(layout, b.digest) for b in (info.config,) + info.layers}
    platform = {"architecture": info.architecture, "os": info.os}
    if info.variant:
        platform["variant"] = info.variant
    return RawArtifact(manifest=read_blob(layout, info.digest), media_type=info.manifest.media_type,
                       blobs=blobs, platform=platform)


def raw_index(children: Sequence[RawArtifact]) -> RawArtifact:
    """Builds an OCI image index listing ``children`` with their platforms."""
    body = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": [child.descriptor() for child in children]}
    return RawArtifact(manifest=_pretty_json(body), media_type=MEDIA_TYPE_OCI_INDEX,
                       blobs={}, children=tuple(children))


def push_raw(registry: "DistributionRegistry", repo: str, tag: str, blobs: Dict[str, bytes],
             manifest_bytes: bytes, media_type: str) -> str:
    """Pushes blobs and one manifest through the distribution API; returns its digest.

    Each blob not already there goes up as a monolithic upload (``POST
    /v2/REPO/blobs/uploads/``, then ``PUT Location?digest=``); the manifest is ``PUT
    /v2/REPO/manifests/TAG`` (``tag`` may be a digest) with ``media_type`` as its
    Content-Type. Raises unless the registry answers with the sha256 of exactly these
    bytes and serves them back unchanged.
    """
    for digest, data in blobs.items():
        if sha256_bytes(data) != digest:
            raise ValueError("blob keyed %s hashes to %s" % (digest, sha256_bytes(data)))
        status, _, _ = registry.request("HEAD", "/v2/%s/blobs/%s" % (repo, digest))
        if status == 200:
            continue
        status, headers, body = registry.request("POST", "/v2/%s/blobs/uploads/" % repo, data=b"")
        if status != 202 or not headers.get("Location"):
            raise RuntimeError("POST blobs/uploads/ on %s -> %d %s" % (repo, status, body[:200]))
        location = urllib.parse.urljoin(registry.url + "/", headers["Location"])
        location += ("&" if "?" in location else "?") + "digest=" + urllib.parse.quote(digest)
        status, headers, body = registry.request(
            "PUT", location, data=data, headers={"Content-Type": "application/octet-stream"})
        if status != 201 or headers.get("Docker-Content-Digest") != digest:
            raise RuntimeError("PUT blob %s on %s -> %d %s %s" % (
                digest, repo, status, headers.get("Docker-Content-Digest"), body[:200]))
    status, headers, body = registry.request(
        "PUT", "/v2/%s/manifests/%s" % (repo, tag), data=manifest_bytes,
        headers={"Content-Type": media_type})
    expected = sha256_bytes(manifest_bytes)
    if status != 201:
        raise RuntimeError("PUT manifest %s:%s -> %d %s" % (repo, tag, status, body[:300]))
    if headers.get("Docker-Content-Digest") != expected:
        raise RuntimeError("registry stored %s:%s as %s, not %s (the bytes were rewritten)" % (
            repo, tag, headers.get("Docker-Content-Digest"), expected))
    digest, _content_type, stored = registry.manifest(
        repo, tag, accept=(media_type, MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX))
    if digest != expected or stored != manifest_bytes:
        raise RuntimeError("%s:%s is served as %s, not the %s pushed" % (
            repo, tag, digest, expected))
    return digest


def push_artifact(registry: "DistributionRegistry", repo: str, tag: str,
                  artifact: RawArtifact) -> str:
    """Pushes ``artifact`` (an index's children first, by digest) as ``repo:tag``."""
    for child in artifact.children:
        push_artifact(registry, repo, child.digest, child)
    return push_raw(registry, repo, tag, artifact.blobs, artifact.manifest, artifact.media_type)


def write_raw_to_layout(layout: Path, tag: str, artifact: RawArtifact) -> Blob:
    """Writes ``artifact`` (children and blobs included) into an OCI layout under ``tag``."""
    layout = init_layout(Path(layout))

    def write(item: RawArtifact) -> Blob:
        for child in item.children:
            write(child)
        for data in item.blobs.values():
            write_blob(layout, data, "")
        return write_blob(layout, item.manifest, item.media_type)

    blob = write(artifact)
    _tag_in_index_json(layout, blob, tag)
    return blob


# =============================================================================
# 5. FILESYSTEM LAYERS: hand-written tar entries, gzip/zstd/plain layers, trees
# =============================================================================
# The unpack interop tests need layers with every entry type and every whiteout form
# (image-spec layer.md), in each layer media type, and a way to compare two unpacked
# root filesystems (ours, umoci's, tar's) entry by entry.

MEDIA_TYPE_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_MEDIA_TYPES = {"gzip": MEDIA_TYPE_OCI_LAYER_GZIP, "tar": MEDIA_TYPE_OCI_LAYER_TAR,
                     "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD}
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_ENTRY_KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE}


@dataclasses.dataclass(frozen=True)
class TarEntry:
    """Is one tar member of a hand-written layer.

    ``kind`` is file, dir, symlink, hardlink, fifo, char or block; ``linkname`` the target
    of a link. A file holds ``data``, or ``size`` pseudo-random bytes from ``seed`` when a
    seed is given (streamed, so large files cost no memory). ``xattrs`` are (name, text)
    pairs written as PAX ``SCHILY.xattr.NAME`` records, as docker and buildah write them.
    """

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = _EPOCH_S
    size: int = 0
    seed: Optional[int] = None
    xattrs: Tuple[Tuple[str, str], ...] = ()
    devmajor: int = 0
    devminor: int = 0

    def tarinfo(self) -> tarfile.TarInfo:
        """Returns the tar header of this entry."""
        info = tarfile.TarInfo(self.name)
        info.type = _ENTRY_KINDS[self.kind]
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        if self.xattrs:
            info.pax_headers = {"SCHILY.xattr." + name: value for name, value in self.xattrs}
        if self.kind == "file":
            info.size = self.size if self.seed is not None else len(self.data)
        return info

    def content(self):
        """Returns a reader of the file's bytes, None for other kinds."""
        if self.kind != "file":
            return None
        if self.seed is not None:
            return _RandomReader(self.seed, self.size)
        return io.BytesIO(self.data)


def file_entry(name: str, data: bytes = b"", mode: int = 0o644, **extra) -> TarEntry:
    """Returns a regular file entry."""
    return TarEntry(name, "file", data=data, mode=mode, **extra)


def random_file_entry(name: str, size: int, seed: int, mode: int = 0o644) -> TarEntry:
    """Returns a file of ``size`` incompressible bytes derived from ``seed``."""
    return TarEntry(name, "file", mode=mode, size=size, seed=seed)


def dir_entry(name: str, mode: int = 0o755, **extra) -> TarEntry:
    """Returns a directory entry (the name gets its trailing slash)."""
    return TarEntry(name.rstrip("/") + "/", "dir", mode=mode, **extra)


def symlink_entry(name: str, target: str) -> TarEntry:
    """Returns a symbolic link ``name -> target``."""
    return TarEntry(name, "symlink", mode=0o777, linkname=target)


def hardlink_entry(name: str, target: str) -> TarEntry:
    """Returns a hard link to ``target``, a path relative to the root of the image."""
    return TarEntry(name, "hardlink", mode=0o644, linkname=target)


def fifo_entry(name: str, mode: int = 0o644) -> TarEntry:
    """Returns a named pipe."""
    return TarEntry(name, "fifo", mode=mode)


def device_entry(name: str, kind: str, major: int, minor: int, mode: int = 0o666) -> TarEntry:
    """Returns a character (``kind="char"``) or block (``kind="block"``) device node."""
    return TarEntry(name, kind, mode=mode, devmajor=major, devminor=minor)


def whiteout_entry(path: str) -> TarEntry:
    """Returns the whiteout that deletes ``path`` of lower layers (``dir/.wh.name``)."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return file_entry((parent + "/" if parent else "") + WHITEOUT_PREFIX + base, mode=0o600)


def opaque_entry(directory: str) -> TarEntry:
    """Returns the opaque whiteout that hides everything lower layers put in ``directory``."""
    directory = directory.strip("/")
    return file_entry((directory + "/" if directory else "") + OPAQUE_WHITEOUT, mode=0o600)


def write_tar(fileobj, entries: Iterable[TarEntry]) -> None:
    """Writes ``entries`` in order as a PAX tar stream into a binary file object."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            tar.addfile(entry.tarinfo(), entry.content())


def tar_bytes(entries: Iterable[TarEntry]) -> bytes:
    """Returns ``entries`` as an uncompressed tar archive, for small layers."""
    buf = io.BytesIO()
    write_tar(buf, entries)
    return buf.getvalue()


def write_entries_layer(layout: Path, entries: Iterable[TarEntry], compression: str = "gzip",
                        compresslevel: int = 6) -> Tuple[Blob, str]:
    """Writes a layer of ``entries`` into the layout; returns the blob and its diff_id.

    ``compression`` is gzip (deterministic header), tar (stored as is) or zstd (the
    ``zstd`` program, level 3). The tar is streamed to a temporary file in
    ``blobs/sha256``, so file sizes cost disk, not memory.
    """
    if compression not in LAYER_MEDIA_TYPES:
        raise ValueError("compression %r is not one of %s" % (compression, sorted(LAYER_MEDIA_TYPES)))
    zstd = require_tool("zstd") if compression == "zstd" else None
    blobs = _blobs_dir(Path(layout))
    temporaries = []
    try:
        fd, tar_name = tempfile.mkstemp(dir=str(blobs), prefix=".tmp-")
        temporaries.append(tar_name)
        with os.fdopen(fd, "wb") as raw:
            stored = _HashingWriter(raw)
            if compression == "gzip":
                with gzip.GzipFile(filename="", mode="wb", fileobj=stored, mtime=_EPOCH_S,
                                   compresslevel=compresslevel) as gz:
                    plain = _HashingWriter(gz)
                    write_tar(plain, entries)
            else:
                plain = _HashingWriter(raw)
                write_tar(plain, entries)
        diff_id = "sha256:" + plain.sha256.hexdigest()
        blob_name = tar_name
        if compression == "zstd":
            blob_name = tar_name + ".zst"
            temporaries.append(blob_name)
            subprocess.run([zstd, "-q", "-3", "--no-progress", "-f", tar_name, "-o", blob_name],
                           check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=600)
        digest = sha256_file(Path(blob_name))
        size = os.path.getsize(blob_name)
        os.chmod(blob_name, 0o644)
        os.replace(blob_name, str(blobs / digest[7:]))
    finally:
        for name in temporaries:
            if os.path.exists(name):
                os.unlink(name)
    return Blob(digest, size, LAYER_MEDIA_TYPES[compression]), diff_id


def build_image_from_layers(layout: Path, tag: str, layers: Sequence[Tuple[Blob, str]],
                            platform: str = "linux/amd64") -> ImageInfo:
    """Writes config and manifest for already written ``(blob, diff_id)`` layers, under ``tag``."""
    layout = init_layout(Path(layout))
    os_name, architecture, variant = parse_platform(platform)
    config = {
        "created": _CREATED, "architecture": architecture, "os": os_name,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        "history": [{"created": _CREATED, "created_by": "_oci_testkit layer %d" % i}
                    for i in range(len(layers))],
    }
    if variant:
        config["variant"] = variant
    config_blob = write_blob(layout, _canonical_json(config), MEDIA_TYPE_OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": config_blob.descriptor(),
                "layers": [blob.descriptor() for blob, _ in layers]}
    manifest_blob = write_blob(layout, _canonical_json(manifest), MEDIA_TYPE_OCI_MANIFEST)
    _tag_in_index_json(layout, manifest_blob, tag)
    return ImageInfo(manifest_blob, config_blob, tuple(blob for blob, _ in layers),
                     tuple(diff_id for _, diff_id in layers), os_name, architecture, variant)


def layer_blob_paths(layout: Path, info: ImageInfo) -> List[Path]:
    """Returns the files of an image's layers in the layout, lowest layer first."""
    return [Path(layout) / "blobs" / "sha256" / blob.digest[7:] for blob in info.layers]


def umoci_unpack(layout: Path, tag: str, bundle: Path, rootless: bool = True) -> Path:
    """Runs ``umoci unpack [--rootless] --image LAYOUT:TAG BUNDLE``; returns BUNDLE/rootfs."""
    cmd = [require_tool("umoci"), "unpack"] + (["--rootless"] if rootless else [])
    cmd += ["--image", "%s:%s" % (layout, tag), str(bundle)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("umoci unpack failed (exit %d): %s" % (
            proc.returncode, proc.stderr.decode(errors="replace").strip()[-2000:]))
    return Path(bundle) / "rootfs"


def push_exact(registry: DistributionRegistry, layout_dir: Path, tag: str, repo: str) -> str:
    """Copies ``oci:layout_dir:tag`` to ``repo:tag`` byte for byte; returns the digest stored.

    ``skopeo copy`` to a registry gzips uncompressed layers on the way (skopeo 1.9), which
    changes the manifest; ``--preserve-digests`` makes it push every blob as it is, so a
    plain-tar or zstd layer reaches the registry under its own media type.
    """
    return _skopeo_copy(registry, "oci:%s:%s" % (layout_dir, tag),
                        "docker://%s/%s:%s" % (registry.host, repo, tag), dest=True)


def skopeo_to_layout(registry: DistributionRegistry, repository: str, tag: str,
                     layout: Path) -> str:
    """Copies ``repository:tag`` into the OCI layout ``layout`` unchanged; returns its digest."""
    return _skopeo_copy(registry, "docker://%s/%s:%s" % (registry.host, repository, tag),
                        "oci:%s:%s" % (layout, tag), dest=False)


def _skopeo_copy(registry: DistributionRegistry, source: str, destination: str, dest: bool) -> str:
    side = "--dest" if dest else "--src"
    cmd = [registry._skopeo_bin, "--insecure-policy", "copy", "--retry-times", "0",
           "--preserve-digests", side + "-tls-verify=false"]
    cmd += [side + "-creds", registry.creds] if registry.creds else [side + "-no-creds"]
    digest_file = Path(tempfile.mkdtemp(dir=str(registry.root))) / "digest"
    registry._run(cmd + ["--digestfile", str(digest_file), source, destination])
    return digest_file.read_text().strip()


def _entry_type(mode: int) -> str:
    import stat
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def snapshot_tree(root: Path) -> Dict[str, dict]:
    """Describes every entry under ``root`` (the root itself is ``"."``), never following links.

    Each value has ``type``, ``mode`` (permission bits with setuid/setgid/sticky),
    ``uid``, ``gid``, ``mtime`` (whole seconds), ``nlink``, ``inode`` (device, number),
    ``xattrs`` (names under ``user.`` and ``trusted.`` to their values); files add ``size``
    and ``sha256``, symlinks ``target``, device nodes ``rdev`` (major, minor).
    """
    import stat
    root = Path(root)
    out: Dict[str, dict] = {}

    def describe(path: str, relative: str) -> None:
        st = os.lstat(path)
        item = {"type": _entry_type(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid, "gid": st.st_gid, "mtime": int(st.st_mtime),
                "nlink": st.st_nlink, "inode": (st.st_dev, st.st_ino)}
        if item["type"] == "file":
            item["size"] = st.st_size
            item["sha256"] = sha256_file(Path(path))
        elif item["type"] == "symlink":
            item["target"] = os.readlink(path)
        elif item["type"] in ("char", "block"):
            item["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        item["xattrs"] = _user_xattrs(path)
        out[relative] = item

    describe(str(root), ".")
    for dirpath, dirnames, filenames in os.walk(str(root)):
        base = os.path.relpath(dirpath, str(root))
        for name in sorted(dirnames + filenames):
            relative = name if base == "." else base + "/" + name
            describe(os.path.join(dirpath, name), relative)
    return out


def _user_xattrs(path: str) -> Dict[str, bytes]:
    # security.* (SELinux labels, capabilities) depends on the host policy, not the image.
    if not hasattr(os, "listxattr"):
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False)
            for name in sorted(names) if name.startswith(("user.", "trusted."))}


def hardlink_groups(snapshot: Dict[str, dict]) -> List[Tuple[str, ...]]:
    """Returns the sets of paths of a snapshot that share an inode, sorted (groups of 2+)."""
    by_inode: Dict[tuple, List[str]] = {}
    for path, item in snapshot.items():
        if item["type"] != "dir":
            by_inode.setdefault(item["inode"], []).append(path)
    return sorted(tuple(sorted(paths)) for paths in by_inode.values() if len(paths) > 1)


def comparable(snapshot: Dict[str, dict],
               fields: Sequence[str] = ("type", "mode", "size", "sha256", "target", "rdev"),
               ) -> Dict[str, dict]:
    """Returns the snapshot reduced to ``fields`` (no inodes, owners or times by default)."""
    return {path: {k: item[k] for k in fields if k in item} for path, item in snapshot.items()}


def tree_differences(ours: Dict[str, dict], theirs: Dict[str, dict]) -> List[str]:
    """Returns one line per path that differs between two comparable snapshots, empty if equal."""
    lines = []
    for path in sorted(set(ours) | set(theirs)):
        a, b = ours.get(path), theirs.get(path)
        if a != b:
            lines.append("%s: ours=%s theirs=%s" % (path, a, b))
    return lines


def rmtree(path: Path) -> None:
    """Removes a tree, first making its directories writable (an image may make them 0555)."""
    path = Path(path)
    if not os.path.lexists(str(path)):
        return
    if path.is_dir() and not path.is_symlink():
        os.chmod(str(path), 0o700)
        for dirpath, dirnames, _ in os.walk(str(path)):
            for name in dirnames:
                child = os.path.join(dirpath, name)
                if not os.path.islink(child):
                    os.chmod(child, 0o700)
        shutil.rmtree(str(path))
    else:
        os.unlink(str(path))


def _main(argv: Optional[List[str]] = None) -> int:
    """Builds a layout from the command line: ``python _oci_testkit.py image|index|bench DIR [TAG]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in ("image", "index", "bench"):
        print("usage: python _oci_testkit.py image|index|bench DIR [TAG]", file=sys.stderr)
        return 2
    kind, layout, tag = args[0], Path(args[1]), args[2] if len(args) > 2 else "latest"
    if kind == "index":
        print(build_index(layout, tag).digest)
    else:
        layers = benchmark_layers() if kind == "bench" else None
        print(build_image(layout, tag, layers=layers).digest)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
