"""Pull container images and WebAssembly artifacts from OCI/Docker registries.

zlayer_registry is a single-file, standard-library-only registry client: it
resolves image references, authenticates (Docker token auth, basic, bearer,
Docker/podman credential files and helpers), downloads every blob in parallel
over keep-alive connections, verifies each against its digest while streaming
it into a content-addressed cache, and tells container images from WebAssembly
artifacts.  Its API is that of the Rust crate zlayer-registry, in Python form.

Quickstart::

    from zlayer_registry import BlobCache, ImagePuller, RegistryAuth

    cache = BlobCache.open("/var/lib/zlayer/cache")
    with ImagePuller(cache) as puller:
        manifest, layers = puller.pull("ghcr.io/org/image:latest",
                                       RegistryAuth.anonymous())
    print(f"pulled {len(layers)} layers")
    for layer in layers:
        with layer.open() as f:           # verified bytes, streamed from disk
            f.read(512)

Command line: ``python -m zlayer_registry pull alpine:3.20 --json``.

Sections (``grep -n '^# [0-9]*\\. ' zlayer_registry.py`` prints this map):
    1. IMPORTS AND COMPATIBILITY
    2. CONSTANTS: media types and limits
    3. ERRORS
    4. UTILITIES: value classes, warnings, URLs, hosts, sizes, capped reads
    5. FILES: safe reads, atomic writes, locks, crash leftovers
    6. DIGESTS AND DESCRIPTORS
    7. REFERENCES: parsing and normalising image references
    8. LOCATIONS: where an image lives (registry, layout, archive)
    9. MANIFESTS AND PLATFORMS
    10. MANIFEST GRAPH: walking indexes, images and their blobs
    11. WASM DETECTION
    12. HTTP/1.1: headers and responses
    13. HTTP/1.1: request bodies and connections
    14. TRANSPORT: keep-alive pooling and proxies
    15. RETRIES: which requests are sent again, and when
    16. CREDENTIALS: RegistryAuth, docker and podman files, credential helpers
    17. TOKEN AUTH: challenges, token requests, the token cache
    18. REGISTRY ANSWERS: errors, manifests, hosts that do not answer
    19. REGISTRY CLIENT: scheme, auth, redirects and the distribution API
    20. BLOB STORES: the interface every cache implements
    21. BLOB SOURCES: where a pull's manifests and blobs come from
    22. REGISTRY PUSH: uploads, mounts and manifests
    23. CACHE FILES: content-addressed files, writers (direct I/O), locks, references
    24. LOCAL REPOSITORIES: repositories, tags and manifests as files beside the blobs
    25. CACHE INDEX: SQLite beside the files
    26. DIRECTORY CACHE: DirectoryBlobCache, the files and their index
    27. MEMORY CACHE: BlobCache, and where persistent caches are opened
    28. S3: SigV4 signing (headers and presigned URLs)
    29. S3: credentials, region and endpoint, found as AWS's own tools find them
    30. S3: the object client (signed requests, errors, listing, multipart)
    31. S3: S3BlobCache, blobs in a bucket where registries keep them
    32. S3: the fleet tier (S3 between the local cache and the registry)
    33. UNPACK: layer streams (compression, prefetch)
    34. UNPACK: the root filesystem tree
    35. UNPACK: LayerUnpacker, applying tar entries
    36. OCI LAYOUT: writing layouts and archives
    37. WASM ARTIFACTS: a .wasm file as a CNCF Wasm OCI layout; the wasm names
    38. OCI LAYOUT: reading and importing
    39. LOCAL REGISTRY: LocalRegistry, images stored on this host
    40. WORKER POOL: threads that keep their connections between batches
    41. SESSION AND RESOLVER: what transfers share; references to manifests
    42. FETCHER: verified blobs from a source into a store
    43. PULL: what a pull returns (Layer, PullResult)
    44. PULL: the ImagePuller API
    45. PUSH: what a copy reads from (a registry, the cache, a layout, an archive)
    46. PUSH: ImagePusher, push and copy
    47. SERVE: basic credentials from an htpasswd file (bcrypt, apr1, SHA, SHA-crypt)
    48. SERVE: upload sessions and request bodies
    49. SERVE: the pull-through mirror (upstreams, tags kept for a TTL, single-flight blobs)
    50. SERVE: RegistryServer, the distribution API over the local registry
    51. CLI: output, progress, and what every command opens (caches, pullers, credentials)
    52. CLI: the commands
    53. CLI: argument types, the command table, the parser, main

Specifications followed:
    OCI image-spec        https://github.com/opencontainers/image-spec/blob/main/spec.md
    OCI image-layout      https://github.com/opencontainers/image-spec/blob/main/image-layout.md
    OCI distribution-spec https://github.com/opencontainers/distribution-spec/blob/main/spec.md
    Docker token auth     https://distribution.github.io/distribution/spec/auth/token/
    Docker OAuth2 refresh https://distribution.github.io/distribution/spec/auth/oauth/
    Reference grammar     https://github.com/distribution/reference/blob/main/reference.go
    AWS SigV4             https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv4.html
"""

# =============================================================================
# 1. IMPORTS AND COMPATIBILITY
# =============================================================================
# Only cheap modules are imported here; sqlite3, ssl, socket, tarfile,
# tempfile and subprocess are imported where first used (http.client never:
# sections 12 and 13 have the HTTP/1.1 it needs), so that
# `import zlayer_registry` stays fast and never fails on a Python built without
# sqlite3 or ssl (Debian's python3-minimal has no sqlite3).

from __future__ import annotations

import base64
import enum
import errno
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from typing import (TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterable, Iterator,
                    List, Mapping, Optional, Protocol, Sequence, Tuple, TypeVar, Union, cast)

if TYPE_CHECKING:  # type checkers read _value as a dataclass (typing has it from 3.11)
    from typing import dataclass_transform as _dataclass_transform
else:
    def _dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda decorator: decorator

__version__ = "0.1.0"

__all__ = [
    # Constants
    "MEDIA_TYPE_OCI_MANIFEST", "MEDIA_TYPE_OCI_INDEX", "MEDIA_TYPE_OCI_CONFIG",
    "MEDIA_TYPE_DOCKER_MANIFEST", "MEDIA_TYPE_DOCKER_LIST",
    "MEDIA_TYPE_DOCKER_CONFIG", "MAX_MANIFEST_SIZE_BYTES",
    "MAX_ERROR_BODY_BYTES", "MAX_BLOB_SIZE_BYTES", "MAX_REDIRECTS",
    "DEFAULT_MAX_WORKERS", "DEFAULT_TIMEOUT_S", "DEFAULT_RETRIES",
    "RETRY_BACKOFF_BASE_S", "RETRY_BACKOFF_MAX_S", "RETRY_AFTER_MAX_S",
    "DEFAULT_TOKEN_LIFETIME_S", "MAX_TOKEN_RESPONSE_BYTES", "DEFAULT_GC_GRACE_S",
    "DEFAULT_UPSTREAM_TTL_S",
    "WASM_ARTIFACT_COMPONENT", "WASM_ARTIFACT_MODULE", "WASM_CONFIG_V0",
    "WASM_CONFIG_V1", "WASM_LAYER_MEDIA_TYPE",
    # Errors
    "ZLayerError", "InvalidReferenceError", "InvalidDigestError", "InvalidPlatformError",
    "ManifestError", "PlatformNotFoundError", "ManifestBlobUnknownError",
    "DigestMismatchError", "RegistryError", "AuthError", "NotFoundError", "RateLimitedError", "CacheError", "UnpackError",
    "LayoutError",
    # Digests, descriptors, references
    "Descriptor", "Platform", "Reference", "parse_reference", "parse_platform",
    "compute_digest", "host_platform", "select_platform",
    # Manifests
    "Manifest", "parse_manifest",
    # WASM
    "ArtifactType", "WasiVersion", "WasmArtifactInfo", "detect_artifact_type",
    "extract_wasm_info", "wasi_version_from_bytes", "wasm",
    # OCI layout
    "ANNOTATION_REF_NAME", "ANNOTATION_TITLE", "export_wasm_as_oci", "ExportInfo",
    "ImportInfo",
    # Credentials
    "RegistryAuth",
    # S3
    "sigv4_headers", "sigv4_presign", "S3Credentials", "S3BlobCache",
    "S3_MULTIPART_THRESHOLD_BYTES", "S3_PART_BYTES", "DEFAULT_LEASE_S",
    # Caches
    "BlobStore", "BlobWriter", "BlobCache", "DirectoryBlobCache",
    # Local registry and its server
    "LocalRegistry", "RegistryServer",
    # Pull and unpack
    "ImagePuller", "Layer", "PullResult", "LayerUnpacker",
    # Push and copy
    "ImagePusher", "CopyResult",
    # CLI
    "main",
]


_NOT_IMPORTED = object()


def _import_sqlite3() -> Any:
    """Return the sqlite3 module, or None on a Python built without it."""
    try:
        import sqlite3
    except ImportError:  # python3-minimal and some embedded builds
        return None
    return sqlite3


# =============================================================================
# 2. CONSTANTS: media types and limits
# =============================================================================

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_SCHEMA1_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
_IMAGE_MANIFEST_TYPES = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
_INDEX_TYPES = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST)
_MANIFEST_TYPES = _IMAGE_MANIFEST_TYPES + _INDEX_TYPES
# distribution answers 404 to a manifest GET whose Accept lacks the OCI
# types, so every manifest request names all four.
_MANIFEST_ACCEPT = ", ".join(_MANIFEST_TYPES)

MAX_MANIFEST_SIZE_BYTES = 4 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
# Descriptor sizes above this are refused before any byte is downloaded.
MAX_BLOB_SIZE_BYTES = 1 << 40
MAX_REDIRECTS = 10
# Parallel blob downloads: skopeo's (containers/image's) number.
DEFAULT_MAX_WORKERS = 6
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 4
RETRY_BACKOFF_BASE_S = 0.25
RETRY_BACKOFF_MAX_S = 10.0
RETRY_AFTER_MAX_S = 60.0
# Token lifetime assumed when a token response has no expires_in (Docker
# token spec: "defaults to 60 seconds").
DEFAULT_TOKEN_LIFETIME_S = 60.0
# How long garbage collection spares a blob no manifest names yet, where a
# local registry keeps images: a client uploads blobs first, manifests after.
DEFAULT_GC_GRACE_S = 3600.0
_READ_CHUNK_BYTES = 1024 * 1024
# Network reads return what one recv() brings, rarely more than a few
# hundred KiB; a smaller cap keeps four workers' peak memory down.
_NETWORK_READ_BYTES = 256 * 1024
# Cache blobs at least this large are written with O_DIRECT, through a staging
# buffer of this size, in multiples of the alignment (the largest logical
# block size in common use).  Larger stages mean fewer receive, hash and
# write calls for a little more memory (bench/RESULTS.md has the trade).
_DIRECT_IO_MIN_BYTES = 4 * 1024 * 1024
_DIRECT_IO_STAGE_BYTES = 1024 * 1024
_DIRECT_IO_ALIGN_BYTES = 4096
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_USER_AGENT = f"zlayer-registry/{__version__} (python)"


# =============================================================================
# 3. ERRORS
# =============================================================================

class ZLayerError(Exception):
    """Base class of every error this module raises on purpose."""


class InvalidReferenceError(ZLayerError, ValueError):
    """An image reference does not follow the distribution reference grammar."""

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"invalid reference {reference!r}: {reason}")


class InvalidDigestError(ZLayerError, ValueError):
    """A digest string is malformed or uses an unsupported algorithm."""

    def __init__(self, digest: str, reason: str) -> None:
        self.digest = digest
        self.reason = reason
        super().__init__(f"invalid digest {digest!r}: {reason}")


class InvalidPlatformError(ZLayerError, ValueError):
    """A platform is not ``OS/ARCH[/VARIANT]``."""


class ManifestError(ZLayerError):
    """A manifest or index is malformed, too large or of an unsupported type."""


class PlatformNotFoundError(ManifestError):
    """An index has no manifest for the platform asked for; ``platform`` names it and
    ``offered`` lists what the index has."""

    def __init__(self, message: str, platform: str, offered: Sequence[str]) -> None:
        self.platform = platform
        self.offered = tuple(offered)
        super().__init__(message)


class ManifestBlobUnknownError(ManifestError):
    """A manifest names blobs or child manifests the store does not hold: ``digests``
    lists them, ``digest`` is the first."""

    def __init__(self, message: str, digest: str, digests: Sequence[str] = ()) -> None:
        self.digest = digest
        self.digests = tuple(digests) or (digest,)
        super().__init__(message)


class DigestMismatchError(ZLayerError):
    """Content does not hash to the digest (or size) it was announced with."""

    def __init__(self, subject: str, expected: str, actual: str) -> None:
        self.subject = subject
        self.expected = expected
        self.actual = actual
        # A subject that names the digest already need not repeat it.
        named = expected.startswith(("sha256:", "sha512:")) and expected.split()[0] in subject
        super().__init__(f"{subject}: {'' if named else f'expected {expected}, '}got {actual}")


class RegistryError(ZLayerError):
    """A registry answered with an error status.

    Fields: ``status`` (HTTP status or None for connection failures),
    ``codes`` (distribution-spec error codes), ``method``, ``url`` (redacted:
    no query string, no user info) and ``temporary`` (worth retrying).
    """

    def __init__(self, message: str, *, status: Optional[int] = None,
                 codes: Sequence[str] = (), method: str = "",
                 url: str = "", temporary: bool = False) -> None:
        self.status = status
        self.codes = tuple(codes)
        self.method = method
        self.url = url
        self.temporary = temporary
        super().__init__(message)


class AuthError(RegistryError):
    """Authentication or authorisation failed (401/403, token endpoint)."""


class NotFoundError(RegistryError):
    """The repository, tag, manifest or blob does not exist."""


class RateLimitedError(RegistryError):
    """The registry kept answering 429 Too Many Requests."""

    def __init__(self, message: str, *, retry_after_s: Optional[float] = None,
                 **kwargs: Any) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kwargs)


class CacheError(ZLayerError):
    """The blob cache cannot be opened, read or written.

    Fields: ``code`` (the store's error code, S3's ``Code`` such as
    AccessDenied or SlowDown; '' otherwise), ``status`` (the HTTP status
    where there was one) and ``temporary`` (trying again may help).
    """

    def __init__(self, message: str, *, code: str = "", status: Optional[int] = None,
                 temporary: bool = False) -> None:
        self.code = code
        self.status = status
        self.temporary = temporary
        super().__init__(message)


class UnpackError(ZLayerError):
    """A layer cannot be unpacked safely; ``member`` names the tar entry."""

    def __init__(self, message: str, member: str = "") -> None:
        self.member = member
        super().__init__(message)


class LayoutError(ZLayerError):
    """An OCI image layout or archive is malformed or incomplete."""


class _Cancelled(Exception):
    """Internal: another worker failed (or the command is ending), so this download stops."""


# =============================================================================
# 4. UTILITIES: value classes, warnings, URLs, hosts, sizes, capped reads
# =============================================================================
# Immutable values (Reference, Descriptor, Platform, Manifest...) are made
# by ``_value``, which does what ``dataclass(frozen=True)`` does for them:
# importing dataclasses (and inspect with it) and decorating with it are a
# large share of a CLI run's start-up (bench/RESULTS.md).

_MISSING: Any = object()
_ValueClass = TypeVar("_ValueClass", bound=type)


class _FieldSpec:
    """What ``_field`` says of one field: its default (or a factory making it), and
    whether it shows in ``repr`` and counts for ``==`` and ``hash``."""

    __slots__ = ("default", "factory", "in_repr", "in_eq")

    def __init__(self, default: Any, factory: Optional[Callable[[], Any]], in_repr: bool,
                 in_eq: bool) -> None:
        self.default, self.factory, self.in_repr, self.in_eq = default, factory, in_repr, in_eq


def _field(default: Any = _MISSING, *, default_factory: Optional[Callable[[], Any]] = None,
           in_repr: bool = True, in_eq: bool = True) -> Any:
    """Describe a field of a ``_value`` class (as ``dataclasses.field`` does)."""
    return _FieldSpec(default, default_factory, in_repr, in_eq)


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is immutable")


@_dataclass_transform(frozen_default=True, field_specifiers=(_field,))
def _value(cls: _ValueClass) -> _ValueClass:
    """Make ``cls`` an immutable value from its annotated fields: ``__init__``
    (positional or by keyword, defaults last), ``__repr__``, ``__eq__``,
    ``__hash__``, ``replace(**changes)``; assigning to an attribute raises."""
    specs: Dict[str, _FieldSpec] = {}
    for name in cls.__dict__.get("__annotations__", {}):
        spec = cls.__dict__.get(name, _MISSING)
        specs[name] = spec if isinstance(spec, _FieldSpec) else _FieldSpec(spec, None, True, True)
        if isinstance(spec, _FieldSpec):
            delattr(cls, name)
    names = tuple(specs)
    compared = tuple(name for name in names if specs[name].in_eq)
    shown = tuple(name for name in names if specs[name].in_repr)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes at most {len(names)} arguments")
        values = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in specs or name in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated "
                                f"argument {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                spec = specs[name]
                if spec.factory is not None:
                    values[name] = spec.factory()
                elif spec.default is not _MISSING:
                    values[name] = spec.default
                else:
                    raise TypeError(f"{cls.__name__}() misses the argument {name!r}")
            object.__setattr__(self, name, values[name])

    def __repr__(self: Any) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{cls.__qualname__}({fields})"

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in compared)

    def __hash__(self: Any) -> int:
        return hash(tuple(getattr(self, name) for name in compared))

    def replace(self: Any, **changes: Any) -> Any:
        """Return a copy with ``changes`` to its fields (as ``dataclasses.replace``)."""
        return cls(**dict({name: getattr(self, name) for name in names}, **changes))

    for function in (__init__, __repr__, __eq__, __hash__, replace):
        function.__qualname__ = f"{cls.__qualname__}.{function.__name__}"
        setattr(cls, function.__name__, function)
    cls.__setattr__ = _frozen_setattr  # type: ignore[assignment]
    cls.__delattr__ = _frozen_setattr  # type: ignore[assignment]
    cls.__match_args__ = names  # type: ignore[attr-defined]
    return cls


def _warn(message: str) -> None:
    """Print a one-line warning on stderr (library warnings stay terse)."""
    print(f"zlayer-registry: warning: {message}", file=sys.stderr)


def _redact_url(url: str) -> str:
    """Return ``url`` without user info or query string.

    Presigned blob URLs (S3, CloudFront, Azure SAS) carry their credentials
    in the query string, so error messages never show it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{authority}{slash}{path}"


def _split_host_port(host: str) -> Tuple[str, Optional[int]]:
    """Split ``host[:port]`` (IPv6 in brackets) into host and port."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 address in {host!r}")
        name, rest = host[1:end], host[end + 1:]
        if rest.startswith(":") and not rest[1:].isdigit():
            raise ValueError(f"invalid port in {host!r}")
        return name, int(rest[1:]) if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return host, None


def _split_name_port(text: str) -> Tuple[str, Optional[int]]:
    """Split like ``_split_host_port``, but take a bare IPv6 address (several colons) whole."""
    if not text.startswith("[") and text.count(":") > 1:
        return text, None
    return _split_host_port(text)


def _ip_address(text: str) -> Any:
    """Return ``text`` as an ipaddress address, or None when it is a name.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) comes back as the IPv4
    address, as Go's net package compares them.
    """
    if ":" not in text and not text.replace(".", "").isdigit():
        return None  # a host name: ipaddress is not even imported
    import ipaddress
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def _is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` (a name or an address; bracketed, or with a port) is loopback."""
    try:
        name = _split_name_port(host)[0].lower()
    except ValueError:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    parts = name.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts):
        # IPv4, the common case, decided without importing ipaddress.
        return parts[0] == "127" and all(int(p) < 256 for p in parts)
    address = _ip_address(name) if ":" in name else None
    return address is not None and address.is_loopback


def _format_bytes(size_bytes: float) -> str:
    """Format a byte count for people (``12.3 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size_bytes) < 1024 or unit == "GiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    return f"{size_bytes:.1f} GiB"


def _read_capped(stream: Any, limit_bytes: int) -> bytes:
    """Read at most ``limit_bytes`` from ``stream`` (error bodies, tokens)."""
    chunks = []
    remaining = limit_bytes
    while remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# =============================================================================
# 5. FILES: safe reads, atomic writes, locks, crash leftovers
# =============================================================================
# Every file this module writes for others to read (cache blobs, reference
# records, layouts, archives, root filesystems) is first written under a
# temporary name that carries the writer's PID, flocked while in use, and
# renamed into place; the next process beside it removes the temporaries of
# writers that are gone.

def _is_root() -> bool:
    """Tell whether the effective user is root."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _join(parent: str, name: str) -> str:
    """Join two parts of a relative path ('' is the top)."""
    return f"{parent}/{name}" if parent else name


def _write_all(fd: int, data: Any) -> None:
    """Write all of ``data`` (any buffer) to a file descriptor."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_regular_file(path: str) -> Optional[BinaryIO]:
    """Open a regular file for reading, never through a symlink, a FIFO or a device.

    Returns None when there is no readable regular file at ``path``: files
    of untrusted layouts are opened this way (a FIFO would hang the reader,
    a device flood it, a symlink lead outside).
    """
    import stat as st
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None  # missing, a symlink (ELOOP), or unreadable
    if not st.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _read_regular_file(path: str, limit_bytes: int) -> Optional[bytes]:
    """Read at most ``limit_bytes`` of a regular file (see ``_open_regular_file``)."""
    stream = _open_regular_file(path)
    if stream is None:
        return None
    with stream:
        return _read_capped(stream, limit_bytes)


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock without waiting; True when taken (or flock is absent)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    """Tell whether a process with ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _temporary_path(directory: str, stem: str, suffix: str = ".partial") -> str:
    """Return a fresh name ``STEM.PID.RANDOM[SUFFIX]`` in ``directory``.

    Random as tempfile.mkstemp makes one (tempfile itself is a slow import);
    the PID lets ``_sweep_leftovers`` tell a crash leftover from work in progress.
    """
    return os.path.join(directory, f"{stem}.{os.getpid()}.{os.urandom(6).hex()}{suffix}")


def _create_temporary(directory: str, stem: str, suffix: str = ".partial") -> Tuple[int, str]:
    """Create and flock a new temporary file (``_temporary_path``); return (fd, path)."""
    path = _temporary_path(directory, stem, suffix)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    _try_flock(fd)  # held while in use: not a leftover, even seen from another PID namespace
    return fd, path


# A temporary without a PID in its name (an older version's) is a leftover
# when nobody holds its flock and it is older than this (the gap between
# creating and locking it).
_LEFTOVER_AGE_S = 60.0
_SWEPT_DIRECTORIES: set = set()
_SWEPT_LOCK = threading.Lock()


def _leftover_pid(name: str, suffix: str) -> Optional[int]:
    """Return the writer's PID in a ``_temporary_path`` name, None when it has none."""
    parts = name[:len(name) - len(suffix)].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _sweep_leftovers(directory: str, prefix: str, suffix: str = ".partial", *,
                     once: bool = True) -> None:
    """Remove what killed processes left in ``directory``: files and directories named
    ``prefix...suffix`` whose writer is gone and whose flock nobody holds.

    With ``once`` a directory is swept once per process.  A process in
    another PID namespace (a container sharing the directory) sees our PID
    as dead, but not our flock.
    """
    if once:
        key = (os.path.abspath(directory), prefix, suffix)
        with _SWEPT_LOCK:
            if key in _SWEPT_DIRECTORIES:
                return
            _SWEPT_DIRECTORIES.add(key)
    try:
        names = [n for n in os.listdir(directory)
                 if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix)]
    except OSError:
        return
    now = time.time()
    for name in names:
        pid = _leftover_pid(name, suffix)
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        _remove_if_abandoned(os.path.join(directory, name), now if pid is None else None)


def _remove_if_abandoned(path: str, now: Optional[float]) -> None:
    """Remove a temporary file or directory unless someone holds its flock (or, with
    ``now``, it is younger than ``_LEFTOVER_AGE_S``)."""
    import shutil
    import stat as st
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        info = os.fstat(fd)
        if (now is not None and now - info.st_mtime < _LEFTOVER_AGE_S) or not _try_flock(fd):
            return
        if st.S_ISDIR(info.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: Union[bytes, Callable[[BinaryIO], None]],
                  mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or a function filling the file) via a temporary file and a rename.

    Nobody ever sees a half-written file at ``path``: the temporary file
    (``.tmp.PID.RANDOM.partial`` beside it) is fsynced before the rename and
    removed on any failure; one a killed writer left is swept by the next.
    """
    directory = os.path.dirname(os.path.abspath(path))
    _sweep_leftovers(directory, ".tmp")
    fd, tmp = _create_temporary(directory, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _loads_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON; every way it can fail is a ValueError (deep nesting too)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _json_object(raw: bytes) -> Dict[str, Any]:
    """Parse a JSON object (``_loads_json``); anything else is a ValueError."""
    data = _loads_json(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


# =============================================================================
# 6. DIGESTS AND DESCRIPTORS
# =============================================================================

# image-spec descriptor.md: sha256 and sha512 are registered; their encoded
# part is lowercase hex of a fixed length.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


def _validate_digest(digest: Any) -> str:
    """Return ``digest`` when it is a well-formed sha256/sha512 digest."""
    if not isinstance(digest, str):
        raise InvalidDigestError(str(digest), "not a string")
    match = _DIGEST_RE.match(digest)
    if not match:
        raise InvalidDigestError(digest, "expected ALGORITHM:HEX")
    algorithm, encoded = match.groups()
    length = _DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidDigestError(digest, f"unsupported algorithm {algorithm!r} "
                                         "(sha256 and sha512 are)")
    if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise InvalidDigestError(digest, f"{algorithm} needs {length} lowercase hex digits")
    return digest


def _hasher_for(digest: str) -> Any:
    """Return a fresh hash object for the algorithm of ``digest``."""
    return hashlib.new(_validate_digest(digest).split(":", 1)[0])


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """Return the ``algorithm:hex`` digest of ``data``."""
    if algorithm not in _DIGEST_HEX_LENGTHS:
        raise InvalidDigestError(f"{algorithm}:", "unsupported algorithm")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _check_bytes(subject: str, data: bytes, digest: str) -> None:
    """Raise DigestMismatchError unless ``data`` hashes to ``digest``."""
    actual = compute_digest(data, _validate_digest(digest).split(":", 1)[0])
    if actual != digest:
        raise DigestMismatchError(subject, digest, actual)


@_value
class Platform:
    """An OS/architecture pair, as in an image index or image config."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def to_json(self) -> Dict[str, str]:
        """Return the image-spec JSON form (variant only when set)."""
        data = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            data["variant"] = self.variant
        if self.os_version:
            data["os.version"] = self.os_version
        return data


@_value
class Descriptor:
    """A content descriptor: media type, digest and size of one blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = _field(default_factory=dict)
    platform: Optional[Platform] = None
    artifact_type: str = ""
    urls: Tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str = "descriptor") -> "Descriptor":
        """Build a descriptor from its JSON object, validating every field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object")
        media_type = data.get("mediaType", "")
        if not isinstance(media_type, str):
            raise ManifestError(f"{where} has a non-string mediaType")
        try:
            digest = _validate_digest(data.get("digest"))
        except InvalidDigestError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        size = data.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"{where} {digest} has an invalid size {size!r}")
        if size > MAX_BLOB_SIZE_BYTES:
            raise ManifestError(f"{where} {digest} declares {size} bytes, "
                                f"over the {MAX_BLOB_SIZE_BYTES}-byte limit")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ManifestError(f"{where} {digest} has non-object annotations")
        platform = None
        raw_platform = data.get("platform")
        if isinstance(raw_platform, dict):
            platform = Platform(
                os=str(raw_platform.get("os", "")),
                architecture=str(raw_platform.get("architecture", "")),
                variant=str(raw_platform.get("variant", "") or ""),
                os_version=str(raw_platform.get("os.version", "") or ""))
        urls = data.get("urls") or ()
        return cls(media_type=media_type, digest=digest, size=size,
                   annotations=dict(annotations), platform=platform,
                   artifact_type=str(data.get("artifactType", "") or ""),
                   urls=tuple(str(u) for u in urls if isinstance(u, str)))

    def to_json(self) -> Dict[str, Any]:
        """Return the image-spec JSON form of this descriptor."""
        data: Dict[str, Any] = {"mediaType": self.media_type,
                                "digest": self.digest, "size": self.size}
        if self.artifact_type:
            data["artifactType"] = self.artifact_type
        if self.platform is not None:
            data["platform"] = self.platform.to_json()
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


class _HashingReader(io.RawIOBase):
    """Wraps a blob stream, hashing and counting what is read, for ``check()``.

    A raw stream too (``readinto``), so an ``io.BufferedReader`` can sit on top.
    With ``check_at_end`` (the subject of its error), reaching the end of the
    stream checks it: a reader of a stored blob then cannot read it to the end
    without learning that it changed since it was stored.  Seeking is allowed;
    only bytes read in order from the start count, and a seek back to 0 starts
    the hash afresh.
    """

    def __init__(self, stream: BinaryIO, descriptor: Descriptor,
                 check_at_end: Optional[str] = None) -> None:
        super().__init__()
        self._stream = stream
        self._descriptor = descriptor
        self._hasher = _hasher_for(descriptor.digest)
        self._check_at_end = check_at_end
        self._in_order = True  # every byte so far read in order from byte 0
        self._checked = False
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: Optional[int] = -1) -> bytes:
        data = self._stream.read(size)
        self._took(data, len(data), at_end=not data or size is None or size < 0)
        return data

    def readinto(self, buffer: Any) -> int:
        count = self._stream.readinto(buffer)
        self._took(memoryview(buffer)[:count] if count else b"", count or 0, at_end=not count)
        return count

    def _took(self, data: Any, count: int, at_end: bool) -> None:
        if count and self._in_order:
            self._hasher.update(data)
            self.count += count
        if at_end and self._check_at_end is not None and self._in_order and not self._checked:
            self._checked = True
            self.check(self._check_at_end)

    def seekable(self) -> bool:
        return bool(getattr(self._stream, "seekable", lambda: False)())

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._stream.seek(offset, whence)
        if position == 0:
            self._hasher = _hasher_for(self._descriptor.digest)
            self.count, self._in_order, self._checked = 0, True, False
        elif position != self.count:
            self._in_order = False
        return position

    def tell(self) -> int:
        return self._stream.tell()

    def close(self) -> None:
        self._stream.close()
        super().close()

    def check_end(self) -> None:
        """Check what was read, as reaching the end does (``check_at_end``'s subject)."""
        self.check(self._check_at_end or "")

    def check(self, subject: str = "") -> None:
        """Raise DigestMismatchError unless everything read matches the descriptor."""
        actual = f"{self._hasher.name}:{self._hasher.hexdigest()}"
        if self.count != self._descriptor.size or actual != self._descriptor.digest:
            raise DigestMismatchError(subject or f"blob {self._descriptor.digest}",
                                      f"{self._descriptor.digest} ({self._descriptor.size} bytes)",
                                      f"{actual} ({self.count} bytes)")


def _drain_checked(stream: BinaryIO, descriptor: Descriptor, subject: str = "",
                   write: Optional[Callable[[bytes], Any]] = None) -> None:
    """Read ``stream`` to its end, hashing it (and handing each chunk to ``write``);
    raise DigestMismatchError unless it matches ``descriptor``."""
    reader = _HashingReader(stream, descriptor)
    for chunk in iter(lambda: reader.read(_READ_CHUNK_BYTES), b""):
        if write is not None:
            write(chunk)
    reader.check(subject)


# =============================================================================
# 7. REFERENCES: parsing and normalising image references
# =============================================================================
# Grammar from distribution/reference (reference.go, normalize.go):
#   reference := name [ ":" tag ] [ "@" digest ]
#   name      := [domain "/"] path-component ["/" path-component]*
# The first component is a domain when it contains "." or ":", is
# "localhost", or has uppercase letters; otherwise the name is on Docker Hub
# and one-component names live under "library/".

_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_RE = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_MAX_NAME_LENGTH = 255


@_value
class Reference:
    """A fully qualified image reference.

    ``str()`` gives ``registry/repository[:tag][@digest]``; a reference with
    neither tag nor digest gets the tag ``latest``.
    """

    registry: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def api_host(self) -> str:
        """Return the host that serves the registry API (Docker Hub's differs)."""
        return _DOCKER_HUB_API_HOST if self.registry == _DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """Return what goes after ``/manifests/``: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """Return ``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> "Reference":
        """Return a copy of this reference pinned to ``digest``."""
        return Reference(self.registry, self.repository, self.tag, digest)


def parse_reference(text: str) -> Reference:
    """Parse an image reference such as ``ubuntu`` or ``ghcr.io/o/i@sha256:...``."""
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError(str(text), "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReferenceError(text, "contains whitespace")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidReferenceError(text, "a reference has no URL scheme "
                                          f"(drop the '{scheme[:16]}://')")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        try:
            _validate_digest(digest)
        except InvalidDigestError as exc:
            raise InvalidReferenceError(text, exc.reason) from exc
    name, tag = remainder, None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(
                text, f"invalid tag {tag!r} (letters, digits, '_', '.', '-'; "
                      "at most 128; not starting with '.' or '-')")
    registry, path = _split_domain(text, name)
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            if ":" in component:
                reason = "more than one tag (a reference has at most one ':TAG')"
            elif component.lower() != component:
                reason = "repository names must be lowercase"
            else:
                reason = f"invalid path component {component!r}"
            raise InvalidReferenceError(text, reason)
    if len(registry) + 1 + len(path) > _MAX_NAME_LENGTH:
        raise InvalidReferenceError(text, f"name longer than {_MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def _split_domain(text: str, name: str) -> Tuple[str, str]:
    """Split a name into (registry, repository), applying Docker Hub defaults."""
    first, sep, rest = name.partition("/")
    is_domain = sep and ("." in first or ":" in first or first == "localhost"
                         or first.lower() != first)
    if not is_domain:
        registry, path = _DOCKER_HUB, name
    else:
        if not _DOMAIN_RE.fullmatch(first):
            raise InvalidReferenceError(text, f"invalid registry host {first!r}")
        port = _split_host_port(first)[1]
        if port is not None and not 0 < port < 65536:
            raise InvalidReferenceError(text, f"port {port} is out of range")
        registry, path = first, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = _DOCKER_HUB
    if not path:
        raise InvalidReferenceError(text, "missing repository name")
    if registry == _DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return registry, path


# =============================================================================
# 8. LOCATIONS: where an image lives (registry, layout, archive)
# =============================================================================
# skopeo's transport syntax, which users of every peer know:
#   [docker://]REF                  a registry reference
#   oci:DIR[:TAG]                   an OCI image layout directory (TAG may be
#                                   NAME:TAG, the image's name for podman load)
#   oci-archive:FILE[:TAG]          the same as a tar file
#   docker-archive:FILE[:NAME[:TAG]]  what `docker save` writes (NAME[:TAG]:
#                                   the name `docker load` gives the image)
#   local:NAME[:TAG|@DIGEST]        an image of the local registry (LocalRegistry)

# References that name the local registry's images, "local:NAME:TAG" and
# "local:NAME@DIGEST", are its own records ("local:5000/app" is a reference
# to the registry host local:5000, whose first component is a port).
_LOCAL_PREFIX = "local:"


def _is_local_record(reference: str) -> bool:
    """Tell whether a reference record is the local registry's."""
    return reference.startswith(_LOCAL_PREFIX) and not re.match(r"local:[0-9]+/", reference)


def _validate_repository(name: str, text: Optional[str] = None) -> str:
    """Return a repository name of the local registry, or raise InvalidReferenceError."""
    shown = name if text is None else text
    if not isinstance(name, str) or not name:
        raise InvalidReferenceError(str(shown), "empty repository name")
    if len(name) > _MAX_NAME_LENGTH:
        raise InvalidReferenceError(shown[:300], f"name longer than {_MAX_NAME_LENGTH} characters")
    for component in name.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            reason = "repository names must be lowercase" \
                if component.lower() != component and component else \
                f"invalid path component {component[:64]!r} (lowercase letters, digits, " \
                "and '.', '_', '-' between them)"
            raise InvalidReferenceError(shown, reason)
    if "/" in name and name.partition("/")[0].isdigit():
        # Its records would read as a registry reference (see _is_local_record).
        raise InvalidReferenceError(shown, "a first component of digits reads as a port "
                                    "(local:5000/app is on the registry local:5000)")
    return name


def _parse_local_reference(text: str) -> Tuple[str, Optional[str], Optional[str]]:
    """Split ``NAME[:TAG][@DIGEST]`` (what follows ``local:``) into name, tag, digest.

    A bare NAME means its tag ``latest``, as for registry references.
    """
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        try:
            _validate_digest(digest)
        except InvalidDigestError as exc:
            raise InvalidReferenceError(f"{_LOCAL_PREFIX}{text}", exc.reason) from None
    name, tag = remainder, None
    if ":" in name.rpartition("/")[2]:
        name, _, tag = name.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(f"{_LOCAL_PREFIX}{text}", f"invalid tag {tag[:140]!r}")
    _validate_repository(name, f"{_LOCAL_PREFIX}{text}")
    if tag is None and digest is None:
        tag = "latest"
    return name, tag, digest


_LAYOUT_TRANSPORTS = ("oci", "oci-archive")
_FILE_TRANSPORTS = ("oci", "oci-archive", "docker-archive")
_LOCATION_FORMS = {
    "docker": "[docker://]REF",
    "oci": "oci:DIR[:TAG]",
    "oci-archive": "oci-archive:FILE[:TAG]",
    "docker-archive": "docker-archive:FILE[:NAME[:TAG]]",
    "local": "local:NAME[:TAG]",
}


class _Location:
    """A parsed location: its ``transport`` and, by transport, a ``reference``
    (docker), or a ``path`` and ``tag`` (the layout's ref name; for a docker
    archive, the NAME[:TAG] ``docker load`` gives the image; for the local
    registry, the repository, and a tag or a ``digest``)."""

    __slots__ = ("transport", "path", "tag", "reference", "digest")

    def __init__(self, transport: str, path: str = "", tag: Optional[str] = None,
                 reference: Optional[Reference] = None, digest: Optional[str] = None) -> None:
        self.transport, self.path, self.tag, self.reference = transport, path, tag, reference
        self.digest = digest

    def __str__(self) -> str:
        if self.reference is not None:
            return str(self.reference)
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")

    def __repr__(self) -> str:
        return f"_Location({str(self)!r})"

    @property
    def is_layout(self) -> bool:
        """Tell whether this is an OCI layout (a directory or an archive of one)."""
        return self.transport in _LAYOUT_TRANSPORTS


def _parse_location(text: str, allowed: Sequence[str] = tuple(_LOCATION_FORMS),
                    what: str = "location", note: str = "") -> _Location:
    """Parse a location; one whose transport is not ``allowed`` is a LayoutError
    (``what`` names the location in it, ``note`` adds to it).

    ``oci:NAME`` is also a Docker Hub reference (the image ``oci``, tag NAME)
    and ``oci:5000/app`` one on a host named oci: where a registry reference
    is allowed, it is a layout only if NAME has a ``/`` or a dot, exists, or
    makes no valid reference.
    """
    docker = "docker" in allowed
    transport, sep, rest = text.partition(":")
    if text.startswith("docker://"):
        location = _Location("docker", reference=parse_reference(text[len("docker://"):]))
    elif sep and transport == "local" and not re.match(r"[0-9]+/", rest):
        name, tag, digest = _parse_local_reference(rest)
        location = _Location("local", name, tag, digest=digest)
    elif sep and transport in _FILE_TRANSPORTS and not (
            docker and transport in _LAYOUT_TRANSPORTS and not _names_a_layout(text)):
        location = _parse_file_location(text, transport, rest)
    elif docker:
        location = _Location("docker", reference=parse_reference(text))
    else:
        location = _Location("")
    if location.transport not in allowed:
        forms = [_LOCATION_FORMS[name] for name in allowed]
        raise LayoutError(f"unsupported {what} {text!r}: expected "
                          f"{', '.join(forms[:-1]) + ' or ' if len(forms) > 1 else ''}"
                          f"{forms[-1]}{f' ({note})' if note else ''}")
    return location


def _names_a_layout(text: str) -> bool:
    """Tell whether ``oci:…`` or ``oci-archive:…`` names a layout rather than a
    registry reference (see ``_parse_location``)."""
    rest = text.partition(":")[2]
    if not rest or re.match(r"[0-9]+/", rest):
        return False
    path = rest.partition(":")[0]
    if "/" in path or path.startswith(".") or os.path.exists(path):
        return True
    try:
        parse_reference(text)
    except InvalidReferenceError:
        return True
    return False


def _parse_file_location(text: str, transport: str, rest: str) -> _Location:
    """Parse the part after ``oci:``, ``oci-archive:`` or ``docker-archive:``."""
    if transport == "docker-archive":
        # NAME[:TAG] follows the first colon, as skopeo splits it.
        path, _, name = rest.partition(":")
        if not path:
            raise LayoutError(f"location {text!r} names no file")
        if name:
            try:
                named = parse_reference(name)
            except InvalidReferenceError as exc:
                raise LayoutError(f"invalid image name in {text!r}: {exc}") from None
            if named.digest:
                raise LayoutError(f"the image name in {text!r} cannot hold a digest")
        return _Location(transport, path, name or None)
    # PATH:NAME splits at the first colon, as skopeo does, so that NAME may be
    # a tag or a whole NAME:TAG (what podman load names the image); a path
    # that exists is taken whole, colons and all.
    path, tag = rest, None
    if not os.path.exists(rest):
        head, sep, tail = rest.partition(":")
        if sep:
            path, tag = head, tail
    if not path:
        raise LayoutError(f"location {text!r} names no file or directory")
    if tag is not None and not (_TAG_RE.fullmatch(tag) or _is_image_name(tag)):
        raise LayoutError(f"invalid tag {tag!r} in {text!r} (a tag, or NAME:TAG)")
    return _Location(transport, path, tag)


def _is_image_name(text: str) -> bool:
    """Tell whether ``text`` is a reference without a digest (a layout's NAME:TAG)."""
    try:
        return parse_reference(text).digest is None
    except InvalidReferenceError:
        return False


# =============================================================================
# 9. MANIFESTS AND PLATFORMS
# =============================================================================

@_value
class Manifest:
    """A parsed image manifest or image index, with its exact bytes and digest."""

    media_type: str
    digest: str
    raw: bytes = _field(in_repr=False)
    data: Mapping[str, Any] = _field(in_repr=False, in_eq=False)

    @property
    def is_index(self) -> bool:
        """Tell whether this is an image index / manifest list."""
        return self.media_type in _INDEX_TYPES

    @property
    def config(self) -> Optional[Descriptor]:
        """Return the config descriptor (None for an index)."""
        raw = self.data.get("config")
        return Descriptor.from_json(raw, "config") if raw is not None else None

    @property
    def layers(self) -> List[Descriptor]:
        """Return the layer descriptors in order (empty for an index)."""
        return [Descriptor.from_json(item, f"layer {i}")
                for i, item in enumerate(self.data.get("layers") or [])]

    @property
    def manifests(self) -> List[Descriptor]:
        """Return the child manifest descriptors of an index."""
        return [Descriptor.from_json(item, f"manifest {i}")
                for i, item in enumerate(self.data.get("manifests") or [])]

    @property
    def artifact_type(self) -> str:
        """Return the OCI 1.1 ``artifactType`` field, or an empty string."""
        value = self.data.get("artifactType")
        return value if isinstance(value, str) else ""

    @property
    def annotations(self) -> Dict[str, str]:
        """Return the manifest's annotations."""
        value = self.data.get("annotations")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def size(self) -> int:
        """Return the manifest's size in bytes."""
        return len(self.raw)

    @property
    def children(self) -> List[Descriptor]:
        """Return what this manifest points at: an index's manifests, an image's
        config and layers."""
        return self.manifests if self.is_index else [self.config] + self.layers

    def descriptor(self) -> Descriptor:
        """Return a descriptor that points at this manifest."""
        return Descriptor(self.media_type, self.digest, len(self.raw))


def parse_manifest(raw: bytes, content_type: str = "",
                   digest: Optional[str] = None) -> Manifest:
    """Parse and validate manifest bytes; check them against ``digest`` if given.

    The media type comes from the document's ``mediaType`` field, else the
    HTTP Content-Type, else the document's shape (image-spec allows an index
    or manifest without ``mediaType``).  Docker schema 1 is refused.
    """
    if len(raw) > MAX_MANIFEST_SIZE_BYTES:
        raise ManifestError(f"manifest is {len(raw)} bytes, over the "
                            f"{MAX_MANIFEST_SIZE_BYTES}-byte limit")
    if digest is not None:
        _check_bytes("manifest digest mismatch", raw, digest)
    else:
        digest = compute_digest(raw)
    try:
        data = _loads_json(raw)
    except ValueError as exc:
        raise ManifestError(f"manifest {digest} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {digest} is not a JSON object")
    media_type = _manifest_media_type(data, content_type, digest)
    manifest = Manifest(media_type=media_type, digest=digest, raw=raw, data=data)
    if manifest.is_index:
        if not isinstance(data.get("manifests"), list):
            raise ManifestError(f"index {digest} has no 'manifests' list")
        manifest.manifests  # validates every child descriptor
    else:
        if not isinstance(data.get("config"), dict):
            raise ManifestError(f"manifest {digest} has no 'config' descriptor")
        if not isinstance(data.get("layers", []), list):
            raise ManifestError(f"manifest {digest} has a non-list 'layers'")
        manifest.config, manifest.layers  # validates every descriptor
    return manifest


def _manifest_media_type(data: Mapping[str, Any], content_type: str,
                         digest: str) -> str:
    """Decide a manifest's media type from its body, header and shape."""
    declared = data.get("mediaType")
    header = content_type.split(";", 1)[0].strip().lower()
    if data.get("schemaVersion") == 1 or declared in _SCHEMA1_MEDIA_TYPES \
            or header in _SCHEMA1_MEDIA_TYPES:
        raise ManifestError(f"manifest {digest} is Docker schema 1, "
                            "which is deprecated and not supported")
    known = _MANIFEST_TYPES
    if declared is not None:
        if declared not in known:
            raise ManifestError(f"manifest {digest} has unsupported mediaType {declared!r}")
        return str(declared)
    if header in known:
        return header
    if "manifests" in data:
        return MEDIA_TYPE_OCI_INDEX
    if "config" in data:
        return MEDIA_TYPE_OCI_MANIFEST
    raise ManifestError(f"manifest {digest} has no mediaType and is neither "
                        "a manifest nor an index")


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64",
                 "armv8l": "arm", "i386": "386", "i686": "386", "x86": "386",
                 "ppc64el": "ppc64le", "armhf": "arm", "armel": "arm"}
_ARM_VARIANT_LADDER = ("v8", "v7", "v6", "v5")


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` (e.g. ``linux/arm64/v8``), normalising aliases."""
    parts = text.strip().split("/") if isinstance(text, str) else []
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise InvalidPlatformError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
    os_name, arch = parts[0].lower(), parts[1].lower()
    variant = parts[2].lower() if len(parts) == 3 else ""
    return _normalize_platform(Platform(os_name, arch, variant))


def _normalize_platform(platform: Platform) -> Platform:
    """Apply containerd's normalisation: arch aliases, arm64 v8, arm v7."""
    arch = _ARCH_ALIASES.get(platform.architecture, platform.architecture)
    variant = platform.variant
    if platform.architecture == "armhf" and not variant:
        variant = "v7"
    elif platform.architecture == "armel" and not variant:
        variant = "v6"
    elif platform.architecture == "armv8l" and not variant:
        variant = "v8"
    if arch == "arm64" and variant == "v8":
        variant = ""
    elif arch == "arm" and not variant:
        variant = "v7"
    return Platform(platform.os, arch, variant, platform.os_version)


def host_platform() -> Platform:
    """Return the platform images for this host are built for (OS is linux)."""
    machine = (os.uname().machine if hasattr(os, "uname") else "").lower() or "amd64"
    variant = ""
    if machine.startswith("armv") and machine[4:5].isdigit():
        variant, machine = f"v{machine[4]}", "arm"
    return _normalize_platform(Platform("linux", machine, variant))


def _platform_rank(wanted: Platform, offered: Platform) -> Optional[int]:
    """Rank how well ``offered`` serves ``wanted`` (0 best), None when it cannot."""
    offered = _normalize_platform(offered)
    if offered.os != wanted.os or offered.architecture != wanted.architecture:
        return None
    if wanted.architecture == "arm":
        ladder = _ARM_VARIANT_LADDER
        start = ladder.index(wanted.variant) if wanted.variant in ladder else 1
        acceptable = ladder[start:]
        return acceptable.index(offered.variant) if offered.variant in acceptable else None
    if not wanted.variant:
        return 0 if not offered.variant else 1
    return 0 if offered.variant == wanted.variant else None


def select_platform(index: Manifest, wanted: Platform) -> Descriptor:
    """Pick the child manifest of ``index`` that best serves ``wanted``."""
    best: Optional[Tuple[int, int, Descriptor]] = None
    for position, child in enumerate(index.manifests):
        if child.platform is None:
            continue
        rank = _platform_rank(wanted, child.platform)
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, child)
    if best is None:
        offered = sorted({str(c.platform) for c in index.manifests
                          if c.platform is not None
                          and c.platform.os != "unknown"})
        raise PlatformNotFoundError(f"no manifest for platform {wanted} in index "
                                    f"{index.digest}; it offers: "
                                    f"{', '.join(offered) or 'no platforms'}",
                                    str(wanted), offered)
    return best[2]


def _referrer_descriptor(manifest: Manifest) -> Dict[str, Any]:
    """Return the descriptor a referrers list gives a manifest with a subject: its
    artifactType, else its config's media type (image-spec 1.1), and its annotations."""
    artifact_type = manifest.artifact_type or \
        (manifest.config.media_type if manifest.config is not None else "")
    descriptor: Dict[str, Any] = {"mediaType": manifest.media_type,
                                  "digest": manifest.digest, "size": manifest.size}
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if manifest.annotations:
        descriptor["annotations"] = manifest.annotations
    return descriptor


def _index_platforms(index: Manifest) -> List[Dict[str, str]]:
    """List the platforms of an index as ``{os, architecture, variant, digest}``."""
    result = []
    for child in index.manifests:
        if child.platform is None:
            continue
        result.append({"os": child.platform.os,
                       "architecture": child.platform.architecture,
                       "variant": child.platform.variant,
                       "digest": child.digest})
    return result


# =============================================================================
# 10. MANIFEST GRAPH: walking indexes, images and their blobs
# =============================================================================
# gc, export, import, index pulls (and push, children before their index)
# walk the same graph: an index points at manifests, a manifest at its
# config and layers.  Each node is visited once, however often it is listed.

_GraphNode = Tuple[Descriptor, Optional[Manifest]]


def _walk_graph(roots: Iterable[Descriptor], load: Callable[[Descriptor], Optional[Manifest]],
                *, post_order: bool = False) -> Iterator[_GraphNode]:
    """Yield (descriptor, manifest or None) for everything ``roots`` reach, each once.

    ``load`` returns the manifest a descriptor names, or None for a blob it
    will not descend into (a layer, a config; it may raise for one that is
    missing).  Pre-order yields a manifest before what it points at;
    ``post_order`` after, as a push must send them.  Iterative: a hostile
    layout cannot exhaust the stack with deeply nested indexes.
    """
    seen: set = set()
    stack: List[Tuple[Descriptor, Optional[Manifest], bool]] = [
        (root, None, False) for root in reversed(list(roots))]
    while stack:
        descriptor, manifest, expanded = stack.pop()
        if expanded:
            yield descriptor, manifest
            continue
        if descriptor.digest in seen:
            continue
        seen.add(descriptor.digest)
        manifest = load(descriptor)
        if post_order:
            stack.append((descriptor, manifest, True))
        else:
            yield descriptor, manifest
        if manifest is not None:
            stack.extend((child, None, False) for child in reversed(manifest.children))


# =============================================================================
# 11. WASM DETECTION
# =============================================================================
# Signals, most specific first (never the reference's name):
#   1. the manifest's OCI 1.1 artifactType;
#   2. the config media type (CNCF "Wasm OCI Artifact" v0, wasm-to-oci v1);
#   3. the layer media types (CNCF, wasm-to-oci, runwasi);
#   4. the config's os/architecture (what containerd's runwasi relies on)
#      and the CNCF config's "component" field;
#   5. the module bytes: "\0asm" then version 1 (core module) or the
#      component-model version/layer word.  Where verified bytes are at
#      hand they decide the WASI level, whatever the manifest says.

WASM_ARTIFACT_COMPONENT = "application/vnd.wasm.component.v1+wasm"
WASM_ARTIFACT_MODULE = "application/vnd.wasm.module.v1+wasm"
WASM_CONFIG_V0 = "application/vnd.wasm.config.v0+json"
WASM_CONFIG_V1 = "application/vnd.wasm.config.v1+json"
WASM_LAYER_MEDIA_TYPE = "application/wasm"
_WASM_CONFIG_TYPES = (WASM_CONFIG_V0, WASM_CONFIG_V1)
_WASM_LAYER_TYPES = (
    WASM_LAYER_MEDIA_TYPE,
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
)
_WASM_COMPONENT_LAYER_TYPES = (
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",)
_WASM_MAGIC = b"\0asm"
_WASM_CORE_VERSION = b"\x01\x00\x00\x00"
# Component-model binaries: version 0x0d and layer 1 (Binary.md, "preamble").
_WASM_COMPONENT_LAYER = b"\x01\x00"


class WasiVersion(enum.Enum):
    """The WASI level a WebAssembly artifact targets."""

    PREVIEW1 = "wasip1"
    PREVIEW2 = "wasip2"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    def is_preview1(self) -> bool:
        """Tell whether this is WASI preview 1 (a core module)."""
        return self is WasiVersion.PREVIEW1

    def is_preview2(self) -> bool:
        """Tell whether this is WASI preview 2 (a component)."""
        return self is WasiVersion.PREVIEW2

    def target_triple_suffix(self) -> str:
        """Return the whole Rust target triple for this level: ``wasm32-wasip1``,
        ``wasm32-wasip2``, or ``wasm32-wasi`` when unknown (the name is the Rust crate's)."""
        return {"wasip1": "wasm32-wasip1", "wasip2": "wasm32-wasip2"}.get(
            self.value, "wasm32-wasi")


@_value
class ArtifactType:
    """Whether an artifact is a container image or a WASM artifact (and which WASI)."""

    kind: str = "container"
    wasi: Optional[WasiVersion] = None

    @classmethod
    def container(cls) -> "ArtifactType":
        """Return the container-image artifact type."""
        return cls("container", None)

    @classmethod
    def wasm(cls, wasi_version: WasiVersion = WasiVersion.UNKNOWN) -> "ArtifactType":
        """Return the WASM artifact type for ``wasi_version``."""
        return cls("wasm", wasi_version)

    def __str__(self) -> str:
        return self.kind

    def is_wasm(self) -> bool:
        """Tell whether this is a WebAssembly artifact."""
        return self.kind == "wasm"

    def is_container(self) -> bool:
        """Tell whether this is a container image."""
        return self.kind == "container"

    def wasi_version(self) -> Optional[WasiVersion]:
        """Return the WASI version of a WASM artifact, None for a container."""
        return self.wasi


@_value
class WasmArtifactInfo:
    """Metadata of a WASM artifact: WASI level, the module's layer and name."""

    wasi_version: WasiVersion
    wasm_layer_digest: Optional[str] = None
    wasm_size: Optional[int] = None
    module_name: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """Return the JSON form used by the CLI."""
        return {"wasi_version": str(self.wasi_version),
                "wasm_layer_digest": self.wasm_layer_digest,
                "wasm_size": self.wasm_size, "module_name": self.module_name}


def wasi_version_from_bytes(preamble: bytes) -> Optional[WasiVersion]:
    """Tell a core module (wasip1) from a component (wasip2) by its first 8 bytes.

    Returns None when the bytes are not WebAssembly at all.
    """
    if len(preamble) < 8 or preamble[:4] != _WASM_MAGIC:
        return None
    if preamble[4:8] == _WASM_CORE_VERSION:
        return WasiVersion.PREVIEW1
    if preamble[6:8] == _WASM_COMPONENT_LAYER:
        return WasiVersion.PREVIEW2
    return WasiVersion.UNKNOWN


def _as_manifest_data(manifest: Union[Manifest, Mapping[str, Any]]) -> Mapping[str, Any]:
    """Accept our Manifest or the parsed manifest JSON."""
    return manifest.data if isinstance(manifest, Manifest) else manifest


def _wasm_layer(data: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """Return the first layer declared as WASM, if any."""
    for layer in data.get("layers") or []:
        if isinstance(layer, dict) and layer.get("mediaType") in _WASM_LAYER_TYPES:
            return layer
    return None


def _wasi_from_config(config: Optional[Mapping[str, Any]]) -> Optional[WasiVersion]:
    """Read the WASI level from an image or CNCF wasm config, if it says."""
    if not isinstance(config, dict):
        return None
    os_name = str(config.get("os") or "").lower()
    if os_name == "wasip2" or config.get("component"):
        return WasiVersion.PREVIEW2
    if os_name == "wasip1":
        return WasiVersion.PREVIEW1
    if os_name == "wasi" or config.get("architecture") == "wasm":
        return WasiVersion.UNKNOWN
    return None


def detect_artifact_type(manifest: Union[Manifest, Mapping[str, Any]],
                         config: Optional[Mapping[str, Any]] = None) -> ArtifactType:
    """Decide whether a manifest describes a container image or a WASM artifact.

    ``config`` (the parsed config blob, when at hand) adds the os /
    architecture and component signals.
    """
    data = _as_manifest_data(manifest)
    artifact_type = data.get("artifactType")
    if artifact_type == WASM_ARTIFACT_COMPONENT:
        return ArtifactType.wasm(WasiVersion.PREVIEW2)
    if artifact_type == WASM_ARTIFACT_MODULE:
        return ArtifactType.wasm(WasiVersion.PREVIEW1)
    config_wasi = _wasi_from_config(config)
    config_descriptor = data.get("config")
    config_type = (config_descriptor.get("mediaType")
                   if isinstance(config_descriptor, dict) else None)
    layer = _wasm_layer(data)
    is_wasm = (config_type in _WASM_CONFIG_TYPES or artifact_type in _WASM_CONFIG_TYPES
               or layer is not None or config_wasi is not None)
    if not is_wasm:
        return ArtifactType.container()
    if config_wasi not in (None, WasiVersion.UNKNOWN):
        return ArtifactType.wasm(config_wasi)
    if layer is not None and layer.get("mediaType") in _WASM_COMPONENT_LAYER_TYPES:
        return ArtifactType.wasm(WasiVersion.PREVIEW2)
    return ArtifactType.wasm(WasiVersion.UNKNOWN)


def extract_wasm_info(manifest: Union[Manifest, Mapping[str, Any]],
                      config: Optional[Mapping[str, Any]] = None
                      ) -> Optional[WasmArtifactInfo]:
    """Return the WASM metadata of a manifest, or None for a container image."""
    kind = detect_artifact_type(manifest, config)
    if not kind.is_wasm():
        return None
    data = _as_manifest_data(manifest)
    # Only a layer typed as WASM is the module: Docker's wasi/wasm images keep
    # theirs inside an ordinary filesystem layer, which is no module.
    layer = _wasm_layer(data)
    digest = size = name = None
    if layer is not None:
        digest = layer.get("digest") if isinstance(layer.get("digest"), str) else None
        size = layer.get("size") if isinstance(layer.get("size"), int) else None
        name = (layer.get("annotations") or {}).get("org.opencontainers.image.title")
    if not name and isinstance(config, dict):
        labels = (config.get("config") or {}).get("Labels") or {}
        name = (config.get("name") or config.get("title")
                or labels.get("org.opencontainers.image.title"))
    return WasmArtifactInfo(kind.wasi or WasiVersion.UNKNOWN, digest, size,
                            str(name) if name else None)


# =============================================================================
# 12. HTTP/1.1: headers and responses
# =============================================================================
# The part of http.client a registry client uses, written out: importing
# http.client (and with it the email package and ssl) is a large share of a
# cold CLI run's start-up.  One request at a time per connection, bodies
# framed by Content-Length, chunked coding (RFC 9112 section 7.1) or the end
# of the connection.  Framing errors are _HttpError, a connection error like
# a reset, so the registry client retries or resumes; response bodies are
# verified by size and digest above this layer.

class _HttpError(Exception):
    """The server broke HTTP/1.1: a malformed status line, header or chunk."""


class _RemoteDisconnected(ConnectionResetError):
    """The server closed the connection without answering (a stale keep-alive)."""


_CONNECTION_ERRORS: Tuple[type, ...] = (OSError, _HttpError)
# What a server may send before the body (http.client's limits).
_MAX_HEADER_LINE_BYTES = 65536
_MAX_HEADERS = 100
_MAX_INTERIM_ANSWERS = 10
# Request targets and header values must not smuggle a second request.
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_HEADER_VALUE = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class _Headers:
    """Response headers: case-insensitive lookup, repeated names kept in order."""

    def __init__(self, items: Sequence[Tuple[str, str]] = ()) -> None:
        self._items = list(items)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """Return the first value of a header, or ``default``."""
        name = name.lower()
        return next((v for k, v in self._items if k.lower() == name), default)

    def get_all(self, name: str) -> List[str]:
        """Return every value of a header, in order (empty when absent)."""
        name = name.lower()
        return [v for k, v in self._items if k.lower() == name]

    def items(self) -> List[Tuple[str, str]]:
        return list(self._items)


def _header_int(text: str) -> Optional[int]:
    """Parse a non-negative decimal header number: ASCII digits only (``str.isdigit``
    also takes "²"), at most 19 of them (past int()'s digit limit is a traceback)."""
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) else None


def _header_tokens(headers: _Headers, name: str) -> List[str]:
    """Return the comma-separated tokens of a header, lowercase (Connection, Transfer-Encoding)."""
    return [t.strip().lower() for v in headers.get_all(name) for t in v.split(",") if t.strip()]


class _RawResponse:
    """The status, headers and body stream of one response on a connection."""

    def __init__(self, reader: Any, method: str) -> None:
        self.fp: Any = reader       # None once the body is fully read (or abandoned)
        self.method = method
        self.status = 0
        self.reason = ""
        self.headers = _Headers()
        self.length: Optional[int] = None   # body bytes left; None: chunked or until close
        self.chunked = False
        self.will_close = True
        self._chunk_left = 0

    def begin(self) -> None:
        """Read the status line and headers, skipping interim 1xx answers."""
        for _ in range(_MAX_INTERIM_ANSWERS + 1):
            version, self.status, self.reason = self._status_line()
            items = self._header_lines()
            if not 100 <= self.status < 200:
                break
        else:
            raise _HttpError(f"more than {_MAX_INTERIM_ANSWERS} interim (1xx) answers")
        self.headers = _Headers(items)
        connection = _header_tokens(self.headers, "Connection")
        self.will_close = ("keep-alive" not in connection if version == "HTTP/1.0"
                           else "close" in connection)
        if self.method in ("HEAD", "CONNECT") or self.status in (204, 304):
            self.length = 0
        elif "chunked" in _header_tokens(self.headers, "Transfer-Encoding"):
            self.chunked = True
        else:
            self.length = self._content_length()
            if self.length is None:
                self.will_close = True  # the body ends when the connection does
        if self.length == 0:
            self.fp = None

    def _line(self, what: str) -> bytes:
        line = self.fp.readline(_MAX_HEADER_LINE_BYTES + 1)
        if len(line) > _MAX_HEADER_LINE_BYTES:
            raise _HttpError(f"{what} longer than {_MAX_HEADER_LINE_BYTES} bytes")
        return line

    def _status_line(self) -> Tuple[str, int, str]:
        line = self._line("status line")
        if not line:
            raise _RemoteDisconnected("the server closed the connection without answering")
        text = line.decode("latin-1").rstrip("\r\n")
        version, _, rest = text.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or _header_int(code) is None or len(code) != 3:
            raise _HttpError(f"malformed status line {text[:60]!r}")
        return version, int(code), reason.strip()

    def _header_lines(self) -> List[Tuple[str, str]]:
        items: List[List[str]] = []
        for _ in range(_MAX_HEADERS + 1):  # every line counts, folded ones too
            line = self._line("header line")
            if line in (b"\r\n", b"\n", b""):
                return [(name, value) for name, value in items]
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and items:  # obsolete line folding (RFC 9112 5.2)
                items[-1][1] = f"{items[-1][1]} {text.strip()}".strip()
                continue
            name, colon, value = text.partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                raise _HttpError(f"malformed header line {text[:60]!r}")
            items.append([name, value.strip()])
        raise _HttpError(f"more than {_MAX_HEADERS} header lines")

    def _content_length(self) -> Optional[int]:
        values = {v.strip() for v in ",".join(self.headers.get_all("Content-Length")).split(",")
                  if v.strip()}
        if not values:
            return None
        # Differing lengths are how responses get smuggled (RFC 9112 6.3).
        length = _header_int(values.pop()) if len(values) == 1 else None
        if length is None:
            raise _HttpError(f"invalid Content-Length {self.headers.get('Content-Length')!r:.60}")
        return length

    def isclosed(self) -> bool:
        """Tell whether the body is fully read (or abandoned)."""
        return self.fp is None

    def close(self) -> None:
        """Stop reading this body (the connection, not the response, owns the socket)."""
        if self.fp is not None:
            self.will_close = True
            self.fp = None

    def read(self, amount: Optional[int] = None) -> bytes:
        """Read the whole body, or until ``amount`` bytes; less when it ends early."""
        if amount is not None and amount < 0:  # file-object convention: read all
            amount = None
        parts = []
        while amount is None or amount > 0:
            try:
                data = self.read1(65536 if amount is None else min(amount, 1 << 20))
            except _HttpError:
                self.close()  # broken framing ends the body here; callers check sizes
                break
            if not data:
                break
            parts.append(data)
            if amount is not None:
                amount -= len(data)
        return b"".join(parts)

    def read1(self, amount: int) -> bytes:
        """Read what one socket read brings, at most ``amount`` bytes; b"" at the end."""
        view = memoryview(bytearray(max(amount, 0)))
        count = self.readinto1(view)
        return bytes(view[:count])

    def readinto1(self, view: memoryview) -> int:
        """Receive into ``view`` what one socket read brings; 0 at the end of the body."""
        if self.fp is None or not len(view):
            return 0
        if self.chunked:
            if not self._chunk_left and not self._next_chunk():
                return 0
            view = view[:self._chunk_left]
        elif self.length is not None:
            view = view[:self.length]
        count = self.fp.readinto1(view)
        if not count:
            self.close()  # the server closed early (or ended an until-close body)
            if self.chunked:
                raise _HttpError("the connection closed in the middle of a chunk")
            return 0
        if self.chunked:
            self._chunk_left -= count
            if not self._chunk_left and self._line("chunk end") not in (b"\r\n", b"\n"):
                self.close()
                raise _HttpError("chunk data longer than its size")
        elif self.length is not None:
            self.length -= count
            if not self.length:
                self.fp = None
        return count

    def _next_chunk(self) -> bool:
        """Read a chunk-size line; at the last chunk, the trailers too (False then)."""
        line = self._line("chunk size")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            self.close()
            raise _HttpError(f"malformed chunk size {line[:40]!r}") from None
        if size < 0:
            self.close()
            raise _HttpError(f"malformed chunk size {line[:40]!r}")
        if size:
            self._chunk_left = size
            return True
        for _ in range(_MAX_HEADERS + 1):
            if self._line("trailer") in (b"\r\n", b"\n", b""):
                self.fp = None
                return False
        self.close()
        raise _HttpError(f"more than {_MAX_HEADERS} trailer lines")


# =============================================================================
# 13. HTTP/1.1: request bodies and connections
# =============================================================================
# A request goes out as its head, then its body (a _RequestBody: bytes, a
# file streamed from disk, or an iterator), on a connection that is plain,
# TLS, or TLS through a proxy's CONNECT tunnel.

def _request_head(request_line: str, fields: Mapping[str, str]) -> bytes:
    """Encode a request line and header fields; refuse a value that would split the request."""
    lines = [request_line]
    for name, value in fields.items():
        if not _HEADER_NAME.fullmatch(name) or _UNSAFE_HEADER_VALUE.search(str(value)):
            raise ValueError(f"the {name!r} header holds a line break (credentials?)")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _host_header(scheme: str, host: str, port: int) -> str:
    """Return the Host header value for a URL's host and port (default ports left out)."""
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


class _RequestBody:
    """A request body: its length, how it goes onto a socket, and whether it can go again.

    The interface of what ``_Transport.send`` takes (bytes are wrapped in a
    ``_BytesBody``).  A ``replayable`` body is sent again when a kept-alive
    connection turns out closed, after a redirect or a 401, and by retries;
    one that is not (an iterator's) is sent once, whatever happens.
    """

    def __init__(self, length: int, replayable: bool) -> None:
        if length < 0:
            raise ValueError("a request body cannot have a negative length")
        self.length = length
        self.replayable = replayable

    def send(self, sock: Any, tls: bool) -> None:
        """Send the whole body on ``sock`` (``tls``: the socket encrypts)."""
        raise NotImplementedError


class _BytesBody(_RequestBody):
    """A body held in memory (small ones: manifests, token forms)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(len(data), True)
        self.data = data

    def send(self, sock: Any, tls: bool) -> None:
        sock.sendall(self.data)


# A plain connection's file body goes out by sendfile in pieces this large,
# each followed by a progress report.
_SENDFILE_PIECE_BYTES = 8 * 1024 * 1024


class _FileBody(_RequestBody):
    """``length`` bytes of a file from ``offset``, streamed: never held in memory.

    Plain connections use ``socket.sendfile`` (the kernel copies the file to
    the socket); TLS ones send it in ``_READ_CHUNK_BYTES`` pieces, larger than
    the 8 KiB ``socket.sendfile`` would use for them.  Replayable: every send
    starts again at ``offset``.  ``progress(sent)`` follows it, every
    ``_SENDFILE_PIECE_BYTES``; ``sent`` is what the last send got out.
    """

    def __init__(self, file: BinaryIO, offset: int = 0, length: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None,
                 ready: Optional[Callable[[int, int], int]] = None) -> None:
        if length is None:
            length = os.fstat(file.fileno()).st_size - offset
        # ``ready(start, end)`` serves a file still being written: it blocks until
        # bytes from ``start`` may be sent and returns how far (at most ``end``),
        # or raises to break the request off.  Such a body is sent once only.
        super().__init__(length, ready is None)
        self.file, self.offset, self._progress, self._ready = file, offset, progress, ready
        self.sent = 0

    def send(self, sock: Any, tls: bool) -> None:
        self.sent = 0
        self.file.seek(self.offset)
        try:
            fd: Optional[int] = self.file.fileno()
        except (OSError, AttributeError, ValueError):
            fd = None
        while self.sent < self.length:
            want = min(self.length - self.sent, _SENDFILE_PIECE_BYTES if not tls
                       else _READ_CHUNK_BYTES)
            if self._ready is not None:
                start = self.offset + self.sent
                want = max(1, min(want, self._ready(start, start + want) - start))
            if tls:
                # pread: parts of one file go up on several threads at once (S3
                # multipart), so the shared file position is never relied on.
                chunk = os.pread(fd, want, self.offset + self.sent) if fd is not None \
                    else self.file.read(want)
                sock.sendall(chunk)
                count = len(chunk)
            else:
                count = sock.sendfile(self.file, self.offset + self.sent, want)
            if not count:
                raise ValueError(f"the body file ended after {self.sent} of "
                                 f"{self.length} bytes")
            self.sent += count
            if self._progress is not None:
                self._progress(self.sent)


class _IterBody(_RequestBody):
    """A body produced by an iterator of byte strings, declared ``length`` long; not replayable."""

    def __init__(self, chunks: Iterable[bytes], length: int) -> None:
        super().__init__(length, False)
        self._chunks = iter(chunks)
        self._used = False

    def send(self, sock: Any, tls: bool) -> None:
        if self._used:
            raise ValueError("a body read from an iterator cannot be sent twice")
        self._used = True
        sent = 0
        for chunk in self._chunks:
            sent += len(chunk)
            if sent > self.length:
                raise ValueError(f"the body is longer than its {self.length} bytes")
            sock.sendall(chunk)
        if sent != self.length:
            raise ValueError(f"the body ended after {sent} of its {self.length} bytes")


def _as_body(body: Union[None, bytes, _RequestBody]) -> Optional[_RequestBody]:
    """Return ``body`` as a _RequestBody (bytes are wrapped), or None."""
    if body is None or isinstance(body, _RequestBody):
        return body
    return _BytesBody(bytes(body))


# A body this small goes out in one send with the request head.
_SMALL_BODY_BYTES = 64 * 1024


class _Connection:
    """One HTTP/1.1 connection: plain, TLS, or TLS through a proxy's CONNECT tunnel.

    ``tunnel`` is (host, port, proxy headers) of the registry when this
    connects to a proxy; TLS then runs end to end with the registry.
    """

    def __init__(self, host: str, port: int, timeout_s: float, *, context: Any = None,
                 tunnel: Optional[Tuple[str, int, Mapping[str, str]]] = None) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.context, self.tunnel = context, tunnel
        self.proxy_headers: Dict[str, str] = {}  # sent with every request (forward proxy)
        self._sock: Any = None
        self._reader: Any = None
        self._method = "GET"
        self._send_error: Optional[OSError] = None

    def request(self, method: str, target: str, *, host: str,
                headers: Mapping[str, str], body: Optional[_RequestBody] = None) -> None:
        """Send one request, connecting first if this connection is new.

        A server may answer before it has read the whole body (a 401, a 413)
        and close: the send then fails, and ``getresponse`` still reads that
        answer if there is one.
        """
        if _UNSAFE_TARGET.search(target):
            raise ValueError("the request target holds control characters or spaces")
        fields = {"Host": host, "Accept-Encoding": "identity", **headers, **self.proxy_headers}
        if body is not None or method in ("POST", "PUT", "PATCH"):
            fields["Content-Length"] = str(body.length if body is not None else 0)
        head = _request_head(f"{method} {target} HTTP/1.1", fields)
        if self._sock is None:
            self._open()
        self._method = method
        self._send_error = None
        if isinstance(body, _BytesBody) and body.length <= _SMALL_BODY_BYTES:
            self._sock.sendall(head + body.data)
            return
        self._sock.sendall(head)
        if body is not None and body.length:
            try:
                body.send(self._sock, self.context is not None)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                self._send_error = exc

    def getresponse(self) -> _RawResponse:
        """Read the status line and headers of the answer to the last request."""
        response = _RawResponse(self._reader, self._method)
        try:
            response.begin()
        except BaseException as exc:
            self.close()
            if self._send_error is not None and isinstance(exc, _CONNECTION_ERRORS):
                raise self._send_error from None  # no answer: the send's failure says why
            raise
        if self._send_error is not None:
            response.will_close = True  # the server stopped reading the body
        return response

    def _open(self) -> None:
        import socket
        # A bytes host skips the idna codec's import (names are ASCII by the
        # reference grammar).
        address = (self.host.encode("ascii") if self.host.isascii() else self.host, self.port)
        sock = socket.create_connection(address, self.timeout_s)
        try:
            tls_host = self.host
            if self.tunnel is not None:
                tls_host = self.tunnel[0]
                self._connect_tunnel(sock)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=tls_host)
        except BaseException:
            sock.close()
            raise
        self._sock, self._reader = sock, sock.makefile("rb")

    def _connect_tunnel(self, sock: Any) -> None:
        """Ask the proxy for a tunnel to the registry (RFC 9110 9.3.6)."""
        t_host, t_port, t_headers = self.tunnel
        authority = f"[{t_host}]:{t_port}" if ":" in t_host else f"{t_host}:{t_port}"
        if _UNSAFE_TARGET.search(authority):
            raise ValueError("the tunnel's host name holds control characters or spaces")
        sock.sendall(_request_head(f"CONNECT {authority} HTTP/1.1",
                                   {"Host": authority, **t_headers}))
        # Unbuffered: not a byte of what follows (the TLS handshake) may be read ahead.
        reader = sock.makefile("rb", buffering=0)
        response = _RawResponse(_UnbufferedLines(reader), "CONNECT")
        response.begin()
        if not 200 <= response.status < 300:
            raise OSError(f"proxy refused the tunnel to {authority}: "
                          f"{response.status} {response.reason}")

    def is_dropped(self) -> bool:
        """Tell whether an idle connection has been closed (or spoken on) by the server.

        Checked before a body that cannot be sent twice goes on a pooled
        connection: a stale one would swallow it.
        """
        if self._sock is None:
            return False
        import select
        try:
            return bool(select.select([self._sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def shutdown(self) -> None:
        """End the socket for both directions: a read blocked in another thread returns.

        Safe while another thread uses the connection, unlike ``close()``
        (whose file descriptor number could be reused under that thread).
        """
        sock = self._sock
        if sock is not None:
            import socket
            try:
                # socket.socket's own method, also for TLS: SSLSocket.shutdown
                # would drop the TLS state a reading thread is still using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close the socket (a later request reconnects)."""
        for closable in (self._reader, self._sock):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self._sock = self._reader = None


class _UnbufferedLines:
    """readline() over a raw socket file one byte at a time (the CONNECT answer only)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def readline(self, limit: int) -> bytes:
        line = bytearray()
        while len(line) < limit and not line.endswith(b"\n"):
            byte = self._raw.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)


# =============================================================================
# 14. TRANSPORT: keep-alive pooling and proxies
# =============================================================================
# urllib.request opens a new connection (and TLS handshake) per request;
# here each (thread, scheme, host, port, certificate checked or not) keeps one
# pooled connection.
# Redirects, auth and retries are the registry client's job (section 19);
# this layer only sends one request.

def _split_url(url: str) -> Tuple[str, str, int, str]:
    """Split an absolute http(s) URL into (scheme, host, port, path+query)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise RegistryError(f"unsupported URL scheme in {_redact_url(url)}",
                            url=_redact_url(url))
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    try:
        host, port = _split_host_port(authority)
    except ValueError as exc:
        raise RegistryError(f"malformed URL {_redact_url(url)}: {exc}") from exc
    if not host or (port is not None and not 0 < port < 65536):
        raise RegistryError(f"URL without a valid host and port: {_redact_url(url)}")
    if not host.isascii() or _UNSAFE_TARGET.search(host):
        # Registry names are ASCII (the reference grammar); a redirect or a
        # token realm naming another host must be too, and carry no line breaks.
        raise RegistryError(f"URL with an invalid host name: {_redact_url(url)}")
    return scheme, host, port or (443 if scheme == "https" else 80), "/" + path


def _origin(url: str) -> Tuple[str, str, int]:
    """Return (scheme, lowercase host, port) of a URL."""
    scheme, host, port, _ = _split_url(url)
    return scheme, host.lower(), port


@_value
class _ProxySettings:
    """Proxy URLs and the NO_PROXY list, read once from the environment."""

    http: str = ""
    https: str = ""
    no_proxy: Tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "_ProxySettings":
        """Read HTTP(S)_PROXY and NO_PROXY (either case, lowercase first, like curl)."""
        def get(name: str) -> str:
            return environ.get(name.lower()) or environ.get(name.upper()) or ""
        no_proxy = tuple(p.strip().lower() for p in get("no_proxy").split(",") if p.strip())
        return cls(http=get("http_proxy"), https=get("https_proxy"), no_proxy=no_proxy)

    def proxy_for(self, scheme: str, host: str, port: int) -> str:
        """Return the proxy URL for a target, or '' to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        # Like Go's net/http, loopback targets never go through a proxy.
        if not proxy or _is_loopback_host(host):
            return ""
        host = host.strip("[]").lower()
        host_ip = _ip_address(host)
        if any(entry == "*" or _no_proxy_covers(entry, host, host_ip, port)
               for entry in self.no_proxy):
            return ""
        return proxy if "://" in proxy else f"http://{proxy}"


def _no_proxy_covers(entry: str, host: str, host_ip: Any, port: int) -> bool:
    """Tell whether one NO_PROXY entry covers ``host``:``port`` (``host_ip``: its address).

    Entries as Go's net/http and curl read them: a domain (covering its
    subdomains; a leading "." or "*." means the same), ``host:port``, an IP
    address (IPv6 bare, or in brackets when a port follows) or a CIDR range.
    IP addresses compare as addresses, so ``::1`` covers ``0:0::1`` and
    ``10.0.0.0/8`` covers ``::ffff:10.0.0.1``.
    """
    if "/" in entry:
        try:
            import ipaddress
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
        return host_ip is not None and host_ip in network
    try:
        name, entry_port = _split_name_port(entry)
    except ValueError:
        return False
    if entry_port is not None and entry_port != port:
        return False
    entry_ip = _ip_address(name)
    if entry_ip is not None or host_ip is not None:
        return entry_ip is not None and entry_ip == host_ip
    name = name.lstrip("*").lstrip(".")
    return bool(name) and (host == name or host.endswith("." + name))


class _Response:
    """One HTTP response; returns its connection to the pool once fully read."""

    def __init__(self, transport: "_Transport", key: Any, connection: Any,
                 raw: Any, url: str, method: str) -> None:
        self._transport = transport
        self._key = key
        self._connection = connection
        self._raw = raw
        self.url = url
        self.method = method
        self.status: int = raw.status
        self.headers = raw.headers

    @property
    def length_left(self) -> Optional[int]:
        """Body bytes still to come per Content-Length (None: chunked or until close)."""
        return 0 if self._raw.isclosed() else self._raw.length

    def header(self, name: str, default: str = "") -> str:
        """Return a response header (case-insensitive)."""
        value = self.headers.get(name)
        return default if value is None else str(value)

    def read(self, amount: Optional[int] = None) -> bytes:
        """Read from the body."""
        data = self._raw.read(amount)
        self._finish()
        return data

    def readinto1(self, view: memoryview) -> int:
        """Receive into ``view`` what one socket read brings; 0 at end of body."""
        count = self._raw.readinto1(view)
        self._finish()
        return count

    readinto = readinto1  # a raw stream's readinto may return less than asked

    def _finish(self) -> None:
        """Return the connection to the pool when the body is fully read."""
        if self._connection is not None and self._raw.isclosed() \
                and not self._raw.will_close:
            self._transport._release(self._key, self._connection)
            self._connection = None

    def close(self) -> None:
        """Discard the rest of the body; the connection is closed unless reusable."""
        if self._connection is None:
            self._raw.close()
            return
        if self._raw.isclosed():
            self._finish()
        if self._connection is not None:
            # Not worth draining a body to save a handshake.  A response
            # without Content-Length owns the socket, so close it as well.
            self._raw.close()
            self._connection.close()
            self._connection = None

    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _import_ssl() -> Any:
    """Return the ssl module, or raise a RegistryError on a Python built without it."""
    try:
        import ssl
    except ImportError as exc:  # Pythons built without OpenSSL
        raise RegistryError("https needs the 'ssl' module, which this Python lacks; "
                            "use a Python built with OpenSSL") from exc
    return ssl


class _Transport:
    """Sends single HTTP requests over pooled keep-alive connections."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 proxies: Optional[_ProxySettings] = None,
                 ssl_context: Any = None) -> None:
        self.timeout_s = timeout_s
        self.proxies = proxies or _ProxySettings()
        self._ssl_context = ssl_context
        self._unverified_context: Any = None
        self._local = threading.local()
        self.request_count = 0
        self._count_lock = threading.Lock()
        import weakref
        self._connections: Any = weakref.WeakSet()  # every thread's, for shutdown()

    def _pool(self) -> Dict[Any, Any]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _context(self, verify: bool = True) -> Any:
        """Return the TLS context: the given or default one, or (``verify``
        false, for an --insecure registry) one that checks no certificate."""
        if verify:
            if self._ssl_context is None:
                self._ssl_context = _import_ssl().create_default_context()
            return self._ssl_context
        if self._unverified_context is None:
            ssl = _import_ssl()
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._unverified_context = context
        return self._unverified_context

    def _connect(self, scheme: str, host: str, port: int,
                 verify: bool = True) -> Tuple[_Connection, bool]:
        """Make a connection (it connects on first use); returns it and whether
        requests need absolute URLs."""
        context = self._context(verify) if scheme == "https" else None
        proxy = self.proxies.proxy_for(scheme, host, port)
        if not proxy:
            return _Connection(host, port, self.timeout_s, context=context), False
        p_scheme, p_host, p_port, _ = _split_url(proxy)
        if p_scheme != "http":
            # Speaking plain HTTP to an https:// proxy would send its
            # Proxy-Authorization in the clear.
            raise RegistryError(f"proxy {_redact_url(proxy)}: only http:// proxies are "
                                "supported (https registries still get TLS end to end)")
        userinfo = proxy.partition("://")[2].partition("/")[0].rpartition("@")[0]
        proxy_headers = {}
        if userinfo:
            from urllib.parse import unquote
            proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
                unquote(userinfo).encode()).decode()
        if scheme == "https":
            # CONNECT tunnel: TLS runs end to end to the registry, so the
            # proxy sees neither the Authorization header nor the blobs.
            return _Connection(p_host, p_port, self.timeout_s, context=context,
                               tunnel=(host, port, proxy_headers)), False
        conn = _Connection(p_host, p_port, self.timeout_s)
        conn.proxy_headers = proxy_headers
        return conn, True

    def send(self, method: str, url: str, headers: Mapping[str, str],
             body: Union[None, bytes, _RequestBody] = None, verify: bool = True) -> _Response:
        """Send one request and return the response with its body unread.

        ``verify=False`` skips the certificate check (an --insecure registry).
        A pooled connection the server has closed is replaced by a fresh one
        once, unless the body cannot be sent twice.
        """
        body = _as_body(body)
        resendable = body is None or body.replayable
        scheme, host, port, path = _split_url(url)
        verify = verify or scheme != "https"
        key = (scheme, host.lower(), port, verify)
        pool = self._pool()
        for attempt in (0, 1):
            reused = key in pool
            connection, absolute = pool.pop(key) if reused else \
                self._connect(scheme, host, port, verify)
            if reused and not resendable and connection.is_dropped():
                connection.close()  # it would take the body down with it: a fresh one
            target = url if absolute else path
            with self._count_lock:
                self.request_count += 1
                if not reused:
                    self._connections.add(connection)
            try:
                connection.request(method, target, host=_host_header(scheme, host, port),
                                   headers=headers, body=body)
            except _CONNECTION_ERRORS:  # first: a TLS verify failure is a ValueError too
                connection.close()
                if reused and attempt == 0 and resendable:
                    continue
                raise
            except ValueError as exc:  # a value that would break the request apart
                connection.close()
                # Never the value itself: it may be a credential.
                detail = ("a header value (credentials?) or the URL holds a character "
                          "outside Latin-1" if isinstance(exc, UnicodeError) else str(exc))
                raise RegistryError(f"cannot send {method} {_redact_url(url)}: {detail}",
                                    method=method, url=_redact_url(url)) from None
            try:
                raw = connection.getresponse()
            except _CONNECTION_ERRORS:
                connection.close()
                # A pooled keep-alive connection the server has closed fails
                # on first use; one fresh attempt is not a retry.
                if reused and attempt == 0 and resendable:
                    continue
                raise
            if method == "HEAD":
                raw.read()
            return _Response(self, (key, absolute), connection, raw, url, method)
        raise AssertionError("unreachable")

    def _release(self, key: Any, connection: Any) -> None:
        (pool_key, absolute) = key
        pool = self._pool()
        old = pool.get(pool_key)
        if old is not None and old is not connection:
            old[0].close()
        pool[pool_key] = (connection, absolute)

    def shutdown(self) -> None:
        """Shut down every thread's connections, so blocked reads end (Ctrl-C, SIGTERM)."""
        with self._count_lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()

    def close(self) -> None:
        """Close this thread's pooled connections."""
        pool = self._pool()
        for connection, _ in pool.values():
            connection.close()
        pool.clear()


# =============================================================================
# 15. RETRIES: which requests are sent again, and when
# =============================================================================
# Shared by every client of the transport.  A request that got no answer, or
# a retryable status, is sent again after a jittered exponential backoff
# (at least what Retry-After asks), as its method allows: GET, HEAD, DELETE,
# and PUT and POST with a replayable body; never PATCH, whose chunk the
# server may have taken (an upload re-syncs from its status instead).

_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NEVER_RESENT_METHODS = frozenset({"PATCH"})


def _is_name_error(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a DNS failure (not worth retrying)."""
    import socket
    return isinstance(exc, socket.gaierror)


def _tls_refusal(exc: BaseException, suggest_insecure: bool = True) -> Optional[str]:
    """Return the rest of a message for a TLS failure no retry can fix, or None.

    ``suggest_insecure`` is false where --insecure would not help: it was
    given, or the host is not the registry (a blob redirect's target).
    """
    ssl = sys.modules.get("ssl")  # not imported: no TLS was attempted
    if ssl is None or not isinstance(exc, ssl.SSLError):
        return None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"presented a TLS certificate that is not trusted ({exc.verify_message}); "
                "for a private CA, point SSL_CERT_FILE at its certificate"
                + (" (or skip the check with --insecure)" if suggest_insecure else ""))
    if exc.reason == "WRONG_VERSION_NUMBER":  # what a plain HTTP answer looks like to TLS
        return "does not speak TLS: it may serve plain http" + (
            " (allow that with --insecure)" if suggest_insecure else "")
    return None


def _parse_retry_after(value: str, clock: Callable[[], float]) -> Optional[float]:
    """Parse Retry-After (delta seconds or HTTP date) into seconds from now."""
    value = value.strip()
    if not value:
        return None
    seconds = _header_int(value)
    if seconds is not None:
        return float(seconds)
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - clock())


def _backoff_delay(attempt: int, retry_after_s: Optional[float]) -> float:
    """Return the wait before retry ``attempt`` (0-based): jittered exponential,
    at least what Retry-After asked for, up to RETRY_AFTER_MAX_S."""
    import random
    delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * (2 ** attempt))
    delay *= 0.5 + random.random() / 2
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_MAX_S))
    return delay


def _may_resend(method: str, body: Optional[_RequestBody]) -> bool:
    """Tell whether a request may be sent again (see this section's comment)."""
    return method not in _NEVER_RESENT_METHODS and (body is None or body.replayable)


def _send_with_retries(send: Callable[[], "_Response"], method: str, *, retries: int,
                       wait: Callable[[int, Optional[float]], None],
                       unanswered: Callable[[BaseException, bool], Optional[BaseException]],
                       body: Optional[_RequestBody] = None,
                       clock: Callable[[], float] = time.time) -> "_Response":
    """Run ``send`` again on connection errors and retryable statuses, as the method allows.

    ``wait(attempt, retry_after_s)`` sleeps before attempt ``attempt + 1``.
    ``unanswered(exc, last)`` returns the error to raise for an attempt that
    got no answer (``last``: none may follow), or None to try again.  A
    retryable status is returned as it is once no attempt is left, or when
    the method may not be sent again.
    """
    resend = _may_resend(method, body)
    attempt = 0
    while True:
        try:
            response = send()
        except ZLayerError:
            raise
        except _CONNECTION_ERRORS as exc:
            error = unanswered(exc, attempt >= retries or not resend)
            if error is not None:
                raise error from exc
            wait(attempt, None)
            attempt += 1
            continue
        if resend and response.status in _RETRYABLE_STATUSES and attempt < retries:
            retry_after = _parse_retry_after(response.header("Retry-After"), clock)
            response.close()
            wait(attempt, retry_after)
            attempt += 1
            continue
        return response


# =============================================================================
# 16. CREDENTIALS: RegistryAuth, docker and podman files, credential helpers
# =============================================================================

class RegistryAuth:
    """Credentials for one registry: anonymous, basic, bearer or identity token.

    Secrets never appear in ``repr()`` or ``str()``.
    """

    __slots__ = ("kind", "username", "password", "token", "identity_token", "source")

    def __init__(self, kind: str = "anonymous", *, username: str = "",
                 password: str = "", token: str = "", identity_token: str = "",
                 source: str = "") -> None:
        if kind not in ("anonymous", "basic", "bearer"):
            raise ValueError(f"unknown auth kind {kind!r}")
        self.kind = kind
        self.username = username
        self.password = password
        self.token = token
        self.identity_token = identity_token
        self.source = source

    @classmethod
    def anonymous(cls) -> "RegistryAuth":
        """Return anonymous access (token auth still runs, without credentials)."""
        return cls("anonymous")

    @classmethod
    def basic(cls, username: str, password: str) -> "RegistryAuth":
        """Return username/password credentials."""
        return cls("basic", username=username, password=password)

    @classmethod
    def bearer(cls, token: str) -> "RegistryAuth":
        """Return a bearer token sent as it is to the registry."""
        return cls("bearer", token=token)

    @classmethod
    def identity(cls, identity_token: str, username: str = "") -> "RegistryAuth":
        """Return an OAuth2 refresh (identity) token, as ``docker login`` stores one."""
        return cls("basic", username=username, identity_token=identity_token)

    def __repr__(self) -> str:
        parts = [f"kind={self.kind!r}"]
        if self.username:
            parts.append(f"username={self.username!r}")
        if self.password or self.token or self.identity_token:
            parts.append("secret=<redacted>")
        if self.source:
            parts.append(f"source={self.source!r}")
        return f"RegistryAuth({', '.join(parts)})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegistryAuth) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__ if n != "source")

    def __hash__(self) -> int:
        return hash((self.kind, self.username))

    @property
    def has_credentials(self) -> bool:
        """Tell whether there is anything secret to send."""
        return bool(self.password or self.token or self.identity_token)

    def basic_header(self) -> str:
        """Return the ``Authorization: Basic`` value for these credentials."""
        raw = f"{self.username}:{self.password}".encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")

    @classmethod
    def from_docker_config(cls, registry: str, *,
                           environ: Optional[Mapping[str, str]] = None,
                           run_helper: Optional[Callable[[str, str], Mapping[str, str]]] = None,
                           auth_file: Optional[str] = None) -> "RegistryAuth":
        """Look up credentials for ``registry`` the way docker and podman do.

        Order: ``credHelpers`` for the registry, then ``auths`` entries in
        ``$DOCKER_CONFIG/config.json`` (or ``~/.docker/config.json``), then
        ``credsStore``, then podman's ``$REGISTRY_AUTH_FILE`` or
        ``$XDG_RUNTIME_DIR/containers/auth.json``.  ``auth_file`` (skopeo's
        ``--authfile``) replaces all of those files with one, which must be
        readable JSON.  Nothing found, or a helper that fails, means
        anonymous (a helper failure warns).
        """
        env = os.environ if environ is None else environ
        runner = run_helper or _run_credential_helper
        keys = _registry_config_keys(registry)
        if auth_file is not None:
            docker_config = _load_json_file(auth_file, required=True)
        else:
            docker_config = _load_json_file(_docker_config_path(env))
        helpers = docker_config.get("credHelpers") or {}
        for key in keys:
            if isinstance(helpers, dict) and helpers.get(key):
                found = _auth_from_helper(str(helpers[key]), registry, runner)
                if found is not None:
                    return found
                break
        found = _auth_from_auths(docker_config.get("auths"), keys,
                                 auth_file if auth_file is not None else "docker config")
        if found is not None:
            return found
        store = docker_config.get("credsStore")
        if isinstance(store, str) and store:
            found = _auth_from_helper(store, registry, runner)
            if found is not None:
                return found
        for path in _podman_auth_paths(env) if auth_file is None else []:
            found = _auth_from_auths(_load_json_file(path).get("auths"), keys, path)
            if found is not None:
                return found
        return cls.anonymous()


def _registry_config_keys(registry: str) -> List[str]:
    """Return the config keys that may hold credentials for ``registry``."""
    if registry in (_DOCKER_HUB, "index.docker.io", _DOCKER_HUB_API_HOST):
        return [_DOCKER_HUB_CONFIG_KEY, "docker.io", "index.docker.io",
                _DOCKER_HUB_API_HOST, "https://index.docker.io/v1",
                "https://registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}"]


def _normalize_config_key(key: str) -> str:
    """Reduce an ``auths`` key (``https://host/v1/``) to its host."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


def _docker_config_path(env: Mapping[str, str]) -> str:
    directory = env.get("DOCKER_CONFIG") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def _podman_auth_paths(env: Mapping[str, str]) -> List[str]:
    if env.get("REGISTRY_AUTH_FILE"):
        return [env["REGISTRY_AUTH_FILE"]]
    if env.get("XDG_RUNTIME_DIR"):
        return [os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json")]
    return []


def _load_json_file(path: str, required: bool = False) -> Dict[str, Any]:
    """Load a JSON object from ``path``; missing or broken files give {} (with a
    warning), or an AuthError when the file is ``required`` (named by the user)."""
    try:
        with open(path, "rb") as f:
            data = _loads_json(f.read(MAX_MANIFEST_SIZE_BYTES))
    except FileNotFoundError as exc:
        if required:
            raise AuthError(f"cannot read credentials file {path}: no such file") from exc
        return {}
    except (OSError, ValueError) as exc:
        # Never the text of the file (secrets): where JSON broke, or the OS error.
        if isinstance(exc, json.JSONDecodeError):
            detail = f"not JSON (line {exc.lineno}, column {exc.colno})"
        elif isinstance(exc, OSError) and exc.strerror:
            detail = exc.strerror
        else:
            detail = exc.__class__.__name__
        if required:
            raise AuthError(f"cannot read credentials file {path}: {detail}") from None
        _warn(f"ignoring credentials file {path}: {detail}")
        return {}
    if not isinstance(data, dict) and required:
        raise AuthError(f"credentials file {path} does not hold a JSON object")
    return data if isinstance(data, dict) else {}


def _auth_from_auths(auths: Any, keys: Sequence[str], source: str) -> Optional[RegistryAuth]:
    """Find an ``auths`` entry for any of ``keys`` with usable credentials."""
    if not isinstance(auths, dict):
        return None
    wanted = {_normalize_config_key(k) for k in keys}
    for key in sorted(auths, key=lambda k: k not in keys):
        entry = auths[key]
        if _normalize_config_key(key) not in wanted or not isinstance(entry, dict):
            continue
        username, password = entry.get("username") or "", entry.get("password") or ""
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"])).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                _warn(f"ignoring malformed 'auth' for {_normalize_config_key(key)} in {source}")
                continue
            username, _, password = decoded.partition(":")
        if entry.get("identitytoken"):
            return RegistryAuth("basic", username=str(username),
                                identity_token=str(entry["identitytoken"]), source=source)
        if entry.get("registrytoken"):
            return RegistryAuth("bearer", token=str(entry["registrytoken"]), source=source)
        if username or password:
            return RegistryAuth("basic", username=str(username),
                                password=str(password), source=source)
    return None


def _run_credential_helper(name: str, server_url: str) -> Mapping[str, str]:
    """Run ``docker-credential-NAME get`` and return its JSON answer."""
    import subprocess
    completed = subprocess.run([f"docker-credential-{name}", "get"],
                               input=server_url.encode(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=30, check=False)
    if completed.returncode != 0:
        # Helpers print "credentials not found in native keychain" here;
        # the text is theirs, not a secret, but keep only its first line.
        first = completed.stdout.decode(errors="replace").strip().splitlines()[:1]
        raise OSError(f"exit {completed.returncode}{': ' + first[0] if first else ''}")
    return _json_object(completed.stdout)


def _auth_from_helper(name: str, registry: str, runner: Callable[[str, str], Mapping[str, str]]
                      ) -> Optional[RegistryAuth]:
    """Ask a credential helper; None (with a warning) when it fails or has nothing."""
    server_url = _DOCKER_HUB_CONFIG_KEY if registry == _DOCKER_HUB else registry
    try:
        answer = runner(name, server_url)
    except FileNotFoundError:
        _warn(f"credential helper docker-credential-{name} is not installed; "
              f"pulling from {registry} anonymously")
        return None
    except (OSError, ValueError) as exc:
        _warn(f"credential helper docker-credential-{name} failed for {registry} "
              f"({str(exc)[:200]}); pulling anonymously")
        return None
    username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    if not secret:
        return None
    source = f"docker-credential-{name}"
    if username == "<token>":
        return RegistryAuth("basic", identity_token=secret, source=source)
    return RegistryAuth("basic", username=username, password=secret, source=source)


# =============================================================================
# 17. TOKEN AUTH: challenges, token requests, the token cache
# =============================================================================
# Docker token auth (the distribution spec's): a 401 names a realm, a
# service and a scope; the client asks the realm for a bearer token (a GET
# with basic credentials, or the OAuth2 refresh-token POST) and sends it.

@_value
class _Challenge:
    """One WWW-Authenticate challenge: scheme (lowercase) and parameters."""

    scheme: str
    params: Mapping[str, str]


_CHALLENGE_TOKEN_RE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*')


def _parse_www_authenticate(header: str) -> List[_Challenge]:
    """Parse a WWW-Authenticate header (RFC 7235) into challenges."""
    challenges: List[_Challenge] = []
    pos, length = 0, len(header)
    current: Optional[Tuple[str, Dict[str, str]]] = None
    while pos < length:
        match = _CHALLENGE_TOKEN_RE.match(header, pos)
        if not match:
            pos += 1
            continue
        token, pos = match.group(1), match.end()
        if pos < length and header[pos] == "=":
            value, pos = _parse_param_value(header, pos + 1)
            if current is not None:
                current[1][token.lower()] = value
        else:
            if current is not None:
                challenges.append(_Challenge(current[0], current[1]))
            current = (token.lower(), {})
        while pos < length and header[pos] in " \t,":
            pos += 1
    if current is not None:
        challenges.append(_Challenge(current[0], current[1]))
    return challenges


def _parse_param_value(header: str, pos: int) -> Tuple[str, int]:
    """Parse a token or quoted-string starting at ``pos``."""
    while pos < len(header) and header[pos] in " \t":
        pos += 1
    if pos < len(header) and header[pos] == '"':
        chars, pos = [], pos + 1
        while pos < len(header) and header[pos] != '"':
            if header[pos] == "\\" and pos + 1 < len(header):
                pos += 1
            chars.append(header[pos])
            pos += 1
        return "".join(chars), pos + 1
    end = pos
    while end < len(header) and header[end] not in ", \t":
        end += 1
    return header[pos:end], end


class _TokenCache:
    """Bearer tokens per (registry, scope), shared by every worker thread."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: Dict[Tuple[str, str], Tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, registry: str, scope: str) -> Optional[str]:
        """Return a token with time to spare, else None."""
        with self._lock:
            entry = self._tokens.get((registry, scope))
        if entry is None:
            return None
        token, expires_at = entry
        return token if self._clock() < expires_at else None

    _MAX_TOKENS = 4096  # a long-running mirror asks for one per repository

    def put(self, registry: str, scope: str, token: str, lifetime_s: float) -> None:
        """Store a token; it counts as expired 10% (at most 30 s) early."""
        margin = min(30.0, lifetime_s * 0.1)
        with self._lock:
            if len(self._tokens) >= self._MAX_TOKENS:
                now = self._clock()
                self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
                while len(self._tokens) >= self._MAX_TOKENS:  # the oldest first
                    del self._tokens[next(iter(self._tokens))]
            self._tokens[(registry, scope)] = (token, self._clock() + lifetime_s - margin)

    def drop(self, registry: str, scope: str, token: Optional[str] = None) -> None:
        """Forget a token the registry refused."""
        with self._lock:
            entry = self._tokens.get((registry, scope))
            if entry is not None and (token is None or entry[0] == token):
                del self._tokens[(registry, scope)]


def _checked_realm(challenge: _Challenge, registry: str, loopback: bool) -> str:
    """Return the challenge's token realm, refusing one a token must not come from."""
    realm = challenge.params.get("realm", "")
    try:
        realm_scheme, realm_host, _, _ = _split_url(realm)
    except RegistryError as exc:
        raise AuthError(f"{registry} named an unusable token realm "
                        f"{_redact_url(realm)!r}") from exc
    # A hostile registry could point the realm at an internal plain-http
    # service (SSRF) or harvest credentials over plain http.
    if realm_scheme != "https" and not (loopback and _is_loopback_host(realm_host)):
        raise AuthError(f"{registry} named a token realm that is not "
                        f"https ({_redact_url(realm)}); refused")
    return realm


def _token_request(challenge: _Challenge, scope: str, auth: RegistryAuth
                   ) -> Tuple[str, str, Optional[bytes], Dict[str, str]]:
    """Return (method, url, body, headers) of the token request for ``scope``.

    A refresh token (identitytoken) is an OAuth2 POST; otherwise a GET, with
    basic credentials when there are some (Docker token spec).
    """
    from urllib.parse import urlencode
    realm = challenge.params.get("realm", "")
    params = {"scope": scope}
    if challenge.params.get("service"):
        params["service"] = challenge.params["service"]
    headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
    if auth.identity_token:
        params.update(grant_type="refresh_token", client_id="zlayer-registry",
                      refresh_token=auth.identity_token)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return "POST", realm, urlencode(params).encode(), headers
    if auth.kind == "basic" and auth.password:
        headers["Authorization"] = auth.basic_header()
        params["account"] = auth.username
    # One scope parameter per scope on GET (the OAuth2 POST above takes them
    # space-separated in one).
    query = [(k, v) for k, v in params.items() if k != "scope"]
    query += [("scope", item) for item in scope.split()]
    sep = "&" if "?" in realm else "?"
    return "GET", realm + sep + urlencode(query), None, headers


def _parse_token_response(raw: bytes, subject: str, method: str,
                          realm: str) -> Tuple[str, float]:
    """Return (token, lifetime in seconds) from a token endpoint's JSON answer."""
    try:
        data = _json_object(raw)
        token = data.get("token") or data.get("access_token")
    except ValueError:
        token, data = None, {}
    if not isinstance(token, str) or not token:
        raise AuthError(f"{subject} returned no token", method=method, url=_redact_url(realm))
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # no header injection, no odd bytes
        raise AuthError(f"{subject} returned a malformed token",
                        method=method, url=_redact_url(realm))
    lifetime = data.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME_S
    return token, float(lifetime)


def _token_cache_key(registry: str, auth: RegistryAuth) -> str:
    """Return the key of a registry's tokens for these credentials.

    Tokens are cached per registry *and* credentials: a puller serving
    several callers must not hand one caller's token to another.
    """
    identity = "\0".join((auth.kind, auth.username, auth.password, auth.token,
                           auth.identity_token))
    return f"{registry}#{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _redact_secrets(text: str, auth: RegistryAuth) -> str:
    """Remove credentials a registry may echo back in an error message."""
    secrets = [auth.password, auth.token, auth.identity_token]
    if auth.password:
        secrets.append(auth.basic_header()[6:])
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return re.sub(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]+", r"\1 <redacted>", text)


def _choose_challenge(response: _Response, registry: str, auth: RegistryAuth) -> _Challenge:
    """Pick the challenge of a 401 to answer: bearer, else basic (with a password)."""
    header = ", ".join(response.headers.get_all("WWW-Authenticate") or [])
    challenges = _parse_www_authenticate(header)
    chosen = next((c for c in challenges if c.scheme == "bearer"), None) or \
        next((c for c in challenges if c.scheme == "basic"), None)
    if chosen is None:
        raise AuthError(f"{registry} answered 401 without a usable WWW-Authenticate "
                        "challenge", status=401, method=response.method,
                        url=_redact_url(response.url))
    if chosen.scheme == "basic" and not auth.password:
        error = AuthError(f"{registry} requires credentials (basic auth) and none were given",
                          status=401, method=response.method, url=_redact_url(response.url))
        error.needs_credentials = True  # the CLI says where they can come from
        raise error
    return chosen


# =============================================================================
# 18. REGISTRY ANSWERS: errors, manifests, hosts that do not answer
# =============================================================================

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What TLS-only servers answer a plain-http request with, besides 400: Go's
# net/http (distribution, zot, Harbor) and nginx.
_TLS_ONLY_ANSWERS = (b"Client sent an HTTP request to an HTTPS server",
                     b"The plain HTTP request was sent to HTTPS port")


def _error_details(body: bytes) -> Tuple[List[str], str]:
    """Extract distribution-spec error codes and a short message from a body."""
    try:
        data = _loads_json(body)
    except ValueError:
        return [], ""
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return [], ""
    codes, messages = [], []
    for item in errors[:10]:
        if isinstance(item, dict):
            code, message = str(item.get("code") or ""), str(item.get("message") or "")
            if code:
                codes.append(code)
            if message:
                messages.append(message[:200])
    return codes, "; ".join(messages)


def _read_manifest(response: _Response, name: str, identifier: str) -> Manifest:
    """Read and parse a manifest answer (capped), checked against the digest asked
    for, else the ``Docker-Content-Digest`` the registry sent."""
    with response:
        length = response.header("Content-Length")
        if (_header_int(length) or 0) > MAX_MANIFEST_SIZE_BYTES:
            raise ManifestError(f"manifest {name}:{identifier} is {length} bytes, over the "
                                f"{MAX_MANIFEST_SIZE_BYTES}-byte limit")
        raw = _read_capped(response, MAX_MANIFEST_SIZE_BYTES + 1)
    expected = identifier if ":" in identifier else None
    header_digest = response.header("Docker-Content-Digest")
    if expected is None and header_digest:
        try:
            expected = _validate_digest(header_digest)
        except InvalidDigestError:
            expected = None
    return parse_manifest(raw, response.header("Content-Type"), expected)


def _referrers_tag(digest: str) -> str:
    """Return the tag of the referrers tag schema for ``digest`` (``sha256-<hex>``)."""
    return digest.replace(":", "-", 1)[:128]


def _manifest_not_found(repository: str, identifier: str, exc: NotFoundError) -> NotFoundError:
    """Say which image was missing, the same way for HEAD and GET, by tag or digest."""
    name = f"{repository}{'@' if ':' in identifier else ':'}{identifier}"
    return NotFoundError(f"{name} not found: {exc}", status=exc.status, codes=exc.codes,
                         method=exc.method, url=exc.url)


class _SchemesUnanswered(ConnectionError):
    """Neither https nor plain http got an answer from an --insecure registry."""

    def __init__(self, https_error: BaseException, http_error: BaseException) -> None:
        super().__init__(f"https: {https_error.__class__.__name__}: {https_error}; "
                         f"http: {http_error.__class__.__name__}: {http_error}")


def _unreachable_error(registry: str, registry_host: str, proxies: _ProxySettings,
                       method: str, url: str, exc: BaseException,
                       refusal: Optional[str]) -> RegistryError:
    """Return the error for a request that got no answer, naming the proxy if one was used.

    ``refusal`` is the rest of the message for a TLS failure (``_tls_refusal``).
    """
    scheme, host, port = _origin(url)
    # The host that failed, when it is not the registry's name (docker.io is
    # registry-1.docker.io): what a firewall's allow-list needs.
    named = _split_name_port(registry)[0].strip("[]").lower()
    where = registry if host == named else f"{registry} ({host})"
    detail = str(exc) if isinstance(exc, _SchemesUnanswered) else \
        f"{exc.__class__.__name__}: {exc}"
    message = f"{where} {refusal}" if refusal else f"cannot reach {where}: {detail}"
    proxy = proxies.proxy_for(scheme, host, port)
    if proxy:
        message += (f" (through the proxy {_redact_url(proxy)} from "
                    f"{'HTTPS_PROXY' if scheme == 'https' else 'HTTP_PROXY'})")
    return RegistryError(message, method=method, url=_redact_url(url),
                         temporary=refusal is None)


def _response_error(response: _Response, subject: str, auth: RegistryAuth,
                    cls: Optional[type], retries: int, clock: Callable[[], float],
                    body: Optional[bytes] = None) -> RegistryError:
    """Build the error for a failed response (body read capped at 64 KiB,
    unless the caller read it already: ``body``).

    The class follows the status unless ``cls`` is given; the registry's
    message is kept, with ``auth``'s secrets taken out.
    """
    status = response.status
    if body is None:
        body = b"" if response.method == "HEAD" else _read_capped(response, MAX_ERROR_BODY_BYTES)
    response.close()
    codes, message = _error_details(body)
    message = _redact_secrets(message, auth)
    if cls is None:
        cls = {401: AuthError, 403: AuthError, 404: NotFoundError,
               429: RateLimitedError}.get(status, RegistryError)
    text = f"{subject} answered {status} to {response.method} {_redact_url(response.url)}"
    if codes:
        text += f": {', '.join(codes)}"
    if message:
        text += f" ({message})"
    kwargs: Dict[str, Any] = dict(status=status, codes=codes, method=response.method,
                                  url=_redact_url(response.url),
                                  temporary=status in _RETRYABLE_STATUSES)
    if cls is RateLimitedError:
        limits = [f"{h}={response.header(h)}" for h in
                  ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
                  if response.header(h)]
        text += f"; rate limited, gave up after {retries} retries"
        if limits:
            text += f" ({', '.join(limits)})"
        kwargs["retry_after_s"] = _parse_retry_after(response.header("Retry-After"), clock)
    return cls(text, **kwargs)


# =============================================================================
# 19. REGISTRY CLIENT: scheme, auth, redirects and the distribution API
# =============================================================================

class _RegistryClient:
    """Talks to one repository of one registry: auth, redirects, retries.

    ``actions`` are what its tokens ask for (``pull``, or ``pull,push``); a
    request may ask for more scopes (a mount's source repository).
    """

    def __init__(self, reference: Reference, auth: RegistryAuth,
                 transport: _Transport, tokens: _TokenCache, *,
                 actions: str = "pull", insecure: bool = False,
                 retries: int = DEFAULT_RETRIES,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = reference.registry
        self.repository = reference.repository
        host = reference.api_host
        self.loopback = _is_loopback_host(host)
        self.insecure = insecure
        # Loopback speaks plain http (https if a TLS-only server answers); an
        # --insecure registry unchecked https, then plain http if https gets
        # no answer, as docker and crane do.  The first answer settles it.
        self._set_base_url(f"{'http' if self.loopback and not insecure else 'https'}://{host}")
        self._scheme_known = not (insecure or self.loopback)
        self.scope = f"repository:{self.repository}:{actions}"
        self.auth = auth
        self._token_key = _token_cache_key(self.registry, auth)
        self.transport = transport
        self.tokens = tokens
        self.retries = retries
        self.sleep = sleep
        self.clock = clock
        self._challenge: Optional[_Challenge] = None
        self._auth_lock = threading.Lock()
        self._scheme_lock = threading.Lock()

    def _set_base_url(self, base_url: str) -> None:
        """Point the client at ``scheme://host[:port]`` (the origin follows)."""
        self.base_url = base_url
        self.origin = _origin(base_url)

    def _is_registry_host(self, url: str) -> bool:
        """Tell whether ``url`` is on the registry's own host and port (either scheme)."""
        return _origin(url)[1:] == self.origin[1:]

    def _is_verified(self, url: str) -> bool:
        """Tell whether to check ``url``'s certificate (all but an --insecure registry's)."""
        return not (self.insecure and self._is_registry_host(url))

    # -- authorisation --------------------------------------------------------

    def _may_send_secret(self, url: str) -> bool:
        """Secrets go over https, or plain http to loopback or an --insecure registry."""
        scheme, host, _ = _origin(url)
        return scheme == "https" or _is_loopback_host(host) or self.insecure

    def _token_scope(self, scope: Optional[str]) -> str:
        """Return the scope a token is asked for: the request's, else the last
        challenge's (registries name their own), else this client's."""
        challenge = self._challenge
        return scope or (challenge.params.get("scope") if challenge else None) or self.scope

    def _authorization(self, scope: Optional[str] = None) -> Optional[str]:
        """Return the Authorization value for the registry, fetching a token if due."""
        if self.auth.kind == "bearer" and self.auth.token:
            return f"Bearer {self.auth.token}"
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self.auth.basic_header() if self.auth.password else None
        if challenge.scheme != "bearer":
            return None
        scope = self._token_scope(scope)
        token = self.tokens.get(self._token_key, scope)
        if token is None:
            with self._auth_lock:  # one token request, not one per worker
                token = self.tokens.get(self._token_key, scope)
                if token is None:
                    token, lifetime_s = self._fetch_token(challenge, scope)
                    self.tokens.put(self._token_key, scope, token, lifetime_s)
        return f"Bearer {token}"

    def _on_unauthorized(self, response: _Response, sent: Optional[str],
                         scope: Optional[str]) -> None:
        """Forget the token a 401 refused, and learn the challenge it brings."""
        if sent and sent.startswith("Bearer "):
            self.tokens.drop(self._token_key, self._token_scope(scope), sent[7:])
        self._challenge = _choose_challenge(response, self.registry, self.auth)

    def _fetch_token(self, challenge: _Challenge, scope: str) -> Tuple[str, float]:
        """Get a bearer token from the challenge's realm (Docker token spec)."""
        realm = _checked_realm(challenge, self.registry, self.loopback)
        method, url, body, headers = _token_request(challenge, scope, self.auth)
        response = self._retrying(
            lambda: self.transport.send(method, url, headers, body, verify=self._is_verified(url)),
            method, lambda: realm, _as_body(body))
        with response:
            if response.status != 200:
                raise self._error(response, AuthError if response.status in (400, 401, 403)
                                  else None, subject=f"token endpoint for {self.registry}")
            raw = _read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
        return _parse_token_response(raw, f"token endpoint for {self.registry}", method, realm)

    # -- requests -------------------------------------------------------------

    def backoff(self, attempt: int, retry_after_s: Optional[float] = None) -> None:
        """Wait before retry ``attempt`` (0-based) of a request to this registry."""
        self.sleep(_backoff_delay(attempt, retry_after_s))

    def _retrying(self, send: Callable[[], _Response], method: str,
                  failed_url: Callable[[], str], body: Optional[_RequestBody],
                  retries: Optional[int] = None) -> _Response:
        """Send with the shared retry policy; ``failed_url()`` (the URL tried last)
        names the request in the error when no answer comes."""
        def unanswered(exc: BaseException, last: bool) -> Optional[BaseException]:
            # A name that does not resolve will not resolve in a second, nor
            # will a certificate become trusted.
            failed = failed_url()
            refusal = _tls_refusal(exc, not self.insecure and self._is_registry_host(failed))
            if last or _is_name_error(exc) or refusal:
                return _unreachable_error(self.registry, self.origin[1], self.transport.proxies,
                                          method, failed, exc, refusal)
            return None

        return _send_with_retries(send, method,
                                  retries=self.retries if retries is None else retries,
                                  wait=self.backoff, unanswered=unanswered, body=body,
                                  clock=self.clock)

    def _send_following_redirects(self, method: str, url: str, headers: Mapping[str, str],
                                  tried: Optional[List[str]] = None,
                                  body: Optional[_RequestBody] = None,
                                  scope: Optional[str] = None
                                  ) -> Tuple[_Response, Optional[str]]:
        """Send a request, following at most MAX_REDIRECTS redirects ourselves.

        Authorization goes only to the registry's own origin: blob redirects
        to S3/CloudFront/R2/Azure carry their own auth in the URL, those
        services reject a second one, and it would leak the token to them.
        A 303 turns the request into a GET without body; other redirects keep
        the body, which must then be replayable.
        ``tried[0]`` is set to each URL as it is sent, for error messages.
        """
        from urllib.parse import urljoin
        sent: Optional[str] = None
        for _ in range(MAX_REDIRECTS + 1):
            if tried is not None:
                tried[0] = url
            scheme, host, _ = _origin(url)
            # Plain http: to loopback only from a loopback registry (a remote one
            # must not steer us at local services), elsewhere only if insecure.
            if scheme == "http" and not ((self.loopback and _is_loopback_host(host))
                                         or self.insecure):
                raise RegistryError(f"refusing plain http to {host} "
                                    "(use --insecure to allow it)",
                                    method=method, url=_redact_url(url))
            all_headers = {"User-Agent": _USER_AGENT}
            all_headers.update(headers)
            sent = None
            if (scheme, host, _origin(url)[2]) == self.origin and self._may_send_secret(url):
                sent = self._authorization(scope)
                if sent:
                    all_headers["Authorization"] = sent
            response = self.transport.send(method, url, all_headers, body,
                                           verify=self._is_verified(url))
            location = response.header("Location")
            if response.status not in _REDIRECT_STATUSES or not location:
                return response, sent
            response.close()
            try:
                url = urljoin(url, location)
                _origin(url)
            except ValueError as exc:
                raise RegistryError(f"{self.registry} redirected to a malformed location "
                                    f"({exc})", method=method,
                                    url=_redact_url(response.url)) from exc
            if response.status == 303 and method != "HEAD":
                method, body = "GET", None
            elif body is not None and not body.replayable:
                raise RegistryError(f"{self.registry} redirected a {method} whose body "
                                    "cannot be sent twice", method=method,
                                    url=_redact_url(response.url))
        raise RegistryError(f"{self.registry} redirected more than {MAX_REDIRECTS} times",
                            method=method, url=_redact_url(url))

    def _send_to_registry(self, method: str, path: str, headers: Mapping[str, str],
                          tried: List[str], body: Optional[_RequestBody],
                          scope: Optional[str]) -> Tuple[_Response, Optional[str]]:
        """Send to ``path`` of the registry (``tried[0]``: the URL tried last).

        While the scheme is unsettled (see ``__init__``), an --insecure
        registry's https that gets no answer is followed by plain http, and a
        loopback registry's plain http answered "this is an HTTPS server"
        (a 400) by https.
        """
        if not self._scheme_known:
            # One request settles the scheme; workers starting meanwhile wait.
            with self._scheme_lock:
                if not self._scheme_known:
                    return self._send_settling_scheme(method, path, headers, tried, body, scope)
        return self._send_following_redirects(method, self.base_url + path, headers, tried,
                                              body, scope)

    def _send_settling_scheme(self, method: str, path: str, headers: Mapping[str, str],
                              tried: List[str], body: Optional[_RequestBody],
                              scope: Optional[str]) -> Tuple[_Response, Optional[str]]:
        """Send the request that settles the registry's scheme (``_scheme_lock`` held)."""
        origin = self.origin
        scheme, rest = self.base_url.split("://", 1)
        try:
            result = self._send_following_redirects(method, self.base_url + path, headers,
                                                    tried, body, scope)
        except _CONNECTION_ERRORS as https_error:
            if scheme != "https" or _origin(tried[0]) != origin:
                raise  # a redirect's target failed
            try:
                return self._settle_scheme(f"http://{rest}", method, path, headers, tried,
                                           body, scope)
            except _CONNECTION_ERRORS as http_error:
                if _is_name_error(http_error):
                    raise
                raise _SchemesUnanswered(https_error, http_error) from http_error
        if scheme == "https" or result[0].status != 400 or _origin(tried[0]) != origin:
            self._scheme_known = True
            return result
        answer = _read_capped(result[0], MAX_ERROR_BODY_BYTES)
        if method == "HEAD" and not answer:
            # A HEAD answer has no body to say "this is an HTTPS server": https decides.
            result[0].close()
            try:
                return self._settle_scheme(f"https://{rest}", method, path, headers, tried,
                                           body, scope)
            except _CONNECTION_ERRORS:
                raise self._error(result[0], body=answer) from None
        if not any(phrase in answer for phrase in _TLS_ONLY_ANSWERS):
            raise self._error(result[0], body=answer)
        result[0].close()
        return self._settle_scheme(f"https://{rest}", method, path, headers, tried, body, scope)

    def _settle_scheme(self, base_url: str, method: str, path: str, headers: Mapping[str, str],
                       tried: List[str], body: Optional[_RequestBody],
                       scope: Optional[str]) -> Tuple[_Response, Optional[str]]:
        """Send with the other scheme; its answer settles the registry's scheme."""
        result = self._send_following_redirects(method, base_url + path, headers, tried,
                                                body, scope)
        self._set_base_url(base_url)
        self._scheme_known = True
        return result

    def request(self, method: str, path: str, *, headers: Optional[Mapping[str, str]] = None,
                ok: Sequence[int] = (200,), body: Union[None, bytes, _RequestBody] = None,
                scope: Optional[str] = None, retries: Optional[int] = None) -> _Response:
        """Send a request to the registry; return the response if its status is in ``ok``.

        ``path`` is a path of the registry's API, or an absolute URL on the
        registry's own host (an upload's ``Location``).  ``scope`` asks the
        token for other scopes than this client's (a mount's source too).
        ``retries`` overrides the client's (0: a request whose repetition the
        caller manages, as an upload's PUT, which must not append twice).
        """
        headers = headers or {}
        payload = _as_body(body)
        absolute = path.startswith(("http://", "https://"))
        if absolute and not self._is_registry_host(path):
            raise RegistryError(f"{self.registry} named a location on another host "
                                f"({_redact_url(path)}); refused", method=method,
                                url=_redact_url(path))
        reauthenticated = False
        sent_box: List[Optional[str]] = [None]
        tried = [path if absolute else self.base_url + path]

        def send() -> _Response:
            if absolute:
                response, sent_box[0] = self._send_following_redirects(
                    method, path, headers, tried, payload, scope)
            else:
                response, sent_box[0] = self._send_to_registry(method, path, headers, tried,
                                                               payload, scope)
            return response

        while True:
            response = self._retrying(send, method, lambda: tried[0], payload, retries)
            if response.status in ok:
                return response
            if response.status == 401 and not reauthenticated \
                    and _origin(response.url) == self.origin \
                    and (payload is None or payload.replayable):
                response.close()
                self._on_unauthorized(response, sent_box[0], scope)
                reauthenticated = True
                continue
            if response.status == 401 and self.auth.kind != "anonymous":
                error = self._error(response)
                who = f" of {self.auth.username!r}" if self.auth.username else ""
                where = f" (from {self.auth.source})" if self.auth.source else ""
                raise AuthError(f"{self.registry} rejected the credentials{who}{where}: {error}",
                                status=401, codes=error.codes, method=error.method,
                                url=error.url)
            raise self._error(response)

    def _error(self, response: _Response, cls: Optional[type] = None,
               subject: str = "", body: Optional[bytes] = None) -> RegistryError:
        """Build the error for a failed response (body read capped at 64 KiB)."""
        return _response_error(response, subject or self.registry, self.auth, cls,
                               self.retries, self.clock, body)

    # -- distribution API ---------------------------------------------------

    def head_manifest(self, identifier: str) -> Optional[str]:
        """Return the digest a tag points at via HEAD, or None if HEAD can't tell."""
        try:
            response = self.request("HEAD", f"/v2/{self.repository}/manifests/{identifier}",
                                    headers={"Accept": _MANIFEST_ACCEPT})
        except NotFoundError as exc:
            raise _manifest_not_found(self.repository, identifier, exc) from exc
        except RegistryError as exc:
            # Some registries answer 405 (or 400) to HEAD; a GET will do.
            if type(exc) is RegistryError and exc.status in (400, 405, 406, 501):
                return None
            raise
        response.close()
        digest = response.header("Docker-Content-Digest")
        try:
            return _validate_digest(digest) if digest else None
        except InvalidDigestError:
            return None

    def get_manifest(self, identifier: str) -> Manifest:
        """GET a manifest by tag or digest, checked against the digest it should have."""
        try:
            response = self.request("GET", f"/v2/{self.repository}/manifests/{identifier}",
                                    headers={"Accept": _MANIFEST_ACCEPT})
        except NotFoundError as exc:
            raise _manifest_not_found(self.repository, identifier, exc) from exc
        return _read_manifest(response, f"{self.registry}/{self.repository}", identifier)

    def referrers(self, digest: str) -> List[Descriptor]:
        """Return the manifests whose ``subject`` is ``digest``: from the referrers API
        (distribution-spec 1.1), else, where a registry has none (404, or 400, 405
        and the like), from the ``sha256-<hex>`` tag of the fallback schema."""
        response = None
        try:
            response = self.request("GET", f"/v2/{self.repository}/referrers/{digest}",
                                    headers={"Accept": MEDIA_TYPE_OCI_INDEX})
        except NotFoundError:
            pass
        except RegistryError as exc:
            if type(exc) is not RegistryError or exc.status not in (400, 405, 406, 501):
                raise
        if response is None:
            try:
                index = self.get_manifest(_referrers_tag(digest))
            except NotFoundError:
                return []
        else:
            index = _read_manifest(response, f"{self.registry}/{self.repository}", "referrers")
        if not index.is_index:
            raise ManifestError(f"{self.registry} answered the referrers of {digest} with a "
                                f"{index.media_type}, not an index")
        return index.manifests

    def open_blob(self, digest: str, offset: int = 0) -> _Response:
        """Start a blob GET, from ``offset`` with a Range request when resuming."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        return self.request("GET", f"/v2/{self.repository}/blobs/{digest}",
                            headers=headers, ok=(200, 206))


# =============================================================================
# 20. BLOB STORES: the interface every cache implements
# =============================================================================
# A blob store keeps blobs by digest and the references (tags, digests,
# layout names) that say which of them to keep.  Every write goes through a
# BlobWriter, which hashes while it writes and makes the blob visible only
# once its digest and size check out.  What is visible is verified: readers
# may trust a blob's bytes as of its commit (caches re-hash where the bytes
# leave them, as export and unpack do).
#
# The stores: BlobCache (in memory), DirectoryBlobCache (files, with a
# SQLite index beside them), S3BlobCache (a bucket) and, on top of the
# directory cache, the local registry.

class _ContentMismatch(DigestMismatchError):
    """The bytes have the announced size but not the digest: corrupted on the way."""


class BlobWriter:
    """Receives one blob's bytes, hashing them as they come; ``commit()`` publishes it.

    The digest is known from the start (a pull: the descriptor's) or only at
    the end (an upload, whose final ``PUT ?digest=`` names it): then it is
    given to ``commit``, and the bytes are hashed with ``algorithm`` meanwhile.
    Stores implement the four ``_sink_*`` methods; a writer used as a context
    manager is aborted when the block raises.
    """

    def __init__(self, digest: Optional[str], size: Optional[int],
                 algorithm: str = "sha256") -> None:
        self.digest = _validate_digest(digest) if digest is not None else None
        self.expected_size = size
        self.offset = 0
        self._algorithm = digest.split(":", 1)[0] if digest is not None else algorithm
        if self._algorithm not in _DIGEST_HEX_LENGTHS:
            raise InvalidDigestError(f"{algorithm}:", "unsupported algorithm")
        self._hasher = hashlib.new(self._algorithm)
        self._scratch: Optional[memoryview] = None

    @property
    def subject(self) -> str:
        """Name the blob in messages (its digest, or 'upload' before it is known)."""
        return f"blob {self.digest}" if self.digest else "uploaded blob"

    def actual_digest(self) -> str:
        """Return the digest of the bytes received so far."""
        return f"{self._algorithm}:{self._hasher.copy().hexdigest()}"

    def write(self, data: Any) -> None:
        """Append bytes (any buffer); refuses more than the announced size."""
        self._take(data)
        self._sink_write(data)

    def _take(self, data: Any) -> None:
        """Count and hash bytes about to be stored."""
        count = len(data)
        if self.expected_size is not None and self.offset + count > self.expected_size:
            raise DigestMismatchError(f"{self.subject} is larger than announced",
                                      f"{self.expected_size} bytes",
                                      f"at least {self.offset + count} bytes")
        self._hasher.update(data)
        self.offset += count

    def buffer(self) -> memoryview:
        """Return a buffer to receive the next bytes into; ``filled(n)`` takes them.

        At most one byte more than the announced size fits, so an overlong
        blob is caught without reading it all.
        """
        if self._scratch is None:
            size = _NETWORK_READ_BYTES if self.expected_size is None \
                else min(_NETWORK_READ_BYTES, self.expected_size + 1)
            self._scratch = memoryview(bytearray(size))
        return self._limit(self._scratch)

    def filled(self, count: int) -> None:
        """Take the first ``count`` bytes of the last ``buffer()``."""
        self.write(self._scratch[:count])

    def _limit(self, view: memoryview) -> memoryview:
        if self.expected_size is None:
            return view
        return view[:max(self.expected_size - self.offset + 1, 1)]

    def restart(self) -> None:
        """Drop what was written (the server ignored a Range request)."""
        self._hasher = hashlib.new(self._algorithm)
        self.offset = 0
        self.restarts += 1
        self._sink_truncate()

    # A reader may follow a blob into the file it is written to (the fleet
    # tier uploads a layer while it downloads): ``readable_path`` names that
    # file (None: the store has none), ``readable_bytes()`` how much of it holds
    # the blob's bytes now; ``restarts`` counts truncations, after which a
    # reader must start over.
    readable_path: Optional[str] = None
    restarts = 0

    def readable_bytes(self) -> int:
        """Return how many leading bytes of the blob ``readable_path`` holds now."""
        return 0

    def check(self, digest: Optional[str] = None) -> None:
        """Raise DigestMismatchError (discarding the blob) unless size and digest match.

        ``digest`` names a blob whose digest was not known at the start.
        """
        if digest is not None:
            self._settle_digest(digest)
        if self.digest is None:
            raise ValueError("the digest of an upload must be given to check() or commit()")
        if self.expected_size is not None and self.offset != self.expected_size:
            self.abort()
            raise DigestMismatchError(f"{self.subject} has the wrong size",
                                      f"{self.expected_size} bytes", f"{self.offset} bytes")
        actual = self.actual_digest()
        if actual != self.digest:
            self.abort()
            raise _ContentMismatch("blob digest mismatch", self.digest, actual)

    def _settle_digest(self, digest: str) -> None:
        """Take the digest an upload names at its end (it must use our algorithm)."""
        _validate_digest(digest)
        if self.digest is not None and digest != self.digest:
            self.abort()
            raise DigestMismatchError("blob digest mismatch", self.digest, digest)
        if digest.split(":", 1)[0] != self._algorithm:
            self.abort()
            raise InvalidDigestError(digest, f"this upload was hashed with {self._algorithm}")
        self.digest = digest

    def commit(self, digest: Optional[str] = None) -> str:
        """Check size and digest, then make the blob visible; return its digest."""
        self.check(digest)
        self._sink_commit()
        return str(self.digest)

    def abort(self) -> None:
        """Throw the partial blob away."""
        self._sink_abort()

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _sink_write(self, data: Any) -> None:
        raise NotImplementedError

    def _sink_truncate(self) -> None:
        raise NotImplementedError

    def _sink_commit(self) -> None:
        raise NotImplementedError

    def _sink_abort(self) -> None:
        raise NotImplementedError


class BlobStore:
    """The interface of a content-addressed blob store: blobs by digest, and references.

    A miss is ``None``, never an exception.  The methods above
    "maintenance" are each store's own; ``read_small``, ``get``, ``put``,
    ``verify``, ``prune``, ``gc`` and ``stats`` are built on them.
    """

    read_only = False

    # -- reading --------------------------------------------------------------

    def has(self, digest: str) -> bool:
        """Tell whether a verified blob is present."""
        raise NotImplementedError

    def size(self, digest: str) -> Optional[int]:
        """Return a stored blob's size in bytes, or None when it is absent."""
        raise NotImplementedError

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Open a blob for reading, or return None when it is absent."""
        raise NotImplementedError

    def path(self, digest: str) -> Optional[str]:
        """Return the blob's file path, or None (absent, or not kept in a file)."""
        return None

    def media_type(self, digest: str) -> str:
        """Return the media type recorded with a blob ('' when unknown)."""
        return ""

    def digests(self) -> Iterator[str]:
        """Yield the digest of every stored blob."""
        raise NotImplementedError

    def entries(self) -> List[Dict[str, Any]]:
        """List blobs as dicts: digest, size, media_type, added_at, last_used_at."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        """Tell whether no blob at all is stored."""
        return next(iter(self.digests()), None) is None

    # -- writing --------------------------------------------------------------

    def begin_write(self, digest: Optional[str] = None, size: Optional[int] = None,
                    media_type: str = "", algorithm: str = "sha256") -> BlobWriter:
        """Start writing a blob; it becomes visible on a verified ``commit()``.

        Without ``digest`` (an upload) the digest is given to ``commit``, and
        the bytes are hashed with ``algorithm`` meanwhile.
        """
        raise NotImplementedError

    def delete(self, digest: str) -> bool:
        """Remove a blob; tell whether it was there."""
        raise NotImplementedError

    def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs as used now (drives least-recently-used pruning)."""

    def lock(self, digest: str) -> Any:
        """Return a context manager held while one writer downloads ``digest``."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Prepare for the queries that end a pull (called while its downloads run)."""

    def record_location(self, digest: str, registry: str, repository: str) -> None:
        """Remember that a repository of a registry has a blob (it was pulled from or
        pushed there): a push to that registry mounts it instead of uploading it."""

    def locations(self, digest: str, registry: str) -> List[str]:
        """Return the repositories of ``registry`` known to have the blob, newest first."""
        return []

    # -- references -----------------------------------------------------------

    def record_reference(self, reference: str, digest: str, media_type: str, *,
                         complete: bool = True) -> None:
        """Remember which manifest ``reference`` resolved to.

        A pull records it ``complete=False`` before it adds blobs (gc keeps
        what an incomplete record reaches too) and complete at its end; an
        incomplete record never replaces a complete one of the same digest.
        """
        raise NotImplementedError

    def lookup_reference(self, reference: str) -> Optional[str]:
        """Return the manifest digest last recorded for ``reference``."""
        raise NotImplementedError

    def reference_records(self) -> List[Dict[str, Any]]:
        """Return every reference record: reference, digest, media_type, complete.

        Raises CacheError when a record cannot be read: ``gc`` must never
        mistake references it cannot see for references that are not there.
        """
        raise NotImplementedError

    def references(self) -> Dict[str, str]:
        """Return every recorded reference (complete or not) and its manifest digest."""
        return {r["reference"]: r["digest"] for r in self.reference_records()}

    def forget_reference(self, reference: str) -> bool:
        """Drop a reference record; tell whether there was one."""
        raise NotImplementedError

    # -- maintenance, built on the methods above ------------------------------

    def get(self, digest: str) -> Optional[bytes]:
        """Return a blob's bytes, or None (use ``open_blob`` for large blobs)."""
        stream = self.open_blob(digest)
        if stream is None:
            return None
        with stream:
            return stream.read()

    def read_small(self, digest: str, limit_bytes: int) -> Optional[bytes]:
        """Return a blob's bytes if it has at most ``limit_bytes``, else None.

        For manifests and configs: a hostile manifest may name a huge cached
        layer as its config, and that must not be read into memory.
        """
        stream = self.open_blob(digest)
        if stream is None:
            return None
        with stream:
            data = _read_capped(stream, limit_bytes + 1)
        return data if len(data) <= limit_bytes else None

    def put(self, digest: str, data: bytes, media_type: str = "") -> None:
        """Store a small blob after checking it against ``digest``."""
        with self.begin_write(digest, len(data), media_type) as writer:
            writer.write(data)
            writer.commit()

    def verify(self, remove: bool = False) -> List[str]:
        """Re-hash every blob; return the digests that fail (removing them if asked)."""
        bad = []
        for entry in self.entries():
            digest = entry["digest"]
            stream = self.open_blob(digest)
            if stream is None:
                continue
            try:
                _drain_checked(stream, Descriptor("", digest, entry["size"]))
            except DigestMismatchError:
                bad.append(digest)
                if remove:
                    self.delete(digest)
        return bad

    def prune(self, max_bytes: int) -> List[str]:
        """Delete least recently used blobs until at most ``max_bytes`` remain.

        References to a manifest that goes are forgotten with it.  What the
        local registry's images reach is not a cache's to drop: it stays.
        """
        kept = self.reachable({r["digest"] for r in self.reference_records()
                                if _is_local_record(r["reference"])})
        entries = sorted((e for e in self.entries() if e["digest"] not in kept),
                         key=lambda e: (e["last_used_at"], e["digest"]))
        total = sum(e["size"] for e in entries)
        removed = []
        for entry in entries:
            if total <= max_bytes:
                break
            if self.delete(entry["digest"]):
                removed.append(entry["digest"])
            total -= entry["size"]
        gone = set(removed)
        for reference, digest in self.references().items():
            if digest in gone:
                self.forget_reference(reference)
        return removed

    def gc(self, grace_s: float = 0.0, dry_run: bool = False) -> List[str]:
        """Delete blobs no recorded reference reaches; return their digests.

        A blob stored less than ``grace_s`` seconds ago stays (an upload
        waiting for the manifest that will name it); ``dry_run`` deletes nothing.
        """
        reachable = self.reachable(set(self.references().values()))
        if grace_s > 0:
            young_after = time.time() - grace_s
            removed = [e["digest"] for e in self.entries()
                       if e["digest"] not in reachable and e["added_at"] < young_after]
        else:
            removed = [digest for digest in list(self.digests()) if digest not in reachable]
        if not dry_run:
            for digest in removed:
                self.delete(digest)
        return removed

    def reachable(self, digests: Iterable[str]) -> set:
        """Return the digests of the manifests given and of all they reach."""
        roots = [self._root_descriptor(digest) for digest in digests]
        return {d.digest for d, _ in _walk_graph(roots, self._load_for_gc)}

    def _root_descriptor(self, digest: str) -> Descriptor:
        """Describe a referenced manifest for the gc walk (its media type, if known)."""
        return Descriptor(self.media_type(digest), digest, self.size(digest) or 0)

    def _load_for_gc(self, descriptor: Descriptor) -> Optional[Manifest]:
        """Return the manifest a descriptor names, None for any other blob.

        A media type the index has lost ('') is tried as a manifest: gc must
        keep too much rather than too little.
        """
        if descriptor.media_type not in _MANIFEST_TYPES + ("",):
            return None
        raw = self.read_small(descriptor.digest, MAX_MANIFEST_SIZE_BYTES)
        if raw is None:
            return None
        try:
            return parse_manifest(raw, descriptor.media_type, descriptor.digest)
        except ZLayerError:
            return None

    def stats(self) -> Dict[str, Any]:
        """Return blob count, total bytes and reference count."""
        entries = self.entries()
        return {"blobs": len(entries), "size_bytes": sum(e["size"] for e in entries),
                "references": len(self.references())}

    def close(self) -> None:
        """Release what the store holds open (connections, index handles)."""

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _corrupt_cached_blob(digest: str, kind: str = "blob") -> str:
    """Return the subject of the error for a cached blob whose bytes no longer match."""
    return f"cached {kind} {digest} is corrupt (run 'cache verify --remove', then pull again)"


def _corrupt_cached_layer(digest: str) -> str:
    """Return the subject of the error for a cached layer whose bytes no longer match."""
    return _corrupt_cached_blob(digest, "layer")


def _open_stored(store: BlobStore, descriptor: Descriptor) -> BinaryIO:
    """Open a blob the store must have (a CacheError when it does not)."""
    stream = store.open_blob(descriptor.digest)
    if stream is None:
        raise CacheError(f"blob {descriptor.digest} is not in the cache")
    return stream


def _verify_stored(store: BlobStore, descriptor: Descriptor) -> None:
    """Hash a stored blob again: one changed on disk since it was stored is an error."""
    with _open_stored(store, descriptor) as stream:
        _drain_checked(stream, descriptor, _corrupt_cached_blob(descriptor.digest))


# =============================================================================
# 21. BLOB SOURCES: where a pull's manifests and blobs come from
# =============================================================================
# The resolver and the fetcher read through this interface: the registry
# (``_RegistrySource``), a layout whose blobs were imported already
# (``_MissingSource``), a mirror's upstream (a registry too), and the fleet
# tier (``_FleetSource``: a bucket, then the registry).  A chain of sources
# (``_SourceChain``) asks each in turn, and one that lacks the blob says so
# with NotFoundError in the same request that would have fetched it (no HEAD
# first).  Whatever a source hands out is verified by the caller, which tells
# the source how each blob ended (``receiving``, ``settled``).

class _BlobStream:
    """A blob's bytes from a source, starting at byte ``offset`` of the blob.

    ``offset`` is the one asked for, or 0 when the source sends the whole
    blob again (a server that ignored Range).  Reads as the network response
    under it does: ``readinto1``, ``length_left``, ``close``.
    """

    def __init__(self, body: _Response, offset: int) -> None:
        self._body = body
        self.offset = offset
        self.url = body.url
        self.readinto1 = body.readinto1

    @property
    def length_left(self) -> Optional[int]:
        """Bytes still to come per Content-Length (None: chunked or until close)."""
        return self._body.length_left

    def close(self) -> None:
        """Stop reading (the connection is reused when the body was read to its end)."""
        self._body.close()

    def __enter__(self) -> "_BlobStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _Source(Protocol):
    """What a pull reads manifests and blobs from."""

    name: str  # for messages: the registry's name, the layout's location
    location: Optional[Tuple[str, str]]  # (registry, repository) when it is one

    def head_manifest(self, tag: str) -> Optional[str]:
        """Return the digest ``tag`` points at, None when this source cannot tell cheaply."""

    def get_manifest(self, identifier: str) -> Manifest:
        """Return the manifest a tag or digest names, checked against its digest
        (NotFoundError when the source has none)."""

    def open_blob(self, digest: str, offset: int = 0) -> _BlobStream:
        """Start sending a blob from ``offset`` (NotFoundError when the source lacks it)."""

    def backoff(self, attempt: int) -> None:
        """Wait before resuming a download from this source for the ``attempt``-th time."""

    def receiving(self, descriptor: Descriptor, writer: "BlobWriter") -> None:
        """Hear that a blob this source sends is being written by ``writer``."""

    def settled(self, descriptor: Descriptor, verified: bool) -> None:
        """Hear how a blob this source sent ended: verified and stored, or failing
        (its digest check, or the download)."""


class _RegistrySource:
    """A repository of a registry as a source: the distribution API's manifest and blob GETs."""

    def __init__(self, client: _RegistryClient) -> None:
        self.client = client
        self.name = client.registry
        self.location = (client.registry, client.repository)
        self.head_manifest = client.head_manifest
        self.get_manifest = client.get_manifest
        self.backoff = client.backoff

    def receiving(self, descriptor: Descriptor, writer: "BlobWriter") -> None:
        """Nothing to do."""

    def settled(self, descriptor: Descriptor, verified: bool) -> None:
        """Nothing to do: the registry keeps its blobs."""

    def open_blob(self, digest: str, offset: int = 0) -> _BlobStream:
        """GET a blob, with ``Range: bytes=offset-`` when resuming.

        Only a 206 whose Content-Range starts at the offset continues a
        partial download; a 200 starts over at 0; a 206 for some other range
        is of no use, so the whole blob is asked for instead.
        """
        response = self.client.open_blob(digest, offset)
        if _continues_at(response, offset):
            return _BlobStream(response, offset)
        if response.status == 200:
            return _BlobStream(response, 0)
        response.close()
        response = self.client.open_blob(digest, 0)
        if not _continues_at(response, 0):
            response.close()
            raise RegistryError(f"{self.name} answered blob {digest} with a Content-Range "
                                "that does not match the request", method="GET",
                                url=_redact_url(response.url))
        return _BlobStream(response, 0)


def _continues_at(response: _Response, offset: int) -> bool:
    """Tell whether a blob response's body starts at byte ``offset``.

    Only a 206 whose Content-Range starts at the offset continues a partial
    download; a 200 means the server ignored Range and sends everything.
    """
    if response.status == 200:
        return offset == 0
    match = re.fullmatch(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)",
                         response.header("Content-Range").strip())
    return bool(match) and int(match.group(1)) == offset


class _SourceChain:
    """Sources asked in turn (a cache tier, a mirror's upstreams): the first that has
    a manifest or blob serves it; the last one's NotFoundError is the answer."""

    def __init__(self, sources: Sequence[_Source]) -> None:
        if not sources:
            raise ValueError("a chain of sources needs at least one")
        self.sources = list(sources)
        self.name = " then ".join(source.name for source in self.sources)
        self.location: Optional[Tuple[str, str]] = None

    def _first(self, ask: Callable[[_Source], Any]) -> Any:
        for source in self.sources[:-1]:
            try:
                return ask(source)
            except NotFoundError:
                continue
        return ask(self.sources[-1])

    def head_manifest(self, tag: str) -> Optional[str]:
        """Return the digest the first source that knows ``tag`` gives."""
        return self._first(lambda source: source.head_manifest(tag))

    def get_manifest(self, identifier: str) -> Manifest:
        """Return the manifest from the first source that has it."""
        return self._first(lambda source: source.get_manifest(identifier))

    def open_blob(self, digest: str, offset: int = 0) -> _BlobStream:
        """Start sending a blob from the first source that has it."""
        return self._first(lambda source: source.open_blob(digest, offset))

    def backoff(self, attempt: int) -> None:
        """Wait as the last source (the authoritative one, a registry) does."""
        self.sources[-1].backoff(attempt)

    def receiving(self, descriptor: Descriptor, writer: "BlobWriter") -> None:
        """Tell every source."""
        for source in self.sources:
            source.receiving(descriptor, writer)

    def settled(self, descriptor: Descriptor, verified: bool) -> None:
        """Tell every source."""
        for source in self.sources:
            source.settled(descriptor, verified)


class _MissingSource:
    """The source of an image imported from a layout: everything is in the store
    already, so whatever a pull asks of it is missing from the layout."""

    def __init__(self, location: str) -> None:
        self.name = location
        self.location: Optional[Tuple[str, str]] = None

    def _missing(self, what: str) -> LayoutError:
        return LayoutError(f"{self.name}: {what} is not in the layout")

    def head_manifest(self, tag: str) -> Optional[str]:
        """Raise: the layout lacks what was asked for."""
        raise self._missing(f"manifest {tag}")

    def get_manifest(self, identifier: str) -> Manifest:
        """Raise: the layout lacks what was asked for."""
        raise self._missing(f"manifest {identifier}")

    def open_blob(self, digest: str, offset: int = 0) -> _BlobStream:
        """Raise: the layout lacks what was asked for."""
        raise self._missing(f"blob {digest}")

    def backoff(self, attempt: int) -> None:
        """Nothing to wait for."""

    def receiving(self, descriptor: Descriptor, writer: "BlobWriter") -> None:
        """Nothing to do."""

    def settled(self, descriptor: Descriptor, verified: bool) -> None:
        """Nothing to do."""


# =============================================================================
# 22. REGISTRY PUSH: uploads, mounts and manifests
# =============================================================================
# distribution-spec "Pushing": a blob is mounted from another repository of
# the registry (POST ?mount=&from=; 201 when it was, 202 with an upload
# session when not: the push then uses that session), or uploaded into a
# session: one PUT ?digest= with the whole body, or PATCH chunks with
# Content-Range and a final empty PUT ?digest=.  The newest Location is
# always followed; a session interrupted is asked where it stands (GET, its
# Range) and resumed there.  An upload's PUT is never repeated blindly: it
# would append to what the registry already has.  Manifests are PUT byte for
# byte with their own media type.  A blob is checked by the registry against
# the digest its PUT names (the spec's DIGEST_INVALID): a whole one goes out
# unhashed, by sendfile; chunks are hashed before they go (their final PUT
# carries no bytes to refuse).

_UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024  # chunked uploads, unless asked otherwise
_MAX_UPLOAD_ATTEMPTS = 4


def _upload_location(response: _Response, registry: str) -> str:
    """Return the absolute Location of an upload answer, refusing one that is missing
    or carries credentials (a hostile registry must not make us send them on)."""
    from urllib.parse import urljoin, urlsplit
    location = response.header("Location")
    if not location:
        raise RegistryError(f"{registry} answered {response.status} to {response.method} "
                            f"{_redact_url(response.url)} without a Location",
                            status=response.status, method=response.method,
                            url=_redact_url(response.url))
    url = urljoin(response.url, location)
    if "@" in (urlsplit(url).netloc or ""):
        raise RegistryError(f"{registry} named an upload location with credentials in it; "
                            "refused", method=response.method, url=_redact_url(url))
    return url


def _with_query(url: str, name: str, value: str) -> str:
    """Add ``name=value`` to a URL's query (an upload Location may carry its own)."""
    from urllib.parse import quote
    return f"{url}{'&' if '?' in url else '?'}{name}={quote(value, safe='')}"


def _uploaded_range(response: _Response) -> Optional[int]:
    """Return how many bytes an upload session holds, from its Range header
    (``0-N``: N+1 bytes; distribution answers ``0-0`` for none), None without one."""
    match = re.fullmatch(r"(?:bytes=)?([0-9]{1,19})-([0-9]{1,19})", response.header("Range"))
    if match is None:
        return None
    return int(match.group(2)) + 1 if int(match.group(2)) > 0 else 0


class _UploadRefused(Exception):
    """Internal: the registry refused the request for its size (413): send chunks."""


class _Uploader:
    """Puts blobs and manifests into one repository of a registry (a push client).

    ``chunk_bytes`` sends every blob in PATCH chunks of that size; without
    it a blob goes up in one PUT, and in chunks once the registry refuses a
    request that large (413).  ``progress(descriptor, sent, size)`` follows
    the bytes that go out.
    """

    def __init__(self, client: _RegistryClient, chunk_bytes: Optional[int] = None,
                 progress: Optional[Callable[[Descriptor, int, int], None]] = None) -> None:
        self.client = client
        self.registry = client.registry
        self.repository = client.repository
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self._whole_refused = False

    # -- blobs ------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        """Tell whether the repository has the blob (HEAD)."""
        try:
            self.client.request("HEAD", f"/v2/{self.repository}/blobs/{digest}").close()
        except NotFoundError:
            return False
        return True

    def mount(self, digest: str, source_repository: Optional[str]
              ) -> Tuple[bool, Optional[str], Optional[int]]:
        """Mount a blob from another repository (``None``: any, as spec 1.1 allows).

        Returns (mounted, the upload session's Location when not, the chunk
        size the registry asks for at least).
        """
        query = f"mount={digest}" + (f"&from={source_repository}" if source_repository else "")
        scope = None
        if source_repository and source_repository != self.repository:
            scope = f"{self.client.scope} repository:{source_repository}:pull"
        response = self.client.request("POST", f"/v2/{self.repository}/blobs/uploads/?{query}",
                                       ok=(201, 202), scope=scope)
        response.close()
        if response.status == 201:
            return True, None, None
        return False, _upload_location(response, self.registry), \
            _header_int(response.header("OCI-Chunk-Min-Length"))

    def cancel(self, location: Optional[str]) -> None:
        """DELETE an upload session no longer needed (best effort: a registry drops
        abandoned sessions itself, later)."""
        if not location:
            return
        try:
            self.client.request("DELETE", location, ok=(202, 204, 200, 404),
                                retries=0).close()
        except (ZLayerError, OSError):
            pass

    def start(self) -> Tuple[str, Optional[int]]:
        """Open an upload session; return its Location and the chunk size it asks for."""
        response = self.client.request("POST", f"/v2/{self.repository}/blobs/uploads/",
                                       ok=(202,))
        response.close()
        return _upload_location(response, self.registry), \
            _header_int(response.header("OCI-Chunk-Min-Length"))

    def upload(self, descriptor: Descriptor, file: BinaryIO, offset: int,
               session: Optional[Tuple[str, Optional[int]]] = None) -> None:
        """Upload a blob (``length`` bytes of ``file`` from ``offset``) into a session."""
        location, minimum = session or self.start()
        chunk = self.chunk_bytes
        if chunk is None and not self._whole_refused:
            try:
                self._put_whole(location, descriptor, file, offset)
                return
            except _UploadRefused:
                self._whole_refused = True  # and for the rest of this push
                location, minimum = self.start()
        chunk = max(chunk or _UPLOAD_CHUNK_BYTES, minimum or 0)
        self._put_chunks(location, descriptor, file, offset, chunk)

    def _put_whole(self, location: str, descriptor: Descriptor, file: BinaryIO,
                   offset: int) -> None:
        """PUT the whole blob; an attempt cut off is resumed from what the session holds.

        The file goes out by sendfile, unhashed: the registry checks it
        against the digest the PUT names (the spec's DIGEST_INVALID), and
        only a refusal has it hashed here, to tell whose copy is wrong.
        """
        body = _FileBody(file, offset, descriptor.size, self._reporter(descriptor))
        for attempt in range(_MAX_UPLOAD_ATTEMPTS):
            try:
                response = self.client.request(
                    "PUT", _with_query(location, "digest", descriptor.digest),
                    headers={"Content-Type": "application/octet-stream"}, body=body,
                    ok=(201, 204), retries=0)
            except RegistryError as exc:
                if body.sent == body.length and exc.status is not None and \
                        not exc.temporary and exc.status != 413:
                    # Refused whole: if our copy is what is wrong, say so.
                    _verify_part(file, offset, descriptor)
                    raise
                if exc.status == 413:
                    raise _UploadRefused() from exc
                if exc.status is not None and not exc.temporary:
                    raise
                # Cut off, or a 5xx: where does the session stand?
                self.client.backoff(attempt)
                held = self._held(location)
                if held is None:
                    location = self.start()[0]  # the session is gone: a fresh one
                elif held:
                    _verify_part(file, offset, descriptor)
                    self._put_chunks(location, descriptor, file, offset, _UPLOAD_CHUNK_BYTES,
                                     start=held)
                    return
                continue
            response.close()
            self._check_stored(response, descriptor.digest)
            return
        raise RegistryError(f"upload of blob {descriptor.digest} to {self.registry} kept "
                            f"failing after {_MAX_UPLOAD_ATTEMPTS} attempts", temporary=True,
                            method="PUT", url=_redact_url(location))

    def _held(self, location: str) -> Optional[int]:
        """Return how many bytes an upload session holds (GET), None when it is gone."""
        try:
            response = self.client.request("GET", location, ok=(204, 200))
        except NotFoundError:
            return None
        response.close()
        return _uploaded_range(response) or 0

    def _put_chunks(self, location: str, descriptor: Descriptor, file: BinaryIO, offset: int,
                    chunk: int, start: int = 0) -> None:
        """PATCH the blob in chunks from byte ``start``, then PUT ?digest= to finish.

        Each answer's Location is the next request's; a chunk refused with 416
        or cut off re-syncs from the Range the session reports.
        """
        report = self._reporter(descriptor)
        if start == 0:
            _verify_part(file, offset, descriptor)  # no hash is taken on the way here
        done, setbacks = start, 0
        while done < descriptor.size:
            count = min(chunk, descriptor.size - done)
            try:
                response = self.client.request(
                    "PATCH", location, ok=(202, 204), body=_FileBody(file, offset + done, count),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{done}-{done + count - 1}"})
            except RegistryError as exc:
                if exc.status == 413 and chunk > 64 * 1024:
                    chunk //= 2  # the registry (or a proxy before it) takes less at once
                    continue
                if exc.status is not None and exc.status != 416 and not exc.temporary:
                    raise
                setbacks += 1
                if setbacks > _MAX_UPLOAD_ATTEMPTS:
                    raise
                self.client.backoff(setbacks - 1)
                held = self._held(location)
                if held is None:
                    raise RegistryError(f"{self.registry} lost the upload session of blob "
                                        f"{descriptor.digest}", method="PATCH",
                                        url=_redact_url(location)) from exc
                done = held
                continue
            response.close()
            location = _upload_location(response, self.registry)
            held = _uploaded_range(response)
            done = held if held is not None and done < held <= done + count else done + count
            if report is not None:
                report(done)
        response = self.client.request("PUT", _with_query(location, "digest", descriptor.digest),
                                       ok=(201, 204), body=b"", retries=0)
        response.close()
        self._check_stored(response, descriptor.digest)

    def _check_stored(self, response: _Response, digest: str) -> None:
        """Refuse an answer that says a blob was stored under another digest."""
        stored = response.header("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(f"{self.registry} stored blob {digest} as {stored[:80]}",
                                method="PUT", url=_redact_url(response.url))

    def _reporter(self, descriptor: Descriptor) -> Optional[Callable[[int], None]]:
        if self.progress is None:
            return None
        progress = self.progress
        return lambda sent: progress(descriptor, sent, descriptor.size)

    # -- manifests --------------------------------------------------------------

    def put_manifest(self, identifier: str, raw: bytes, media_type: str) -> bool:
        """PUT a manifest byte for byte under a tag or its digest; tell whether the
        registry indexed its subject (the ``OCI-Subject`` answer of spec 1.1)."""
        response = self.client.request("PUT", f"/v2/{self.repository}/manifests/{identifier}",
                                       headers={"Content-Type": media_type}, body=raw,
                                       ok=(201, 200, 204))
        response.close()
        digest = compute_digest(raw)
        stored = response.header("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(f"{self.registry} stored manifest {digest} as {stored[:80]}",
                                method="PUT", url=_redact_url(response.url))
        return bool(response.header("OCI-Subject"))


def _verify_part(file: BinaryIO, offset: int, descriptor: Descriptor) -> None:
    """Hash ``descriptor.size`` bytes of ``file`` from ``offset`` against the descriptor."""
    file.seek(offset)
    limited = _LimitedReader(file, descriptor.size)
    _drain_checked(limited, descriptor, f"blob {descriptor.digest} to upload")


class _LimitedReader:
    """Reads at most ``limit`` bytes of a file (a blob inside an archive)."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file, self._left = file, limit

    def read(self, size: int = -1) -> bytes:
        count = self._left if size is None or size < 0 else min(size, self._left)
        data = self._file.read(count) if count else b""
        self._left -= len(data)
        return data

    def close(self) -> None:
        """Do nothing: the file is its opener's to close."""


# =============================================================================
# 23. CACHE FILES: content-addressed files, writers (direct I/O), locks, references
# =============================================================================

class _FileBlobWriter(BlobWriter):
    """Streams into ``tmp/`` inside the cache, then renames into ``blobs/``.

    Blobs of ``_DIRECT_IO_MIN_BYTES`` or more are written with ``O_DIRECT``
    where the file system allows it: whole aligned chunks go from one staging
    buffer straight to the disk, past the page cache.  The blob is fsynced
    before it becomes visible either way, so the page cache would only be a
    detour; on VMs that return freed memory to the host it is a slow one (a
    fresh page costs a host fault).  The unaligned tail is written buffered.
    """

    def __init__(self, files: "_BlobFiles", digest: Optional[str], size: Optional[int],
                 algorithm: str, on_commit: Callable[[str, int], None]) -> None:
        super().__init__(digest, size, algorithm)
        self._files, self._on_commit = files, on_commit
        stem = digest.split(":", 1)[1][:16] if digest else "upload"
        try:
            fd, self._tmp_path = _create_temporary(files.tmp_dir, stem)
        except OSError as exc:
            raise CacheError(f"cannot write to cache {files.root}: {exc.strerror or exc}") from exc
        self._fd: Optional[int] = fd
        self._stage: Optional[memoryview] = None
        self._staged = 0
        if size is not None and size >= _DIRECT_IO_MIN_BYTES and _set_direct_io(fd, True):
            self._stage = _take_stage()
        self.readable_path = self._tmp_path  # the inode stays the blob's after the rename
        self._in_file = 0  # bytes written to the file so far (not those still staged)

    def readable_bytes(self) -> int:
        """Return how many bytes of the blob are in the file."""
        return self._in_file

    def _sink_write(self, data: Any) -> None:
        try:
            view = memoryview(data)
            while view and self._stage is not None:
                count = min(len(view), _DIRECT_IO_STAGE_BYTES - self._staged)
                self._stage[self._staged:self._staged + count] = view[:count]
                self._staged += count
                view = view[count:]
                if self._staged == _DIRECT_IO_STAGE_BYTES:
                    self._flush_stage()
            if view:
                _write_all(self._fd, view)
                self._in_file += len(view)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def buffer(self) -> memoryview:
        """The free end of the staging buffer (received into, never copied)."""
        if self._stage is None:
            return super().buffer()
        return self._limit(self._stage[self._staged:])

    def filled(self, count: int) -> None:
        if self._stage is None:
            super().filled(count)
            return
        self._take(self._stage[self._staged:self._staged + count])
        self._staged += count
        if self._staged == _DIRECT_IO_STAGE_BYTES:
            try:
                self._flush_stage()
            except OSError as exc:
                raise self._write_failed(exc) from exc

    def _flush_stage(self) -> None:
        """Write the staged bytes; an unaligned tail or a short write ends direct I/O."""
        staged = self._stage[:self._staged]
        count = len(staged)
        aligned = count - count % _DIRECT_IO_ALIGN_BYTES
        done = 0
        if aligned:
            try:
                done = os.write(self._fd, staged[:aligned])
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: alignment refused
                    raise
        self._staged = 0
        if done < len(staged):
            _set_direct_io(self._fd, False)
            _write_all(self._fd, staged[done:])
            staged.release()
            self._drop_stage()
        self._in_file += count  # all of it, directly or not

    def _sink_truncate(self) -> None:
        self._staged = 0
        self._in_file = 0
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def check(self, digest: Optional[str] = None) -> None:
        """Verify, and close the temporary file (a checked blob waits without an fd)."""
        super().check(digest)
        if self._fd is not None:
            try:
                if self._stage is not None:
                    self._flush_stage()
                os.fsync(self._fd)
            except OSError as exc:
                raise self._write_failed(exc) from exc
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._drop_stage()

    def _drop_stage(self) -> None:
        if self._stage is not None:
            _return_stage(self._stage)
            self._stage = None

    def _write_failed(self, exc: OSError) -> CacheError:
        """Discard the partial blob; return the error to raise for ``exc``."""
        self.abort()
        return CacheError(f"cannot write {self.subject} to cache {self._files.root}: "
                          f"{exc.strerror or exc}")

    def _sink_commit(self) -> None:
        final = self._files.blob_path(str(self.digest))
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.chmod(self._tmp_path, 0o444)
            os.replace(self._tmp_path, final)
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot store {self.subject} in cache "
                             f"{self._files.root}: {exc.strerror or exc}") from exc
        self._on_commit(str(self.digest), self.offset)

    def _sink_abort(self) -> None:
        self._close()
        try:
            os.unlink(self._tmp_path)
        except FileNotFoundError:
            pass


# Staging buffers of finished writers, reused by the next ones: fresh pages
# are the expensive kind in a VM that returns freed memory to its host.
_SPARE_STAGES: List[memoryview] = []
_SPARE_STAGES_MAX = DEFAULT_MAX_WORKERS
_SPARE_STAGES_LOCK = threading.Lock()


def _take_stage() -> memoryview:
    with _SPARE_STAGES_LOCK:
        if _SPARE_STAGES:
            return _SPARE_STAGES.pop()
    import mmap  # page-aligned, as O_DIRECT needs
    return memoryview(mmap.mmap(-1, _DIRECT_IO_STAGE_BYTES))


def _return_stage(stage: memoryview) -> None:
    with _SPARE_STAGES_LOCK:
        if len(_SPARE_STAGES) < _SPARE_STAGES_MAX:
            _SPARE_STAGES.append(stage)


def _set_direct_io(fd: int, enable: bool) -> bool:
    """Turn O_DIRECT on or off for a file; False where unsupported (tmpfs, non-Linux)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("ZLAYER_NO_DIRECT_IO"):
        return False
    import fcntl
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if enable else flags & ~flag)
    except OSError:
        return False
    return True


class _BlobFileLock:
    """flock() on ``locks/<alg>-<hex>.lock``: one downloader per blob across processes.

    The holder removes the lock file once the blob is stored; a process
    still waiting on the old file then finds the blob present, so the worst
    case of that race is a second download, never a corrupt blob.
    """

    def __init__(self, files: "_BlobFiles", digest: str, path: str) -> None:
        self._files, self._digest, self._path = files, digest, path
        self._fd: Optional[int] = None

    def __enter__(self) -> "_BlobFileLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic renames still keep blobs whole
            return self
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                               0o644)
        except OSError as exc:
            raise CacheError(f"cannot create lock in cache {self._files.root}: "
                             f"{exc.strerror or exc}") from exc
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is None:
            return
        if self._files.has(self._digest):
            try:
                os.unlink(self._path)
            except OSError:
                pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None


# Reference records are files: refs/<name> holds one JSON object
# {"reference", "digest", "media_type"}; the name is the reference with
# everything but [A-Za-z0-9_@+-] (and a leading ".") percent-encoded, or the
# reference's sha256 when that would be too long for a file name.
_REFERENCE_NAME_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789_@+-.")
_MAX_REFERENCE_NAME = 200
_MAX_REFERENCE_RECORD_BYTES = 64 * 1024


def _reference_file_name(reference: str) -> str:
    """Return the file name of a reference's record (see above)."""
    name = "".join(c if c in _REFERENCE_NAME_SAFE else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in reference)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_REFERENCE_NAME:
        return "sha256-" + hashlib.sha256(reference.encode("utf-8")).hexdigest()
    return name


class _BlobFiles:
    """A content-addressed directory: the truth a directory cache keeps.

    ``blobs/<alg>/<hex>`` holds verified blobs (read-only files), ``tmp/``
    partial writes (named with the writer's PID, flocked), ``locks/`` the
    per-blob download locks and ``refs/`` the reference records.  Readable
    without any index: the SQLite index beside it only speeds queries up.
    """

    def __init__(self, root: str, read_only: bool) -> None:
        self.root = root
        self.read_only = read_only
        self.blobs_dir = os.path.join(root, "blobs")
        self.tmp_dir = os.path.join(root, "tmp")
        self.locks_dir = os.path.join(root, "locks")
        self.refs_dir = os.path.join(root, "refs")

    def create(self) -> None:
        """Make the directories of a writable store (refs/ aside: ``create_refs``)."""
        try:
            for directory in (self.blobs_dir, self.tmp_dir, self.locks_dir):
                os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {self.root}: "
                             f"{exc.strerror or exc}") from exc

    # -- blobs ------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        """Return where a blob's file lives (whether or not it is there)."""
        algorithm, encoded = _validate_digest(digest).split(":", 1)
        return os.path.join(self.blobs_dir, algorithm, encoded)

    def has(self, digest: str) -> bool:
        """Tell whether a blob file is present."""
        try:
            return os.path.isfile(self.blob_path(digest))
        except InvalidDigestError:
            return False

    def size(self, digest: str) -> Optional[int]:
        """Return a blob file's size, or None when it is absent."""
        try:
            return os.path.getsize(self.blob_path(digest))
        except (OSError, InvalidDigestError):
            return None

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Open a blob file for reading, or return None when it is absent."""
        try:
            return open(self.blob_path(digest), "rb")
        except (FileNotFoundError, InvalidDigestError):
            return None

    def is_empty(self) -> bool:
        """Tell whether no blob file is stored (one directory read per algorithm)."""
        try:
            with os.scandir(self.blobs_dir) as algorithms:
                for algorithm in algorithms:
                    with os.scandir(algorithm.path) as blobs:
                        if next(blobs, None) is not None:
                            return False
        except OSError:
            return False  # unreadable, or a stray file: assume it holds something
        return True

    def listing(self) -> Iterator[Tuple[str, os.stat_result]]:
        """Yield (digest, stat) of every blob file, sorted by digest."""
        for algorithm in sorted(_DIGEST_HEX_LENGTHS):
            directory = os.path.join(self.blobs_dir, algorithm)
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    yield f"{algorithm}:{name}", os.stat(os.path.join(directory, name))
                except FileNotFoundError:
                    continue

    def begin_write(self, digest: Optional[str], size: Optional[int], algorithm: str,
                    on_commit: Callable[[str, int], None]) -> "_FileBlobWriter":
        """Start writing a blob into ``tmp/``; ``on_commit(digest, size)`` follows its rename."""
        return _FileBlobWriter(self, digest, size, algorithm, on_commit)

    def adopt(self, path: str, digest: str) -> None:
        """Rename a file whose bytes were verified as ``digest`` into ``blobs/`` (a file
        of this directory's file system, fsynced by its writer)."""
        final = self.blob_path(digest)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.chmod(path, 0o444)
            os.replace(path, final)
        except OSError as exc:
            raise CacheError(f"cannot store blob {digest} in cache {self.root}: "
                             f"{exc.strerror or exc}") from exc

    def lock(self, digest: str) -> _BlobFileLock:
        """Return the per-blob download lock shared by every process using this directory."""
        algorithm, encoded = _validate_digest(digest).split(":", 1)
        return _BlobFileLock(self, digest, os.path.join(self.locks_dir,
                                                        f"{algorithm}-{encoded}.lock"))

    def delete(self, digest: str) -> bool:
        """Remove a blob file; tell whether it was there."""
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return True

    def set_used(self, digests: Iterable[str], when: float) -> None:
        """Set blob files' times to ``when`` (last use, where no index keeps it)."""
        for digest in digests:
            try:
                os.utime(self.blob_path(digest), (when, when))
            except (OSError, InvalidDigestError):
                pass

    def sweep_temporaries(self) -> None:
        """Remove partial files of processes that no longer run (crash leftovers)."""
        _sweep_leftovers(self.tmp_dir, "", once=False)

    # -- reference records ------------------------------------------------------

    def has_refs(self) -> bool:
        """Tell whether the reference records directory exists."""
        return os.path.isdir(self.refs_dir)

    def create_refs(self) -> None:
        """Make the reference records directory."""
        try:
            os.makedirs(self.refs_dir, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create {self.refs_dir}: {exc.strerror or exc}") from exc

    def write_reference(self, reference: str, digest: str, media_type: str,
                        complete: bool) -> None:
        """Record ``reference`` → ``digest`` atomically; nothing is written when the
        record is there already, or when an incomplete one would replace a complete
        one of the same digest (a warm pull of the same tag writes nothing)."""
        fields = {"reference": reference, "digest": digest, "media_type": media_type}
        whole = json.dumps(fields, sort_keys=True).encode() + b"\n"
        record = whole if complete else \
            json.dumps(dict(fields, complete=False), sort_keys=True).encode() + b"\n"
        path = os.path.join(self.refs_dir, _reference_file_name(reference))
        existing = _read_regular_file(path, _MAX_REFERENCE_RECORD_BYTES)
        if existing in (record, whole):
            return
        try:
            if not self.has_refs():
                self.create_refs()
            _atomic_write(path, record)
        except OSError as exc:
            raise CacheError(f"cannot record {reference} in cache {self.root}: "
                             f"{exc.strerror or exc}") from exc

    def read_reference(self, reference: str) -> Optional[Dict[str, str]]:
        """Return the record of ``reference``, or None when there is none."""
        path = os.path.join(self.refs_dir, _reference_file_name(reference))
        if not os.path.lexists(path):
            return None
        record = self._read_record(path)
        return record if record["reference"] == reference else None

    def read_references(self) -> List[Dict[str, str]]:
        """Return every reference record; a CacheError when any cannot be read."""
        try:
            names = sorted(n for n in os.listdir(self.refs_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CacheError(f"cannot read the reference records in {self.refs_dir}: "
                             f"{exc.strerror or exc}") from exc
        return [self._read_record(os.path.join(self.refs_dir, name)) for name in names]

    def _read_record(self, path: str) -> Dict[str, str]:
        raw = _read_regular_file(path, _MAX_REFERENCE_RECORD_BYTES)
        try:
            if raw is None:
                raise ValueError("not a readable file")
            record = _json_object(raw)
            _validate_digest(record.get("digest"))
            if not isinstance(record.get("reference"), str):
                raise ValueError("no reference in it")
        except (ValueError, InvalidDigestError) as exc:
            raise CacheError(f"reference record {path} is damaged ({exc}): remove it, "
                             "then pull that image again") from None
        return {"reference": record["reference"], "digest": record["digest"],
                "media_type": str(record.get("media_type") or ""),
                "complete": record.get("complete", True) is not False}

    def remove_reference(self, reference: str) -> bool:
        """Remove a reference record; tell whether there was one."""
        try:
            os.unlink(os.path.join(self.refs_dir, _reference_file_name(reference)))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheError(f"cannot forget {reference} in cache {self.root}: "
                             f"{exc.strerror or exc}") from exc
        return True


# =============================================================================
# 24. LOCAL REPOSITORIES: repositories, tags and manifests as files beside the blobs
# =============================================================================
# The local registry's repositories live in the directory cache, beside its
# blobs, so that one copy of each blob serves pulls and stored images alike:
#   repositories/<name>/_manifests/tags/<tag>                {"digest", "media_type"}
#   repositories/<name>/_manifests/revisions/<alg>/<hex>     {"media_type", "size", ...}
#   repositories/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>   the referrer's descriptor
# A name is path components of the reference grammar (lowercase letters,
# digits and separators, never "." or ".." or a leading "_"), so it is safe
# as a path and never collides with the "_" directories.  The cache sees each
# tag as the reference record "local:NAME:TAG" and each manifest as
# "local:NAME@DIGEST": gc, prune and `cache ls` share one notion of what the
# store keeps.

_MAX_LOCAL_RECORD_BYTES = 64 * 1024


class _RepositoryFiles:
    """The repositories of a local registry, as files (see above): the truth, read
    without any index.  Writes are atomic renames; a tag written by two
    writers at once ends as one of them, whole."""

    def __init__(self, root: str, read_only: bool = False) -> None:
        self.root = root
        self.read_only = read_only
        self.directory = os.path.join(root, "repositories")
        self._gc_lock_path = os.path.join(root, "locks", "gc.lock")

    def exists(self) -> bool:
        """Tell whether the cache holds a local registry (opened here once, at least)."""
        return os.path.isdir(self.directory)

    def create(self) -> None:
        """Make the repositories directory."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create {self.directory}: {exc.strerror or exc}") from exc

    def _repository_dir(self, name: str) -> str:
        return os.path.join(self.directory, *_validate_repository(name).split("/"))

    def _tag_path(self, name: str, tag: str) -> str:
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(f"{name}:{str(tag)[:140]}", "invalid tag")
        return os.path.join(self._repository_dir(name), "_manifests", "tags", tag)

    def _revision_path(self, name: str, digest: str) -> str:
        algorithm, encoded = _validate_digest(digest).split(":", 1)
        return os.path.join(self._repository_dir(name), "_manifests", "revisions",
                            algorithm, encoded)

    def _referrers_dir(self, name: str, subject: str) -> str:
        algorithm, encoded = _validate_digest(subject).split(":", 1)
        return os.path.join(self._repository_dir(name), "_referrers", algorithm, encoded)

    def _write(self, path: str, record: Mapping[str, Any]) -> None:
        if self.read_only:
            raise CacheError(f"store {self.root} is read-only")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _atomic_write(path, json.dumps(record, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            raise CacheError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _read(self, path: str) -> Optional[Dict[str, Any]]:
        """Return a record, None when absent; a damaged one is a CacheError."""
        if not os.path.lexists(path):
            return None
        raw = _read_regular_file(path, _MAX_LOCAL_RECORD_BYTES)
        try:
            if raw is None:
                raise ValueError("not a readable file")
            record = _json_object(raw)
            if "digest" in record:
                _validate_digest(record["digest"])
        except (ValueError, InvalidDigestError) as exc:
            raise CacheError(f"record {path} is damaged ({exc}): remove it") from None
        return record

    @staticmethod
    def _remove(path: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        return True

    # -- repositories -----------------------------------------------------------

    def names(self) -> List[str]:
        """Return every repository that holds a manifest, sorted."""
        found = []
        for parent, directories, _ in os.walk(self.directory):
            directories[:] = [d for d in directories if _PATH_COMPONENT_RE.fullmatch(d)]
            if parent != self.directory:
                name = os.path.relpath(parent, self.directory).replace(os.sep, "/")
                if self.revisions(name):
                    found.append(name)
        return sorted(found)

    def remove_repository(self, name: str) -> bool:
        """Remove a repository's tags, manifests and referrers (not its nested ones)."""
        import shutil
        directory = self._repository_dir(name)
        removed = False
        for part in ("_manifests", "_referrers"):
            path = os.path.join(directory, part)
            if os.path.isdir(path):
                # Renamed away first: a reader sees the repository whole or gone.
                doomed = _temporary_path(self.directory, ".removed", "")
                try:
                    os.replace(path, doomed)
                except OSError as exc:
                    raise CacheError(f"cannot remove {name}: {exc.strerror or exc}") from exc
                shutil.rmtree(doomed, ignore_errors=True)
                removed = True
        return removed

    # -- tags -------------------------------------------------------------------

    def tags(self, name: str) -> List[str]:
        """Return a repository's tags, sorted."""
        try:
            return sorted(t for t in os.listdir(os.path.join(
                self._repository_dir(name), "_manifests", "tags"))
                if _TAG_RE.fullmatch(t))
        except FileNotFoundError:
            return []

    def read_tag(self, name: str, tag: str) -> Optional[Dict[str, Any]]:
        """Return a tag's record (digest, media_type), or None."""
        return self._read(self._tag_path(name, tag))

    def write_tag(self, name: str, tag: str, digest: str, media_type: str) -> None:
        """Point a tag at a manifest (which must be a revision already)."""
        self._write(self._tag_path(name, tag), {"digest": digest, "media_type": media_type})

    def remove_tag(self, name: str, tag: str) -> bool:
        """Remove a tag; tell whether it was there."""
        return self._remove(self._tag_path(name, tag))

    # -- manifests ----------------------------------------------------------------

    def revisions(self, name: str) -> List[str]:
        """Return the digests of a repository's manifests, sorted."""
        found = []
        base = os.path.join(self._repository_dir(name), "_manifests", "revisions")
        for algorithm in sorted(_DIGEST_HEX_LENGTHS):
            try:
                found += [f"{algorithm}:{e}" for e in sorted(os.listdir(
                    os.path.join(base, algorithm))) if not e.startswith(".")]
            except FileNotFoundError:
                continue
        return found

    def read_revision(self, name: str, digest: str) -> Optional[Dict[str, Any]]:
        """Return a manifest's record in a repository (media_type, size, subject), or None."""
        return self._read(self._revision_path(name, digest))

    def write_revision(self, name: str, digest: str, record: Mapping[str, Any],
                       referrer: Optional[Mapping[str, Any]] = None) -> None:
        """Add a manifest to a repository; ``referrer``, its descriptor when it has a
        ``subject``, goes into the subject's referrers first."""
        if referrer is not None:
            algorithm, encoded = digest.split(":", 1)
            self._write(os.path.join(self._referrers_dir(name, str(record["subject"])),
                                     f"{algorithm}-{encoded}"), referrer)
        self._write(self._revision_path(name, digest), dict(record))

    def remove_revision(self, name: str, digest: str) -> bool:
        """Remove a manifest from a repository, with the tags naming it and its
        referrer entry; tell whether it was there."""
        record = self.read_revision(name, digest)
        for tag in self.tags(name):
            found = self._read(self._tag_path(name, tag))
            if found is not None and found.get("digest") == digest:
                self.remove_tag(name, tag)
        if record is not None and isinstance(record.get("subject"), str):
            algorithm, encoded = digest.split(":", 1)
            self._remove(os.path.join(self._referrers_dir(name, record["subject"]),
                                      f"{algorithm}-{encoded}"))
        return self._remove(self._revision_path(name, digest))

    def referrers(self, name: str, subject: str) -> List[Dict[str, Any]]:
        """Return the descriptors of the manifests whose subject is ``subject``."""
        directory = self._referrers_dir(name, subject)
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            record = self._read(os.path.join(directory, entry))
            if record is not None and self.read_revision(name, record["digest"]) is not None:
                found.append(record)
        return found

    # -- as the cache's reference records -------------------------------------------

    def records(self) -> List[Dict[str, Any]]:
        """Return every tag and manifest as a reference record (``local:NAME:TAG``,
        ``local:NAME@DIGEST``); a CacheError when one cannot be read."""
        if not self.exists():
            return []
        records = []
        for name in self.names():
            for tag in self.tags(name):
                record = self.read_tag(name, tag)
                if record is not None:
                    records.append({"reference": f"{_LOCAL_PREFIX}{name}:{tag}",
                                    "digest": record["digest"],
                                    "media_type": str(record.get("media_type") or ""),
                                    "complete": True})
            for digest in self.revisions(name):
                record = self.read_revision(name, digest) or {}
                records.append({"reference": f"{_LOCAL_PREFIX}{name}@{digest}",
                                "digest": digest,
                                "media_type": str(record.get("media_type") or ""),
                                "complete": True})
        return records

    def lookup(self, reference: str) -> Optional[Dict[str, Any]]:
        """Return the record of ``local:NAME:TAG`` or ``local:NAME@DIGEST``, or None."""
        try:
            name, tag, digest = _parse_local_reference(reference[len(_LOCAL_PREFIX):])
        except InvalidReferenceError:
            return None
        if digest is not None:
            record = self.read_revision(name, digest)
            return None if record is None else dict(record, digest=digest)
        return self.read_tag(name, str(tag))

    def forget(self, reference: str) -> bool:
        """Remove the tag, or the manifest, a ``local:`` reference names."""
        name, tag, digest = _parse_local_reference(reference[len(_LOCAL_PREFIX):])
        if digest is not None:
            return self.remove_revision(name, digest)
        return self.remove_tag(name, str(tag))

    def gc_lock(self, exclusive: bool) -> "_FileLock":
        """Return the lock a collection holds exclusively and a manifest write shared:
        no collection marks while a manifest is being added."""
        return _FileLock(self._gc_lock_path, exclusive)


class _FileLock:
    """flock() on a file, shared or exclusive, across threads and processes."""

    def __init__(self, path: str, exclusive: bool) -> None:
        self._path, self._exclusive = path, exclusive
        self._fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process exclusion
            return self
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT
                               | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise CacheError(f"cannot create lock {self._path}: {exc.strerror or exc}") from exc
        fcntl.flock(self._fd, fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# =============================================================================
# 25. CACHE INDEX: SQLite beside the files
# =============================================================================

# Two statements rather than an UPSERT, which needs SQLite 3.24 (older than
# some Python 3.8 builds link against).
_INSERT_BLOB = "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)"
_UPDATE_BLOB = ("UPDATE blobs SET last_used_at = ?, media_type = CASE WHEN ? != '' THEN ? "
                "ELSE media_type END WHERE digest = ?")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT NOT NULL,
    added_at REAL NOT NULL, last_used_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refs (
    reference TEXT PRIMARY KEY, digest TEXT NOT NULL, media_type TEXT NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS locations (
    digest TEXT NOT NULL, registry TEXT NOT NULL, repository TEXT NOT NULL,
    seen_at REAL NOT NULL, PRIMARY KEY (digest, registry, repository));
"""


class _SqliteIndex:
    """The directory cache's SQLite index: blob sizes, media types and use times.

    Only an index: everything in it but the media types and use times can be
    rebuilt from the files, and the cache works without it.  One connection
    per thread (WAL mode, busy timeout).  Rows of stored blobs are queued and
    written in one transaction by the next query.  sqlite3 is imported at
    first use; without it every query returns nothing.  A ``read_only`` index
    is opened immutable (SQLite writes nothing, not even its -shm file) and
    drops every write.
    """

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._module: Any = _NOT_IMPORTED
        self._local = threading.local()
        self._connections: List[Any] = []
        self._lock = threading.Lock()
        self._pending_rows: List[Tuple[str, int, str, float]] = []
        self._pending_locations: List[Tuple[str, str, str, float]] = []

    @property
    def sqlite(self) -> Any:
        """The sqlite3 module (None without it), imported at first use: a pull
        imports it while its downloads run (``DirectoryBlobCache.warm_up``)."""
        if self._module is _NOT_IMPORTED:
            self._module = _import_sqlite3()
        return self._module

    @sqlite.setter
    def sqlite(self, module: Any) -> None:
        self._module = module

    def db(self) -> Any:
        """Return this thread's SQLite connection, or None without sqlite3 (or,
        read-only, without an index file)."""
        if self.sqlite is None:
            return None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect_read_only() if self.read_only else self._connect()
            if conn is None:
                return None
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> Any:
        """Open the index, set WAL mode and create tables, retrying while busy.

        Switching to WAL takes an exclusive lock and SQLite does not run the
        busy handler for it, so processes opening a new cache at the same
        moment can get "database is locked": they retry for up to 30 s.
        """
        deadline = time.monotonic() + 30.0
        delay_s = 0.005
        while True:
            try:
                # Each connection serves one thread; check_same_thread=False only
                # lets close() shut the worker threads' connections too.
                conn = self.sqlite.connect(self.path, timeout=30.0,
                                           isolation_level=None, check_same_thread=False)
                try:
                    conn.execute("PRAGMA busy_timeout = 30000")
                    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    conn.executescript(_SCHEMA)
                except BaseException:
                    conn.close()
                    raise
                return conn
            except self.sqlite.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) \
                        or time.monotonic() > deadline:
                    raise CacheError(f"cannot open cache index {self.path}: {exc}") from exc
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.2)
            except self.sqlite.Error as exc:
                raise CacheError(f"cannot open cache index {self.path}: {exc}") from exc

    def _connect_read_only(self) -> Any:
        """Open the index immutable, or return None when there is none to open."""
        if not os.path.isfile(self.path):
            return None
        from urllib.parse import quote
        try:
            return self.sqlite.connect(f"file:{quote(self.path)}?immutable=1", uri=True,
                                       check_same_thread=False)
        except self.sqlite.Error:
            return None  # the files alone will do

    def execute(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """Run one query after the queued rows; return its rows ([] without sqlite3)."""
        db = self.db()
        if db is None:
            return []
        self.flush()
        try:
            return db.execute(sql, params).fetchall()
        except self.sqlite.Error as exc:
            if self.read_only:
                # Immutable reads skip a WAL its writer left unmerged: the
                # tables may not be there yet.  The files alone will do.
                return []
            raise CacheError(f"cache index {self.path}: {exc}") from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], flush: bool = True,
                    then: Optional[Tuple[str, Sequence[Sequence[Any]]]] = None) -> None:
        """Run ``sql`` for every row (and ``then``'s statement) in one transaction."""
        db = None if self.read_only else self.db()
        if db is None:
            return
        if flush:
            self.flush()
        if not rows:
            return
        try:
            with db:  # one transaction for the whole batch
                db.execute("BEGIN")
                db.executemany(sql, rows)
                if then is not None:
                    db.executemany(*then)
        except self.sqlite.Error as exc:
            raise CacheError(f"cache index {self.path}: {exc}") from exc

    def queue_blob(self, digest: str, size: int, media_type: str) -> None:
        """Queue an index row for a stored blob (written in one batch by the next query).

        Workers only append here, so they never wait on SQLite's lock; a
        crash before the batch is harmless, since the files are the truth.
        Importing sqlite3 is left to the batch: here it would delay the first
        download by the manifest's commit.
        """
        if self._module is None or self.read_only:
            return
        with self._lock:
            self._pending_rows.append((digest, size, media_type, time.time()))

    def queue_location(self, digest: str, registry: str, repository: str) -> None:
        """Queue a row saying where a blob was seen (written with the next query)."""
        if self._module is None or self.read_only:
            return
        with self._lock:
            self._pending_locations.append((digest, registry, repository, time.time()))

    def flush(self) -> None:
        """Write the queued blob and location rows, each kind in one transaction."""
        with self._lock:
            rows, self._pending_rows = self._pending_rows, []
            seen, self._pending_locations = self._pending_locations, []
        if rows:
            self.executemany(_INSERT_BLOB, [(d, n, m, t, t) for d, n, m, t in rows], flush=False,
                             then=(_UPDATE_BLOB, [(t, m, m, d) for d, n, m, t in rows]))
        if seen:
            self.executemany("INSERT OR REPLACE INTO locations VALUES (?, ?, ?, ?)", seen,
                             flush=False)

    def legacy_references(self) -> List[Tuple[str, str, str]]:
        """Return the (reference, digest, media type) rows older versions kept here."""
        return [(str(r), str(d), str(m)) for r, d, m in
                self.execute("SELECT reference, digest, media_type FROM refs")]

    def drop_legacy_references(self) -> None:
        """Delete those rows, once they are reference records (files)."""
        self.execute("DELETE FROM refs")

    def close(self) -> None:
        """Write the queued rows and close every connection (when no thread uses them)."""
        if self.db() is not None:
            self.flush()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()


# =============================================================================
# 26. DIRECTORY CACHE: DirectoryBlobCache, the files and their index
# =============================================================================

class DirectoryBlobCache(BlobStore):
    """A persistent cache: content-addressed files, with a SQLite index beside them.

    The files are the truth (``_BlobFiles``: blobs, and references as
    records); the index keeps media types and last-use times and is rebuilt
    from the files when lost.  Safe for many threads and processes at once:
    writers use unique temporary files and atomic renames; SQLite runs in WAL
    mode with a busy timeout.  Without the sqlite3 module it works from the
    files alone.

    ``read_only`` (by default: an existing cache this process cannot write,
    such as one baked into an image or mounted read-only) serves what it holds
    and refuses to store or delete: a pull that needs a blob it lacks fails.
    """

    def __init__(self, root: str, read_only: Optional[bool] = None) -> None:
        self.root = os.path.abspath(root)
        blobs_dir = os.path.join(self.root, "blobs")
        if read_only is None:
            read_only = os.path.isdir(blobs_dir) and \
                not os.access(self.root, os.W_OK | os.X_OK)
        self.read_only = read_only
        self._files = _BlobFiles(self.root, read_only)
        self._repositories = _RepositoryFiles(self.root, read_only)
        self._index = _SqliteIndex(os.path.join(self.root, "index.sqlite"), read_only)
        if read_only:
            if not os.path.isdir(blobs_dir):
                raise CacheError(f"no cache at {self.root} to read")
            return
        new = not os.path.isdir(blobs_dir)
        self._files.create()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CacheError(f"cache directory {self.root} is not writable")
        if not self._files.has_refs():
            self._adopt_legacy_references(new)
        self._files.sweep_temporaries()

    def _adopt_legacy_references(self, new: bool) -> None:
        """Give a cache its refs/ directory, moving the records that older versions
        kept only in the index into it (so losing the index loses no reference)."""
        rows: List[Tuple[str, str, str]] = []
        if not new and os.path.exists(self._index.path):
            try:
                rows = self._index.legacy_references()
            except CacheError:
                pass  # a damaged index: no records to move
        if not rows and not new and not self._files.is_empty():
            return  # blobs but no records (refs/ removed?): gc refuses until a pull records one
        for reference, digest, media_type in rows:
            self._files.write_reference(reference, digest, media_type, complete=True)
        self._files.create_refs()
        if rows:
            self._index.drop_legacy_references()

    def _refuse_write(self, what: str) -> None:
        """Raise if this cache is read-only; ``what`` says what was to be done."""
        if self.read_only:
            raise CacheError(f"cache {self.root} is read-only: cannot {what}")

    def warm_up(self) -> None:
        """Open this thread's index connection now (called while downloads run)."""
        try:
            self._index.db()
        except CacheError:
            pass  # reported by the query that needs it

    # -- blobs ------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        """Tell whether a verified blob file is present."""
        return self._files.has(digest)

    def path(self, digest: str) -> Optional[str]:
        """Return the blob's file path, or None when absent."""
        return self._files.blob_path(digest) if self._files.has(digest) else None

    def size(self, digest: str) -> Optional[int]:
        """Return a stored blob's size in bytes, or None when it is absent."""
        return self._files.size(digest)

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Open a blob file for reading, or return None when absent."""
        return self._files.open_blob(digest)

    def is_empty(self) -> bool:
        """Tell whether no blob file is stored."""
        return self._files.is_empty()

    def digests(self) -> Iterator[str]:
        """Yield the digest of every blob file."""
        return (digest for digest, _ in self._files.listing())

    def media_type(self, digest: str) -> str:
        """Return the media type recorded with a blob ('' when unknown)."""
        rows = self._index.execute("SELECT media_type FROM blobs WHERE digest = ?", (digest,))
        return str(rows[0][0]) if rows else ""

    def entries(self) -> List[Dict[str, Any]]:
        """List blob files, with the index's metadata where it has a row."""
        rows = {r[0]: r for r in self._index.execute(
            "SELECT digest, size, media_type, added_at, last_used_at FROM blobs")}
        result = []
        for digest, info in self._files.listing():
            row = rows.get(digest)
            result.append({"digest": digest, "size": info.st_size,
                           "media_type": row[2] if row else "",
                           "added_at": row[3] if row else info.st_mtime,
                           "last_used_at": row[4] if row else info.st_mtime})
        return result

    def begin_write(self, digest: Optional[str] = None, size: Optional[int] = None,
                    media_type: str = "", algorithm: str = "sha256") -> BlobWriter:
        """Start writing a blob into a temporary file inside the cache."""
        self._refuse_write(f"store blob {digest or '(upload)'}")
        return self._files.begin_write(
            digest, size, algorithm,
            lambda stored, count: self._index.queue_blob(stored, count, media_type))

    def lock(self, digest: str) -> Any:
        """Return an exclusive per-blob lock shared by every process using this cache."""
        self._refuse_write(f"store blob {digest}")  # taken only to write one
        return self._files.lock(digest)

    def create_temporary(self, stem: str) -> Tuple[int, str]:
        """Create a temporary file in the cache's ``tmp/`` (what ``adopt`` takes);
        return (fd, path).  It is a leftover, swept, once its process is gone."""
        self._refuse_write("write a temporary file")
        try:
            return _create_temporary(self._files.tmp_dir, stem)
        except OSError as exc:
            raise CacheError(f"cannot write to cache {self.root}: {exc.strerror or exc}"
                             ) from exc

    def adopt(self, path: str, digest: str, media_type: str = "") -> None:
        """Take a file whose bytes the caller verified as ``digest`` into the cache by a
        rename (an upload session's file, in this cache's file system, fsynced)."""
        self._refuse_write(f"store blob {digest}")
        size = os.path.getsize(path)
        self._files.adopt(path, digest)
        self._index.queue_blob(digest, size, media_type)

    def delete(self, digest: str) -> bool:
        """Remove a blob file and its index row."""
        self._refuse_write(f"delete blob {digest}")
        self._index.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        return self._files.delete(digest)

    def record_location(self, digest: str, registry: str, repository: str) -> None:
        """Remember where a blob was seen (in the index; without one, nowhere)."""
        self._index.queue_location(digest, registry, repository)

    def locations(self, digest: str, registry: str) -> List[str]:
        """Return the repositories of ``registry`` the index saw the blob in."""
        return [str(r[0]) for r in self._index.execute(
            "SELECT repository FROM locations WHERE digest = ? AND registry = ? "
            "ORDER BY seen_at DESC LIMIT 8", (digest, registry))]

    def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs as used now, in one transaction (file mtimes without an index);
        a read-only cache keeps its times."""
        if self.read_only:
            return
        now = time.time()
        if self._index.db() is None:
            self._files.set_used(digests, now)
            return
        self._index.executemany("UPDATE blobs SET last_used_at = ? WHERE digest = ?",
                                [(now, d) for d in digests])

    # -- references -------------------------------------------------------------

    def record_reference(self, reference: str, digest: str, media_type: str, *,
                         complete: bool = True) -> None:
        """Remember which manifest ``reference`` resolved to (a read-only cache keeps none).

        The local registry's records (``local:NAME:TAG``) are written by
        LocalRegistry, which checks what they name.
        """
        if _is_local_record(reference):
            raise ValueError(f"{reference} is the local registry's: store it with LocalRegistry")
        if not self.read_only:
            self._files.write_reference(reference, digest, media_type, complete)

    def lookup_reference(self, reference: str) -> Optional[str]:
        """Return the manifest digest last recorded for ``reference``."""
        if _is_local_record(reference):
            found = self._repositories.lookup(reference)
            return found["digest"] if found else None
        if not self._files.has_refs():
            return self.references().get(reference)
        record = self._files.read_reference(reference)
        return record["digest"] if record else None

    def reference_records(self) -> List[Dict[str, Any]]:
        """Return every reference record (from its file), the local registry's too."""
        if not self._files.has_refs():
            # A read-only cache an older version wrote: its index has them.
            return [{"reference": r, "digest": d, "media_type": m, "complete": True}
                    for r, d, m in self._index.legacy_references()]
        return self._files.read_references() + self._repositories.records()

    def forget_reference(self, reference: str) -> bool:
        """Drop a reference record; tell whether there was one."""
        self._refuse_write(f"forget {reference}")
        if _is_local_record(reference):
            return self._repositories.forget(reference)
        return self._files.remove_reference(reference)

    # -- maintenance ------------------------------------------------------------

    def gc(self, grace_s: Optional[float] = None, dry_run: bool = False) -> List[str]:
        """Delete unreachable blobs, stale temporaries and index rows without files.

        Refuses to run when the reference records cannot all be read, or the
        cache holds blobs but no records at all: it would delete what they keep.
        Marks and sweeps holding the local registry's collection lock, so no
        manifest is added meanwhile.  ``grace_s`` defaults to
        ``DEFAULT_GC_GRACE_S`` where the cache holds a local registry (a blob
        uploaded there waits for its manifest), else to 0.
        """
        self._refuse_write("collect garbage")
        if not self._files.has_refs() and not self._files.is_empty():
            raise CacheError(f"cache {self.root} has blobs but no reference records "
                             f"({self._files.refs_dir} is missing): gc would delete every "
                             "blob; pull the images to keep first")
        if grace_s is None:
            grace_s = DEFAULT_GC_GRACE_S if self._repositories.exists() else 0.0
        with self._repositories.gc_lock(exclusive=True):
            removed = super().gc(grace_s, dry_run)
        if dry_run:
            return removed
        self._files.sweep_temporaries()
        present = set(self.digests())
        orphans = [r[0] for r in self._index.execute("SELECT digest FROM blobs")
                   if r[0] not in present]
        self._index.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in orphans])
        return removed

    def close(self) -> None:
        """Close every SQLite connection this cache opened (call when no thread uses it)."""
        self._index.close()


# =============================================================================
# 27. MEMORY CACHE: BlobCache, and where persistent caches are opened
# =============================================================================

class _MemoryBlobWriter(BlobWriter):
    """Collects a blob in memory; its commit stores it in the BlobCache."""

    def __init__(self, store: Callable[[str, bytes], None], digest: Optional[str],
                 size: Optional[int], algorithm: str) -> None:
        super().__init__(digest, size, algorithm)
        self._store = store
        self._chunks: List[bytes] = []

    def _sink_write(self, data: Any) -> None:
        self._chunks.append(bytes(data))

    def _sink_truncate(self) -> None:
        self._chunks = []

    def _sink_commit(self) -> None:
        self._store(str(self.digest), b"".join(self._chunks))
        self._chunks = []

    def _sink_abort(self) -> None:
        self._chunks = []


class BlobCache(BlobStore):
    """An in-memory content-addressed blob cache.

    ``BlobCache.open(path)`` returns the persistent :class:`DirectoryBlobCache`.
    A miss is ``None``, never an exception.
    """

    def __init__(self) -> None:
        self._blobs: Dict[str, bytes] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}
        self._references: Dict[str, Tuple[str, str, bool]] = {}
        self._locations: Dict[Tuple[str, str], List[str]] = {}
        self._lock = threading.Lock()
        self._blob_locks: Dict[str, Any] = {}

    @staticmethod
    def open(path: Union[str, "os.PathLike[str]"],
             read_only: Optional[bool] = None) -> DirectoryBlobCache:
        """Open (creating if needed) a persistent cache directory; one this process
        cannot write is opened read-only unless ``read_only`` says otherwise."""
        return DirectoryBlobCache(os.fspath(path), read_only)

    @staticmethod
    def default_path(environ: Optional[Mapping[str, str]] = None) -> str:
        """Return ``$ZLAYER_REGISTRY_CACHE``, else ``$XDG_CACHE_HOME/zlayer-registry``."""
        env = os.environ if environ is None else environ
        if env.get("ZLAYER_REGISTRY_CACHE"):
            return env["ZLAYER_REGISTRY_CACHE"]
        base = env.get("XDG_CACHE_HOME") or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".cache")
        return os.path.join(base, "zlayer-registry")

    def has(self, digest: str) -> bool:
        """Tell whether a verified blob is present."""
        return digest in self._blobs

    def get(self, digest: str) -> Optional[bytes]:
        """Return a blob's bytes, or None."""
        return self._blobs.get(digest)

    def size(self, digest: str) -> Optional[int]:
        """Return a stored blob's size in bytes, or None when it is absent."""
        data = self._blobs.get(digest)
        return None if data is None else len(data)

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Open a blob for reading, or return None when it is absent."""
        data = self._blobs.get(digest)
        return None if data is None else io.BytesIO(data)

    def media_type(self, digest: str) -> str:
        """Return the media type recorded with a blob ('' when unknown)."""
        return str(self._meta.get(digest, {}).get("media_type", ""))

    def digests(self) -> Iterator[str]:
        """Yield the digest of every stored blob."""
        with self._lock:
            return iter(list(self._blobs))

    def entries(self) -> List[Dict[str, Any]]:
        """List blobs as dicts: digest, size, media_type, added_at, last_used_at."""
        with self._lock:
            return [dict(meta, digest=d) for d, meta in self._meta.items()]

    def begin_write(self, digest: Optional[str] = None, size: Optional[int] = None,
                    media_type: str = "", algorithm: str = "sha256") -> BlobWriter:
        """Start writing a blob; it becomes visible on a verified ``commit()``."""
        return _MemoryBlobWriter(lambda d, data: self._store(d, data, media_type),
                                 digest, size, algorithm)

    def _store(self, digest: str, data: bytes, media_type: str) -> None:
        now = time.time()
        with self._lock:
            self._blobs[digest] = data
            self._meta[digest] = {"size": len(data), "media_type": media_type,
                                  "added_at": now, "last_used_at": now}

    def delete(self, digest: str) -> bool:
        """Remove a blob; tell whether it was there."""
        with self._lock:
            self._meta.pop(digest, None)
            return self._blobs.pop(digest, None) is not None

    def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs as used now (drives least-recently-used pruning)."""
        now = time.time()
        with self._lock:
            for digest in digests:
                if digest in self._meta:
                    self._meta[digest]["last_used_at"] = now

    def lock(self, digest: str) -> Any:
        """Return a context manager held while one writer downloads ``digest``."""
        with self._lock:
            return self._blob_locks.setdefault(digest, threading.Lock())

    def record_location(self, digest: str, registry: str, repository: str) -> None:
        """Remember that a repository of a registry has a blob."""
        with self._lock:
            known = self._locations.setdefault((digest, registry), [])
            if repository in known:
                known.remove(repository)
            known.insert(0, repository)

    def locations(self, digest: str, registry: str) -> List[str]:
        """Return the repositories of ``registry`` known to have the blob, newest first."""
        with self._lock:
            return list(self._locations.get((digest, registry), ()))

    def record_reference(self, reference: str, digest: str, media_type: str, *,
                         complete: bool = True) -> None:
        """Remember which manifest ``reference`` resolved to."""
        with self._lock:
            old = self._references.get(reference)
            if complete or old is None or old[0] != digest:
                self._references[reference] = (digest, media_type, complete)

    def lookup_reference(self, reference: str) -> Optional[str]:
        """Return the manifest digest last recorded for ``reference``."""
        entry = self._references.get(reference)
        return entry[0] if entry else None

    def reference_records(self) -> List[Dict[str, Any]]:
        """Return every reference record."""
        with self._lock:
            return [{"reference": name, "digest": digest, "media_type": media_type,
                     "complete": complete}
                    for name, (digest, media_type, complete) in sorted(self._references.items())]

    def forget_reference(self, reference: str) -> bool:
        """Drop a reference record; tell whether there was one."""
        with self._lock:
            return self._references.pop(reference, None) is not None


# =============================================================================
# 28. S3: SigV4 signing (headers and presigned URLs)
# =============================================================================
# AWS Signature Version 4, written on hmac and hashlib: a canonical request
# (method, path, sorted query, the signed headers, the payload's SHA-256) is
# hashed into a string to sign, which a key derived from the secret, the day,
# the region and the service signs.  S3 departs from the generic rules in
# three ways (its "Signature Calculations" page): the path is signed exactly as
# it goes on the wire (an object key may hold "//" or "..", so no
# normalisation and no second encoding); x-amz-content-sha256 is a header of
# every request and is signed; a payload may be UNSIGNED-PAYLOAD.  A session
# token is signed (x-amz-security-token), as S3 and STS require.
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv4.html

_SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# RFC 3986 unreserved characters: the only ones SigV4 leaves unencoded.
_SIGV4_SAFE = "-_.~"
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_SIGNING_KEYS: "OrderedDict[Tuple[str, str, str, str], bytes]" = OrderedDict()
_SIGNING_KEYS_LOCK = threading.Lock()


def _sigv4_quote(text: str, safe: str = _SIGV4_SAFE) -> str:
    from urllib.parse import quote
    return quote(text, safe=safe)


def _sigv4_path(path: str, service: str) -> str:
    """Return the canonical URI: S3's path as given; other services' path with
    dot segments and repeated slashes removed, then percent-encoded again."""
    if not path:
        return "/"
    if service == "s3":
        return path
    segments: List[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    normalised = "/" + "/".join(segments)
    if path.endswith("/") and normalised != "/":
        normalised += "/"
    return _sigv4_quote(normalised, safe="/" + _SIGV4_SAFE)


def _sigv4_query(query: str) -> str:
    """Return the canonical query string: each name and value decoded from the
    wire and encoded strictly ("+" is a plus, not a space), sorted by name, then value."""
    from urllib.parse import unquote
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_sigv4_quote(unquote(name)), _sigv4_quote(unquote(value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _sigv4_header_items(headers: Union[Mapping[str, str], Iterable[Tuple[str, str]]]
                        ) -> List[Tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), str(value)) for name, value in items]


def _sigv4_canonical_headers(items: Sequence[Tuple[str, str]]) -> Tuple[str, str]:
    """Return (canonical headers, signed header names): names lowercased and
    sorted, values trimmed with runs of whitespace (folded lines too) made one
    space, repeated names joined with commas in the order given."""
    merged: Dict[str, List[str]] = {}
    for name, value in items:
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    canonical = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return canonical, ";".join(names)


def _sigv4_host(scheme: str, netloc: str) -> str:
    """Return the Host value as sent: the default port of the scheme left out."""
    netloc = netloc.rpartition("@")[2].lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    if default and netloc.endswith(default):
        netloc = netloc[:-len(default)]
    return netloc


def _sigv4_signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    """Return the derived key of a day, region and service (kept: it changes daily)."""
    import hmac
    cache_key = (secret_key, day, region, service)
    with _SIGNING_KEYS_LOCK:
        key = _SIGNING_KEYS.get(cache_key)
    if key is None:
        key = ("AWS4" + secret_key).encode("utf-8")
        for part in (day, region, service, "aws4_request"):
            key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
        with _SIGNING_KEYS_LOCK:
            _SIGNING_KEYS[cache_key] = key
            while len(_SIGNING_KEYS) > 64:
                _SIGNING_KEYS.popitem(last=False)
    return key


def _sigv4_check(amz_date: str, region: str, service: str) -> None:
    if not _AMZ_DATE.fullmatch(amz_date):
        raise ValueError(f"amz_date must look like 20150830T123600Z, not {amz_date!r}")
    if not region or not service:
        raise ValueError("a SigV4 signature needs a region and a service")


def _sigv4_signature(method: str, path: str, query: str, header_items: Sequence[Tuple[str, str]],
                     body_sha256: str, *, secret_key: str, scope: str, amz_date: str,
                     region: str, service: str) -> Tuple[str, str]:
    """Return (signature, signed header names) of one canonical request."""
    import hmac
    canonical_headers, signed = _sigv4_canonical_headers(header_items)
    canonical_request = "\n".join([method.upper(), path, query, canonical_headers, signed,
                                   body_sha256])
    string_to_sign = "\n".join([
        _SIGV4_ALGORITHM, amz_date, scope,
        hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    key = _sigv4_signing_key(secret_key, amz_date[:8], region, service)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest(), signed


def sigv4_headers(method: str, url: str,
                  headers: Union[Mapping[str, str], Iterable[Tuple[str, str]]],
                  body_sha256: str, *, access_key: str, secret_key: str, region: str,
                  service: str, amz_date: str, session_token: Optional[str] = None
                  ) -> Dict[str, str]:
    """Return the headers that sign a request with AWS Signature Version 4.

    ``url`` is the URL as it goes on the wire (path percent-encoded, query
    encoded); every header in ``headers`` (a mapping, or pairs when a name
    repeats) is signed, and ``host`` with them.  ``body_sha256`` is the hex
    SHA-256 of the payload or ``UNSIGNED-PAYLOAD``; ``amz_date`` is UTC as
    ``YYYYMMDDTHHMMSSZ``.  The result holds ``Authorization``,
    ``x-amz-date``, ``x-amz-content-sha256`` (service ``s3``) and
    ``x-amz-security-token`` (with a session token): add them to the request.
    """
    from urllib.parse import urlsplit
    _sigv4_check(amz_date, region, service)
    parts = urlsplit(url)
    items = [item for item in _sigv4_header_items(headers)
             if item[0].strip().lower() not in ("authorization", "x-amz-date",
                                                 "x-amz-content-sha256",
                                                 "x-amz-security-token")]
    added = {"x-amz-date": amz_date}
    if service == "s3":
        added["x-amz-content-sha256"] = body_sha256
    if session_token:
        added["x-amz-security-token"] = session_token
    if not any(name.strip().lower() == "host" for name, _ in items):
        items.append(("host", _sigv4_host(parts.scheme, parts.netloc)))
    items.extend(added.items())
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signature, signed = _sigv4_signature(
        method, _sigv4_path(parts.path, service), _sigv4_query(parts.query), items,
        body_sha256, secret_key=secret_key, scope=scope, amz_date=amz_date,
        region=region, service=service)
    added["Authorization"] = (f"{_SIGV4_ALGORITHM} Credential={access_key}/{scope}, "
                              f"SignedHeaders={signed}, Signature={signature}")
    return added


def sigv4_presign(method: str, url: str, *, access_key: str, secret_key: str, region: str,
                  amz_date: str, expires_s: int = 3600, service: str = "s3",
                  session_token: Optional[str] = None,
                  headers: Union[Mapping[str, str], Iterable[Tuple[str, str]]] = ()) -> str:
    """Return ``url`` signed in its query string (a presigned URL), valid for ``expires_s``.

    Anyone holding the URL may send the request until it expires, without
    credentials: hand it to another tool (curl, a browser) to fetch one
    blob.  The payload is ``UNSIGNED-PAYLOAD``; ``headers`` the request
    must carry are signed along with ``host``.
    """
    from urllib.parse import urlsplit
    _sigv4_check(amz_date, region, service)
    if not 1 <= int(expires_s) <= 604800:  # S3's limit: seven days
        raise ValueError("a presigned URL expires after 1 second to 7 days")
    parts = urlsplit(url)
    items = _sigv4_header_items(headers)
    if not any(name.strip().lower() == "host" for name, _ in items):
        items.append(("host", _sigv4_host(parts.scheme, parts.netloc)))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    _, signed = _sigv4_canonical_headers(items)
    params = [("X-Amz-Algorithm", _SIGV4_ALGORITHM),
              ("X-Amz-Credential", f"{access_key}/{scope}"),
              ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(int(expires_s))),
              ("X-Amz-SignedHeaders", signed)]
    if session_token:
        params.append(("X-Amz-Security-Token", session_token))
    query = "&".join(filter(None, [parts.query] + [
        f"{name}={_sigv4_quote(value)}" for name, value in params]))
    signature, _ = _sigv4_signature(
        method, _sigv4_path(parts.path, service), _sigv4_query(query), items,
        _UNSIGNED_PAYLOAD, secret_key=secret_key, scope=scope, amz_date=amz_date,
        region=region, service=service)
    base = url.split("#", 1)[0].split("?", 1)[0]
    return f"{base}?{query}&X-Amz-Signature={signature}"


def _amz_date(when: Optional[float] = None) -> str:
    """Return ``when`` (default: now) as SigV4's UTC timestamp."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))


# =============================================================================
# 29. S3: credentials, region and endpoint, found as AWS's own tools find them
# =============================================================================
# The chain, in botocore's order: the environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN); the shared credentials file and
# the config file of the profile (AWS_PROFILE; ``[NAME]`` in credentials,
# ``[profile NAME]`` in config; ``credential_process``); the ECS/EKS container
# endpoint (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI, with
# AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]); EC2 instance metadata, IMDSv2
# (a PUT for a session token, then GETs for the role and its credentials).
# Temporary credentials are fetched again before they expire.  The metadata
# endpoints are link-local, so they are asked directly (never through a
# proxy, which would see the credentials) with one-second timeouts: a host
# off EC2 waits at most that long before the error says what was tried.
# https://docs.aws.amazon.com/sdkref/latest/guide/standardized-credentials.html

_CONTAINER_CREDENTIALS_HOST = "http://169.254.170.2"
# Hosts AWS SDKs accept in AWS_CONTAINER_CREDENTIALS_FULL_URI over plain http
# (the ECS and EKS pod-identity agents), besides loopback.
_CONTAINER_CREDENTIALS_HOSTS = ("169.254.170.2", "169.254.170.23", "fd00:ec2::23")
_IMDS_ENDPOINT = "http://169.254.169.254"
_IMDS_TOKEN_TTL_S = 21600
_METADATA_TIMEOUT_S = 1.0
_METADATA_RESPONSE_BYTES = 64 * 1024
# Temporary credentials are renewed this long before they expire (botocore:
# 15 minutes advisory, 10 mandatory); within the last minute the old ones
# are no longer used even when renewal fails.
_CREDENTIALS_REFRESH_S = 15 * 60
_CREDENTIALS_MANDATORY_S = 60
_DEFAULT_AWS_REGION = "us-east-1"


def _debug(message: str) -> None:
    """Log ``message`` for ``--debug`` (the logger ``zlayer_registry``, at DEBUG)."""
    import logging
    logging.getLogger("zlayer_registry").debug(message)


class S3Credentials:
    """AWS credentials: an access key and its secret, and for temporary ones a
    session token and the time they expire.

    The secret and the token never appear in ``repr()`` or ``str()``.
    """

    __slots__ = ("access_key", "secret_key", "session_token", "expires_at", "source")

    def __init__(self, access_key: str, secret_key: str, session_token: str = "", *,
                 expires_at: Optional[float] = None, source: str = "") -> None:
        if not access_key or not secret_key:
            raise ValueError("S3 credentials need an access key and a secret key")
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.expires_at = expires_at  # a Unix time, None for long-term keys
        self.source = source  # where they were found: "environment", a file, ...

    def __repr__(self) -> str:
        expiry = "" if self.expires_at is None else f", expires_at={self.expires_at:.0f}"
        return (f"S3Credentials(access_key={self.access_key[:4]!r}..., "
                f"source={self.source!r}{expiry})")

    __str__ = __repr__

    def expires_within(self, seconds: float, now: float) -> bool:
        """Tell whether these credentials expire within ``seconds`` of ``now``."""
        return self.expires_at is not None and self.expires_at - now <= seconds


class _AwsSettings:
    """The profile's settings from the shared files: credentials, region,
    endpoint_url, credential_process (values never shown in errors)."""

    def __init__(self, environ: Mapping[str, str], home: Optional[str] = None) -> None:
        home = home if home is not None else os.path.expanduser("~")
        self.profile = (environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE")
                        or "default")
        self.credentials_file = os.path.expanduser(
            environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws",
                                                                       "credentials"))
        self.config_file = os.path.expanduser(
            environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"))
        self.credentials = self._section(self.credentials_file, [self.profile])
        self.config = self._section(self.config_file, [
            f"profile {self.profile}"] + (["default"] if self.profile == "default" else []))
        if self.profile != "default" and not (self.credentials or self.config) \
                and ("AWS_PROFILE" in environ or "AWS_DEFAULT_PROFILE" in environ):
            raise CacheError(f"AWS profile {self.profile!r} is not in {self.credentials_file} "
                             f"or {self.config_file}")

    @staticmethod
    def _section(path: str, names: Sequence[str]) -> Dict[str, str]:
        import configparser
        data = _read_regular_file(path, 1024 * 1024)
        if data is None:
            return {}
        parser = configparser.RawConfigParser(default_section="\x00", strict=False,
                                              interpolation=None)
        try:
            parser.read_string(data.decode("utf-8", "replace"), source=path)
        except configparser.Error as exc:
            raise CacheError(f"cannot read {path}: line {getattr(exc, 'lineno', '?')} "
                             "is not INI syntax") from None
        for name in names:
            if parser.has_section(name):
                return {key.lower(): value.strip() for key, value in parser.items(name)}
        return {}

    def get(self, key: str) -> str:
        """Return a setting of the profile (config file), '' when absent."""
        return self.config.get(key, "")


def _credentials_from_environ(environ: Mapping[str, str]) -> Optional[S3Credentials]:
    access_key = environ.get("AWS_ACCESS_KEY_ID", "")
    secret_key = environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key and not secret_key:
        return None
    if not access_key or not secret_key:
        missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
        raise CacheError(f"AWS credentials in the environment lack {missing}")
    token = environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN") or ""
    return S3Credentials(access_key, secret_key, token, source="environment")


def _credentials_from_section(section: Mapping[str, str], where: str
                              ) -> Optional[S3Credentials]:
    access_key = section.get("aws_access_key_id", "")
    secret_key = section.get("aws_secret_access_key", "")
    if not access_key and not secret_key:
        return None
    if not access_key or not secret_key:
        raise CacheError(f"{where} has only half of a key pair "
                         "(aws_access_key_id and aws_secret_access_key)")
    return S3Credentials(access_key, secret_key, section.get("aws_session_token", ""),
                         source=where)


def _parse_expiration(text: str) -> Optional[float]:
    """Parse an ISO 8601 UTC time (``2026-12-03T10:00:00Z``) into a Unix time."""
    import calendar
    match = re.fullmatch(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                         r"(?:\.[0-9]+)?(Z|[+-]00:?00)", text.strip())
    if not match:
        return None
    return float(calendar.timegm(tuple(int(g) for g in match.groups()[:6]) + (0, 0, 0)))


def _credentials_from_json(data: bytes, where: str) -> S3Credentials:
    """Read the credentials document of a container endpoint, IMDS or a
    credential_process (its fields are never quoted in errors)."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CacheError(f"{where} answered with something that is not JSON") from None
    if not isinstance(document, dict):
        raise CacheError(f"{where} answered with a JSON value that is not an object")
    if document.get("Code", "Success") != "Success":
        raise CacheError(f"{where} refused credentials (code "
                         f"{str(document.get('Code'))[:64]!r})")
    access_key = document.get("AccessKeyId")
    secret_key = document.get("SecretAccessKey")
    token = document.get("Token", document.get("SessionToken", "")) or ""
    if not isinstance(access_key, str) or not isinstance(secret_key, str) \
            or not access_key or not secret_key or not isinstance(token, str):
        raise CacheError(f"{where} answered without AccessKeyId and SecretAccessKey")
    expiration = document.get("Expiration")
    expires_at = _parse_expiration(expiration) if isinstance(expiration, str) else None
    if isinstance(expiration, str) and expires_at is None:
        raise CacheError(f"{where} answered with an Expiration that is not an ISO 8601 time")
    return S3Credentials(access_key, secret_key, token, expires_at=expires_at, source=where)


def _credentials_from_process(command: str, where: str) -> S3Credentials:
    """Run a profile's ``credential_process`` (a command that prints JSON credentials)."""
    import shlex
    import subprocess
    try:
        result = subprocess.run(shlex.split(command), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise CacheError(f"credential_process of {where} cannot run: "
                         f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    if result.returncode != 0:
        raise CacheError(f"credential_process of {where} failed (exit status "
                         f"{result.returncode})")
    return _credentials_from_json(result.stdout, f"credential_process of {where}")


def _metadata_request(transport: _Transport, method: str, url: str,
                      headers: Mapping[str, str], where: str) -> Tuple[int, bytes]:
    """Send one request to a metadata endpoint; return (status, capped body).

    Raises CacheError when the endpoint does not answer (host off EC2/ECS).
    """
    try:
        with transport.send(method, url, headers) as response:
            return response.status, _read_capped(response, _METADATA_RESPONSE_BYTES)
    except _CONNECTION_ERRORS as exc:
        raise CacheError(f"{where} at {_redact_url(url)} does not answer "
                         f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None


def _container_credentials(environ: Mapping[str, str], transport: _Transport
                           ) -> S3Credentials:
    """Fetch credentials from the ECS/EKS container endpoint."""
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
    url = (_CONTAINER_CREDENTIALS_HOST + relative if relative
           else environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""))
    scheme, host, _, _ = _split_url(url)
    if not relative and scheme != "https" and not _is_loopback_host(host) \
            and host.strip("[]").lower() not in _CONTAINER_CREDENTIALS_HOSTS:
        # A credentials URL anyone could plant must not send the token elsewhere.
        raise CacheError("AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, loopback or "
                         "the ECS/EKS agent's address")
    headers = {"Accept": "application/json"}
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "")
    if token_file:
        data = _read_regular_file(token_file, 16384)
        if data is None:
            raise CacheError(f"cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {token_file}")
        headers["Authorization"] = data.decode("utf-8", "replace").strip()
    elif environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"):
        headers["Authorization"] = environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    status, body = _metadata_request(transport, "GET", url, headers, "the container "
                                     "credentials endpoint")
    if status != 200:
        raise CacheError(f"the container credentials endpoint answered {status}")
    return _credentials_from_json(body, "the container credentials endpoint")


def _instance_credentials(environ: Mapping[str, str], transport: _Transport
                          ) -> S3Credentials:
    """Fetch the instance role's credentials from EC2 instance metadata (IMDSv2)."""
    endpoint = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or _IMDS_ENDPOINT).rstrip("/")
    where = "EC2 instance metadata"
    status, token = _metadata_request(
        transport, "PUT", endpoint + "/latest/api/token",
        {"X-aws-ec2-metadata-token-ttl-seconds": str(_IMDS_TOKEN_TTL_S)}, where)
    headers: Dict[str, str] = {}
    if status == 200:
        headers["X-aws-ec2-metadata-token"] = token.decode("ascii", "replace").strip()
    elif status not in (404, 405):  # 403: IMDS turned off; 404/405: IMDSv1 only
        raise CacheError(f"{where} refused a session token ({status})")
    base = endpoint + "/latest/meta-data/iam/security-credentials/"
    status, body = _metadata_request(transport, "GET", base, headers, where)
    role = body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    if status != 200 or not role or "/" in role:
        raise CacheError(f"{where} names no instance role ({status})")
    from urllib.parse import quote
    status, body = _metadata_request(transport, "GET", base + quote(role), headers, where)
    if status != 200:
        raise CacheError(f"{where} answered {status} for the role's credentials")
    return _credentials_from_json(body, where)


class _CredentialChain:
    """Finds credentials as the chain above does, keeps them, and fetches
    temporary ones again before they expire (thread-safe)."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None, *,
                 home: Optional[str] = None, settings: Optional[_AwsSettings] = None,
                 transport: Optional[_Transport] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._home = home
        self._settings = settings  # the shared files, when the caller read them already
        self._transport = transport or _Transport(timeout_s=_METADATA_TIMEOUT_S)
        self._clock = clock
        self._lock = threading.Lock()
        self._current: Optional[S3Credentials] = None
        self._fetch: Optional[Callable[[], S3Credentials]] = None

    def get(self) -> S3Credentials:
        """Return valid credentials, renewing temporary ones when they are about to expire."""
        with self._lock:
            now = self._clock()
            current = self._current
            if current is not None and not current.expires_within(_CREDENTIALS_REFRESH_S, now):
                return current
            if current is not None and self._fetch is not None:
                try:
                    self._current = self._fetch()
                except CacheError:
                    if current.expires_within(_CREDENTIALS_MANDATORY_S, now):
                        raise
                    _debug(f"renewing {current.source} credentials failed; "
                           "the current ones are still valid")
                return cast(S3Credentials, self._current)
            self._current, self._fetch = self._find()
            return self._current

    def _find(self) -> Tuple[S3Credentials, Optional[Callable[[], S3Credentials]]]:
        environ = self._environ
        found = _credentials_from_environ(environ)
        if found is not None:
            return found, None
        settings = self._settings or _AwsSettings(environ, self._home)
        where = f"profile {settings.profile!r} of {settings.credentials_file}"
        found = _credentials_from_section(settings.credentials, where)
        if found is not None:
            return found, None
        where = f"profile {settings.profile!r} of {settings.config_file}"
        found = _credentials_from_section(settings.config, where)
        if found is not None:
            return found, None
        process = settings.credentials.get("credential_process") or settings.get(
            "credential_process")
        if process:
            fetch: Callable[[], S3Credentials] = lambda: _credentials_from_process(process, where)
            return fetch(), fetch
        tried = ["environment", settings.credentials_file, settings.config_file]
        if environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or environ.get(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            fetch = lambda: _container_credentials(environ, self._transport)
            return fetch(), fetch
        if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
            fetch = lambda: _instance_credentials(environ, self._transport)
            try:
                return fetch(), fetch
            except CacheError as exc:
                _debug(f"no instance credentials: {exc}")
                tried.append("EC2 instance metadata")
        raise CacheError("no AWS credentials found (looked in: " + ", ".join(tried)
                         + "); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")


def _aws_region(environ: Mapping[str, str], settings: Optional[_AwsSettings]) -> str:
    """Return the region: AWS_REGION, AWS_DEFAULT_REGION, the profile's, or us-east-1."""
    return (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
            or (settings.get("region") if settings else "") or _DEFAULT_AWS_REGION)


def _aws_endpoint(environ: Mapping[str, str], settings: Optional[_AwsSettings]) -> str:
    """Return the S3 endpoint URL set by AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or
    the profile's endpoint_url ('' for AWS's own)."""
    return (environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
            or (settings.get("endpoint_url") if settings else "")).rstrip("/")


# =============================================================================
# 30. S3: the object client (signed requests, errors, listing, multipart)
# =============================================================================
# The S3 REST API over the shared transport (keep-alive pool, proxies,
# streamed bodies) and retry policy: every attempt is signed anew (its date,
# renewed credentials).  Errors are S3's XML (``<Code>``, ``<Message>``) turned
# into a CacheError with the code; 500, 503 SlowDown and dropped connections
# are retried with backoff.  Buckets are addressed virtual-host style
# (bucket.s3.REGION.amazonaws.com) on AWS and path style on any other
# endpoint (MinIO, SeaweedFS, Ceph and R2 all take it), unless told.
# XML from the server is parsed only when it declares no DTD, so that entity
# expansion (billion laughs) cannot happen: S3 never sends one.
# https://docs.aws.amazon.com/AmazonS3/latest/API/Welcome.html

_S3_XML_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_S3_LIST_BYTES = 16 * 1024 * 1024
_S3_RETRYABLE_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable",
                                 "RequestTimeout", "RequestTimeTooSkewed"})
# Bucket names that can be a DNS label (virtual-host addressing); with dots,
# TLS would fail on the wildcard certificate, so those go path style.
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


def _s3_xml(data: bytes, what: str) -> Any:
    """Parse an S3 XML document (no DTD allowed); CacheError when it is not one."""
    import xml.etree.ElementTree as ElementTree
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise CacheError(f"{what}: the answer declares a DTD; refused")
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError:
        raise CacheError(f"{what}: the answer is not XML") from None


def _xml_text(element: Any, name: str) -> str:
    """Return the text of ``element``'s child ``name`` (namespaced or not), '' when absent."""
    child = element.find(_S3_XML_NS + name)
    if child is None:
        child = element.find(name)
    return (child.text or "") if child is not None else ""


def _s3_error_fields(body: bytes) -> Tuple[str, str]:
    """Return (Code, Message) of an S3 XML error body, ('', '') when it is not one."""
    code = re.search(rb"<Code>([^<]{1,128})</Code>", body)
    message = re.search(rb"<Message>([^<]{1,512})</Message>", body)
    return ((code.group(1).decode("utf-8", "replace") if code else ""),
            (message.group(1).decode("utf-8", "replace") if message else ""))


class _S3Client:
    """Signed requests to one bucket: objects by key, listing, multipart uploads."""

    def __init__(self, bucket: str, *, endpoint: str, region: str, credentials: Any,
                 addressing: str = "auto", transport: Optional[_Transport] = None,
                 retries: int = DEFAULT_RETRIES,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not _BUCKET_NAME.fullmatch(bucket):
            raise CacheError(f"invalid S3 bucket name {bucket!r}")
        if addressing not in ("auto", "path", "virtual"):
            raise ValueError("addressing is 'auto', 'path' or 'virtual'")
        self.bucket = bucket
        self.region = region
        self.credentials = credentials  # anything with get() -> S3Credentials
        self.transport = transport or _Transport()
        self.retries = retries
        self._sleep = sleep
        aws = not endpoint
        endpoint = (endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
        # Host names are signed as sent: lowercase (DNS is case-blind, SigV4 is not).
        scheme_part, sep, netloc_part = endpoint.partition("://")
        endpoint = f"{scheme_part.lower()}{sep}{netloc_part.lower()}" if sep else endpoint
        try:
            scheme, _, _, path = _split_url(endpoint)
        except RegistryError:
            raise CacheError(f"invalid S3 endpoint {_redact_url(endpoint)}") from None
        if path not in ("/", ""):
            raise CacheError(f"an S3 endpoint is a scheme and host, not {_redact_url(endpoint)}")
        virtual = addressing == "virtual" or (
            addressing == "auto" and aws and _DNS_BUCKET.fullmatch(bucket) is not None
            and "--" not in bucket)
        netloc = endpoint.partition("://")[2]
        self.endpoint = endpoint
        self._base = (f"{scheme}://{bucket}.{netloc}" if virtual
                      else f"{endpoint}/{self._quote(bucket)}")

    @staticmethod
    def _quote(key: str) -> str:
        from urllib.parse import quote
        return quote(key, safe="/" + _SIGV4_SAFE)

    def url(self, key: str, query: str = "") -> str:
        """Return an object's (or with key '', the bucket's) URL as sent."""
        url = f"{self._base}/{self._quote(key)}" if key else self._base + "/"
        return f"{url}?{query}" if query else url

    def presign(self, key: str, expires_s: int = 3600) -> str:
        """Return a presigned GET URL of an object (valid ``expires_s`` seconds)."""
        credentials = self.credentials.get()
        return sigv4_presign("GET", self.url(key), access_key=credentials.access_key,
                             secret_key=credentials.secret_key, region=self.region,
                             amz_date=_amz_date(), expires_s=expires_s,
                             session_token=credentials.session_token or None)

    # -- requests -------------------------------------------------------------

    def send(self, method: str, key: str, *, query: str = "",
             headers: Optional[Mapping[str, str]] = None,
             body: Union[None, bytes, _RequestBody] = None,
             payload_sha256: Optional[str] = None,
             expect: Sequence[int] = (200,)) -> _Response:
        """Send a signed request; return the response when its status is expected.

        Any other status raises CacheError with S3's error code; a 404 of a
        HEAD or GET is returned when 404 is expected.  ``payload_sha256``
        defaults to the body's hash (bytes) or UNSIGNED-PAYLOAD (a stream).
        """
        url = self.url(key, query)
        request_body = _as_body(body)
        if payload_sha256 is None:
            payload_sha256 = (hashlib.sha256(body).hexdigest() if isinstance(body, bytes)
                              else _EMPTY_SHA256 if body is None else _UNSIGNED_PAYLOAD)
        extra = dict(headers or {})
        if request_body is not None:
            extra["Content-Length"] = str(request_body.length)
        elif method in ("PUT", "POST"):
            extra["Content-Length"] = "0"

        def attempt() -> _Response:
            credentials = self.credentials.get()
            signed = sigv4_headers(method, url, extra, payload_sha256,
                                   access_key=credentials.access_key,
                                   secret_key=credentials.secret_key, region=self.region,
                                   service="s3", amz_date=_amz_date(),
                                   session_token=credentials.session_token or None)
            return self.transport.send(method, url, {**extra, **signed}, request_body)

        def unanswered(exc: BaseException, last: bool) -> Optional[BaseException]:
            if not last:
                return None
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return CacheError(f"S3 endpoint {_redact_url(self.endpoint)} does not answer "
                              f"({reason})", status=None, temporary=True)

        try:
            response = _send_with_retries(
                attempt, method, retries=self.retries,
                wait=lambda n, after: self._sleep(_backoff_delay(n, after)),
                unanswered=unanswered, body=request_body)
        except RegistryError as exc:
            # The transport speaks for registries (a URL it cannot use, a proxy it
            # refuses); to callers of a cache, every failure is a CacheError.
            raise CacheError(f"S3 {method} s3://{self.bucket}/{key}: {exc}",
                             status=exc.status) from exc
        if response.status in expect:
            return response
        raise self._error(response, method, key)

    def _error(self, response: _Response, method: str, key: str) -> CacheError:
        with response:
            body = b"" if method == "HEAD" else _read_capped(response, MAX_ERROR_BODY_BYTES)
        code, message = _s3_error_fields(body)
        status = response.status
        where = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        if not code:
            code = {301: "PermanentRedirect", 403: "AccessDenied", 404: "NoSuchKey"}.get(
                status, "")
        detail = f"{status} {code}".strip()
        hint = ""
        region = response.header("x-amz-bucket-region")
        if status in (301, 307, 400) and region and region != self.region:
            hint = f"; the bucket is in {region}: set AWS_REGION={region}"
        elif code == "SignatureDoesNotMatch":
            hint = "; check the secret key (AWS_SECRET_ACCESS_KEY or the profile's)"
        elif code in ("InvalidAccessKeyId", "ExpiredToken", "InvalidToken"):
            hint = "; check the access key and session token"
        elif code == "NoSuchBucket":
            hint = f"; create it first (aws s3 mb s3://{self.bucket})"
        text = f": {message}" if message and code not in ("SignatureDoesNotMatch",) else ""
        return CacheError(f"S3 {method} {where} failed: {detail}{text}{hint}", code=code,
                          status=status,
                          temporary=status in _RETRYABLE_STATUSES or code in _S3_RETRYABLE_CODES)

    # -- objects --------------------------------------------------------------

    def head(self, key: str) -> Optional[Dict[str, str]]:
        """Return an object's ``size`` and ``content_type``, None when it is absent."""
        with self.send("HEAD", key, expect=(200, 404)) as response:
            if response.status == 404:
                return None
            return {"size": response.header("Content-Length"),
                    "content_type": response.header("Content-Type")}

    def get(self, key: str, offset: int = 0) -> Optional[_Response]:
        """Start reading an object (from ``offset``); None when it is absent."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.send("GET", key, headers=headers, expect=(200, 206, 404, 416))
        if response.status in (404, 416):
            response.close()
            return None
        if offset and response.status != 206:
            response.close()
            raise CacheError(f"S3 GET s3://{self.bucket}/{key}: a Range was ignored")
        return response

    def get_small(self, key: str, limit_bytes: int) -> Optional[bytes]:
        """Return a small object's bytes (None when absent); CacheError when it is larger."""
        response = self.get(key)
        if response is None:
            return None
        with response:
            data = _read_capped(response, limit_bytes + 1)
        if len(data) > limit_bytes:
            raise CacheError(f"s3://{self.bucket}/{key} is larger than {limit_bytes} bytes")
        return data

    def put(self, key: str, body: Union[bytes, _RequestBody], payload_sha256: Optional[str]
            = None, headers: Optional[Mapping[str, str]] = None) -> str:
        """Store an object in one PUT; return its ETag."""
        with self.send("PUT", key, body=body, payload_sha256=payload_sha256,
                       headers=headers) as response:
            response.read()
            return response.header("ETag")

    def put_if_absent(self, key: str, data: bytes) -> Optional[bool]:
        """Create an object only when there is none (``If-None-Match: *``).

        True: created; False: one exists; None: the store does not do
        conditional writes (it answered 501, or an error naming the header).
        """
        try:
            with self.send("PUT", key, body=data, headers={"If-None-Match": "*"},
                           expect=(200, 412, 409)) as response:
                response.read()
                return response.status == 200
        except CacheError as exc:
            if exc.status == 501 or exc.code in ("NotImplemented",):
                return None
            raise

    def delete(self, key: str) -> None:
        """Delete an object (absent is not an error: S3 answers 204 either way)."""
        with self.send("DELETE", key, expect=(200, 204, 404)) as response:
            response.read()

    def list(self, prefix: str) -> Iterator[Dict[str, Any]]:
        """Yield the objects under ``prefix`` (ListObjectsV2, page by page):
        dicts with ``key``, ``size`` and ``last_modified`` (a Unix time)."""
        token = ""
        while True:
            query = [("list-type", "2"), ("prefix", prefix)]
            if token:
                query.append(("continuation-token", token))
            root = self._list_page(query)
            for item in root.iter(_S3_XML_NS + "Contents"):
                yield {"key": _xml_text(item, "Key"),
                       "size": int(_xml_text(item, "Size") or 0),
                       "last_modified": _parse_expiration(_xml_text(item, "LastModified"))}
            token = _xml_text(root, "NextContinuationToken")
            if _xml_text(root, "IsTruncated") != "true" or not token:
                return

    def _list_page(self, query: Sequence[Tuple[str, str]]) -> Any:
        encoded = "&".join(f"{name}={_sigv4_quote(value)}" for name, value in query)
        with self.send("GET", "", query=encoded) as response:
            data = _read_capped(response, _S3_LIST_BYTES)
        root = _s3_xml(data, f"listing s3://{self.bucket}")
        if root.tag not in (_S3_XML_NS + "ListBucketResult", "ListBucketResult",
                            _S3_XML_NS + "ListMultipartUploadsResult",
                            "ListMultipartUploadsResult"):
            raise CacheError(f"listing s3://{self.bucket}: unexpected answer <{root.tag}>")
        return root

    def check_bucket(self) -> None:
        """Make sure the bucket exists and the credentials may use it (HEAD bucket)."""
        with self.send("HEAD", "", expect=(200,)) as response:
            response.read()

    # -- multipart uploads ------------------------------------------------------

    def create_upload(self, key: str, headers: Optional[Mapping[str, str]] = None) -> str:
        """Start a multipart upload; return its upload ID."""
        with self.send("POST", key, query="uploads=", headers=headers) as response:
            data = _read_capped(response, MAX_ERROR_BODY_BYTES)
        upload_id = _xml_text(_s3_xml(data, f"starting an upload of {key}"), "UploadId")
        if not upload_id:
            raise CacheError(f"S3 gave no UploadId for s3://{self.bucket}/{key}")
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: _RequestBody,
                    payload_sha256: str) -> str:
        """Upload part ``number`` (1-based); return its ETag."""
        query = f"partNumber={number}&uploadId={_sigv4_quote(upload_id)}"
        with self.send("PUT", key, query=query, body=body,
                       payload_sha256=payload_sha256) as response:
            response.read()
            etag = response.header("ETag")
        if not etag:
            raise CacheError(f"S3 gave no ETag for part {number} of s3://{self.bucket}/{key}")
        return etag

    def complete_upload(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        """Finish a multipart upload; the object appears only now."""
        from xml.sax.saxutils import escape
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
                        for n, etag in enumerate(etags, 1))
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        with self.send("POST", key, query=f"uploadId={_sigv4_quote(upload_id)}",
                       body=body, headers={"Content-Type": "application/xml"}) as response:
            data = _read_capped(response, MAX_ERROR_BODY_BYTES)
        code, message = _s3_error_fields(data)
        if code or b"<Error>" in data:  # S3 may answer 200 and then an error
            raise CacheError(f"S3 could not complete s3://{self.bucket}/{key}: "
                             f"{code} {message}".rstrip(), code=code, status=200,
                             temporary=code in _S3_RETRYABLE_CODES)

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abandon a multipart upload, so its parts are not kept (and billed)."""
        with self.send("DELETE", key, query=f"uploadId={_sigv4_quote(upload_id)}",
                       expect=(200, 204, 404)) as response:
            response.read()

    def uploads(self, prefix: str) -> List[Tuple[str, str, Optional[float]]]:
        """Return the multipart uploads in progress under ``prefix``: (key, upload ID, started)."""
        found: List[Tuple[str, str, Optional[float]]] = []
        key_marker = upload_marker = ""
        while True:
            query = [("prefix", prefix), ("uploads", "")]
            if key_marker:
                query += [("key-marker", key_marker), ("upload-id-marker", upload_marker)]
            root = self._list_page(sorted(query))
            for item in root.iter(_S3_XML_NS + "Upload"):
                found.append((_xml_text(item, "Key"), _xml_text(item, "UploadId"),
                              _parse_expiration(_xml_text(item, "Initiated"))))
            key_marker = _xml_text(root, "NextKeyMarker")
            upload_marker = _xml_text(root, "NextUploadIdMarker")
            if _xml_text(root, "IsTruncated") != "true" or not key_marker:
                return found


# =============================================================================
# 31. S3: S3BlobCache, blobs in a bucket where registries keep them
# =============================================================================
# Keys follow the CNCF distribution registry's storage layout (its s3
# driver, and Kraken, use the same), so a bucket the fleet fills is laid out
# as registries and their tools expect, and a registry's own bucket can be
# the fleet's read tier:
#     PREFIX/docker/registry/v2/blobs/sha256/<hex[:2]>/<hex>/data
# What is ours sits beside it, under PREFIX/zlayer/: reference records
# (references/<name>, the JSON the directory cache writes) and the leases of
# downloads in progress (leases/sha256/<hex>, see the tiered cache).
# A blob is uploaded only once its digest checks out: a single PUT whose
# x-amz-content-sha256 is the blob's own digest, so S3 checks the bytes too;
# above S3_MULTIPART_THRESHOLD_BYTES a multipart upload, parts in parallel, each part
# signed with its own SHA-256, aborted when anything fails (gc aborts those
# a killed process left).  A read is checked against the digest as it
# streams: a corrupted object raises DigestMismatchError at its end.

# One PUT up to this size (signed with the digest itself: no hashing pass, and S3
# checks the bytes); above it, parts in parallel, each resent alone on failure.
S3_MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
S3_PART_BYTES = 8 * 1024 * 1024
_S3_PART_WORKERS = 4
_S3_BLOBS = "docker/registry/v2/blobs/"
_S3_REFERENCES = "zlayer/references/"
_S3_LEASES = "zlayer/leases/"
_S3_STALE_UPLOAD_S = 24 * 3600
_S3_BLOB_KEY = re.compile(r"([a-z0-9]+)/([0-9a-f]{2})/([0-9a-f]+)/data")


_HASH_PIECE_BYTES = 256 * 1024


def _sha256_of_range(file: BinaryIO, offset: int, length: int) -> str:
    """Return the hex SHA-256 of ``length`` bytes of ``file`` from ``offset``, read
    into one small buffer (several parts are hashed at once: their memory adds up)."""
    hasher = hashlib.sha256()
    fd = file.fileno()
    piece = memoryview(bytearray(min(_HASH_PIECE_BYTES, max(length, 1))))
    done = 0
    while done < length:
        view = piece[:min(len(piece), length - done)]
        count = os.preadv(fd, [view], offset + done) if hasattr(os, "preadv") else \
            _pread_into(fd, view, offset + done)
        if not count:
            raise CacheError("the file to upload ended early")
        hasher.update(view[:count])
        done += count
    return hasher.hexdigest()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """``os.preadv`` where the system has none (it is Linux's and the BSDs')."""
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def _run_in_threads(tasks: Sequence[Callable[[], Any]], workers: int) -> List[Any]:
    """Run ``tasks`` on up to ``workers`` threads; return their results in order.

    The first exception raised stops the remaining tasks from starting and is
    raised again here, once every running task has ended.
    """
    results: List[Any] = [None] * len(tasks)
    errors: List[BaseException] = []
    queue = list(enumerate(tasks))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                if errors or not queue:
                    return
                index, task = queue.pop(0)
            try:
                results[index] = task()
            except BaseException as exc:  # re-raised in the caller's thread
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=run, name="zlayer-s3-part", daemon=True)
               for _ in range(min(workers, len(tasks)) - 1)]
    for thread in threads:
        thread.start()
    run()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class _S3BlobWriter(BlobWriter):
    """Spools a blob to an unnamed temporary file; the commit uploads it once verified."""

    def __init__(self, cache: "S3BlobCache", digest: Optional[str], size: Optional[int],
                 media_type: str, algorithm: str) -> None:
        import tempfile
        super().__init__(digest, size, algorithm)
        self._cache = cache
        self._media_type = media_type
        self._file: Optional[BinaryIO] = tempfile.TemporaryFile(prefix="zlayer-s3-")

    def _sink_write(self, data: Any) -> None:
        assert self._file is not None
        self._file.write(data)

    def _sink_truncate(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()

    def _sink_commit(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
            self._cache.put_file(self._file, str(self.digest), self.offset, self._media_type)
        finally:
            self._sink_abort()

    def _sink_abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _FixedCredentials:
    """Credentials given outright, behind the chain's ``get()``."""

    def __init__(self, credentials: S3Credentials) -> None:
        self._credentials = credentials

    def get(self) -> S3Credentials:
        """Return the credentials."""
        return self._credentials


class S3BlobCache(BlobStore):
    """A blob cache in an S3 bucket (AWS S3, MinIO, SeaweedFS, Ceph RGW, R2, GCS).

    ``S3BlobCache.from_url("s3://BUCKET/PREFIX")`` finds credentials, region
    and endpoint as the AWS CLI does; the constructor takes them outright
    (``credentials``: an S3Credentials, or anything whose ``get()`` returns
    one).  Reads are verified as they stream; writes become visible only
    once verified.  S3 keeps no access times: ``prune`` drops the oldest.
    """

    def __init__(self, bucket: str, *, prefix: str = "", endpoint: Optional[str] = None,
                 region: Optional[str] = None, credentials: Any = None,
                 addressing: str = "auto", environ: Optional[Mapping[str, str]] = None,
                 transport: Optional[_Transport] = None,
                 retries: int = DEFAULT_RETRIES,
                 multipart_threshold_bytes: int = S3_MULTIPART_THRESHOLD_BYTES,
                 part_bytes: int = S3_PART_BYTES) -> None:
        environ = os.environ if environ is None else environ
        if part_bytes < 1 or multipart_threshold_bytes < part_bytes:
            raise ValueError("part_bytes must be positive and at most the multipart threshold")
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.part_bytes = part_bytes
        settings: Optional[_AwsSettings] = None
        if region is None or endpoint is None:
            settings = _AwsSettings(environ)
        if endpoint is None:
            endpoint = _aws_endpoint(environ, settings)
        if transport is None and environ.get("AWS_CA_BUNDLE") \
                and not endpoint.lower().startswith("http://"):
            # The AWS CLI's variable for a private CA (an S3 behind a corporate TLS
            # proxy); loaded only for https, where it is used (ssl costs 3 MiB).
            ssl = _import_ssl()
            try:
                context = ssl.create_default_context(cafile=environ["AWS_CA_BUNDLE"])
            except (OSError, ssl.SSLError) as exc:
                raise CacheError(f"cannot read AWS_CA_BUNDLE {environ['AWS_CA_BUNDLE']}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            transport = _Transport(ssl_context=context,
                                   proxies=_ProxySettings.from_environ(environ))
        if transport is None:  # the registry client's proxy rules (HTTPS_PROXY, NO_PROXY)
            transport = _Transport(proxies=_ProxySettings.from_environ(environ))
        if credentials is None:
            credentials = _CredentialChain(environ, settings=settings)
        elif isinstance(credentials, S3Credentials):
            credentials = _FixedCredentials(credentials)
        self.prefix = "/".join(p for p in prefix.strip("/").split("/") if p)
        self.client = _S3Client(
            bucket, endpoint=endpoint, region=region or _aws_region(environ, settings),
            credentials=credentials, addressing=addressing, transport=transport,
            retries=retries)
        self.bucket = bucket
        self.root = self.url  # where the cache is, for messages
        self._locks: Dict[str, Any] = {}
        self._locks_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "S3BlobCache":
        """Open ``s3://BUCKET[/PREFIX]`` with the credentials, region and endpoint
        the AWS environment and profile give."""
        if not url.startswith("s3://"):
            raise CacheError(f"an S3 cache is named s3://BUCKET[/PREFIX], not {url!r}")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise CacheError(f"no bucket in {url!r} (s3://BUCKET[/PREFIX])")
        return cls(bucket, prefix=prefix, **kwargs)

    def __repr__(self) -> str:
        return f"S3BlobCache({self.url!r})"

    @property
    def url(self) -> str:
        """Return ``s3://BUCKET/PREFIX``."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, tail: str) -> str:
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def blob_key(self, digest: str) -> str:
        """Return the object key of a blob (distribution's layout)."""
        algorithm, hex_digest = _validate_digest(digest).split(":", 1)
        return self._key(f"{_S3_BLOBS}{algorithm}/{hex_digest[:2]}/{hex_digest}/data")

    def presign(self, digest: str, expires_s: int = 3600) -> str:
        """Return a presigned URL that GETs a blob without credentials until it expires."""
        return self.client.presign(self.blob_key(digest), expires_s)

    # -- reading --------------------------------------------------------------

    def has(self, digest: str) -> bool:
        """Tell whether the bucket has the blob (a HEAD)."""
        return self.client.head(self.blob_key(digest)) is not None

    def size(self, digest: str) -> Optional[int]:
        """Return a blob's size (a HEAD), None when it is absent."""
        head = self.client.head(self.blob_key(digest))
        return None if head is None else int(head["size"] or 0)

    def media_type(self, digest: str) -> str:
        """Return the Content-Type the blob was stored with."""
        head = self.client.head(self.blob_key(digest))
        kind = head["content_type"] if head is not None else ""
        return "" if kind in ("binary/octet-stream", "application/octet-stream") else kind

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Stream a blob, checked against its digest as it is read (None when absent)."""
        response = self.client.get(self.blob_key(digest))
        if response is None:
            return None
        size = _header_int(response.header("Content-Length"))
        descriptor = Descriptor("", digest, size if size is not None else 0)
        return cast(BinaryIO, _HashingReader(cast(BinaryIO, response), descriptor,
                                             check_at_end=f"blob {digest} in {self.url}"))

    def open_stream(self, digest: str, offset: int = 0) -> Optional[_Response]:
        """Start a GET of a blob from ``offset``: the raw response, for a fetcher
        that verifies what it writes (None when the blob is absent)."""
        return self.client.get(self.blob_key(digest), offset)

    def digests(self) -> Iterator[str]:
        """Yield the digest of every blob in the bucket (ListObjectsV2)."""
        for entry in self._listing():
            yield entry["digest"]

    def _listing(self) -> Iterator[Dict[str, Any]]:
        root = self._key(_S3_BLOBS)
        for item in self.client.list(root):
            match = _S3_BLOB_KEY.fullmatch(item["key"][len(root):])
            if match is None:
                continue
            digest = f"{match.group(1)}:{match.group(3)}"
            if match.group(1) in _DIGEST_HEX_LENGTHS and match.group(3)[:2] == match.group(2) \
                    and len(match.group(3)) == _DIGEST_HEX_LENGTHS[match.group(1)]:
                when = item["last_modified"] or 0.0
                yield {"digest": digest, "size": item["size"], "media_type": "",
                       "added_at": when, "last_used_at": when}

    def entries(self) -> List[Dict[str, Any]]:
        """List blobs: digest, size, media_type (''), added_at and last_used_at
        (both the object's Last-Modified)."""
        return list(self._listing())

    # -- writing --------------------------------------------------------------

    def begin_write(self, digest: Optional[str] = None, size: Optional[int] = None,
                    media_type: str = "", algorithm: str = "sha256") -> BlobWriter:
        """Start writing a blob: spooled to a temporary file, uploaded on commit."""
        return _S3BlobWriter(self, digest, size, media_type, algorithm)

    def put_file(self, file: BinaryIO, digest: str, size: int, media_type: str = "") -> None:
        """Upload ``size`` verified bytes of ``file`` as blob ``digest``.

        One PUT up to ``multipart_threshold_bytes`` (signed with the digest
        itself when it is a sha256 one), a parallel multipart upload above.
        """
        key = self.blob_key(digest)
        headers = {"Content-Type": media_type or "application/octet-stream"}
        if size <= self.multipart_threshold_bytes:
            algorithm, hex_digest = digest.split(":", 1)
            payload = hex_digest if algorithm == "sha256" else _sha256_of_range(file, 0, size)
            self.client.put(key, _FileBody(file, 0, size), payload, headers)
            return
        upload_id = self.client.create_upload(key, headers)
        try:
            def part(number: int, offset: int, length: int) -> Callable[[], str]:
                return lambda: self.client.upload_part(
                    key, upload_id, number, _FileBody(file, offset, length),
                    _sha256_of_range(file, offset, length))
            tasks = [part(n, offset, min(self.part_bytes, size - offset))
                     for n, offset in enumerate(range(0, size, self.part_bytes), 1)]
            etags = _run_in_threads(tasks, _S3_PART_WORKERS)
            self.client.complete_upload(key, upload_id, etags)
        except BaseException:
            try:
                self.client.abort_upload(key, upload_id)
            except (CacheError, OSError) as exc:
                _debug(f"aborting the upload of {digest} failed ({exc}); gc removes it")
            raise

    def put_path(self, path: str, digest: str, media_type: str = "") -> None:
        """Upload a verified blob file (the local cache's) as blob ``digest``."""
        with open(path, "rb") as file:
            self.put_file(file, digest, os.fstat(file.fileno()).st_size, media_type)

    def delete(self, digest: str) -> bool:
        """Delete a blob; tell whether it was there."""
        key = self.blob_key(digest)
        if self.client.head(key) is None:
            return False
        self.client.delete(key)
        return True

    def lock(self, digest: str) -> Any:
        """Return this process's lock of a blob (hosts coordinate through leases)."""
        with self._locks_lock:
            return self._locks.setdefault(digest, threading.Lock())

    # -- references -----------------------------------------------------------

    def _reference_key(self, reference: str) -> str:
        return self._key(_S3_REFERENCES + _reference_file_name(reference))

    def record_reference(self, reference: str, digest: str, media_type: str, *,
                         complete: bool = True) -> None:
        """Record ``reference`` → ``digest`` in the bucket (an incomplete record never
        replaces a complete one of the same digest)."""
        key = self._reference_key(reference)
        if not complete:
            existing = self._read_record(key)
            if existing is not None and existing["digest"] == digest:
                return
        record = {"reference": reference, "digest": _validate_digest(digest),
                  "media_type": media_type, "recorded_at": int(time.time())}
        if not complete:
            record["complete"] = False
        self.client.put(key, json.dumps(record, sort_keys=True).encode() + b"\n",
                        headers={"Content-Type": "application/json"})

    def _read_record(self, key: str) -> Optional[Dict[str, Any]]:
        raw = self.client.get_small(key, _MAX_REFERENCE_RECORD_BYTES)
        if raw is None:
            return None
        try:
            record = _json_object(raw)
            _validate_digest(record.get("digest"))
            if not isinstance(record.get("reference"), str):
                raise ValueError("no reference in it")
        except (ValueError, InvalidDigestError) as exc:
            raise CacheError(f"reference record s3://{self.bucket}/{key} is damaged "
                             f"({exc}): delete it") from None
        return {"reference": record["reference"], "digest": record["digest"],
                "media_type": str(record.get("media_type") or ""),
                "complete": record.get("complete", True) is not False,
                "recorded_at": record.get("recorded_at")}

    def lookup_reference(self, reference: str) -> Optional[str]:
        """Return the manifest digest recorded for ``reference`` in the bucket."""
        record = self.reference_record(reference)
        return None if record is None else record["digest"]

    def reference_record(self, reference: str) -> Optional[Dict[str, Any]]:
        """Return the record of ``reference`` (with ``recorded_at``), None when absent."""
        record = self._read_record(self._reference_key(reference))
        return record if record is not None and record["reference"] == reference else None

    def reference_records(self) -> List[Dict[str, Any]]:
        """Return every reference record in the bucket."""
        records = []
        for item in self.client.list(self._key(_S3_REFERENCES)):
            record = self._read_record(item["key"])
            if record is not None:
                records.append(record)
        return records

    def forget_reference(self, reference: str) -> bool:
        """Delete a reference record; tell whether there was one."""
        key = self._reference_key(reference)
        if self.client.head(key) is None:
            return False
        self.client.delete(key)
        return True

    # -- maintenance ----------------------------------------------------------

    def gc(self, grace_s: Optional[float] = None, dry_run: bool = False) -> List[str]:
        """Delete blobs no recorded reference reaches, and abort multipart uploads
        a process left more than a day ago; return the blobs' digests.

        ``grace_s`` defaults to DEFAULT_GC_GRACE_S: hosts of the fleet upload
        blobs before they record the reference that keeps them.  A bucket with
        blobs but no reference records (a registry's own) is refused.
        """
        no_records = next(iter(self.client.list(self._key(_S3_REFERENCES))), None) is None
        if no_records and not self.is_empty():
            raise CacheError(f"{self.url} has blobs but no reference records of this tool "
                             "(a registry's bucket?): gc would delete them all; refused")
        removed = super().gc(DEFAULT_GC_GRACE_S if grace_s is None else grace_s, dry_run)
        if not dry_run:
            self.abort_stale_uploads()
        return removed

    def abort_stale_uploads(self, older_than_s: float = _S3_STALE_UPLOAD_S) -> int:
        """Abort the multipart uploads under the prefix started over
        ``older_than_s`` ago (a killed process's); return how many."""
        count = 0
        before = time.time() - older_than_s
        for key, upload_id, started in self.client.uploads(self._key(_S3_BLOBS)):
            if started is not None and started < before:
                self.client.abort_upload(key, upload_id)
                count += 1
        return count

    def close(self) -> None:
        """Close this thread's connections to S3."""
        self.client.transport.close()


# =============================================================================
# 32. S3: the fleet tier (S3 between the local cache and the registry)
# =============================================================================
# A pull with a remote cache reads through ``_FleetSource``: the local store
# first (the resolver and fetcher do that), then the bucket, then the
# registry; a local miss costs one GET to S3, never a HEAD first.  What comes
# from the registry is uploaded to the bucket by background threads once it
# is verified in the local store (``_FleetTier``), so the pull does not wait
# for S3; ``flush()`` does.  Manifests go up as well, and each pulled
# reference is recorded (``zlayer/references/``), so another host can pull
# by digest with the registry down and by tag with ``--offline``.
#
# One download per fleet: a host that misses a blob in S3 writes a lease
# object (``zlayer/leases/sha256/<hex>``) with ``If-None-Match: *``; the
# host whose write succeeds downloads the blob from the registry, renews the
# lease while it works and deletes it once the blob is in the bucket.  The
# others poll for the blob, and take over when the lease is gone or expired
# (its owner died).  A store without conditional writes makes every host
# download for itself (said under --debug).
#
# A cache is a cache: any S3 failure (down, slow, full, credentials refused)
# is one warning, after which this process leaves S3 alone and the pull goes
# on from the registry.  A corrupted object is never served (the fetcher
# verifies what it writes) and is replaced by the registry's bytes.

DEFAULT_LEASE_S = 60.0
_LEASE_POLL_S = 0.2
_UPLOAD_WORKERS = 4
_TIER_RETRIES = 2


class _BodyWithdrawn(OSError):
    """A request body stopped on purpose: the connection is closed at once (never
    one of the errors a server's early answer causes, which would be waited for)."""


class _Follower:
    """Uploads a large blob to the bucket while it downloads: one PUT, signed with
    the blob's digest, whose body is read from the local writer's file as it fills.

    The last byte is held back until the local store has verified the blob
    (``finish``): only then does the PUT end and the object appear (S3 checks
    the bytes against the signed SHA-256 as well).  A download that fails ends
    the PUT unfinished, which S3 discards.  A writer that starts over (a
    source that ignored Range) or any S3 failure ends the follow: the blob is
    then uploaded after its commit, as a smaller one is.
    """

    def __init__(self, tier: "_FleetTier", descriptor: Descriptor, writer: BlobWriter) -> None:
        self.tier = tier
        self.descriptor = descriptor
        self._writer = writer
        self._restarts = writer.restarts
        self._file: Optional[BinaryIO] = open(cast(str, writer.readable_path), "rb")
        self._done = threading.Event()
        self._verified = False
        self._aborted = False
        self.failed = False
        self.thread = threading.Thread(target=self._run, name="zlayer-s3-follow", daemon=True)
        self.thread.start()

    def finish(self, verified: bool) -> None:
        """Say how the download ended: the PUT is finished (verified) or broken off."""
        self._verified = verified
        self._done.set()

    def _ready(self, start: int, end: int) -> int:
        """Wait until bytes from ``start`` are in the file; return how far may go
        (all but the last byte until the blob is verified)."""
        size = self.descriptor.size
        while True:
            if (self._done.is_set() and not self._verified) \
                    or self._writer.restarts != self._restarts or self.tier.down:
                self._aborted = True  # the connection is dropped: S3 keeps nothing
                raise _BodyWithdrawn("the download did not end verified")
            allowed = size if self._verified else min(self._writer.readable_bytes(), size - 1)
            if allowed > start:
                return min(end, allowed)
            self._done.wait(0.02)

    def _run(self) -> None:
        remote, digest = self.tier.remote, self.descriptor.digest
        try:
            remote.client.put(remote.blob_key(digest),
                              _FileBody(cast(BinaryIO, self._file), 0, self.descriptor.size,
                                        ready=self._ready),
                              digest.split(":", 1)[1], {
                                  "Content-Type": self.descriptor.media_type
                                  or "application/octet-stream"})
            with self.tier._lock:
                self.tier.uploaded.append(digest)
        except (ZLayerError, OSError) as exc:
            # Not S3's failure to count (a stalled download can time the PUT out):
            # the upload after the commit tries again, and reports what it meets.
            self.failed = True
            if not self._aborted:
                _debug(f"uploading blob {digest} while it downloads failed ({exc})")
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None


class _FleetTier:
    """A bucket behind a local store: reads through it, background uploads into it, leases."""

    def __init__(self, remote: "S3BlobCache", local: BlobStore, *,
                 lease_s: float = DEFAULT_LEASE_S, poll_s: float = _LEASE_POLL_S,
                 workers: int = _UPLOAD_WORKERS,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import queue
        import socket
        self.remote = remote
        self.local = local
        self.lease_s = lease_s
        self.poll_s = poll_s
        self._sleep = sleep
        self.down = False
        self.leases_supported = True
        self._warned = False
        self._lock = threading.Lock()
        self._queue: Any = queue.Queue()
        self._workers_wanted = workers
        self._threads: List[threading.Thread] = []
        self._records: List[Tuple[str, str, str]] = []
        self._held: set = set()  # the digests whose leases this process holds
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self._closed = threading.Event()
        self._renewer: Optional[threading.Thread] = None
        self._followers: Dict[str, _Follower] = {}
        self.uploaded: List[str] = []

    # -- failures -------------------------------------------------------------

    def failed(self, exc: BaseException, doing: str) -> None:
        """Take S3 out of this process's pulls after a failure, with one warning."""
        with self._lock:
            self.down = True
            warn = not self._warned
            self._warned = True
        if warn:
            _warn(f"remote cache {self.remote.url}: {doing} failed ({exc}); "
                  "going on without it")

    # -- reading --------------------------------------------------------------

    def open_blob(self, digest: str, offset: int) -> Optional[_Response]:
        """GET a blob from the bucket (None: absent, or S3 is out)."""
        if self.down:
            return None
        try:
            return self.remote.open_stream(digest, offset)
        except CacheError as exc:
            self.failed(exc, f"reading blob {digest}")
            return None

    def read_manifest(self, digest: str) -> Optional[Manifest]:
        """Return a manifest stored in the bucket (None: absent, corrupt, or S3 is out)."""
        if self.down:
            return None
        try:
            response = self.remote.open_stream(digest)
            if response is None:
                return None
            with response:
                media_type = response.header("Content-Type")
                raw = _read_capped(response, MAX_MANIFEST_SIZE_BYTES + 1)
        except CacheError as exc:
            self.failed(exc, f"reading manifest {digest}")
            return None
        try:
            return parse_manifest(raw, media_type, digest)
        except ZLayerError as exc:
            _warn(f"manifest {digest} in {self.remote.url} is damaged ({exc}); "
                  "not using it")
            return None

    def recorded(self, reference: str) -> Optional[Dict[str, Any]]:
        """Return the bucket's record of ``reference`` (None: none, or S3 is out)."""
        if self.down:
            return None
        try:
            return self.remote.reference_record(reference)
        except CacheError as exc:
            self.failed(exc, f"reading the record of {reference}")
            return None

    # -- one download per fleet -----------------------------------------------

    def _lease_key(self, digest: str) -> str:
        algorithm, hex_digest = _validate_digest(digest).split(":", 1)
        return self.remote._key(f"{_S3_LEASES}{algorithm}/{hex_digest}")

    def claim(self, digest: str) -> Optional[_Response]:
        """Take the lease of a blob missing from the bucket, or wait for the host
        that holds it: return the blob's GET once it appears, None when this
        host is to download it (it holds the lease, or leases do not work)."""
        key = self._lease_key(digest)
        client = self.remote.client
        while not self.down and self.leases_supported:
            try:
                taken = client.put_if_absent(key, self._lease())
            except CacheError as exc:
                self.failed(exc, f"leasing blob {digest}")
                return None
            if taken is None:
                self.leases_supported = False
                _debug(f"{self.remote.url} does not do conditional writes (If-None-Match); "
                       "hosts that miss a blob together each download it")
                return None
            if taken:
                self._hold(digest)
                return None
            found = self._wait_for(digest, key)
            if found is not None:
                return found
        return None

    def _wait_for(self, digest: str, key: str) -> Optional[_Response]:
        """Poll for a blob another host is downloading; None when its lease ends
        without it (released or expired: the caller tries to take it)."""
        _debug(f"blob {digest}: another host is downloading it; waiting for it in "
               f"{self.remote.url}")
        client = self.remote.client
        while not self.down:
            self._sleep(self.poll_s)
            found = self.open_blob(digest, 0)
            if found is not None:
                return found
            try:
                raw = client.get_small(key, 4096)
                lease = _json_object(raw) if raw is not None else None
            except (CacheError, ValueError) as exc:
                if isinstance(exc, CacheError):
                    self.failed(exc, f"reading the lease of {digest}")
                return None
            if lease is None:
                found = self.open_blob(digest, 0)  # it may have landed just before
                return found
            expires = lease.get("expires_at")
            if not isinstance(expires, (int, float)) or expires < time.time():
                _debug(f"blob {digest}: the lease of {str(lease.get('owner'))[:80]} expired")
                try:
                    client.delete(key)
                except CacheError as exc:
                    self.failed(exc, f"removing an expired lease of {digest}")
                return None
        return None

    def _lease(self) -> bytes:
        """Return a lease object's body: this host, and when the lease runs out."""
        return json.dumps({"owner": self._owner,
                           "expires_at": time.time() + self.lease_s}).encode()

    def _hold(self, digest: str) -> None:
        with self._lock:
            self._held.add(digest)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, name="zlayer-s3-lease",
                                                 daemon=True)
                self._renewer.start()

    def _renew(self) -> None:
        """Rewrite held leases with a later expiry while their downloads run."""
        while not self._closed.wait(self.lease_s / 3):
            with self._lock:
                held = list(self._held)
            for digest in held:
                try:
                    self.remote.client.put(self._lease_key(digest), self._lease())
                except CacheError as exc:
                    _debug(f"renewing the lease of {digest} failed ({exc})")

    def drop(self, digest: str) -> None:
        """A download from the registry failed: abort its follower, give up its lease."""
        self._follower_done(digest, False)
        self.release(digest)

    def release(self, digest: str) -> None:
        """Give up a lease this host holds (its download failed, or the blob is in)."""
        with self._lock:
            held = digest in self._held
            self._held.discard(digest)
        if held:
            try:
                self.remote.client.delete(self._lease_key(digest))
            except CacheError as exc:
                _debug(f"removing the lease of {digest} failed ({exc}); it expires")

    # -- background uploads ---------------------------------------------------

    def _start_workers(self) -> None:
        with self._lock:
            while len(self._threads) < self._workers_wanted:
                thread = threading.Thread(target=self._work, name="zlayer-s3-upload",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if not self.down:
                    task()
            except (OSError, ZLayerError) as exc:
                self.failed(exc, "uploading")
            finally:
                self._queue.task_done()

    def _submit(self, task: Callable[[], None]) -> None:
        if self.down:
            return
        self._start_workers()
        self._queue.put(task)

    def follow(self, descriptor: Descriptor, writer: BlobWriter) -> None:
        """Start uploading a large blob from the registry while it downloads."""
        # A sha256 digest signs the PUT before the bytes exist; S3 takes up to 5 GiB
        # in one PUT; below a few parts, a PUT after the commit costs about as much.
        if self.down or writer.readable_path is None \
                or not descriptor.digest.startswith("sha256:") \
                or not 2 * self.remote.part_bytes < descriptor.size <= 5 * 1024 ** 3:
            return
        with self._lock:
            if descriptor.digest in self._followers:
                return
        try:
            follower = _Follower(self, descriptor, writer)
        except OSError as exc:
            _debug(f"cannot follow blob {descriptor.digest} while it downloads ({exc})")
            return
        with self._lock:
            self._followers[descriptor.digest] = follower

    def _follower_done(self, digest: str, verified: bool) -> bool:
        """End the follower of ``digest``; tell whether it uploaded the blob."""
        with self._lock:
            follower = self._followers.pop(digest, None)
        if follower is None:
            return False
        follower.finish(verified)
        follower.thread.join()
        return verified and not follower.failed

    def offer_blob(self, descriptor: Descriptor) -> None:
        """Upload a blob the local store verified (it came from the registry)."""
        with self._lock:
            followed = descriptor.digest in self._followers

        def upload() -> None:
            try:
                # A follower that uploaded it is done; one that stopped early leaves it here.
                if followed and self._follower_done(descriptor.digest, True):
                    return
                path = self.local.path(descriptor.digest)
                if path is not None:
                    self.remote.put_path(path, descriptor.digest, descriptor.media_type)
                else:
                    self._upload_stream(descriptor)
                with self._lock:
                    self.uploaded.append(descriptor.digest)
            finally:
                self.release(descriptor.digest)
        self._submit(upload)

    def _upload_stream(self, descriptor: Descriptor) -> None:
        """Upload a blob of a store without files (spooled to a temporary file first)."""
        import shutil
        import tempfile
        stream = self.local.open_blob(descriptor.digest)
        if stream is None:
            return
        with stream, tempfile.TemporaryFile(prefix="zlayer-s3-") as spool:
            shutil.copyfileobj(stream, spool, _READ_CHUNK_BYTES)
            spool.flush()
            self.remote.put_file(spool, descriptor.digest, spool.tell(), descriptor.media_type)

    def offer_manifest(self, manifest: Manifest) -> None:
        """Upload a manifest fetched from the registry."""
        self._submit(lambda: self.remote.put(manifest.digest, manifest.raw,
                                             manifest.media_type))

    def record(self, reference: str, digest: str, media_type: str) -> None:
        """Record ``reference`` → ``digest`` in the bucket once this pull's uploads are in."""
        with self._lock:
            self._records.append((reference, digest, media_type))

    def flush(self) -> None:
        """Wait until every upload offered so far is done, then write the records."""
        self._queue.join()  # followers are finished by the queue's tasks
        with self._lock:
            records, self._records = self._records, []
        for reference, digest, media_type in records:
            if self.down:
                return
            try:
                self.remote.record_reference(reference, digest, media_type)
            except CacheError as exc:
                self.failed(exc, f"recording {reference}")

    def close(self, wait: bool = True) -> None:
        """Stop the upload threads: after the uploads (``wait``), or dropping those
        not started and releasing the leases held, for the next host to take."""
        import queue
        if wait:
            self.flush()
        else:
            try:
                while True:
                    self._queue.get_nowait()
                    self._queue.task_done()
            except queue.Empty:
                pass
            with self._lock:
                held = list(self._held)
            for digest in held:
                self.release(digest)
        with self._lock:
            left = list(self._followers)  # S3 went down, or the uploads are not waited for
        for digest in left:
            self._follower_done(digest, False)
        self._closed.set()
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()
        self.remote.close()


class _FleetSource:
    """A pull's source through the tier: the bucket, then the registry (``upstream``;
    None offline, when recorded references stand in for tags)."""

    def __init__(self, tier: Optional[_FleetTier], local: BlobStore,
                 upstream: Optional[_Source], reference: Reference) -> None:
        self.tier = tier
        self.local = local
        self.upstream = upstream
        self.reference = reference
        names = ([tier.remote.url] if tier else []) + ([upstream.name] if upstream else [])
        self.name = " then ".join(names) or "the cache"
        self.location = upstream.location if upstream is not None else None
        self._from_upstream: set = set()
        self._remote_opens: Dict[str, int] = {}
        self._skip_remote: set = set()
        self._lock = threading.Lock()

    def _missing(self, what: str) -> NotFoundError:
        where = f"the local cache or {self.tier.remote.url}" if self.tier else "the local cache"
        return NotFoundError(f"{what} is not in {where}, and --offline keeps the registry "
                             "out of it")

    def head_manifest(self, tag: str) -> Optional[str]:
        """Ask the registry; offline, take the recorded digest (with a warning)."""
        if self.upstream is not None:
            return self.upstream.head_manifest(tag)
        name = str(self.reference)
        digest = self.local.lookup_reference(name)
        record = None
        if digest is None and self.tier is not None:
            record = self.tier.recorded(name)
            digest = record["digest"] if record else None
        if digest is None:
            raise self._missing(f"no recorded digest of {name}")
        when = record.get("recorded_at") if record else None
        since = f" recorded {time.strftime('%Y-%m-%d %H:%M', time.gmtime(when))} UTC" \
            if isinstance(when, (int, float)) else ""
        _warn(f"offline: {name} is taken as {digest}{since}; the registry may have moved it")
        return digest

    def get_manifest(self, identifier: str) -> Manifest:
        """Return a manifest from the bucket (by digest), else from the registry
        (uploading it to the bucket)."""
        if ":" in identifier and self.tier is not None:
            found = self.tier.read_manifest(identifier)
            if found is not None:
                return found
        if self.upstream is None:
            if ":" not in identifier:
                identifier = cast(str, self.head_manifest(identifier))
                return self.get_manifest(identifier)
            raise self._missing(f"manifest {identifier}")
        manifest = self.upstream.get_manifest(identifier)
        if self.tier is not None:
            self.tier.offer_manifest(manifest)
        return manifest

    def open_blob(self, digest: str, offset: int = 0) -> _BlobStream:
        """Stream a blob from the bucket, else (after the fleet's lease) the registry."""
        tier = self.tier
        if tier is not None and digest not in self._skip_remote:
            with self._lock:
                tries = self._remote_opens[digest] = self._remote_opens.get(digest, 0) + 1
            # A second interruption of the bucket's stream: the registry finishes it.
            if tries <= 2:
                response = tier.open_blob(digest, offset)
                if response is None and offset == 0 and self.upstream is not None \
                        and not tier.down:
                    response = tier.claim(digest)
                if response is not None:
                    return _BlobStream(response, offset if response.status == 206 else 0)
        if self.upstream is None:
            raise self._missing(f"blob {digest}")
        with self._lock:
            self._from_upstream.add(digest)
        return self.upstream.open_blob(digest, offset)

    def settled(self, descriptor: Descriptor, verified: bool) -> None:
        """Upload a verified blob that came from the registry; after a digest
        failure, skip the bucket's copy (the registry's replaces it)."""
        tier = self.tier
        if tier is None:
            return
        digest = descriptor.digest
        with self._lock:
            from_upstream = digest in self._from_upstream
            if not verified and not from_upstream:
                self._skip_remote.add(digest)  # what comes next is the registry's
        if verified and from_upstream:
            tier.offer_blob(descriptor)
        elif not verified and from_upstream:
            tier.drop(digest)

    def receiving(self, descriptor: Descriptor, writer: BlobWriter) -> None:
        """Start uploading a large blob from the registry to the bucket as it arrives."""
        if self.tier is not None and descriptor.digest in self._from_upstream:
            self.tier.follow(descriptor, writer)

    def backoff(self, attempt: int) -> None:
        """Wait as the registry does."""
        if self.upstream is not None:
            self.upstream.backoff(attempt)


# =============================================================================
# 33. UNPACK: layer streams (compression, prefetch)
# =============================================================================
# Layers are gzip, zstd or plain tar, decided by media type and confirmed by
# the magic bytes; every layer is streamed, none is held in memory.

_WHITEOUT_PREFIX = ".wh."
_OPAQUE_WHITEOUT = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_SYMLINK_HOPS = 40


def _layer_compression(media_type: str, head: bytes) -> str:
    """Decide a layer's compression ('gzip', 'zstd' or 'tar') from media type and magic.

    A media type that names one compression while the bytes show another is
    refused: that layer is not what its manifest says.
    """
    lowered = media_type.lower()
    declared = ("gzip" if "gzip" in lowered else "zstd" if "zstd" in lowered
                else "tar" if lowered.endswith("tar") or "tar" in lowered.rsplit(".", 1)[-1]
                else "")
    actual = ("gzip" if head.startswith(_GZIP_MAGIC) else "zstd" if head.startswith(_ZSTD_MAGIC)
              else "tar")
    if declared and declared != actual:
        raise UnpackError(f"layer declared as {declared} ({media_type}) but its bytes "
                          f"are {actual if actual != 'tar' else 'not compressed'}")
    return actual


class _ZstdPipe:
    """Decompresses zstd with compression.zstd (3.14+) or an installed zstd binary."""

    def __init__(self, source: BinaryIO) -> None:
        self._process = None
        try:
            # Python 3.14 added compression.zstd; it is imported by name so that
            # stdlib checks run on older Pythons do not mistake it for a dependency.
            import importlib
            zstd = importlib.import_module("compression.zstd")
        except ImportError:
            zstd = None
        if zstd is not None:
            self.stream: Any = zstd.ZstdFile(source)
            return
        import shutil
        import subprocess
        binary = shutil.which("zstd")
        if binary is None:
            raise UnpackError("zstd layers need Python 3.14's compression.zstd or a "
                              "'zstd' program on PATH; neither is available")
        self._process = subprocess.Popen([binary, "-dc"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stream = self._process.stdout
        # A thread feeds the pipe: the source may be buffered (already peeked
        # at) or not a file at all, so its descriptor cannot be handed over.
        self._feeder = threading.Thread(target=self._feed, args=(source,), daemon=True)
        self._feeder.start()

    def _feed(self, source: BinaryIO) -> None:
        sink = self._process.stdin
        try:
            for chunk in iter(lambda: source.read(_READ_CHUNK_BYTES), b""):
                sink.write(chunk)
        except (OSError, ValueError):
            pass  # the reader stopped early; close() reports zstd's own error
        finally:
            try:
                sink.close()
            except OSError:
                pass

    def close(self, check: bool = True) -> None:
        """Close the stream; with ``check``, raise if the decompressor failed.

        Without ``check`` (another error is already on its way) the process
        is stopped quietly, so its failure cannot hide the first error.
        """
        if self._process is None:
            self.stream.close()
            return
        if not check:
            self._process.kill()
        while self.stream.read(_READ_CHUNK_BYTES):
            pass
        self.stream.close()
        self._feeder.join()
        error = self._process.stderr.read().decode(errors="replace").strip()
        self._process.stderr.close()
        if self._process.wait() != 0 and check:
            raise UnpackError(f"zstd failed: {error.splitlines()[-1] if error else 'no output'}")


class _PrefetchReader:
    """Reads a stream ahead in a background thread, at most ``depth`` chunks ahead.

    Errors of the source are raised to the reader; ``close()`` stops the
    thread even when the reader gave up half way.  It counts what it hands
    out (``tell``) and seeks forward by skipping, which is all a tarfile
    reading members in order asks of its file.
    """

    def __init__(self, source: Any, chunk_bytes: int = _READ_CHUNK_BYTES, depth: int = 4) -> None:
        import queue
        self._queue: Any = queue.Queue(depth)
        self._stop = threading.Event()
        self._buffer = b""
        self._position = 0
        self._consumed = 0  # bytes of the chunks before the current one
        self._ended = False
        self._thread = threading.Thread(target=self._run, args=(source, chunk_bytes),
                                        name="zlayer-inflate", daemon=True)
        self._thread.start()

    def _run(self, source: Any, chunk_bytes: int) -> None:
        import queue
        while not self._stop.is_set():
            try:
                item: Any = source.read(chunk_bytes)
            except BaseException as exc:  # handed to the reader, raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (all that is left when negative)."""
        parts = []
        while size != 0 and not self._ended:
            if self._position >= len(self._buffer):
                item = self._queue.get()
                if isinstance(item, BaseException):
                    self._ended = True
                    raise item
                if not item:
                    self._ended = True
                    break
                self._consumed += len(self._buffer)
                self._buffer, self._position = item, 0
            end = len(self._buffer) if size < 0 else min(len(self._buffer), self._position + size)
            parts.append(self._buffer[self._position:end])
            if size > 0:
                size -= end - self._position
            self._position = end
        return b"".join(parts)

    def tell(self) -> int:
        """Return how many bytes were read so far."""
        return self._consumed + self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        """Skip forward to ``offset`` (at most to the end); backwards is an error."""
        if whence != 0 or offset < self.tell():
            raise OSError(errno.ESPIPE, "a layer stream only seeks forward")
        while offset > self.tell() and not self._ended:
            left = len(self._buffer) - self._position
            if left:
                self._position += min(left, offset - self.tell())
            else:
                self.read(min(offset - self.tell(), _READ_CHUNK_BYTES))
        return self.tell()

    def close(self) -> None:
        """Stop the background thread."""
        import queue
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def _stream_errors() -> Tuple[type, ...]:
    """Return the exceptions that mean a corrupt or truncated layer stream."""
    import gzip
    import tarfile
    import zlib
    return (tarfile.TarError, EOFError, zlib.error, getattr(gzip, "BadGzipFile", zlib.error))


# =============================================================================
# 34. UNPACK: the root filesystem tree
# =============================================================================
# A layer is untrusted input from the network.  Every entry's parent path is
# resolved component by component inside the root, following symlinks the
# way a chroot would (an absolute target or ".." stops at the root, as in
# umoci's and containerd's extractors), so no entry can create, change or
# delete anything outside it.  Work deferred to the end of a layer or image
# (opaque whiteouts, directory modes) re-checks that its path holds no
# symlink.  Whiteouts follow image-spec layer.md.

class _RootTree:
    """A root filesystem being built: safe path resolution, removal, deferred metadata.

    ``_written`` holds what the current layer added (whiteouts spare it);
    ``_dirs`` the directory entries whose mode and times are set at the end.
    """

    def __init__(self, root: str, as_root: bool) -> None:
        self.root = root
        self.as_root = as_root
        self._dirs: Dict[str, Any] = {}
        self._restore: Dict[str, Tuple[int, float]] = {}
        self._resolved: Dict[str, str] = {}
        self._written: set = set()

    @staticmethod
    def _split_name(name: str) -> List[str]:
        """Split a member name into components; '..' anywhere is refused."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnpackError(f"refusing member {name!r}: '..' in its path", member=name)
        return parts

    def _resolve_dir(self, parts: Sequence[str], member: str, create: bool) -> Optional[str]:
        """Resolve directory components inside the root; return the real relative path.

        Symlinks are followed as if the root were '/': an absolute target
        restarts at the root and '..' stops there.  Missing directories are
        created when ``create``; otherwise None is returned for them.
        """
        key = "/".join(parts)
        cached = self._resolved.get(key)
        if cached is not None:
            return cached
        import stat as st
        resolved: List[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            component = pending.pop(0)
            if component in ("", "."):
                continue
            if component == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = resolved + [component]
            full = os.path.join(self.root, *candidate)
            try:
                mode = os.lstat(full).st_mode
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(full)
                except PermissionError:
                    if self.as_root or not self._make_writable("/".join(resolved)):
                        raise
                    os.mkdir(full)
                os.chmod(full, 0o755)  # implied parents: 0755, whatever the umask
                self._written.add("/".join(candidate))
                resolved = candidate
                continue
            if st.S_ISLNK(mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise UnpackError(f"refusing member {member!r}: too many levels of "
                                      "symbolic links", member=member)
                target = os.readlink(full)
                if target.startswith("/"):
                    resolved = []
                pending = target.split("/") + pending
                continue
            if not st.S_ISDIR(mode):
                raise UnpackError(f"member {member!r}: {'/'.join(candidate)} is not a "
                                  "directory", member=member)
            resolved = candidate
        result = "/".join(resolved)
        self._resolved[key] = result
        return result

    def _remove(self, relative: str) -> None:
        """Remove whatever is at ``relative`` (never following a symlink)."""
        import shutil
        import stat as st
        full = os.path.join(self.root, relative)
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            return
        if st.S_ISDIR(mode):
            shutil.rmtree(full)
            prefix = relative + "/"
            for table in (self._dirs, self._restore):
                for key in [k for k in table if k == relative or k.startswith(prefix)]:
                    del table[key]  # a directory made later here starts afresh
        else:
            os.unlink(full)
        if st.S_ISDIR(mode) or st.S_ISLNK(mode):
            self._resolved.clear()  # cached resolutions may run through it

    def _is_real_dir(self, relative: str) -> bool:
        """Tell whether ``relative`` is a directory reached without any symlink.

        Deferred work (opaque whiteouts, directory modes) is done by path
        after later entries may have replaced a directory with a symlink; it
        must never follow one out of the root.
        """
        import stat as st
        path = self.root
        for component in relative.split("/") if relative else ():
            path = os.path.join(path, component)
            try:
                if not st.S_ISDIR(os.lstat(path).st_mode):
                    return False
            except FileNotFoundError:
                return False
        return True

    def _make_writable(self, relative: str) -> bool:
        """Give the owner write access to a directory; False if it already had it."""
        import stat as st
        full = os.path.join(self.root, relative) if relative else self.root
        if not self._is_real_dir(relative):
            return False
        info = os.lstat(full)
        if info.st_mode & 0o300 == 0o300:
            return False
        if relative not in self._dirs and relative not in self._restore:
            self._restore[relative] = (st.S_IMODE(info.st_mode), info.st_mtime)
        os.chmod(full, st.S_IMODE(info.st_mode) | 0o700)
        return True

    def _apply_opaque(self, directory: str) -> None:
        """Hide what lower layers put under ``directory``; keep this layer's entries."""
        if not self._is_real_dir(directory):
            return  # replaced later in the layer: nothing of the lower layers is left
        full = os.path.join(self.root, directory) if directory else self.root
        prefix = f"{directory}/" if directory else ""
        keep = set()
        for path in self._written:
            if path.startswith(prefix) or not directory:
                pieces = path[len(prefix):].split("/")
                for i in range(1, len(pieces) + 1):
                    keep.add(prefix + "/".join(pieces[:i]))
        self._prune_tree(full, prefix, keep)

    def _prune_tree(self, full: str, prefix: str, keep: set) -> None:
        try:
            entries = list(os.scandir(full))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            relative = prefix + entry.name
            if relative not in keep:
                self._remove(relative)
            elif entry.is_dir(follow_symlinks=False):
                # Even a directory this layer re-declares loses its lower content.
                self._prune_tree(entry.path, relative + "/", keep)

    def _finish_directories(self) -> None:
        """Set directory modes, owners and mtimes deepest first (after their contents)."""
        pending = set(self._dirs) | set(self._restore)
        for relative in sorted(pending, key=lambda p: (p.count("/") + bool(p), p), reverse=True):
            if not self._is_real_dir(relative):
                continue
            full = os.path.join(self.root, relative) if relative else self.root
            if relative in self._dirs:
                self._set_metadata(full, self._dirs[relative])
            else:
                mode, mtime = self._restore[relative]
                os.chmod(full, mode)
                os.utime(full, (mtime, mtime))
        self._dirs = {}
        self._restore = {}

    def _set_metadata(self, target: Union[int, str], member: Any, is_link: bool = False) -> None:
        """Apply ownership (root only), mode and mtime to a file descriptor or path."""
        if self.as_root:
            try:
                if isinstance(target, int):
                    os.fchown(target, member.uid, member.gid)
                else:
                    os.lchown(target, member.uid, member.gid)
            except OSError as exc:
                raise UnpackError(f"cannot set owner of {member.name!r}: {exc.strerror}",
                                  member=member.name) from exc
            self._set_xattrs(target, member)
        if not is_link:
            mode = member.mode & 0o7777
            if not self.as_root:
                mode &= ~0o6000  # no setuid/setgid for files an unprivileged user makes
            os.chmod(target, mode)
        if is_link:
            if os.utime in getattr(os, "supports_follow_symlinks", ()):
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
        else:
            os.utime(target, (member.mtime, member.mtime))

    @staticmethod
    def _set_xattrs(target: Union[int, str], member: Any) -> None:
        if not hasattr(os, "setxattr"):
            return
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                try:
                    if isinstance(target, int):
                        os.setxattr(target, key[13:], raw)
                    else:
                        os.setxattr(target, key[13:], raw, follow_symlinks=False)
                except OSError as exc:
                    _warn(f"cannot set xattr {key[13:]} on {member.name}: {exc.strerror}")


# =============================================================================
# 35. UNPACK: LayerUnpacker, applying tar entries
# =============================================================================

def _layer_name(layer: Any) -> str:
    """Return a layer's name for a message (digest or path, and a space), or '' for a stream."""
    if hasattr(layer, "digest") and hasattr(layer, "open"):
        return f"{layer.digest} "
    if isinstance(layer, (str, os.PathLike)):
        return f"{os.fspath(layer)} "
    return ""


def _tar_members(tar: Any) -> Iterator[Any]:
    """Yield a streamed tar's members, taking the end of the stream right after
    the last member's data (no padding, no end-of-archive blocks) as its end.

    umoci 0.4's ``insert`` writes such layers (umoci issue #436); Go's
    archive/tar, and so umoci and containerd, read them.  A member whose data
    is cut short is still an error.
    """
    import tarfile
    last = None
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError as exc:
            if (last is not None and str(exc) == "unexpected end of data"
                    and tar.fileobj.tell() >= last.offset_data + last.size):
                return
            raise
        if member is None:
            return
        last = member
        yield member


class LayerUnpacker(_RootTree):
    """Unpacks image layers into a root filesystem directory, safely.

    ``unpack_layer`` applies one layer in place; ``unpack_layers`` builds a
    whole image in a staging directory beside ``rootfs`` and renames it into
    place at the end, so a failure leaves ``rootfs`` as it was.  ``as_root``
    (default: the effective uid is 0) decides whether ownership, xattrs and
    device nodes are applied and setuid/setgid bits kept.  ``progress``
    (descriptor, bytes read, size) is called as a pulled Layer is read, at
    most every 0.1 s and once at its end.
    """

    def __init__(self, rootfs: Union[str, "os.PathLike[str]"], *,
                 as_root: Optional[bool] = None,
                 progress: Optional[Callable[[Descriptor, int, int], None]] = None) -> None:
        self.rootfs = os.path.abspath(os.fspath(rootfs))
        super().__init__(self.rootfs, _is_root() if as_root is None else as_root)
        self.skipped: List[str] = []
        self.progress = progress

    def unpack_layers(self, layers: Iterable[Any]) -> str:
        """Unpack every layer, in order, into a new ``rootfs``; return its path."""
        import shutil
        if os.path.lexists(self.rootfs) and (not os.path.isdir(self.rootfs)
                                             or os.listdir(self.rootfs)):
            raise UnpackError(f"{self.rootfs} exists and is not an empty directory")
        parent = os.path.dirname(self.rootfs)
        stem = f".{os.path.basename(self.rootfs)}.staging"
        try:
            os.makedirs(parent, exist_ok=True)
            _sweep_leftovers(parent, stem, "")
            staging = _temporary_path(parent, stem, "")
            os.mkdir(staging, 0o700)
            lock_fd = os.open(staging, os.O_RDONLY)
        except OSError as exc:
            raise UnpackError(f"cannot create {self.rootfs}: {exc.strerror or exc}") from exc
        _try_flock(lock_fd)  # in use: not a leftover for _sweep_leftovers
        self.root = staging
        try:
            os.chmod(staging, 0o755)  # unless a "./" entry says otherwise
            for layer in layers:
                self.unpack_layer(layer)
            self._finish_directories()
            os.replace(staging, self.rootfs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            os.close(lock_fd)
            self.root = self.rootfs
        return self.rootfs

    def unpack_layer(self, layer: Any, media_type: Optional[str] = None) -> None:
        """Apply one layer (a Layer, a path or a binary file) to the root filesystem."""
        import tarfile
        opened, media_type = self._open_layer(layer, media_type)
        with opened as raw:
            head = raw.peek(8)[:8] if hasattr(raw, "peek") else b""
            compression = _layer_compression(media_type or "", head)
            zstd_pipe = None
            if compression == "zstd":
                zstd_pipe = _ZstdPipe(raw)
                source: Any = zstd_pipe.stream
            elif compression == "gzip":
                import gzip
                source = gzip.GzipFile(fileobj=raw, mode="rb")
            else:
                source = raw
            # A second thread reads (inflates, hashes) ahead: zlib and sha256
            # release the GIL, as tar -z runs gzip in a process of its own.
            # The tarfile reads it as a plain file, in order: tarfile's stream
            # mode ("r|") re-slices its buffer on every read it makes.
            prefetch = _PrefetchReader(source)
            self._written = set()
            opaque: List[str] = []
            stream_errors = _stream_errors()
            broken: Optional[UnpackError] = None
            report = self._reporter(layer, getattr(raw, "raw", None))
            try:
                with tarfile.TarFile(fileobj=prefetch, mode="r") as tar:
                    for member in _tar_members(tar):
                        if report is not None:
                            report(False)
                        try:
                            self._apply(tar, member, opaque)
                        except stream_errors:
                            raise
                        except OSError as exc:
                            raise UnpackError(f"cannot unpack member {member.name!r}: "
                                              f"{exc.strerror or exc}", member=member.name) from exc
            except stream_errors as exc:
                broken = UnpackError(f"layer {_layer_name(layer)}is not a valid tar stream: {exc}")
                broken.__cause__ = exc
            finally:
                prefetch.close()
                if zstd_pipe is not None:
                    zstd_pipe.close(check=sys.exc_info()[0] is None and broken is None)
            checking = getattr(raw, "raw", None)
            if isinstance(checking, _HashingReader):
                # Read the rest (bytes after the end of the tar, or after the
                # point where it broke) and check the whole: a cached layer
                # changed on disk usually breaks its compression first, and is
                # reported as corrupt.  (The reading thread may have met the end
                # already, its error unread: the check is made here again.)
                try:
                    while raw.read(_READ_CHUNK_BYTES):
                        pass
                    checking.check_end()
                except DigestMismatchError as exc:
                    raise exc from broken
            if broken is not None:
                raise broken
            for directory in opaque:
                self._apply_opaque(directory)
            if report is not None:
                report(True)
        if self.root == self.rootfs:
            self._finish_directories()

    def _reporter(self, layer: Any, counted: Any) -> Optional[Callable[[bool], None]]:
        """Return what reports a pulled Layer's progress (``report(final)``), or None."""
        if self.progress is None or not isinstance(counted, _HashingReader):
            return None
        progress, descriptor = self.progress, layer.descriptor
        last = [0.0]

        def report(final: bool) -> None:
            now = time.monotonic()
            if final or now - last[0] >= 0.1:
                last[0] = now
                # The reading thread updates the count: an int, read whole.
                done = descriptor.size if final else min(counted.count, descriptor.size - 1)
                progress(descriptor, done, descriptor.size)
        return report

    @staticmethod
    def _open_layer(layer: Any, media_type: Optional[str]) -> Tuple[Any, str]:
        import io
        if hasattr(layer, "open") and hasattr(layer, "media_type"):  # a pulled Layer
            # Hashed as it is read (by the inflating thread for gzip): a cache
            # file changed since it was verified is caught, not unpacked.
            return layer.open(), media_type or layer.media_type
        if isinstance(layer, (str, os.PathLike)):
            try:
                return open(os.fspath(layer), "rb", buffering=_READ_CHUNK_BYTES), media_type or ""
            except OSError as exc:
                raise UnpackError(f"cannot read layer {os.fspath(layer)}: "
                                  f"{exc.strerror or exc}") from exc
        if not hasattr(layer, "peek"):
            layer = io.BufferedReader(layer, _READ_CHUNK_BYTES)
        return layer, media_type or ""

    def _apply(self, tar: Any, member: Any, opaque: List[str]) -> None:
        name = member.name
        parts = self._split_name(name)
        if not parts:
            if member.isdir():
                self._dirs[""] = member  # "./": its mode and times are the root's
            return
        try:
            self._apply_entry(tar, member, parts, opaque)
        except PermissionError:
            # Unprivileged: a lower layer may have made the directory read-only;
            # open it up for this entry and restore its mode at the end.
            if self.as_root:
                raise
            parent = self._resolve_dir(parts[:-1], name, create=False)
            if parent is None or not self._make_writable(parent):
                raise
            self._apply_entry(tar, member, parts, opaque)

    def _whiteout(self, parts: Sequence[str], name: str, opaque: List[str]) -> None:
        """Apply ``.wh.NAME`` (hide NAME of lower layers) or record an opaque marker."""
        base = parts[-1]
        hidden = base[len(_WHITEOUT_PREFIX):]
        if base != _OPAQUE_WHITEOUT and hidden in ("", ".", ".."):
            raise UnpackError(f"refusing whiteout {name!r}: it names no entry", member=name)
        parent = self._resolve_dir(parts[:-1], name, create=False)
        if parent is None:
            return
        if base == _OPAQUE_WHITEOUT:
            opaque.append(parent)  # applied after the layer: order inside it does not matter
            return
        target = _join(parent, hidden)
        prefix = target + "/"
        # A whiteout hides lower layers only (layer.md): what this layer put at
        # or under the path stays, and a directory it declared loses the
        # lower layers' content, as an opaque one would.
        if target in self._written or any(path.startswith(prefix) for path in self._written):
            self._apply_opaque(target)
        else:
            self._remove(target)

    def _apply_entry(self, tar: Any, member: Any, parts: Sequence[str],
                     opaque: List[str]) -> None:
        name = member.name
        base = parts[-1]
        if base.startswith(_WHITEOUT_PREFIX):
            self._whiteout(parts, name, opaque)
            return
        parent = self._resolve_dir(parts[:-1], name, create=True)
        relative = _join(parent, base)
        full = os.path.join(self.root, relative)
        if member.isdir():
            self._make_directory(full, relative, member)
        elif member.isreg():
            self._write_file(tar, member, full, relative)
        elif member.issym():
            self._replace(full, relative)
            os.symlink(member.linkname, full)
            self._set_metadata(full, member, is_link=True)
        elif member.islnk():
            self._hardlink(member, full, relative)
        elif member.isfifo():
            self._replace(full, relative)
            os.mkfifo(full, 0o600)
            self._set_metadata(full, member)
        elif member.ischr() or member.isblk():
            if not self.as_root:
                self.skipped.append(name)
                _warn(f"skipping device node {name} (needs root)")
                return
            import stat as st
            self._replace(full, relative)
            kind = st.S_IFCHR if member.ischr() else st.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            self._set_metadata(full, member)
        else:
            raise UnpackError(f"refusing member {name!r} of unsupported type "
                              f"{member.type!r}", member=name)
        self._written.add(relative)

    def _replace(self, full: str, relative: str) -> None:
        """Clear the way for a new non-directory entry."""
        if os.path.lexists(full):
            self._remove(relative)

    def _make_directory(self, full: str, relative: str, member: Any) -> None:
        import stat as st
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not st.S_ISDIR(mode):
            self._remove(relative)
            mode = None
        if mode is None:
            os.mkdir(full, 0o700)
        self._dirs[relative] = member
        self._written.add(relative)

    def _write_file(self, tar: Any, member: Any, full: str, relative: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
            | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(full, flags, 0o600)
        except FileExistsError:
            self._remove(relative)
            fd = os.open(full, flags, 0o600)
        try:
            if member.sparse is not None:
                source = tar.extractfile(member)
                for chunk in iter(lambda: source.read(_READ_CHUNK_BYTES), b""):
                    _write_all(fd, chunk)
            else:
                # Read the member's data straight from the stream, which sits at
                # its first byte: extractfile() costs more than a small file does.
                stream = tar.fileobj
                if stream.tell() != member.offset_data:
                    stream.seek(member.offset_data)
                remaining = member.size
                while remaining:
                    chunk = stream.read(min(remaining, _READ_CHUNK_BYTES))
                    if not chunk:
                        raise EOFError(f"layer ends inside member {member.name!r}")
                    _write_all(fd, chunk)
                    remaining -= len(chunk)
            self._set_metadata(fd, member)
        finally:
            os.close(fd)

    def _hardlink(self, member: Any, full: str, relative: str) -> None:
        import stat as st
        name, target_parts = member.name, self._split_name(member.linkname)
        if not target_parts:
            raise UnpackError(f"refusing hard link {name!r} to the root", member=name)
        parent = self._resolve_dir(target_parts[:-1], name, create=False)
        source = None if parent is None else _join(parent, target_parts[-1])
        try:
            mode = os.lstat(os.path.join(self.root, source)).st_mode if source else None
        except FileNotFoundError:
            mode = None
        if mode is None or st.S_ISDIR(mode):
            raise UnpackError(f"refusing hard link {name!r}: target {member.linkname!r} "
                              "is not a file inside the image", member=name)
        if source == relative:
            return
        self._replace(full, relative)
        os.link(os.path.join(self.root, source), full, follow_symlinks=False)


# =============================================================================
# 36. OCI LAYOUT: writing layouts and archives
# =============================================================================
# image-layout.md: a directory with "oci-layout" ({"imageLayoutVersion":
# "1.0.0"}), "index.json" (an image index whose descriptors may carry
# "org.opencontainers.image.ref.name", skopeo's oci:DIR:TAG) and
# blobs/<alg>/<encoded>.

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"
_LAYOUT_VERSION = "1.0.0"


def _read_layout_json(path: str) -> Dict[str, Any]:
    """Read a layout's own JSON object file (``oci-layout``, ``index.json``)."""
    raw = _read_regular_file(path, MAX_MANIFEST_SIZE_BYTES + 1)
    try:
        if raw is None:
            raise ValueError("not a readable regular file")
        return _json_object(raw)
    except ValueError as exc:
        raise LayoutError(f"{path} is not a readable JSON object: {exc}") from None


class _LayoutWriter:
    """Adds blobs and tagged manifests to an OCI image layout directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        marker = os.path.join(self.root, "oci-layout")
        try:
            os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
            if os.path.exists(marker):
                version = _read_layout_json(marker).get("imageLayoutVersion")
                if version != _LAYOUT_VERSION:
                    raise LayoutError(f"{self.root} is an OCI layout of unsupported "
                                      f"version {version!r}")
            else:
                _atomic_write(marker, json.dumps(
                    {"imageLayoutVersion": _LAYOUT_VERSION}).encode())
        except OSError as exc:
            raise LayoutError(f"cannot write OCI layout {self.root}: "
                              f"{exc.strerror or exc}") from exc

    def blob_path(self, digest: str) -> str:
        """Return where a blob lives in the layout."""
        algorithm, encoded = _validate_digest(digest).split(":", 1)
        return os.path.join(self.root, "blobs", algorithm, encoded)

    def write_bytes(self, data: bytes, media_type: str, **fields: Any) -> Descriptor:
        """Store a small blob; return its descriptor."""
        digest = compute_digest(data)
        path = self.blob_path(digest)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            existing = _read_regular_file(path, len(data) + 1)
            if existing != data:  # missing, or not what its name says: (re)write
                if existing is not None:
                    os.unlink(path)
                _atomic_write(path, data)
        except OSError as exc:
            raise LayoutError(f"cannot write blob {digest} to {self.root}: "
                              f"{exc.strerror or exc}") from exc
        return Descriptor(media_type, digest, len(data), **fields)

    def tag(self, descriptor: Descriptor, ref_name: Optional[str]) -> None:
        """Add a manifest to index.json, replacing an entry with the same ref name."""
        path = os.path.join(self.root, "index.json")
        index: Dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX,
                                 "manifests": []}
        if os.path.exists(path):
            index = _read_layout_json(path)
            if not isinstance(index.get("manifests"), list):
                raise LayoutError(f"{path} has no 'manifests' list")
        entry = descriptor.to_json()
        if ref_name:
            entry["annotations"] = dict(entry.get("annotations", {}),
                                        **{ANNOTATION_REF_NAME: ref_name})

        def replaced(item: Any) -> bool:
            # One entry per ref name; untagged, one per digest (as skopeo does:
            # it refuses a layout listing one untagged image twice).
            if not isinstance(item, dict):
                return False
            annotations = item.get("annotations")
            name = annotations.get(ANNOTATION_REF_NAME) if isinstance(annotations, dict) else None
            return name == ref_name if ref_name else (
                name is None and item.get("digest") == descriptor.digest)

        index["manifests"] = [m for m in index["manifests"] if not replaced(m)]
        index["manifests"].append(entry)
        try:
            _atomic_write(path, json.dumps(index, indent=2).encode())
        except OSError as exc:
            raise LayoutError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _image_closure(store: BlobStore, top: Manifest) -> List[Descriptor]:
    """List every descriptor an image or index reaches: manifests first, then blobs."""
    def load(descriptor: Descriptor) -> Optional[Manifest]:
        if descriptor.digest == top.digest:
            return top
        if descriptor.media_type not in _MANIFEST_TYPES:
            return None
        raw = store.read_small(descriptor.digest, MAX_MANIFEST_SIZE_BYTES)
        if raw is None:
            raise CacheError(f"manifest {descriptor.digest} is not in the cache "
                             "(or is larger than a manifest may be)")
        return parse_manifest(raw, descriptor.media_type, descriptor.digest)

    nodes = list(_walk_graph([top.descriptor()], load))
    return [d for d, m in nodes if m is not None] + [d for d, m in nodes if m is None]


@_value
class ExportInfo:
    """What ``ImagePuller.export_image`` wrote."""

    reference: str
    digest: str
    media_type: str
    destination: str
    format: str
    tag: Optional[str]
    blobs: int
    size_bytes: int

    def to_json(self) -> Dict[str, Any]:
        """Return the JSON form the CLI prints."""
        return dict(self.__dict__)


def _link_or_copy(cache: BlobStore, descriptor: Descriptor, target: str) -> None:
    """Put a cached blob at ``target``: a hard link when possible, else a verified copy.

    The caller has hashed the cached file (``_verify_stored``): a link would
    carry a byte changed on disk since the pull out unnoticed.
    """
    import errno as _errno
    source = cache.path(descriptor.digest)
    if os.path.exists(target):
        if source is not None and os.path.samefile(source, target):
            return
        try:
            with open(target, "rb") as existing:  # a layout's own blob is verified, not trusted
                _drain_checked(existing, descriptor)
            return
        except DigestMismatchError:
            os.unlink(target)
    if source is not None:
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in (_errno.EXDEV, _errno.EPERM, _errno.EMLINK, _errno.ENOTSUP):
                raise

    def copy_verified(out: BinaryIO) -> None:
        with _open_stored(cache, descriptor) as stream:
            _drain_checked(stream, descriptor, _corrupt_cached_blob(descriptor.digest), out.write)

    _atomic_write(target, copy_verified, 0o444)


def _write_layout_dir(cache: BlobStore, top: Manifest, directory: str,
                      tag: Optional[str]) -> List[Descriptor]:
    """Write an image (and everything it reaches) into an OCI layout directory.

    Every cached blob is hashed before the first is written, so a corrupt
    one fails the export with nothing added to the layout.
    """
    closure = _image_closure(cache, top)
    for descriptor in closure:
        if cache.path(descriptor.digest) is not None:
            _verify_stored(cache, descriptor)
    writer = _LayoutWriter(directory)
    try:
        for descriptor in closure:
            target = writer.blob_path(descriptor.digest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _link_or_copy(cache, descriptor, target)
    except OSError as exc:
        raise LayoutError(f"cannot write OCI layout {directory}: "
                          f"{exc.strerror or exc}") from exc
    writer.tag(top.descriptor(), tag)
    return closure


def _tar_add_bytes(tar: Any, name: str, data: bytes) -> None:
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _tar_add_blob(tar: Any, cache: BlobStore, descriptor: Descriptor, name: str) -> None:
    """Stream one cached blob into a tar, verifying it on the way."""
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = descriptor.size, 0o644, 0
    with _open_stored(cache, descriptor) as stream:
        reader = _HashingReader(stream, descriptor)
        tar.addfile(info, reader)
        reader.check(_corrupt_cached_blob(descriptor.digest))


def _write_archive(path: str, fill: Callable[[Any], None]) -> None:
    """Write a tar archive through a temporary file and a rename."""
    import tarfile

    def write_tar(raw: BinaryIO) -> None:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            fill(tar)

    try:
        _atomic_write(os.path.abspath(path), write_tar)
    except OSError as exc:
        raise LayoutError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_oci_archive(cache: BlobStore, top: Manifest, path: str,
                       tag: Optional[str]) -> List[Descriptor]:
    """Write the OCI layout of an image as a tar file, streamed from the cache."""
    closure = _image_closure(cache, top)
    entry = top.descriptor().to_json()
    if tag:
        entry["annotations"] = {ANNOTATION_REF_NAME: tag}
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [entry]}

    def fill(tar: Any) -> None:
        _tar_add_bytes(tar, "oci-layout", json.dumps(
            {"imageLayoutVersion": _LAYOUT_VERSION}).encode())
        _tar_add_bytes(tar, "index.json", json.dumps(index, indent=2).encode())
        for descriptor in closure:
            algorithm, encoded = descriptor.digest.split(":", 1)
            _tar_add_blob(tar, cache, descriptor, f"blobs/{algorithm}/{encoded}")

    _write_archive(path, fill)
    return closure


def _docker_load_name(reference: Reference) -> str:
    """Return the name ``docker load`` tags an image with (familiar form on Docker Hub)."""
    name = reference.repository if reference.registry == _DOCKER_HUB else reference.name
    if name.startswith("library/") and reference.registry == _DOCKER_HUB:
        name = name[len("library/"):]
    return f"{name}:{reference.tag or 'latest'}"


def _write_docker_archive(cache: BlobStore, manifest: Manifest, reference: Reference,
                          path: str) -> List[Descriptor]:
    """Write the ``docker save`` format (manifest.json, repositories) of one image.

    Blobs sit at ``blobs/sha256/<hex>`` as docker 25 writes them; ``docker
    load`` and ``podman load`` read manifest.json's paths and accept
    compressed layers.
    """
    if manifest.is_index:
        raise LayoutError("docker-archive holds one platform's image, not an index")
    blobs = [manifest.config] + manifest.layers
    names = [f"blobs/{d.digest.replace(':', '/')}" for d in blobs]
    load_name = _docker_load_name(reference)
    listing = [{"Config": names[0], "RepoTags": [load_name], "Layers": names[1:]}]
    top_layer = manifest.layers[-1].digest.split(":", 1)[1] if manifest.layers else ""
    repository, _, tag_part = load_name.rpartition(":")

    def fill(tar: Any) -> None:
        seen = set()
        for descriptor, name in zip(blobs, names):
            if name not in seen:
                seen.add(name)
                _tar_add_blob(tar, cache, descriptor, name)
        _tar_add_bytes(tar, "manifest.json", json.dumps(listing).encode())
        _tar_add_bytes(tar, "repositories",
                       json.dumps({repository: {tag_part: top_layer}}).encode())

    _write_archive(path, fill)
    return blobs


def _write_image(store: BlobStore, top: Manifest, target: _Location,
                 load_name: Reference) -> List[Descriptor]:
    """Write a stored image to a layout, an OCI archive or a docker archive (named
    ``load_name`` for ``docker load``); return the descriptors written."""
    if target.transport == "oci":
        return _write_layout_dir(store, top, target.path, target.tag)
    if target.transport == "oci-archive":
        return _write_oci_archive(store, top, target.path, target.tag)
    return _write_docker_archive(store, top, load_name, target.path)


# =============================================================================
# 37. WASM ARTIFACTS: a .wasm file as a CNCF Wasm OCI layout; the wasm names
# =============================================================================

def export_wasm_as_oci(wasm_path: Union[str, "os.PathLike[str]"],
                       layout_dir: Union[str, "os.PathLike[str]"], *,
                       tag: Optional[str] = "latest", module_name: Optional[str] = None,
                       annotations: Optional[Mapping[str, str]] = None) -> Manifest:
    """Write a .wasm file into an OCI layout as a CNCF "Wasm OCI Artifact".

    The config is ``application/vnd.wasm.config.v0+json`` with
    ``architecture: wasm``, ``os`` (wasip1 or wasip2, from the bytes) and
    ``layerDigests``; the one layer is ``application/wasm`` with a title
    annotation; ``artifactType`` names module or component.
    """
    path = os.fspath(wasm_path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror or exc}") from exc
    version = wasi_version_from_bytes(data[:8])
    if version is None:
        raise LayoutError(f"{path} is not a WebAssembly module or component")
    os_name = "wasip2" if version is WasiVersion.PREVIEW2 else "wasip1"
    name = module_name or os.path.basename(path)
    writer = _LayoutWriter(os.fspath(layout_dir))
    layer = writer.write_bytes(data, WASM_LAYER_MEDIA_TYPE,
                               annotations={ANNOTATION_TITLE: name})
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    config = {"created": created, "architecture": "wasm", "os": os_name,
              "layerDigests": [layer.digest]}
    config_desc = writer.write_bytes(json.dumps(config, sort_keys=True).encode(),
                                     WASM_CONFIG_V0)
    manifest_data: Dict[str, Any] = {
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": WASM_ARTIFACT_COMPONENT if version is WasiVersion.PREVIEW2
        else WASM_ARTIFACT_MODULE,
        "config": config_desc.to_json(), "layers": [layer.to_json()],
        "annotations": dict({"org.opencontainers.image.created": created}, **(annotations or {}))}
    raw = json.dumps(manifest_data, indent=2).encode()
    manifest = parse_manifest(raw)
    descriptor = writer.write_bytes(raw, MEDIA_TYPE_OCI_MANIFEST,
                                    artifact_type=manifest_data["artifactType"])
    writer.tag(descriptor, tag)
    return manifest


class _Namespace:
    """A read-only bundle of names, standing in for a submodule (``wasm``)."""

    def __init__(self, doc: str, **names: Any) -> None:
        self.__dict__.update(names)
        self.__doc__ = doc

    def __repr__(self) -> str:
        names = sorted(n for n in self.__dict__ if not n.startswith("_"))
        return f"<zlayer_registry namespace: {', '.join(names)}>"


wasm = _Namespace(
    "Hold the WebAssembly names: "
    "``from zlayer_registry import wasm; wasm.detect_artifact_type(m)``.",
    ArtifactType=ArtifactType, WasiVersion=WasiVersion, WasmArtifactInfo=WasmArtifactInfo,
    detect_artifact_type=detect_artifact_type, extract_wasm_info=extract_wasm_info,
    wasi_version_from_bytes=wasi_version_from_bytes, export_wasm_as_oci=export_wasm_as_oci)


# =============================================================================
# 38. OCI LAYOUT: reading and importing
# =============================================================================

# An imported layout is untrusted: every blob it reaches is streamed into a
# cache writer that hashes it, and nothing is committed to the cache until
# every blob of every selected image has checked out.

def _parse_import_source(text: str) -> _Location:
    """Parse what ``import`` and ``unpack`` read: ``oci:DIR[:TAG]`` or
    ``oci-archive:FILE[:TAG]``."""
    return _parse_location(text, _LAYOUT_TRANSPORTS, "source",
                           "docker-archive files are not imported")


@_value
class ImportInfo:
    """One image imported from a layout: its ref name (tag), digest and media type,
    and the reference the cache records it under (``oci:/abs/dir:tag``)."""

    reference: Optional[str]
    digest: str
    media_type: str
    cached_as: str = ""

    def to_json(self) -> Dict[str, Any]:
        """Return the JSON form ``import --json`` prints: ``reference`` is the name the
        cache records it under, ``tag`` its ref name in the layout."""
        return {"reference": self.cached_as, "tag": self.reference, "digest": self.digest,
                "media_type": self.media_type}


class _LayoutSource:
    """Reads the files of an OCI layout from a directory or a tar archive."""

    def __init__(self, path: str) -> None:
        import tarfile
        self.path = path
        self._tar: Any = None
        self._members: Dict[str, Any] = {}
        if os.path.isdir(path):
            return
        try:
            self._tar = tarfile.open(path, mode="r:*")
            for member in self._tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                self._members[name] = member
        except tarfile.ReadError as exc:  # tarfile's own text lists every codec it tried
            empty = os.path.isfile(path) and os.path.getsize(path) == 0
            raise LayoutError(f"{path} is not a tar archive"
                              f"{' (empty file)' if empty else ''}") from exc
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise LayoutError(f"cannot read OCI archive {path}: {exc}") from exc

    def open(self, name: str) -> Optional[BinaryIO]:
        """Open a file of the layout, or return None when it is absent."""
        if self._tar is None:
            return _open_regular_file(os.path.join(self.path, name))
        member = self._members.get(name)
        return None if member is None or not member.isfile() else self._tar.extractfile(member)

    def open_at(self, name: str) -> Optional[Tuple[BinaryIO, int]]:
        """Open a file of the layout as (a file, the offset its bytes start at) for a
        reader that seeks (an upload); None when it is absent, or only a stream (a
        compressed archive)."""
        if self._tar is None:
            stream = self.open(name)
            return None if stream is None else (stream, 0)
        member = self._members.get(name)
        if member is None or not member.isfile() or member.sparse is not None \
                or not isinstance(self._tar.fileobj, io.BufferedReader):
            return None
        return open(self.path, "rb"), member.offset_data

    def seekable(self) -> bool:
        """Tell whether ``open_at`` works: a directory, or an uncompressed archive."""
        return self._tar is None or isinstance(self._tar.fileobj, io.BufferedReader)

    def size(self, name: str) -> int:
        """Return the size of a file of the layout (0 when it is absent)."""
        if self._tar is None:
            try:
                return os.path.getsize(os.path.join(self.path, name))
            except OSError:
                return 0
        member = self._members.get(name)
        return member.size if member is not None else 0

    def read_json(self, name: str) -> Any:
        stream = self.open(name)
        if stream is None:
            raise LayoutError(f"{self.path} is not an OCI layout: {name} is missing")
        with stream:
            raw = stream.read(MAX_MANIFEST_SIZE_BYTES + 1)
        try:
            return _loads_json(raw)
        except ValueError as exc:
            raise LayoutError(f"{name} in {self.path} is not valid JSON: {exc}") from exc

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _select_layout_entries(index: Any, source: str, tag: Optional[str]) -> List[Descriptor]:
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise LayoutError(f"index.json in {source} has no 'manifests' list")
    try:
        entries = [Descriptor.from_json(item, "index.json entry") for item in index["manifests"]]
    except ManifestError as exc:
        raise LayoutError(f"{source}: {exc}") from exc
    if tag is None:
        return entries
    chosen = [e for e in entries if e.annotations.get(ANNOTATION_REF_NAME) == tag]
    if not chosen:
        names = sorted({e.annotations.get(ANNOTATION_REF_NAME, "") for e in entries} - {""})
        raise LayoutError(f"no image tagged {tag!r} in {source}; it has: "
                          f"{', '.join(names) or 'no tags'}")
    return chosen


def _import_layout(cache: BlobStore, path: str, tag: Optional[str]) -> List[ImportInfo]:
    """Import images from an OCI layout directory or archive into ``cache``."""
    source = _LayoutSource(path)
    writers: List[BlobWriter] = []
    try:
        version = source.read_json("oci-layout")
        if not isinstance(version, dict) or version.get("imageLayoutVersion") != _LAYOUT_VERSION:
            found = version.get("imageLayoutVersion") if isinstance(version, dict) else version
            raise LayoutError(f"{path} has unsupported imageLayoutVersion {found!r} "
                              f"(expected {_LAYOUT_VERSION!r})")
        entries = _select_layout_entries(source.read_json("index.json"), path, tag)

        def ingest(descriptor: Descriptor) -> Optional[Manifest]:
            data = _ingest_layout_blob(cache, source, descriptor, writers)
            return None if data is None else parse_manifest(data, descriptor.media_type,
                                                            descriptor.digest)

        for _ in _walk_graph(entries, ingest):
            pass
        for writer in writers:
            writer.commit()
        writers = []
    except (ManifestError, DigestMismatchError) as exc:
        raise LayoutError(f"{path}: {exc}") from exc
    finally:
        for writer in writers:
            writer.abort()
        source.close()
    # References are recorded with the layout they came from ("oci:/abs/dir:tag",
    # untagged ones by digest): a bare ref.name such as "latest" would make the
    # next layout with the same tag replace it, and gc then drop the first image.
    origin = f"{'oci' if os.path.isdir(path) else 'oci-archive'}:{os.path.abspath(path)}"
    infos = []
    for entry in entries:
        name = entry.annotations.get(ANNOTATION_REF_NAME)
        cached_as = f"{origin}:{name}" if name else f"{origin}@{entry.digest}"
        cache.record_reference(cached_as, entry.digest, entry.media_type)
        infos.append(ImportInfo(name, entry.digest, entry.media_type, cached_as))
    return infos


def _ingest_layout_blob(cache: BlobStore, source: _LayoutSource, descriptor: Descriptor,
                        writers: List[BlobWriter]) -> Optional[bytes]:
    """Verify one layout blob into a pending cache writer; return manifest bytes."""
    algorithm, encoded = descriptor.digest.split(":", 1)
    stream = source.open(f"blobs/{algorithm}/{encoded}")
    if stream is None:
        raise LayoutError(f"{source.path}: blob {descriptor.digest} is missing")
    is_manifest = descriptor.media_type in _MANIFEST_TYPES
    if is_manifest and descriptor.size > MAX_MANIFEST_SIZE_BYTES:
        raise LayoutError(f"{source.path}: manifest {descriptor.digest} is over the "
                          f"{MAX_MANIFEST_SIZE_BYTES}-byte limit")
    chunks: List[bytes] = []
    with stream:
        if cache.has(descriptor.digest):
            try:
                _drain_checked(stream, descriptor, write=chunks.append if is_manifest else None)
            except DigestMismatchError as exc:
                raise LayoutError(f"{source.path}: blob {descriptor.digest} is corrupt "
                                  f"(its bytes hash to {exc.actual})") from exc
            return b"".join(chunks) if is_manifest else None
        writer = cache.begin_write(descriptor.digest, descriptor.size, descriptor.media_type)
        writers.append(writer)
        for chunk in iter(lambda: stream.read(_READ_CHUNK_BYTES), b""):
            writer.write(chunk)
            if is_manifest:
                chunks.append(chunk)
        try:
            writer.check()
        except DigestMismatchError as exc:
            writers.remove(writer)
            raise LayoutError(f"{source.path}: blob {descriptor.digest} is corrupt "
                              f"(its bytes hash to {exc.actual})") from exc
    return b"".join(chunks) if is_manifest else None


# =============================================================================
# 39. LOCAL REGISTRY: LocalRegistry, images stored on this host
# =============================================================================
# A manifest is checked as distribution checks it by default before it is
# added: a known media type, well-formed JSON, the digest it is put under,
# and every blob and child manifest it names present (and of the size it
# says).  Collection marks and sweeps under the collection lock, which a
# manifest write holds shared; a blob stored less than the grace period ago
# is spared, since a client uploads blobs before the manifest naming them.

# Layers a registry need not hold: Windows' foreign layers (Docker) and the
# OCI non-distributable ones, which name URLs instead.
_FOREIGN_LAYER_TYPES = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"})


class LocalRegistry:
    """Images kept on this host: repositories, tags and manifests over a directory
    cache's blobs (one copy of each blob, shared with pulls).

    ``root`` is a cache directory (the default cache when None) or a
    DirectoryBlobCache.  Every write is atomic and verified; several threads
    and processes may use one store.  ``local:NAME[:TAG]`` names its images
    in ``copy``, ``push``, ``pull --output`` and ``import``.
    """

    def __init__(self, root: Union[str, "os.PathLike[str]", DirectoryBlobCache, None] = None
                 ) -> None:
        if isinstance(root, DirectoryBlobCache):
            self.cache, self._owned = root, False
        elif isinstance(root, BlobStore):
            raise CacheError(f"the local registry lives in a cache directory, not in "
                             f"{getattr(root, 'root', type(root).__name__)}")
        else:
            self.cache = DirectoryBlobCache(BlobCache.default_path() if root is None
                                            else os.fspath(root))
            self._owned = True
        self.root = self.cache.root
        self._repositories = _RepositoryFiles(self.root, self.cache.read_only)
        if not self.cache.read_only:
            self._repositories.create()  # the cache holds a local registry from now on

    def close(self) -> None:
        """Close the cache this store opened."""
        if self._owned:
            self.cache.close()

    def __enter__(self) -> "LocalRegistry":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalRegistry({self.root!r})"

    # -- blobs ------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        """Tell whether the store holds a verified blob."""
        return self.cache.has(digest)

    def get_blob(self, digest: str) -> Optional[bytes]:
        """Return a blob's bytes, or None (``open_blob`` streams large ones)."""
        return self.cache.get(digest)

    def open_blob(self, digest: str) -> Optional[BinaryIO]:
        """Open a blob for reading, or return None when it is absent."""
        return self.cache.open_blob(digest)

    def blob_size(self, digest: str) -> Optional[int]:
        """Return a blob's size in bytes, or None when it is absent."""
        return self.cache.size(digest)

    def put_blob(self, data: Union[bytes, BinaryIO], digest: Optional[str] = None,
                 media_type: str = "") -> str:
        """Store a blob (bytes, or a file streamed in pieces); return its digest.

        With ``digest`` the bytes must match it (DigestMismatchError, and
        nothing stored, when they do not).
        """
        if digest is not None and self.cache.has(digest):
            if isinstance(data, (bytes, bytearray, memoryview)):
                _check_bytes("blob digest mismatch", bytes(data), digest)
            return digest
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
        with self.cache.begin_write(digest, size, media_type) as writer:
            if size is not None:
                writer.write(data)
            else:
                for chunk in iter(lambda: data.read(_READ_CHUNK_BYTES), b""):  # type: ignore
                    writer.write(chunk)
            return writer.commit(None if digest is not None else writer.actual_digest())

    def begin_blob(self, digest: Optional[str] = None, size: Optional[int] = None,
                   media_type: str = "") -> BlobWriter:
        """Start writing a blob (an upload); it becomes visible on a verified commit."""
        return self.cache.begin_write(digest, size, media_type)

    # -- manifests --------------------------------------------------------------

    def put_manifest(self, name: str, reference: str, data: bytes,
                     media_type: str = "") -> str:
        """Add a manifest to repository ``name`` under a tag or its digest; return
        its digest.

        ``media_type`` is the Content-Type it came with.  ManifestError
        when it is not a manifest of a known type, ManifestBlobUnknownError
        when a blob or child manifest it names is not stored, and
        DigestMismatchError when ``reference`` is a digest it does not have.
        """
        _validate_repository(name)
        tag, digest = self._split(name, reference)
        if not isinstance(data, bytes):
            raise TypeError("a manifest is bytes")
        header = media_type.split(";", 1)[0].strip().lower()
        manifest = parse_manifest(data, header, digest)
        declared = manifest.data.get("mediaType")
        if header and header not in _MANIFEST_TYPES and header != "application/json":
            raise ManifestError(f"unsupported manifest media type {header!r}")
        if declared and header in _MANIFEST_TYPES and header != declared:
            raise ManifestError(f"manifest {manifest.digest} declares {declared} but was "
                                f"sent as {header}")
        with self._repositories.gc_lock(exclusive=False):
            self._check_children(manifest)
            self._record(name, tag, manifest)
        return manifest.digest

    def put_mirrored(self, name: str, tag: Optional[str], manifest: Manifest) -> None:
        """Add a manifest a mirror fetched (verified against its digest) to ``name``,
        under ``tag`` when given: its blobs come later, as clients ask for them."""
        _validate_repository(name)
        with self._repositories.gc_lock(exclusive=False):
            self._record(name, tag, manifest)

    def _record(self, name: str, tag: Optional[str], manifest: Manifest) -> None:
        """Store a checked manifest, its revision (and subject) and its tag."""
        subject = self._subject(manifest)
        if not self.cache.has(manifest.digest):
            self.cache.put(manifest.digest, manifest.raw, manifest.media_type)
        record: Dict[str, Any] = {"media_type": manifest.media_type, "size": len(manifest.raw)}
        referrer = None
        if subject is not None:
            record["subject"] = subject.digest
            referrer = _referrer_descriptor(manifest)
        self._repositories.write_revision(name, manifest.digest, record, referrer)
        if tag is not None:
            self._repositories.write_tag(name, tag, manifest.digest, manifest.media_type)

    @staticmethod
    def _split(name: str, reference: str) -> Tuple[Optional[str], Optional[str]]:
        """Return (tag, digest) of a reference that is one or the other."""
        if not isinstance(reference, str):
            raise InvalidReferenceError(str(reference), "a tag or a digest")
        if ":" in reference:
            return None, _validate_digest(reference)
        if not _TAG_RE.fullmatch(reference):
            raise InvalidReferenceError(f"{name}:{reference[:140]}",
                                        "invalid tag (letters, digits, '_', '.', '-'; at "
                                        "most 128; not starting with '.' or '-')")
        return reference, None

    @staticmethod
    def _subject(manifest: Manifest) -> Optional[Descriptor]:
        raw = manifest.data.get("subject")
        return None if raw is None else Descriptor.from_json(raw, "subject")

    def _check_children(self, manifest: Manifest) -> None:
        """Raise ManifestBlobUnknownError unless every blob and child it names is here."""
        missing = []
        for child in manifest.children:
            if child is None or child.media_type in _FOREIGN_LAYER_TYPES or \
                    (child.urls and not self.cache.has(child.digest)):
                continue
            size = self.cache.size(child.digest)
            if size is None:
                missing.append(child.digest)
            elif size != child.size:
                raise ManifestError(f"manifest {manifest.digest} says {child.digest} has "
                                    f"{child.size} bytes; the stored blob has {size}")
        if missing:
            kind = "manifest" if manifest.is_index else "blob"
            raise ManifestBlobUnknownError(
                f"manifest {manifest.digest} names {kind} {missing[0]}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which is "
                "not in the store (push it first)", missing[0], missing)

    def resolve(self, name: str, reference: str) -> Optional[str]:
        """Return the digest a tag (or digest) names in repository ``name``, or None."""
        tag, digest = self._split(name, reference)
        if digest is not None:
            return digest if self._repositories.read_revision(name, digest) else None
        record = self._repositories.read_tag(name, str(tag))
        return record["digest"] if record else None

    def has_manifest(self, name: str, reference: str) -> bool:
        """Tell whether repository ``name`` has a manifest by that tag or digest."""
        digest = self.resolve(name, reference)
        return digest is not None and self.cache.has(digest)

    def get_manifest(self, name: str, reference: str) -> Optional[Manifest]:
        """Return the manifest a tag or digest names in ``name`` (verified), or None."""
        digest = self.resolve(name, reference)
        if digest is None:
            return None
        record = self._repositories.read_revision(name, digest) or {}
        raw = self.cache.read_small(digest, MAX_MANIFEST_SIZE_BYTES)
        if raw is None:
            return None
        try:
            return parse_manifest(raw, str(record.get("media_type") or ""), digest)
        except DigestMismatchError as exc:
            raise CacheError(_corrupt_cached_blob(digest, "manifest")) from exc

    def delete_manifest(self, name: str, digest: str) -> bool:
        """Remove a manifest from a repository, with every tag naming it."""
        return self._repositories.remove_revision(name, _validate_digest(digest))

    def list_tags(self, name: str) -> List[str]:
        """Return the tags of repository ``name``, sorted."""
        return self._repositories.tags(_validate_repository(name))

    def list_images(self) -> List[str]:
        """Return every repository name, sorted."""
        return self._repositories.names() if self._repositories.exists() else []

    def list_manifests(self, name: str) -> List[str]:
        """Return the digests of every manifest of repository ``name``."""
        return self._repositories.revisions(_validate_repository(name))

    def blob_in_use(self, digest: str) -> bool:
        """Tell whether a manifest of the store, or a cache reference, reaches a blob."""
        return digest in self.cache.reachable(set(self.cache.references().values()))

    def delete_tag(self, name: str, tag: str) -> bool:
        """Remove a tag (its manifest stays, by digest, until ``delete_manifest``)."""
        return self._repositories.remove_tag(_validate_repository(name), tag)

    def delete_image(self, name: str) -> bool:
        """Remove a repository: its tags and manifests (its blobs go at the next gc)."""
        return self._repositories.remove_repository(name)

    def referrers(self, name: str, digest: str,
                  artifact_type: Optional[str] = None) -> List[Descriptor]:
        """Return the manifests of ``name`` whose subject is ``digest`` (distribution-spec
        1.1 referrers), only those of ``artifact_type`` when given."""
        found = []
        for record in self._repositories.referrers(_validate_repository(name),
                                                   _validate_digest(digest)):
            descriptor = Descriptor.from_json(record, "referrer")
            if artifact_type is None or descriptor.artifact_type == artifact_type:
                found.append(descriptor)
        return found

    def store_image(self, name: str, reference: str, top: Manifest,
                    load: Optional[Callable[[Descriptor], Optional[Manifest]]] = None) -> str:
        """Add an image whose blobs are stored already: every manifest it reaches
        (children first), then ``top`` under ``reference`` (a tag, or its digest)."""
        def load_stored(descriptor: Descriptor) -> Optional[Manifest]:
            if descriptor.digest == top.digest:
                return top
            if descriptor.media_type not in _MANIFEST_TYPES:
                return None
            if load is not None:
                return load(descriptor)
            raw = self.cache.read_small(descriptor.digest, MAX_MANIFEST_SIZE_BYTES)
            if raw is None:
                raise ManifestBlobUnknownError(f"manifest {descriptor.digest} is not in "
                                               "the store", descriptor.digest)
            return parse_manifest(raw, descriptor.media_type, descriptor.digest)

        for descriptor, manifest in _walk_graph([top.descriptor()], load_stored,
                                                post_order=True):
            if manifest is not None and manifest.digest != top.digest:
                self.put_manifest(name, manifest.digest, manifest.raw, manifest.media_type)
        return self.put_manifest(name, reference, top.raw, top.media_type)

    def garbage_collect(self, grace_s: float = DEFAULT_GC_GRACE_S,
                        dry_run: bool = False) -> int:
        """Delete blobs no tag, manifest or cache reference reaches; return the bytes
        freed (that would be freed, with ``dry_run``).  A blob stored less than
        ``grace_s`` seconds ago stays."""
        sizes = {e["digest"]: e["size"] for e in self.cache.entries()}
        removed = self.cache.gc(grace_s, dry_run)
        return sum(sizes.get(digest, 0) for digest in removed)


# =============================================================================
# 40. WORKER POOL: threads that keep their connections between batches
# =============================================================================

class _Batch:
    """The tasks of one ``_WorkerPool.run`` call: results, errors and how many are left.

    ``done`` is held until the last task ends; the caller waits by acquiring
    it.  A plain lock, because a Ctrl-C landing inside Condition.wait can
    leave the condition's lock held and the workers stuck.
    """

    def __init__(self, count: int, cancel: threading.Event) -> None:
        self.results: List[Any] = [None] * count
        self.errors: List[Optional[BaseException]] = [None] * count
        self.pending = count
        self.cancel = cancel
        self.done = threading.Lock()
        if count:
            self.done.acquire()

    def finish(self, count: int = 1) -> None:
        """Count tasks as ended (pool lock held); the last one releases ``done``."""
        if count:
            self.pending -= count
            if not self.pending:
                self.done.release()


class _WorkerPool:
    """Worker threads kept between batches, so each keeps its keep-alive connections.

    Lighter than concurrent.futures (whose import alone slows a cold CLI run)
    and stricter on failure: the first error sets the batch's
    cancel event (running tasks stop at their next read), drops the tasks not
    yet started, and is raised once the running ones have stopped.  An
    interrupt of the waiting caller (Ctrl-C) cancels the same way without
    waiting.  Threads are daemons; ``close()`` ends them, each running
    ``on_exit`` (closing its connections) first.
    """

    def __init__(self, size: int, name: str, on_exit: Callable[[], None]) -> None:
        self._size, self._name, self._on_exit = size, name, on_exit
        self._cond = threading.Condition(threading.Lock())
        self._queue: List[Tuple[_Batch, int, Callable[[Any], Any], Any]] = []
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any], cancel: threading.Event,
            meanwhile: Optional[Callable[[], None]] = None) -> List[Any]:
        """Return ``[fn(item) for item in items]``, computed in parallel.

        The caller runs ``meanwhile()`` (if given) while the workers start.
        """
        batch = _Batch(len(items), cancel)
        with self._cond:
            if self._closed:
                raise RuntimeError("the puller is closed")
            self._queue.extend((batch, index, fn, item) for index, item in enumerate(items))
            wanted = min(self._size - len(self._threads), len(self._queue) - self._idle)
            for _ in range(max(wanted, 0)):
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{len(self._threads)}")
                try:
                    thread.start()
                except RuntimeError as exc:  # "can't start new thread": use those running
                    if self._threads:
                        break
                    self._drop(batch)
                    raise ZLayerError(f"cannot start a download thread: {exc}") from None
                self._threads.append(thread)
            self._cond.notify_all()
        try:
            if meanwhile is not None:
                meanwhile()
            # The timeout only bounds how long a signal delivered to another
            # thread waits to be handled here.
            while items and not batch.done.acquire(timeout=0.25):
                pass
        except BaseException:
            cancel.set()
            with self._cond:
                self._drop(batch)
            raise
        errors = [e for e in batch.errors if e is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        return batch.results

    def _drop(self, batch: _Batch) -> None:
        """Remove the batch's tasks that no worker has started (pool lock held)."""
        kept = [task for task in self._queue if task[0] is not batch]
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        batch.finish(dropped)

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._idle += 1
                        self._cond.wait()
                        self._idle -= 1
                    if self._closed:
                        return
                    batch, index, fn, item = self._queue.pop(0)
                try:
                    batch.results[index] = fn(item)
                except BaseException as exc:  # handed to the caller
                    batch.errors[index] = exc
                    batch.cancel.set()
                with self._cond:
                    if batch.cancel.is_set():
                        self._drop(batch)  # nothing more of a failed batch starts
                    batch.finish()
        finally:
            self._on_exit()

    def close(self) -> None:
        """End the worker threads (after their current task); queued tasks are cancelled."""
        with self._cond:
            self._closed = True
            for batch in {id(task[0]): task[0] for task in self._queue}.values():
                batch.cancel.set()
                batch.errors[0] = batch.errors[0] or ZLayerError("the puller was closed "
                                                                 "in the middle of a pull")
                self._drop(batch)
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._threads = []


# =============================================================================
# 41. SESSION AND RESOLVER: what transfers share; references to manifests
# =============================================================================

_MAX_INDEX_DEPTH = 4
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_ProgressCallback = Callable[[Descriptor, int, int], None]
_WASM_PLATFORM_PREFERENCE = ("wasip2", "wasip1", "wasi")


class _Session:
    """What every registry conversation of one puller (or pusher) shares: the
    transport (keep-alive pools, proxies, TLS), the token cache and the workers."""

    def __init__(self, *, max_workers: int, insecure: bool, timeout_s: float, retries: int,
                 environ: Mapping[str, str], sleep: Callable[[float], None],
                 clock: Callable[[], float], ssl_context: Any) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.insecure = insecure
        self.retries = retries
        self._sleep, self._clock = sleep, clock
        self.transport = _Transport(timeout_s=timeout_s,
                                    proxies=_ProxySettings.from_environ(environ),
                                    ssl_context=ssl_context)
        self._tokens = _TokenCache(clock)
        self._workers: Optional[_WorkerPool] = None

    def client(self, reference: Reference, auth: Optional[RegistryAuth],
               actions: str = "pull", insecure: Optional[bool] = None) -> _RegistryClient:
        """Return a client for ``reference``'s repository (tokens for ``actions``;
        ``insecure`` for this registry only, else the session's)."""
        return _RegistryClient(reference, auth or RegistryAuth.anonymous(), self.transport,
                               self._tokens, actions=actions,
                               insecure=self.insecure if insecure is None else insecure,
                               retries=self.retries, sleep=self._sleep, clock=self._clock)

    def source(self, reference: Reference, auth: Optional[RegistryAuth]) -> _RegistrySource:
        """Return ``reference``'s repository as a source to pull from."""
        return _RegistrySource(self.client(reference, auth))

    def pool(self) -> _WorkerPool:
        """Return the worker threads (started at first use), each with its connections."""
        if self._workers is None:
            self._workers = _WorkerPool(self.max_workers, "zlayer-pull", self.transport.close)
        return self._workers

    @property
    def request_count(self) -> int:
        """Return how many HTTP requests were sent."""
        return self.transport.request_count

    def close(self) -> None:
        """Stop the worker threads and close connections."""
        if self._workers is not None:
            # A worker blocked on a stalled server would hold close() up for
            # the read timeout after a Ctrl-C: its read ends at once.
            self.transport.shutdown()
            self._workers.close()
            self._workers = None
        self.transport.close()


def _select_wasm_child(index: Manifest) -> Optional[Descriptor]:
    """Pick the WASM entry of a mixed index (os wasip2/wasip1/wasi, architecture wasm)."""
    children = [c for c in index.manifests if c.platform is not None
                and c.platform.architecture == "wasm"
                and c.platform.os in _WASM_PLATFORM_PREFERENCE]
    children.sort(key=lambda c: _WASM_PLATFORM_PREFERENCE.index(c.platform.os))
    return children[0] if children else None


def _config_platform(config_data: Mapping[str, Any]) -> Optional[Platform]:
    """Return the platform an image config names (None for artifacts without one)."""
    os_name, architecture = config_data.get("os"), config_data.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str) \
            or not os_name or not architecture:
        return None
    variant = config_data.get("variant")
    return Platform(os_name, architecture, variant if isinstance(variant, str) else "")


class _Resolver:
    """Turns references into manifests, each verified and stored as it is fetched.

    A tag is resolved with HEAD (Docker Hub does not count HEADs against the
    pull quota), so a stored image costs one request; a digest is looked up
    in the store first; an index is followed down to one platform.
    ``platform_given`` says whether ``platform`` was asked for (an image for
    another platform is then refused) or is the host's default.
    """

    def __init__(self, store: BlobStore, platform: Platform, platform_given: bool) -> None:
        self.store = store
        self.platform = platform
        self.platform_given = platform_given

    def manifest_by_digest(self, source: _Source, digest: str) -> Manifest:
        """Return a manifest from the store, else GET it by digest and store it."""
        raw = self.store.read_small(digest, MAX_MANIFEST_SIZE_BYTES)
        if raw is not None:
            return parse_manifest(raw, self.store.media_type(digest), digest)
        if self.store.has(digest):
            raise ManifestError(f"{digest} is over the {MAX_MANIFEST_SIZE_BYTES}-byte "
                                "manifest limit: it is no manifest")
        manifest = source.get_manifest(digest)
        self.store.put(manifest.digest, manifest.raw, manifest.media_type)
        return manifest

    def resolve(self, reference: Reference, source: _Source) -> Manifest:
        """Resolve a reference to its top-level manifest or index."""
        if reference.digest:
            manifest = self.manifest_by_digest(source, reference.digest)
        else:
            # An empty store holds no manifest a HEAD could find: GET the tag
            # at once, one round trip fewer on a first pull.
            digest = None if self.store.is_empty() else source.head_manifest(reference.identifier)
            if digest is not None:
                manifest = self.manifest_by_digest(source, digest)
            else:
                manifest = source.get_manifest(reference.identifier)
                self.store.put(manifest.digest, manifest.raw, manifest.media_type)
        return manifest

    def resolve_platform(self, source: _Source, top: Manifest, *, prefer_wasm: bool = False,
                         wanted: Optional[Platform] = None
                         ) -> Tuple[Manifest, Optional[Manifest], Optional[Platform]]:
        """Follow an index (nested ones too) down to the platform; return (manifest,
        the index it came from, the platform chosen).

        With ``prefer_wasm`` and no platform given, a WASM child is chosen
        (wasip2, then wasip1, then wasi) before the host's platform.
        """
        manifest, index, chosen = top, None, None
        for _ in range(_MAX_INDEX_DEPTH):
            if not manifest.is_index:
                return manifest, index, chosen
            index = manifest
            child = (_select_wasm_child(manifest) if prefer_wasm and not self.platform_given
                     else None) or select_platform(manifest, wanted or self.platform)
            chosen = _normalize_platform(child.platform) if child.platform else None
            manifest = self.manifest_by_digest(source, child.digest)
        raise ManifestError(f"index {top.digest} nests more than {_MAX_INDEX_DEPTH} levels deep")

    def walk(self, source: _Source, top: Manifest, *,
             post_order: bool = False) -> List[_GraphNode]:
        """Return every node ``top`` reaches, fetching the manifests the store lacks."""
        def load(descriptor: Descriptor) -> Optional[Manifest]:
            if descriptor.digest == top.digest:
                return top
            if descriptor.media_type not in _MANIFEST_TYPES:
                return None
            return self.manifest_by_digest(source, descriptor.digest)

        return list(_walk_graph([top.descriptor()], load, post_order=post_order))

    def read_config(self, descriptor: Descriptor) -> Dict[str, Any]:
        """Parse a JSON config blob from the store, checked against its digest
        ({} when it is absent or not JSON)."""
        if descriptor.size > _MAX_CONFIG_BYTES or not (
                descriptor.media_type.endswith("json") or not descriptor.media_type):
            return {}
        raw = self.store.read_small(descriptor.digest, _MAX_CONFIG_BYTES)
        if raw is not None:
            _check_bytes(_corrupt_cached_blob(descriptor.digest, "config"), raw,
                         descriptor.digest)
        try:
            return _json_object(raw) if raw else {}
        except ValueError:
            return {}

    def check_platform(self, reference: Union[Reference, str],
                       config_data: Mapping[str, Any]) -> None:
        """Refuse a single-platform image built for another platform than the one asked for."""
        offered = _config_platform(config_data)
        if offered is not None and _platform_rank(self.platform, offered) is None:
            raise ManifestError(f"{reference} is a single {offered} image, "
                                f"not {self.platform} as asked")


# =============================================================================
# 42. FETCHER: verified blobs from a source into a store
# =============================================================================

class _Fetcher:
    """Makes blobs present and verified in a store, downloading what it lacks.

    Downloads run on the session's workers, largest first; each streams into
    a store writer (verified before it is visible) and resumes with Range
    after an interruption.  One process downloads a blob while others that
    want it wait on its lock and then find it stored.
    """

    def __init__(self, store: BlobStore, pool: Callable[[], _WorkerPool], retries: int,
                 progress: Optional[_ProgressCallback]) -> None:
        self.store = store
        self._pool = pool
        self.retries = retries
        self.progress = progress

    def fetch(self, source: _Source, descriptors: Sequence[Descriptor],
              manifests: Sequence[str] = (), verify: bool = False) -> Tuple[int, int]:
        """Make every blob present and verified; return (downloaded, from the store) bytes.

        A stored blob counts as present when its size is the descriptor's;
        with ``verify`` it is hashed again, and one that changed since it was
        stored is replaced by a fresh download.  The blobs and the
        ``manifests`` digests (stored already) are marked used, so ``cache
        prune`` (least recently used first) keeps an image's manifests as long
        as its layers.
        """
        unique: Dict[str, Descriptor] = {}
        for descriptor in descriptors:
            unique.setdefault(descriptor.digest, descriptor)
        missing = []
        for descriptor in unique.values():
            size = self.store.size(descriptor.digest)
            if size is None:
                missing.append(descriptor)
            elif size != descriptor.size:
                raise DigestMismatchError(f"blob {descriptor.digest} is described with the "
                                          "wrong size", f"{descriptor.size} bytes",
                                          f"{size} bytes")
            elif verify and not self._still_intact(descriptor):
                missing.append(descriptor)
        from_store = sum(d.size for d in unique.values()) - sum(d.size for d in missing)
        downloaded = 0
        if missing:
            # Largest first: a small blob waiting behind the big ones costs a
            # few milliseconds at the end; a big one queued behind a small one
            # starts late and finishes alone, with a CPU idle.
            missing.sort(key=lambda d: d.size, reverse=True)
            cancel = threading.Event()
            received = self._pool().run(lambda d: self.download(source, d, cancel),
                                        missing, cancel, meanwhile=self.store.warm_up)
            downloaded = sum(n for n in received if n is not None)
            # None: another process stored the blob while this one waited.
            from_store += sum(d.size for d, n in zip(missing, received) if n is None)
        self.store.touch(list(unique) + [d for d in manifests if d not in unique])
        if source.location is not None:  # a push to that registry can mount them from there
            for digest in unique:
                self.store.record_location(digest, *source.location)
        return downloaded, from_store

    def _still_intact(self, descriptor: Descriptor) -> bool:
        """Hash a stored blob again; drop it (False) when it changed since it was stored."""
        try:
            _verify_stored(self.store, descriptor)
        except DigestMismatchError:
            if self.store.read_only:
                raise
            _warn(f"cached blob {descriptor.digest} is corrupt; downloading it again")
            self.store.delete(descriptor.digest)
            return False
        return True

    def download(self, source: _Source, descriptor: Descriptor,
                 cancel: threading.Event) -> Optional[int]:
        """Download a blob unless another process does; return bytes received or None."""
        with self.store.lock(descriptor.digest):
            if self.store.has(descriptor.digest):
                return None
            try:
                received = self.stream_blob(source, descriptor, cancel)
            except BaseException:
                source.settled(descriptor, False)
                raise
            source.settled(descriptor, True)
            return received

    def stream_blob(self, source: _Source, descriptor: Descriptor,
                    cancel: threading.Event) -> int:
        """Stream one blob into the store; return the bytes received.

        Bytes of the right size that fail the digest check are fetched once
        more from byte 0 (a flaky proxy or CDN edge corrupts one transfer); a
        second failure is the error.  A blob of the wrong size is not: the
        resumptions have had their chance, and a registry that serves too
        much or too little does so again.
        """
        try:
            return self._stream_once(source, descriptor, cancel)
        except _ContentMismatch as first:
            _warn(f"blob {descriptor.digest} from {source.name} failed its digest check "
                  f"({first.actual}); downloading it once more")
            source.settled(descriptor, False)
        return self._stream_once(source, descriptor, cancel)

    def _stream_once(self, source: _Source, descriptor: Descriptor,
                     cancel: threading.Event) -> int:
        """Stream one blob into the store, resuming after interruptions."""
        received = interruptions = 0
        with self.store.begin_write(descriptor.digest, descriptor.size,
                                    descriptor.media_type) as writer:
            told = False
            while True:
                if cancel.is_set():
                    raise _Cancelled()
                with source.open_blob(descriptor.digest, writer.offset) as stream:
                    if not told:
                        source.receiving(descriptor, writer)
                        told = True
                    if stream.offset != writer.offset:
                        writer.restart()  # the source sends the whole blob again
                    count, error = self._copy_body(stream, writer, descriptor, cancel)
                    received += count
                # All bytes in: the digest decides, whatever the connection did
                # after the last one (a lost chunked terminator, a stall).
                if writer.offset < descriptor.size:
                    interruptions += 1  # dropped, stalled or ended early: resume
                    if interruptions > self.retries:
                        if error is None:
                            break  # commit() reports the short blob
                        raise RegistryError(
                            f"download of blob {descriptor.digest} from {source.name} "
                            f"kept failing ({error.__class__.__name__}) after "
                            f"{interruptions - 1} resumptions", temporary=True,
                            method="GET", url=_redact_url(stream.url)) from error
                    if cancel.is_set():
                        raise _Cancelled()
                    if error is not None:
                        source.backoff(interruptions - 1)
                    continue
                break
            writer.commit()
            return received

    def _copy_body(self, stream: _BlobStream, writer: BlobWriter, descriptor: Descriptor,
                   cancel: threading.Event) -> Tuple[int, Optional[BaseException]]:
        """Copy a blob stream into a writer; return (bytes, the network error if any).

        ``readinto1`` receives what one socket read brings, straight into the
        writer's buffer, so a reset or a stall loses nothing already received
        and the resume starts exactly there.
        Store write failures are not network errors and propagate.
        """
        count = 0
        while True:
            if cancel.is_set():
                raise _Cancelled()
            if writer.offset >= descriptor.size and stream.length_left is None:
                # A chunked or until-close body: waiting for its end could mean
                # waiting for a timeout; the blob is complete, its digest decides.
                return count, None
            try:
                received = stream.readinto1(writer.buffer())
            except _CONNECTION_ERRORS as exc:
                return count, exc
            if not received:
                return count, None
            try:
                writer.filled(received)
            except OSError as exc:
                raise CacheError(f"cannot write blob {descriptor.digest} to the cache: "
                                 f"{exc.strerror or exc}") from exc
            count += received
            if self.progress is not None:
                self.progress(descriptor, writer.offset, descriptor.size)


# =============================================================================
# 43. PULL: what a pull returns (Layer, PullResult)
# =============================================================================

@_value
class Layer:
    """A pulled, verified layer: its descriptor and where the cache keeps it."""

    descriptor: Descriptor
    cache: BlobStore = _field(in_repr=False, in_eq=False)

    @property
    def digest(self) -> str:
        """Return the layer's digest (of the blob as stored)."""
        return self.descriptor.digest

    @property
    def size(self) -> int:
        """Return the layer's size in bytes."""
        return self.descriptor.size

    @property
    def media_type(self) -> str:
        """Return the layer's media type."""
        return self.descriptor.media_type

    @property
    def path(self) -> Optional[str]:
        """Return the layer's file in the cache (None for an in-memory cache)."""
        return self.cache.path(self.digest)

    def open(self) -> BinaryIO:
        """Open the layer blob for reading, hashed as it is read: reading it to the end
        raises DigestMismatchError if the cached bytes changed since they were verified."""
        stream = self.cache.open_blob(self.digest)
        if stream is None:
            raise CacheError(f"layer {self.digest} is no longer in the cache")
        checked = _HashingReader(stream, self.descriptor, _corrupt_cached_layer(self.digest))
        return io.BufferedReader(checked, _READ_CHUNK_BYTES)

    def read_bytes(self) -> bytes:
        """Return the whole layer (only for small layers: it is held in memory)."""
        with self.open() as stream:
            return stream.read()


@_value
class PullResult:
    """Everything a pull resolved and fetched."""

    reference: Reference
    manifest: Manifest
    config: Descriptor
    layers: List[Layer]
    config_data: Mapping[str, Any] = _field(default_factory=dict, in_repr=False)
    index: Optional[Manifest] = None
    platform: Optional[Platform] = None
    bytes_downloaded: int = 0
    bytes_from_cache: int = 0

    @property
    def artifact_type(self) -> ArtifactType:
        """Return whether this is a container image or a WASM artifact."""
        return detect_artifact_type(self.manifest, self.config_data)

    def to_json(self) -> Dict[str, Any]:
        """Return the JSON object ``pull --json`` prints."""
        kind = self.artifact_type
        data: Dict[str, Any] = {
            "reference": str(self.reference),
            "digest": self.manifest.digest,
            "media_type": self.manifest.media_type,
            "platform": str(self.platform) if self.platform else None,
            "index_digest": self.index.digest if self.index else None,
            "manifest_digest": self.manifest.digest,  # as inspect --json names it
            "config": _descriptor_summary(self.config),
            "layers": [_descriptor_summary(layer.descriptor) for layer in self.layers],
            "artifact_type": str(kind),
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_from_cache": self.bytes_from_cache,
        }
        info = self.wasm_info()
        if info is not None:
            data["artifact_type"] = "wasm"
            data.update(info.to_json())
        return data

    def wasm_module_info(self) -> WasmArtifactInfo:
        """Return the WASM metadata of an artifact whose module is a layer of its own;
        a ManifestError for a container image or a module inside a filesystem layer."""
        info = self.wasm_info()
        if info is None:
            raise ManifestError(f"{self.reference} is a container image, "
                                "not a WebAssembly artifact")
        if info.wasm_layer_digest is None:
            raise ManifestError(f"{self.reference} is a WASM image whose module sits inside "
                                "a filesystem layer (Docker wasi/wasm style); unpack it instead")
        return info

    def wasm_info(self) -> Optional[WasmArtifactInfo]:
        """Return WASM metadata (WASI level completed from the verified bytes), or None."""
        return _verified_wasm_info(self.manifest, self.config_data,
                                   self.layers[0].cache if self.layers else None)


def _verified_wasm_info(manifest: Manifest, config_data: Mapping[str, Any],
                        cache: Optional[BlobStore]) -> Optional[WasmArtifactInfo]:
    """Return the WASM info of a manifest, checked against the layer's bytes when cached.

    The bytes settle a WASI level the manifest leaves unknown; a layer
    declared as WASM whose bytes are not WebAssembly is an error.
    """
    info = extract_wasm_info(manifest, config_data)
    if info is None or info.wasm_layer_digest is None or cache is None:
        return info
    stream = cache.open_blob(info.wasm_layer_digest)
    if stream is None:
        return info
    with stream:
        from_bytes = wasi_version_from_bytes(stream.read(8))
    if from_bytes is None:
        raise ManifestError(f"layer {info.wasm_layer_digest} of {manifest.digest} is "
                            "declared as WebAssembly but its bytes are not")
    # Verified bytes are the surest signal: runwasi, for one, writes os wasip1
    # into the config of component images.
    if from_bytes is not WasiVersion.UNKNOWN and from_bytes is not info.wasi_version:
        info = WasmArtifactInfo(from_bytes, info.wasm_layer_digest, info.wasm_size,
                                info.module_name)
    return info


def _descriptor_summary(descriptor: Descriptor) -> Dict[str, Any]:
    return {"digest": descriptor.digest, "size": descriptor.size,
            "media_type": descriptor.media_type}


# =============================================================================
# 44. PULL: the ImagePuller API
# =============================================================================

def _as_reference(reference: Union[str, Reference]) -> Reference:
    """Return ``reference`` parsed (a Reference is taken as it is)."""
    return parse_reference(reference) if isinstance(reference, str) else reference


class ImagePuller:
    """Pulls images and WASM artifacts into a blob cache.

    ``platform`` (``"linux/arm64"`` or a :class:`Platform`) picks the image
    from an index; the default is this host's.  ``insecure`` skips the
    registry's certificate check (its own host only, never a blob
    redirect's) and falls back to plain http when https gets no answer.
    ``remote_cache`` (an :class:`S3BlobCache`) puts a bucket between the
    cache and the registry, shared by a fleet: blobs missing locally come
    from it, and what comes from the registry is uploaded to it in the
    background (``flush_remote()`` and ``close()`` wait for that).
    ``offline`` never asks the registry: tags resolve to the digests
    recorded in the cache or the bucket.
    ``sleep``, ``clock`` and ``environ`` are injectable for tests.
    """

    def __init__(self, cache: Optional[BlobStore] = None, *,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 platform: Union[str, Platform, None] = None,
                 insecure: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES,
                 progress: Optional[_ProgressCallback] = None,
                 environ: Optional[Mapping[str, str]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time,
                 ssl_context: Any = None,
                 remote_cache: Optional["S3BlobCache"] = None, offline: bool = False,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        self.cache = cache if cache is not None else BlobCache()
        self.remote_cache = remote_cache
        self.offline = offline
        self._tier = None if remote_cache is None else _FleetTier(remote_cache, self.cache,
                                                                  lease_s=lease_s)
        if isinstance(platform, str):
            platform = parse_platform(platform)
        self.platform = platform if platform is not None else host_platform()
        self._session = _Session(max_workers=max_workers, insecure=insecure,
                                 timeout_s=timeout_s, retries=retries,
                                 environ=os.environ if environ is None else environ,
                                 sleep=sleep, clock=clock, ssl_context=ssl_context)
        self._resolver = _Resolver(self.cache, self.platform, platform_given=platform is not None)
        self._fetcher = _Fetcher(self.cache, self._session.pool, retries, progress)

    @property
    def max_workers(self) -> int:
        """Return how many blobs download at once."""
        return self._session.max_workers

    @property
    def insecure(self) -> bool:
        """Tell whether registries' certificates go unchecked (and plain http is allowed)."""
        return self._session.insecure

    @property
    def request_count(self) -> int:
        """Return how many HTTP requests this puller has sent."""
        return self._session.request_count

    def _source(self, reference: Reference, auth: Optional[RegistryAuth]) -> _Source:
        """Return where a pull of ``reference`` reads: the registry, through the
        remote cache when there is one; offline, the recorded references."""
        upstream = None if self.offline else self._session.source(reference, auth)
        if upstream is not None and self._tier is None:
            return upstream
        return _FleetSource(self._tier, self.cache, upstream, reference)

    def flush_remote(self) -> None:
        """Wait until what the pulls so far fetched from registries is in the remote cache."""
        if self._tier is not None:
            self._tier.flush()

    def close(self, wait_remote: bool = True) -> None:
        """Stop worker threads and close connections; with a remote cache, wait for
        its uploads first (``wait_remote=False`` leaves them to the next host)."""
        try:
            if self._tier is not None:
                self._tier.close(wait=wait_remote)
        finally:
            self._session.close()

    def __enter__(self) -> "ImagePuller":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _fetch_index(self, source: _Source, index: Manifest) -> Tuple[int, int]:
        """Fetch every child manifest of an index (nested too) and all their blobs."""
        nodes = self._resolver.walk(source, index)
        return self._fetcher.fetch(source, [d for d, m in nodes if m is None],
                                   manifests=sorted(d.digest for d, m in nodes if m is not None))

    def fetch_manifest(self, reference: Union[str, Reference],
                       auth: Optional[RegistryAuth] = None, *,
                       resolve_index: bool = True) -> Manifest:
        """Fetch the image manifest for ``reference`` (an index is resolved to the platform's).

        With ``resolve_index=False`` an index is returned as it is.
        """
        reference = _as_reference(reference)
        source = self._source(reference, auth)
        top = self._resolver.resolve(reference, source)
        return self._resolver.resolve_platform(source, top)[0] if resolve_index else top

    def pull_image(self, reference: Union[str, Reference],
                   auth: Optional[RegistryAuth] = None, *,
                   prefer_wasm: bool = False, verify: bool = False) -> PullResult:
        """Pull config and layers of ``reference`` into the cache; return what was pulled.

        A warm pull trusts what the cache verified when it stored it (a blob of
        the right size is taken as it is); ``verify`` hashes every cached blob
        the image uses again, and downloads again one that changed.
        """
        reference = _as_reference(reference)
        source = self._source(reference, auth)
        top = self._resolver.resolve(reference, source)
        manifest, index, platform = self._resolver.resolve_platform(source, top,
                                                                    prefer_wasm=prefer_wasm)
        self._record(reference, top, complete=False)
        config = manifest.config
        layers = manifest.layers
        used = [top.digest] + ([manifest.digest] if manifest is not top else [])
        early, config_data = 0, None
        if self._resolver.platform_given and not top.is_index:
            # One image, no index to choose from: its config must still match.
            early = self._fetcher.fetch(source, [config], manifests=used, verify=verify)[0]
            config_data = self._resolver.read_config(config)
            self._resolver.check_platform(reference, config_data)
        downloaded, from_cache = self._fetcher.fetch(source, [config] + layers, manifests=used,
                                                     verify=verify)
        downloaded, from_cache = downloaded + early, from_cache - early
        if config_data is None:
            config_data = self._resolver.read_config(config)
        self._record(reference, top, complete=True)
        return PullResult(reference=reference, manifest=manifest, config=config,
                          layers=[Layer(d, self.cache) for d in layers],
                          config_data=config_data, index=index,
                          platform=platform or _config_platform(config_data),
                          bytes_downloaded=downloaded, bytes_from_cache=from_cache)

    def pull(self, reference: Union[str, Reference],
             auth: Optional[RegistryAuth] = None, *,
             verify: bool = False) -> Tuple[Manifest, List[Layer]]:
        """Pull an image; return its manifest and its verified layers (``pull_image``
        returns all it resolved)."""
        result = self.pull_image(reference, auth, verify=verify)
        return result.manifest, result.layers

    def _record(self, reference: Reference, top: Manifest, complete: bool) -> None:
        """Record what ``reference`` names: first incomplete (so that gc keeps the blobs
        a pull is adding), then complete once every blob is in.  Digest references too:
        ``cache gc`` keeps what a recorded reference reaches."""
        self.cache.record_reference(str(reference), top.digest, top.media_type,
                                    complete=complete)
        if complete and self._tier is not None and not self.offline:
            self._tier.record(str(reference), top.digest, top.media_type)

    def pull_wasm(self, reference: Union[str, Reference],
                  auth: Optional[RegistryAuth] = None) -> Tuple[bytes, WasmArtifactInfo]:
        """Pull a WASM artifact; return the verified module bytes and its metadata.

        From a mixed index the WASM entry is chosen unless a platform was
        given.  A container image is a ``ManifestError``.
        """
        result = self.pull_image(reference, auth, prefer_wasm=True)
        info = result.wasm_module_info()
        layer = next(layer for layer in result.layers if layer.digest == info.wasm_layer_digest)
        return layer.read_bytes(), info

    def read_config(self, manifest: Manifest) -> Dict[str, Any]:
        """Return the parsed config of an image manifest in the cache ({} when it has
        none there, or it is not JSON)."""
        return self._resolver.read_config(manifest.config) if manifest.config else {}

    def get_wasm_info(self, reference: Union[str, Reference],
                      auth: Optional[RegistryAuth] = None) -> Optional[WasmArtifactInfo]:
        """Return WASM metadata from the manifest and config only; None for a container."""
        reference = _as_reference(reference)
        source = self._source(reference, auth)
        top = self._resolver.resolve(reference, source)
        manifest = self._resolver.resolve_platform(source, top, prefer_wasm=True)[0]
        self._fetcher.fetch(source, [manifest.config])
        return extract_wasm_info(manifest, self._resolver.read_config(manifest.config))

    def export_image(self, reference: Union[str, Reference], dest: str, *,
                     transport: Optional[str] = None,
                     platform: Union[str, Platform, None] = None,
                     auth: Optional[RegistryAuth] = None) -> ExportInfo:
        """Pull an image and write it as an OCI layout, OCI archive or docker archive.

        ``dest`` is ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]`` or
        ``docker-archive:FILE[:NAME[:TAG]]`` (or a plain path with ``transport``
        "oci", "oci-archive" or "docker-archive").  An index keeps every
        platform unless ``platform`` picks one; a docker archive always holds
        one, named NAME:TAG (default: the reference's) for ``docker load``.
        """
        if ":" in dest and dest.partition(":")[0] in _FILE_TRANSPORTS:
            target = _parse_location(dest, _FILE_TRANSPORTS, "destination")
        elif (transport or "oci") in _FILE_TRANSPORTS:
            target = _Location(transport or "oci", dest)
        else:
            raise LayoutError(f"unknown export format {transport!r}")
        path, tag = target.path, target.tag
        reference = _as_reference(reference)
        docker_named = tag and target.transport == "docker-archive"
        load_name = parse_reference(tag) if docker_named else reference
        tag = tag or reference.tag
        source = self._source(reference, auth)
        top = resolved = self._resolver.resolve(reference, source)
        wanted = parse_platform(platform) if isinstance(platform, str) else platform
        if top.is_index and (wanted is not None or target.transport == "docker-archive"):
            top = self._resolver.resolve_platform(source, top, wanted=wanted)[0]
        self._record(reference, resolved, complete=False)
        if top.is_index:
            self._fetch_index(source, top)
        else:
            self._fetcher.fetch(source, [top.config] + top.layers)
        self._record(reference, resolved, complete=True)
        written = _write_image(self.cache, top, _Location(target.transport, path, tag), load_name)
        return ExportInfo(reference=str(reference), digest=top.digest, media_type=top.media_type,
                          destination=os.path.abspath(path), format=target.transport, tag=tag,
                          blobs=len(written), size_bytes=sum(d.size for d in written))

    def import_image(self, src: str, *, tag: Optional[str] = None) -> List[ImportInfo]:
        """Import images from ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]`` or a path.

        Every blob is verified against its digest and size before any of
        them enters the cache; each image is recorded as a reference named
        after the layout (``oci:/abs/dir:tag``, or ``oci:/abs/dir@digest``
        when untagged), so ``cache gc`` keeps it.
        """
        path, transport = src, None
        if ":" in src and src.partition(":")[0] in _FILE_TRANSPORTS:
            location = _parse_import_source(src)
            path, transport, tag = location.path, location.transport, tag or location.tag
        if not os.path.exists(path):
            raise LayoutError(f"{path} does not exist")
        if transport == "oci" and not os.path.isdir(path):
            raise LayoutError(f"{path} is not a directory: oci: names a layout directory "
                              "(an archive is oci-archive:)")
        if transport == "oci-archive" and os.path.isdir(path):
            raise LayoutError(f"{path} is a directory: oci-archive: names a tar file "
                              "(a layout directory is oci:)")
        return _import_layout(self.cache, path, tag)

    def _imported(self, transport: str, path: str, tag: Optional[str]) -> str:
        """Return the digest ``import`` recorded for a layout that is no longer there."""
        digest = self.cache.lookup_reference(f"{transport}:{os.path.abspath(path)}:{tag}") \
            if tag else None
        if digest is None:
            raise LayoutError(f"{path} does not exist (nor was it imported"
                              f"{' with that tag' if tag else ' by tag'})")
        return digest

    def unpack(self, reference: Union[str, Reference],
               rootfs: Union[str, "os.PathLike[str]"],
               auth: Optional[RegistryAuth] = None, *,
               progress: Optional[_ProgressCallback] = None) -> PullResult:
        """Pull what is missing and unpack the image into a new root filesystem ``rootfs``."""
        result = self.pull_image(reference, auth)
        info = result.wasm_info()
        if info is not None and info.wasm_layer_digest is not None:
            raise UnpackError(f"{result.reference} is a WebAssembly artifact, not a container "
                              "image: use pull-wasm to write its module")
        LayerUnpacker(rootfs, progress=progress).unpack_layers(result.layers)
        return result

    def unpack_layout(self, src: str, rootfs: Union[str, "os.PathLike[str]"], *,
                      progress: Optional[_ProgressCallback] = None) -> Manifest:
        """Unpack the image of ``oci:DIR[:TAG]`` or ``oci-archive:FILE[:TAG]`` into a new
        root filesystem, as umoci does; return the image manifest unpacked.

        The layout is imported first (every blob verified into the cache);
        it must name one image (give TAG when it holds several).  A layout
        that is gone is served from the cache if it was imported (by the
        name ``import`` recorded).  An index is resolved to this puller's
        platform.  No registry is contacted.
        """
        location = _parse_import_source(src)
        transport, path, tag = location.transport, location.path, location.tag
        if os.path.exists(path):
            digests = sorted({info.digest for info in self.import_image(src)})
        else:
            digests = [self._imported(transport, path, tag)]
        if len(digests) != 1:
            raise LayoutError(f"{src} holds {len(digests)} images: name one with :TAG")
        local = _MissingSource(src)
        top = self._resolver.manifest_by_digest(local, digests[0])
        manifest = self._resolver.resolve_platform(local, top)[0]
        if manifest.config is None:
            raise ManifestError(f"{src}: manifest {manifest.digest} has no config")
        config_data = self._resolver.read_config(manifest.config)
        info = _verified_wasm_info(manifest, config_data, self.cache)
        if info is not None and info.wasm_layer_digest is not None:
            raise UnpackError(f"{src} is a WebAssembly artifact, not a container image")
        if self._resolver.platform_given and not top.is_index:
            self._resolver.check_platform(src, config_data)  # as unpack of a REF does
        LayerUnpacker(rootfs, progress=progress).unpack_layers(
            [Layer(d, self.cache) for d in manifest.layers])
        return manifest

    def inspect(self, reference: Union[str, Reference],
                auth: Optional[RegistryAuth] = None) -> Dict[str, Any]:
        """Describe an image without downloading layers (manifest, config, platforms)."""
        reference = _as_reference(reference)
        source = self._source(reference, auth)
        top = self._resolver.resolve(reference, source)
        data: Dict[str, Any] = {"reference": str(reference), "digest": top.digest,
                                "media_type": top.media_type}
        if top.is_index:
            data["platforms"] = _index_platforms(top)
            try:
                manifest, _, platform = self._resolver.resolve_platform(source, top)
            except PlatformNotFoundError:
                return data
            data["platform"] = str(platform) if platform else None
            data["manifest_digest"] = manifest.digest
            data["index_digest"] = top.digest  # the keys pull --json has too
        else:
            manifest = top
            data.update(manifest_digest=top.digest, index_digest=None)
        config = manifest.config
        self._fetcher.fetch(source, [config])
        config_data = self._resolver.read_config(config)
        if not top.is_index:
            offered = _config_platform(config_data)  # as pull --json reports it
            data["platform"] = str(offered) if offered else None
            if self._resolver.platform_given:
                self._resolver.check_platform(reference, config_data)  # as pull does
        kind = detect_artifact_type(manifest, config_data)
        data.update(config=_descriptor_summary(config),
                    layers=[_descriptor_summary(d) for d in manifest.layers],
                    artifact_type=str(kind), config_data=config_data)
        if manifest.artifact_type:
            data["manifest_artifact_type"] = manifest.artifact_type
        info = extract_wasm_info(manifest, config_data)
        if info is not None and info.wasm_layer_digest and info.wasm_size is not None:
            # The module is the artifact (usually small): fetch and verify it,
            # so that its bytes settle the WASI level as they do for pull.
            wasm_layer = next(d for d in manifest.layers if d.digest == info.wasm_layer_digest)
            self._fetcher.fetch(source, [wasm_layer])
            info = _verified_wasm_info(manifest, config_data, self.cache)
        if info is not None:
            data["artifact_type"] = "wasm"
            data.update(info.to_json())
        return data


# =============================================================================
# 45. PUSH: what a copy reads from (a registry, the cache, a layout, an archive)
# =============================================================================
# A copy walks one image graph (an index, its manifests, their blobs) and
# needs each blob as a file it can seek in (an upload is sent again after a
# setback).  Manifests are checked against their digests as they are read;
# a blob is checked as it goes up (its PUT hashes what it sends) or before
# (chunks).  What a registry serves is first pulled into the cache.

class _Content:
    """An image to copy: its top manifest, and where what it reaches is read.

    ``load`` returns a child manifest (verified); ``prepare`` makes a blob
    readable (a registry's is downloaded into the cache); ``open_blob``
    returns (a file, the offset the blob starts at); ``repository`` is the
    (registry, repository) it lives in, when a registry: the destination
    can mount from it; ``referrers`` lists the manifests whose subject is a
    digest (None: the source cannot tell).
    """

    def __init__(self, name: str, top: Manifest, load: Callable[[Descriptor], Manifest],
                 open_blob: Callable[[Descriptor], Tuple[BinaryIO, int]],
                 prepare: Optional[Callable[[Descriptor], Any]] = None,
                 repository: Optional[Tuple[str, str]] = None,
                 close: Optional[Callable[[], None]] = None,
                 prepare_all: Optional[Callable[[List[Descriptor]], Any]] = None,
                 referrers: Optional[Callable[[str], List[Descriptor]]] = None) -> None:
        self.name, self.top, self._load = name, top, load
        self.open_blob, self.repository = open_blob, repository
        self._prepare, self._close, self._prepare_all = prepare, close, prepare_all
        self.referrers = referrers

    def nodes(self, post_order: bool = True) -> List[_GraphNode]:
        """Return what the top reaches, children before their index by default."""
        def load(descriptor: Descriptor) -> Optional[Manifest]:
            if descriptor.digest == self.top.digest:
                return self.top
            return self._load(descriptor) if descriptor.media_type in _MANIFEST_TYPES else None
        return list(_walk_graph([self.top.descriptor()], load, post_order=post_order))

    def load(self, descriptor: Descriptor) -> Manifest:
        """Return a child manifest (verified against its digest)."""
        return self.top if descriptor.digest == self.top.digest else self._load(descriptor)

    def with_top(self, top: Manifest) -> "_Content":
        """Return the same content with another top (one platform of an index)."""
        return _Content(self.name, top, self._load, self.open_blob, self._prepare,
                        self.repository, self._close, self._prepare_all, self.referrers)

    def prepare(self, descriptor: Descriptor) -> None:
        """Make a blob readable by ``open_blob``."""
        if self._prepare is not None:
            self._prepare(descriptor)

    def prepare_all(self, descriptors: List[Descriptor]) -> None:
        """Make blobs readable, in parallel where their source allows."""
        if self._prepare_all is not None:
            self._prepare_all(descriptors)
        else:
            for descriptor in descriptors:
                self.prepare(descriptor)

    def close(self) -> None:
        """Release what reading held (an archive)."""
        if self._close is not None:
            self._close()


def _store_content(store: BlobStore, top: Manifest, name: str,
                   load: Optional[Callable[[Descriptor], Manifest]] = None,
                   prepare: Optional[Callable[[Descriptor], Any]] = None,
                   repository: Optional[Tuple[str, str]] = None,
                   prepare_all: Optional[Callable[[List[Descriptor]], Any]] = None,
                   referrers: Optional[Callable[[str], List[Descriptor]]] = None) -> _Content:
    """An image whose blobs are (or will be, by ``prepare``) in a store."""
    def load_stored(descriptor: Descriptor) -> Manifest:
        raw = store.read_small(descriptor.digest, MAX_MANIFEST_SIZE_BYTES)
        if raw is None:
            raise CacheError(f"manifest {descriptor.digest} is not in the cache")
        return parse_manifest(raw, descriptor.media_type, descriptor.digest)

    def open_stored(descriptor: Descriptor) -> Tuple[BinaryIO, int]:
        path = store.path(descriptor.digest)
        return (open(path, "rb") if path else _open_stored(store, descriptor)), 0

    return _Content(name, top, load or load_stored, open_stored, prepare, repository,
                    prepare_all=prepare_all, referrers=referrers)


def _layout_content(location: _Location, store: BlobStore) -> _Content:
    """An image of an OCI layout or archive (it must name one: give TAG when it holds
    several); from a compressed archive, it is imported into ``store`` first."""
    path = location.path
    if not os.path.exists(path):
        raise LayoutError(f"{path} does not exist")
    source = _LayoutSource(path)
    try:
        entries = _select_layout_entries(source.read_json("index.json"), path, location.tag)
        if len({entry.digest for entry in entries}) != 1:
            raise LayoutError(f"{location} holds {len(entries)} images: name one with :TAG")

        def read(descriptor: Descriptor) -> Manifest:
            algorithm, encoded = descriptor.digest.split(":", 1)
            stream = source.open(f"blobs/{algorithm}/{encoded}")
            if stream is None:
                raise LayoutError(f"{path}: blob {descriptor.digest} is missing")
            with stream:
                raw = _read_capped(stream, MAX_MANIFEST_SIZE_BYTES + 1)
            try:
                return parse_manifest(raw, descriptor.media_type, descriptor.digest)
            except (ManifestError, DigestMismatchError) as exc:
                raise LayoutError(f"{path}: {exc}") from exc

        def open_blob(descriptor: Descriptor) -> Tuple[BinaryIO, int]:
            algorithm, encoded = descriptor.digest.split(":", 1)
            found = source.open_at(f"blobs/{algorithm}/{encoded}")
            if found is None:
                raise LayoutError(f"{path}: blob {descriptor.digest} is missing")
            return found

        top = read(entries[0])
        if not source.seekable():
            # A compressed archive: its blobs cannot be seeked in, so they go
            # through the cache (verified on the way in).
            source.close()
            _import_layout(store, path, location.tag)
            return _store_content(store, top, str(location))
    except BaseException:
        source.close()
        raise
    return _Content(str(location), top, read, open_blob, close=source.close)


_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _docker_archive_content(location: _Location, store: BlobStore) -> _Content:
    """An image of what ``docker save`` or ``podman save`` wrote: an OCI layout inside
    (docker 25 and later), or manifest.json naming a config and layer files, from
    which a Docker v2 manifest is made (the digests are of the files as they are)."""
    path = location.path
    if not os.path.isfile(path):
        raise LayoutError(f"{path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    source = _LayoutSource(path)
    try:
        if source.open("index.json") is not None and source.open("oci-layout") is not None:
            source.close()
            return _layout_content(_Location("oci-archive", path, None), store)
        listing = source.read_json("manifest.json")
        entry = _docker_archive_entry(listing, location)
        files = [entry["Config"]] + list(entry["Layers"])
        descriptors = []
        for index, name in enumerate(files):
            found = source.open_at(name) if isinstance(name, str) else None
            if found is None:
                raise LayoutError(f"{path}: {name!r} is not a file of the archive "
                                  "(a compressed archive? give the .tar docker save wrote)")
            file, offset = found
            with file:
                file.seek(offset)
                hasher, size, head = hashlib.sha256(), 0, b""
                limited = _LimitedReader(file, source.size(name))
                for chunk in iter(lambda: limited.read(_READ_CHUNK_BYTES), b""):
                    head = head or chunk[:2]
                    hasher.update(chunk)
                    size += len(chunk)
            media_type = MEDIA_TYPE_DOCKER_CONFIG if index == 0 else \
                _DOCKER_LAYER_GZIP if head == _GZIP_MAGIC else _DOCKER_LAYER
            descriptors.append((name, Descriptor(media_type, f"sha256:{hasher.hexdigest()}",
                                                 size)))
        raw = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
                          "config": descriptors[0][1].to_json(),
                          "layers": [d.to_json() for _, d in descriptors[1:]]},
                         indent=3).encode()
        top = parse_manifest(raw)
        by_digest = {d.digest: name for name, d in descriptors}

        def open_blob(descriptor: Descriptor) -> Tuple[BinaryIO, int]:
            found = source.open_at(by_digest[descriptor.digest])
            assert found is not None  # it was opened above
            return found
    except BaseException:
        source.close()
        raise
    return _Content(str(location), top, lambda d: top, open_blob, close=source.close)


def _docker_archive_entry(listing: Any, location: _Location) -> Dict[str, Any]:
    """Pick the manifest.json entry of a docker archive (by NAME[:TAG], else the only one)."""
    entries = [e for e in listing if isinstance(e, dict)] if isinstance(listing, list) else []
    if not entries or not all(isinstance(e.get("Config"), str) and
                              isinstance(e.get("Layers"), list) for e in entries):
        raise LayoutError(f"{location.path} has no usable manifest.json (Config, Layers)")
    if location.tag:
        wanted = {location.tag, _docker_load_name(parse_reference(location.tag))}
        chosen = [e for e in entries if wanted & set(e.get("RepoTags") or [])]
        if not chosen:
            raise LayoutError(f"no image named {location.tag} in {location.path}")
        return chosen[0]
    if len(entries) != 1:
        raise LayoutError(f"{location.path} holds {len(entries)} images: name one with "
                          "docker-archive:FILE:NAME:TAG")
    return entries[0]


# =============================================================================
# 46. PUSH: ImagePusher, push and copy
# =============================================================================

@_value
class CopyResult:
    """What ``ImagePusher.copy`` did: the image copied, and each blob's fate."""

    source: str
    destination: str
    digest: str
    media_type: str
    uploaded: List[Descriptor] = _field(default_factory=list)
    mounted: List[Descriptor] = _field(default_factory=list)
    skipped: List[Descriptor] = _field(default_factory=list)
    manifests: int = 0
    referrers: List[str] = _field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """Return the JSON form ``push --json`` and ``copy --json`` print."""
        def listed(descriptors: List[Descriptor]) -> List[Dict[str, Any]]:
            return [_descriptor_summary(d) for d in descriptors]
        return {"reference": self.source, "destination": self.destination,
                "digest": self.digest, "media_type": self.media_type,
                "uploaded": listed(self.uploaded), "mounted": listed(self.mounted),
                "skipped": listed(self.skipped), "manifests": self.manifests,
                "referrers": list(self.referrers),
                "bytes_uploaded": sum(d.size for d in self.uploaded)}


# Referrers one copy follows at most (a hostile source could list without end).
_MAX_REFERRERS = 1000


class ImagePusher:
    """Pushes images to registries and copies them between registries, layouts and archives.

    A copy's source is a registry reference (``docker://`` optional),
    ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE`` or
    ``local:NAME[:TAG]`` (the local registry in the cache); its destination
    any of those (an image reaches a registry by push, a layout or archive
    by export, the local registry through the cache).  Blobs go up in parallel, largest first,
    each checked with HEAD and skipped when the repository has it, mounted
    when the registry has it elsewhere (the source repository, or one the
    cache saw it in), else uploaded; manifests go last, children before
    their index, the tag last of all.  What a registry serves comes through
    the cache.  ``insecure``/``src_insecure`` are per side, as for pulls;
    ``chunk_bytes`` sends every blob in chunks of that size;
    ``on_blob(descriptor, fate)`` hears what became of each blob pushed
    ("uploaded", "mounted" or "skipped"), beside ``progress``'s bytes.
    """

    def __init__(self, cache: Optional[BlobStore] = None, *,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 platform: Union[str, Platform, None] = None,
                 insecure: bool = False, src_insecure: Optional[bool] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 chunk_bytes: Optional[int] = None,
                 progress: Optional[_ProgressCallback] = None,
                 on_blob: Optional[Callable[[Descriptor, str], None]] = None,
                 environ: Optional[Mapping[str, str]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time, ssl_context: Any = None,
                 remote_cache: Optional["S3BlobCache"] = None) -> None:
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        env = os.environ if environ is None else environ
        # A registry source is read as a pull reads it: through ``remote_cache`` too.
        self.puller = ImagePuller(cache, max_workers=max_workers, platform=platform,
                                  insecure=insecure if src_insecure is None else src_insecure,
                                  timeout_s=timeout_s, retries=retries, environ=env,
                                  sleep=sleep, clock=clock, ssl_context=ssl_context,
                                  remote_cache=remote_cache)
        self.cache = self.puller.cache
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.on_blob = on_blob
        self._session = _Session(max_workers=max_workers, insecure=insecure,
                                 timeout_s=timeout_s, retries=retries, environ=env,
                                 sleep=sleep, clock=clock, ssl_context=ssl_context)

    @property
    def request_count(self) -> int:
        """Return how many HTTP requests this pusher sent (both sides)."""
        return self._session.request_count + self.puller.request_count

    def close(self) -> None:
        """Stop worker threads and close connections."""
        self._session.close()
        self.puller.close()

    def __enter__(self) -> "ImagePusher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _uploader(self, reference: Reference, auth: Optional[RegistryAuth]) -> _Uploader:
        return _Uploader(self._session.client(reference, auth, actions="pull,push"),
                         self.chunk_bytes, self.progress)

    # -- the parts --------------------------------------------------------------

    def push_blob(self, reference: Union[str, Reference], descriptor: Descriptor,
                  file: BinaryIO, offset: int = 0,
                  auth: Optional[RegistryAuth] = None) -> str:
        """Put one blob (``descriptor.size`` bytes of ``file`` from ``offset``) into the
        repository of ``reference``; return "skipped", "mounted" or "uploaded"."""
        uploader = self._uploader(_as_reference(reference), auth)
        return self._push_one(uploader, descriptor, lambda: (file, offset), (), close=False)

    def push_manifest(self, reference: Union[str, Reference], manifest: Manifest,
                      auth: Optional[RegistryAuth] = None) -> None:
        """PUT a manifest byte for byte under the reference's tag (or its digest)."""
        reference = _as_reference(reference)
        if reference.digest and reference.digest != manifest.digest:
            raise ManifestError(f"{reference} names {reference.digest}, not the manifest "
                                f"{manifest.digest} to push")
        self._uploader(reference, auth).put_manifest(
            reference.tag if reference.tag and not reference.digest else manifest.digest,
            manifest.raw, manifest.media_type)

    def _push_one(self, uploader: _Uploader, descriptor: Descriptor,
                  open_blob: Callable[[], Tuple[BinaryIO, int]], mount_from: Sequence[str],
                  close: bool = True, prepare: Optional[Callable[[], Any]] = None) -> str:
        """HEAD, then mount, then upload one blob; return what became of it."""
        if uploader.has_blob(descriptor.digest):
            return "skipped"
        session: Optional[Tuple[Optional[str], Optional[int]]] = None
        try:
            for repository in list(dict.fromkeys(mount_from))[:3]:
                if repository == uploader.repository:
                    continue
                mounted, location, minimum = uploader.mount(descriptor.digest, repository)
                if session is not None:
                    uploader.cancel(session[0])  # one session at a time
                session = None if mounted else (location, minimum)
                if mounted:
                    return "mounted"
            if session is None:
                # Spec 1.1: a registry may mount a blob it has anywhere; one that
                # does not answers with a session, which the upload uses.
                mounted, location, minimum = uploader.mount(descriptor.digest, None)
                if mounted:
                    return "mounted"
                session = (location, minimum)
            if prepare is not None:
                prepare()
            file, offset = open_blob()
            try:
                uploader.upload(descriptor, file, offset, session)
            finally:
                if close:
                    file.close()
            session = None
            return "uploaded"
        finally:
            if session is not None:  # a failure left it open: the registry may drop it now
                uploader.cancel(session[0])

    # -- copy -------------------------------------------------------------------

    def push(self, src: str, destination: Union[str, Reference], *,
             src_auth: Optional[RegistryAuth] = None,
             auth: Optional[RegistryAuth] = None, platform: Union[str, Platform, None] = None
             ) -> CopyResult:
        """Push the image of ``src`` (any copy source) to a registry reference."""
        target = destination if isinstance(destination, Reference) else \
            _parse_location(str(destination), ("docker",), "destination").reference
        return self.copy(src, f"docker://{target}", src_auth=src_auth, dst_auth=auth,
                         platform=platform)

    def copy(self, src: str, dst: str, *, src_auth: Optional[RegistryAuth] = None,
             dst_auth: Optional[RegistryAuth] = None,
             platform: Union[str, Platform, None] = None,
             referrers: bool = False) -> CopyResult:
        """Copy an image from ``src`` to ``dst`` (see the class); return what was done.

        An index is copied whole unless ``platform`` picks one of its images
        (a docker archive holds one: the host's, unless ``platform`` says).
        ``referrers`` copies the manifests whose subject is a manifest copied
        (signatures, SBOMs, attestations), theirs too, from a registry or the
        local registry to a registry or the local registry.
        """
        source = _parse_location(src, what="source")
        target = _parse_location(dst, what="destination")
        for side, location in (("from", source), ("to", target)):
            if referrers and location.transport not in ("docker", "local"):
                raise LayoutError(f"referrers are copied between registries and local:NAME, "
                                  f"not {side} {location}")
        wanted = parse_platform(platform) if isinstance(platform, str) else platform
        content = self._content(source, src_auth)
        try:
            top = content.top
            if top.is_index and (wanted is not None or target.transport == "docker-archive"):
                content = content.with_top(self._pick_platform(content, wanted))
            if target.reference is None:
                result = self._write(content, source, target)
            else:
                result = self._push_content(content, target.reference, dst_auth)
            if referrers:
                result = self._copy_referrers(content, source, target, dst_auth, result)
            return result
        finally:
            content.close()

    def _copy_referrers(self, content: _Content, source: _Location, target: _Location,
                        auth: Optional[RegistryAuth], result: CopyResult) -> CopyResult:
        """Copy the referrers of every manifest copied, and theirs; return ``result``
        with what that did added.

        A destination registry that does not index subjects itself (no
        ``OCI-Subject`` answer) gets the referrers tag schema's index.
        """
        assert content.referrers is not None
        subjects = [d.digest for d, m in content.nodes() if m is not None]
        seen = set(subjects)
        done_all: Dict[str, Any] = {"uploaded": list(result.uploaded),
                                    "mounted": list(result.mounted),
                                    "skipped": list(result.skipped),
                                    "manifests": result.manifests, "referrers": []}
        while subjects:
            subject = subjects.pop(0)
            for descriptor in content.referrers(subject):
                if descriptor.digest in seen or descriptor.media_type not in _MANIFEST_TYPES:
                    continue
                if len(seen) >= _MAX_REFERRERS:
                    raise ManifestError(f"{content.name} has more than {_MAX_REFERRERS} "
                                        "referrers; refusing to copy them all")
                seen.add(descriptor.digest)
                referrer = content.with_top(content.load(descriptor))
                if target.reference is None:
                    done = self._write(referrer, source, _Location(
                        "local", target.path, digest=descriptor.digest))
                else:
                    indexed: List[bool] = []
                    done = self._push_content(referrer, Reference(
                        target.reference.registry, target.reference.repository, None,
                        descriptor.digest), auth, indexed)
                    if not indexed[0]:
                        self._tag_referrer(target.reference, auth, subject, referrer.top)
                for fate in ("uploaded", "mounted", "skipped"):
                    done_all[fate] += getattr(done, fate)
                done_all["manifests"] += done.manifests
                done_all["referrers"].append(descriptor.digest)
                subjects.append(descriptor.digest)
        return result.replace(**done_all)

    def _tag_referrer(self, destination: Reference, auth: Optional[RegistryAuth],
                      subject: str, referrer: Manifest) -> None:
        """Add a referrer to the ``sha256-<hex>`` index of its subject (the referrers
        tag schema of distribution-spec 1.1, for registries without the API)."""
        uploader = self._uploader(destination, auth)
        tag = _referrers_tag(subject)
        try:
            listed = [dict(d) for d in uploader.client.get_manifest(tag).data["manifests"]]
        except NotFoundError:
            listed = []
        if any(d.get("digest") == referrer.digest for d in listed):
            return
        listed.append(_referrer_descriptor(referrer))
        raw = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX,
                          "manifests": listed}, indent=3).encode()
        uploader.put_manifest(tag, raw, MEDIA_TYPE_OCI_INDEX)

    def _content(self, source: _Location, auth: Optional[RegistryAuth]) -> _Content:
        """Open what a copy reads from."""
        if source.transport == "local":
            store = self._local_registry()
            top = store.get_manifest(source.path, source.digest or str(source.tag))
            if top is None:
                raise CacheError(f"no image {source} in the local registry {store.root} "
                                 "('cache ls' lists local: images)")
            return _store_content(self.cache, top, str(source),
                                  referrers=lambda digest: store.referrers(source.path, digest))
        if source.transport in _LAYOUT_TRANSPORTS:
            return _layout_content(source, self.cache)
        if source.transport == "docker-archive":
            return _docker_archive_content(source, self.cache)
        reference = source.reference
        assert reference is not None
        puller = self.puller
        registry_source = puller._source(reference, auth)
        top = puller._resolver.resolve(reference, registry_source)
        cancel = threading.Event()

        def load(descriptor: Descriptor) -> Manifest:
            return puller._resolver.manifest_by_digest(registry_source, descriptor.digest)

        def prepare(descriptor: Descriptor) -> None:
            puller._fetcher.download(registry_source, descriptor, cancel)
            self.cache.record_location(descriptor.digest, reference.registry,
                                       reference.repository)

        return _store_content(self.cache, top, str(reference), load, prepare,
                              (reference.registry, reference.repository),
                              lambda descriptors: puller._fetcher.fetch(registry_source,
                                                                        descriptors),
                              puller._session.client(reference, auth).referrers)

    def _pick_platform(self, content: _Content, wanted: Optional[Platform]) -> Manifest:
        """Follow an index down to one platform (the puller's when none is asked for)."""
        manifest = content.top
        for _ in range(_MAX_INDEX_DEPTH):
            if not manifest.is_index:
                return manifest
            child = select_platform(manifest, wanted or self.puller.platform)
            manifest = content.load(child)
        raise ManifestError(f"index {content.top.digest} nests more than "
                            f"{_MAX_INDEX_DEPTH} levels deep")

    def _local_registry(self) -> LocalRegistry:
        """Return the local registry over this pusher's cache (a directory cache)."""
        if not isinstance(self.cache, DirectoryBlobCache):
            raise CacheError("the local registry lives in a directory cache: open the "
                             "pusher with one (the CLI's --cache)")
        return LocalRegistry(self.cache)

    def _write(self, content: _Content, source: _Location, target: _Location) -> CopyResult:
        """Copy into a layout, an archive or the local registry: through the cache,
        then written out (or recorded, for the local registry)."""
        store = self._local_registry() if target.transport == "local" else None
        nodes = content.nodes(post_order=False)
        for descriptor, manifest in nodes:
            if manifest is not None and not self.cache.has(descriptor.digest):
                self.cache.put(descriptor.digest, manifest.raw, manifest.media_type)
        blobs = list({d.digest: d for d, m in nodes if m is None}.values())
        present = {d.digest for d in blobs if self.cache.has(d.digest)}
        content.prepare_all([d for d in blobs if not self.cache.has(d.digest)])
        for descriptor in blobs:
            if self.cache.has(descriptor.digest):
                continue
            file, offset = content.open_blob(descriptor)
            with file, self.cache.begin_write(descriptor.digest, descriptor.size,
                                              descriptor.media_type) as writer:
                file.seek(offset)
                limited = _LimitedReader(file, descriptor.size + 1)
                for chunk in iter(lambda: limited.read(_READ_CHUNK_BYTES), b""):
                    writer.write(chunk)
                writer.commit()
        if store is not None:
            if target.digest and target.digest != content.top.digest:
                raise ManifestError(f"{target} names {target.digest}, but the image copied "
                                    f"is {content.top.digest}")
            store.store_image(target.path, target.digest or str(target.tag), content.top,
                              content.load)
            return CopyResult(str(source), str(target), content.top.digest,
                              content.top.media_type,
                              uploaded=[d for d in blobs if d.digest not in present],
                              skipped=[d for d in blobs if d.digest in present],
                              manifests=sum(1 for _, m in nodes if m is not None))
        if target.tag is None and target.transport != "docker-archive":
            tag = source.reference.tag if source.reference else source.tag
            target = _Location(target.transport, target.path, tag)
        if target.transport == "docker-archive" and target.tag:
            load_name = parse_reference(target.tag)
        elif source.reference is not None:
            load_name = source.reference
        else:  # a layout's image has no name of its own: its tag, if it is one
            tag = source.tag if source.tag and "/" in source.tag else None
            load_name = parse_reference(tag if tag and _is_image_name(tag) else "localhost/image")
        written = _write_image(self.cache, content.top, target, load_name)
        return CopyResult(str(source), str(target), content.top.digest,
                          content.top.media_type,
                          uploaded=[d for d in written if d.media_type not in _MANIFEST_TYPES],
                          manifests=sum(1 for _, m in nodes if m is not None))

    def _push_content(self, content: _Content, destination: Reference,
                      auth: Optional[RegistryAuth],
                      indexed: Optional[List[bool]] = None) -> CopyResult:
        """Push an image to a registry: blobs in parallel, then manifests, then the tag
        (``indexed`` receives whether the registry indexed the top's subject)."""
        if destination.digest and destination.digest != content.top.digest:
            raise ManifestError(f"{destination} names {destination.digest}, but the image "
                                f"copied is {content.top.digest}")
        uploader = self._uploader(destination, auth)
        nodes = content.nodes(post_order=True)
        blobs = sorted({d.digest: d for d, m in nodes if m is None}.values(),
                       key=lambda d: d.size, reverse=True)
        same_registry = content.repository is not None and \
            content.repository[0] == destination.registry

        def push(descriptor: Descriptor) -> str:
            mount_from = ([content.repository[1]] if same_registry else []) + \
                self.cache.locations(descriptor.digest, destination.registry)
            fate = self._push_one(uploader, descriptor,
                                  lambda: content.open_blob(descriptor), mount_from,
                                  prepare=lambda: content.prepare(descriptor))
            self.cache.record_location(descriptor.digest, destination.registry,
                                       destination.repository)
            if self.on_blob is not None:
                self.on_blob(descriptor, fate)
            return fate

        cancel = threading.Event()
        fates = self._session.pool().run(push, blobs, cancel) if blobs else []
        manifests = [(d, m) for d, m in nodes if m is not None]
        for descriptor, manifest in manifests[:-1]:  # children first, by digest
            uploader.put_manifest(manifest.digest, manifest.raw, manifest.media_type)
        top = manifests[-1][1]
        assert top is not None and top.digest == content.top.digest
        tag = destination.tag if destination.tag and not destination.digest else top.digest
        subject_indexed = uploader.put_manifest(tag, top.raw, top.media_type)
        if indexed is not None:
            indexed.append(subject_indexed)
        result: Dict[str, List[Descriptor]] = {"uploaded": [], "mounted": [], "skipped": []}
        for descriptor, fate in zip(blobs, fates):
            result[fate].append(descriptor)
        return CopyResult(content.name, str(destination), top.digest, top.media_type,
                          manifests=len(manifests), **result)


# =============================================================================
# 47. SERVE: basic credentials from an htpasswd file (bcrypt, apr1, SHA, SHA-crypt)
# =============================================================================
# The formats Apache's htpasswd writes, verified here without a C library:
# bcrypt ($2y$, $2a$, $2b$: htpasswd -B, the only one distribution takes) on a
# Blowfish written for the module, Apache's MD5 ($apr1$, -m), {SHA} (-s),
# {SSHA}, and Drepper's SHA-256/SHA-512 crypt ($5$, $6$: -2, -5).  A line
# with DES crypt (-d) or a plain password (-p) is refused.  Every comparison
# is constant-time; an unknown user costs what a wrong password costs.

_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_STANDARD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT_MAX_COST = 10        # pure Python: cost 5 takes about 0.3 s, each step doubles it
_SHA_CRYPT_MAX_ROUNDS = 500_000
_VERIFIED_TTL_S = 600.0      # a verified password is trusted this long (salted, in memory)
_FAILURES_PER_MINUTE = 10    # per client address, before 429s
_BLOWFISH_STATE: List[List[int]] = []
_BLOWFISH_LOCK = threading.Lock()


def _blowfish_initial_state() -> Tuple[List[int], List[int]]:
    """Return copies of Blowfish's initial P-array (18 words) and S-boxes (1024 words).

    They are the fractional hexadecimal digits of pi, in order (Schneier,
    1993): computed once here by Machin's formula in integer arithmetic.
    """
    with _BLOWFISH_LOCK:
        if not _BLOWFISH_STATE:
            words = 18 + 1024
            unity = 1 << (words * 32 + 64)

            def arccot(x: int) -> int:
                total = power = unity // x
                n, sign, square = 3, -1, x * x
                while True:
                    power //= square
                    term = power // n
                    if not term:
                        return total
                    total += sign * term
                    sign, n = -sign, n + 2

            pi = 4 * (4 * arccot(5) - arccot(239))
            fraction = (pi >> 64) & ((1 << (words * 32)) - 1)
            _BLOWFISH_STATE.append([(fraction >> (32 * (words - 1 - i))) & 0xFFFFFFFF
                                    for i in range(words)])
        state = _BLOWFISH_STATE[0]
        return state[:18], state[18:]


def _bcrypt_hash(password: bytes, cost: int, salt: bytes) -> bytes:
    """Return the 23 bytes bcrypt makes of a password (EksBlowfish, Provos and
    Mazières 1999): the key is the password and a NUL, cut at 72 bytes."""
    import struct
    key = (password + b"\0")[:72]
    p, s = _blowfish_initial_state()

    def words(data: bytes, count: int) -> List[int]:
        stream = (data * (count * 4 // len(data) + 1))[:count * 4]
        return list(struct.unpack(f">{count}I", stream))

    key_words, salt_words = words(key, 18), words(salt, 4)
    salt_as_key = words(salt, 18)

    def encrypt(left: int, right: int) -> Tuple[int, int]:
        for i in range(0, 16, 2):
            left ^= p[i]
            right ^= ((s[left >> 24] + s[256 | (left >> 16) & 0xFF]) ^
                      s[512 | (left >> 8) & 0xFF]) + s[768 | left & 0xFF] & 0xFFFFFFFF
            right ^= p[i + 1]
            left ^= ((s[right >> 24] + s[256 | (right >> 16) & 0xFF]) ^
                     s[512 | (right >> 8) & 0xFF]) + s[768 | right & 0xFF] & 0xFFFFFFFF
        return right ^ p[17], left ^ p[16]

    def expand(xor_key: List[int], data: Optional[List[int]]) -> None:
        for i in range(18):
            p[i] ^= xor_key[i]
        left = right = 0
        turn = 0
        for table, count in ((p, 18), (s, 1024)):
            for i in range(0, count, 2):
                if data is not None:
                    left ^= data[turn]
                    right ^= data[turn + 1]
                    turn ^= 2
                left, right = encrypt(left, right)
                table[i], table[i + 1] = left, right

    expand(key_words, salt_words)
    for _ in range(1 << cost):
        expand(key_words, None)
        expand(salt_as_key, None)
    text = list(struct.unpack(">6I", b"OrpheanBeholderScryDoubt"))
    for _ in range(64):
        for i in range(0, 6, 2):
            text[i], text[i + 1] = encrypt(text[i], text[i + 1])
    return struct.pack(">6I", *text)[:23]


def _bcrypt_b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=").translate(
        str.maketrans(_STANDARD_B64, _BCRYPT_ALPHABET))


def _bcrypt_unb64(text: str) -> bytes:
    standard = text.translate(str.maketrans(_BCRYPT_ALPHABET, _STANDARD_B64))
    return base64.b64decode(standard + "=" * (-len(standard) % 4))


def _crypt_b64(data: bytes, groups: Sequence[Tuple[int, ...]]) -> str:
    """The crypt(3) encoding: each group of byte indexes (high byte first) as 6-bit
    characters, low bits first; a group of one or two bytes gives 2 or 3 characters."""
    out = []
    for group in groups:
        value = 0
        for index in group:
            value = (value << 8) | data[index]
        for _ in range(len(group) + 1):
            out.append(_CRYPT_ALPHABET[value & 0x3F])
            value >>= 6
    return "".join(out)


_MD5_GROUPS = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,))
_SHA256_GROUPS = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
                  (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (31, 30))
_SHA512_GROUPS = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4),
                  (47, 5, 26), (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51),
                  (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35),
                  (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
                  (62, 20, 41), (63,))


def _apr1_crypt(password: bytes, salt: bytes) -> str:
    """Return Apache's MD5 crypt of a password (``$apr1$SALT$HASH``)."""
    salt = salt[:8]
    final = hashlib.md5(password + salt + password).digest()
    context = password + b"$apr1$" + salt
    for left in range(len(password), 0, -16):
        context += final[:min(16, left)]
    length = len(password)
    while length:
        context += b"\0" if length & 1 else password[:1]
        length >>= 1
    final = hashlib.md5(context).digest()
    for i in range(1000):
        block = password if i & 1 else final
        if i % 3:
            block += salt
        if i % 7:
            block += password
        block += final if i & 1 else password
        final = hashlib.md5(block).digest()
    return f"$apr1${salt.decode('ascii', 'replace')}${_crypt_b64(final, _MD5_GROUPS)}"


def _sha_crypt(password: bytes, salt: bytes, rounds: int, explicit: bool,
               algorithm: str) -> str:
    """Return Drepper's SHA-256 or SHA-512 crypt (``$5$``, ``$6$``) of a password."""
    new = getattr(hashlib, algorithm)
    size = new().digest_size
    salt = salt[:16]
    alternate = new(password + salt + password).digest()
    first = new(password + salt)
    left = len(password)
    while left > size:
        first.update(alternate)
        left -= size
    first.update(alternate[:left])
    length = len(password)
    while length:
        first.update(alternate if length & 1 else password)
        length >>= 1
    digest = first.digest()
    p_bytes = (new(password * len(password)).digest() * (len(password) // size + 1)
               )[:len(password)]
    s_bytes = (new(salt * (16 + digest[0])).digest() * (len(salt) // size + 1))[:len(salt)]
    for i in range(rounds):
        step = new(p_bytes if i & 1 else digest)
        if i % 3:
            step.update(s_bytes)
        if i % 7:
            step.update(p_bytes)
        step.update(digest if i & 1 else p_bytes)
        digest = step.digest()
    magic = "5" if algorithm == "sha256" else "6"
    head = f"${magic}$" + (f"rounds={rounds}$" if explicit else "")
    groups = _SHA256_GROUPS if algorithm == "sha256" else _SHA512_GROUPS
    return head + salt.decode("ascii", "replace") + "$" + _crypt_b64(digest, groups)


class _HtpasswdEntry:
    """One user's line: a ``check(password) -> bool``, or why it cannot be used."""

    __slots__ = ("user", "stored", "check", "refused", "cost")

    def __init__(self, user: str, stored: str) -> None:
        self.user, self.stored, self.refused, self.cost = user, stored, "", 0
        self.check: Callable[[bytes], bool] = lambda password: False
        import hmac
        equal = hmac.compare_digest
        if re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", stored):
            cost = int(stored[4:6])
            if not 4 <= cost <= _BCRYPT_MAX_COST:
                self.refused = (f"bcrypt cost {cost} (this server verifies 4 to "
                                f"{_BCRYPT_MAX_COST}: htpasswd -B -C 5)")
                return
            salt, expected = _bcrypt_unb64(stored[7:29]), stored[29:]
            self.cost = cost
            self.check = lambda password: equal(
                _bcrypt_b64(_bcrypt_hash(password, cost, salt)), expected)
        elif stored.startswith("$apr1$") and stored.count("$") == 3:
            salt = stored.split("$")[2].encode()
            self.check = lambda password: equal(_apr1_crypt(password, salt), stored)
        elif stored.startswith("{SHA}"):
            self.check = lambda password: equal(
                base64.b64encode(hashlib.sha1(password).digest()).decode(), stored[5:])
        elif stored.startswith("{SSHA}"):
            try:
                raw = base64.b64decode(stored[6:], validate=True)
            except ValueError:
                self.refused = "a {SSHA} hash that is not base64"
                return
            digest, salt_bytes = raw[:20], raw[20:]
            self.check = lambda password: equal(
                hashlib.sha1(password + salt_bytes).digest(), digest)
        elif re.match(r"\$[56]\$", stored):
            self._sha_crypt(stored, equal)
        else:
            self.refused = ("DES crypt or a plain password (make the line with htpasswd -B, "
                            "the bcrypt that distribution takes too)")

    def _sha_crypt(self, stored: str, equal: Callable[[Any, Any], bool]) -> None:
        parts = stored.split("$")
        algorithm = "sha256" if parts[1] == "5" else "sha512"
        rounds, explicit = 5000, False
        if len(parts) == 5 and parts[2].startswith("rounds="):
            try:
                rounds = min(max(int(parts[2][7:]), 1000), 999_999_999)
            except ValueError:
                self.refused = "a SHA-crypt hash with a malformed rounds="
                return
            explicit = True
            parts = parts[:2] + parts[3:]
        if len(parts) != 4:
            self.refused = "a malformed SHA-crypt hash"
            return
        if rounds > _SHA_CRYPT_MAX_ROUNDS:
            self.refused = f"rounds={rounds} (at most {_SHA_CRYPT_MAX_ROUNDS} here)"
            return
        salt = parts[2].encode()
        self.check = lambda password: equal(
            _sha_crypt(password, salt, rounds, explicit, algorithm), stored)


class _Htpasswd:
    """The users of an htpasswd file, re-read when it changes (checked at most once a
    second).  A verified password is kept for a while as a keyed hash, so that a
    client sending basic credentials with every request pays bcrypt once; failures
    are counted per client address, and a client over the limit gets 429."""

    def __init__(self, path: str, note: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self._note, self._clock = path, note, clock
        self._lock = threading.Lock()
        self._entries: Dict[str, _HtpasswdEntry] = {}
        self._signature: Any = None
        self._checked_at = -1.0
        self._secret = os.urandom(32)
        self._verified: Dict[str, Tuple[bytes, float, str]] = {}
        self._failures: Dict[str, List[float]] = {}
        self._dummy_cost = 5
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            info = os.stat(self.path)
        except OSError as exc:
            if force:
                raise ZLayerError(f"cannot read --htpasswd {self.path}: "
                                  f"{exc.strerror or exc}") from None
            return  # gone for a moment (replaced): keep what was read
        signature = (info.st_mtime_ns, info.st_size, info.st_ino)
        if signature == self._signature:
            return
        raw = _read_regular_file(self.path, 16 * 1024 * 1024)
        if raw is None:
            if force:
                raise ZLayerError(f"--htpasswd {self.path} is not a readable file")
            return
        entries: Dict[str, _HtpasswdEntry] = {}
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if not sep or not user:
                self._note(f"{self.path}:{number}: not USER:HASH; ignored")
                continue
            entry = _HtpasswdEntry(user, stored.strip())
            if entry.refused:
                self._note(f"{self.path}:{number}: user {user} cannot log in: "
                           f"{entry.refused}")
            entries[user] = entry
        costs = [e.cost for e in entries.values() if e.cost]
        with self._lock:
            self._entries, self._signature = entries, signature
            self._verified.clear()
            self._dummy_cost = costs[0] if costs else 5

    def allowed(self, client: str) -> bool:
        """Tell whether a client may try a password now (not over the failure limit)."""
        now = self._clock()
        with self._lock:
            recent = [t for t in self._failures.pop(client, []) if now - t < 60.0]
            if recent:  # a client whose failures aged out is forgotten
                self._failures[client] = recent
            return len(recent) < _FAILURES_PER_MINUTE

    def verify(self, client: str, user: str, password: str) -> bool:
        """Tell whether ``user``'s password is ``password`` (a failure is counted)."""
        import hmac
        self._reload()
        secret = password.encode("utf-8", "surrogateescape")
        keyed = hmac.new(self._secret, user.encode("utf-8", "surrogateescape") + b"\0" +
                         secret, hashlib.sha256).digest()
        with self._lock:
            entry = self._entries.get(user)
            known = self._verified.get(user)
        now = self._clock()
        if entry is not None and known is not None and known[2] == entry.stored and \
                now < known[1] and hmac.compare_digest(known[0], keyed):
            return True
        if entry is None or entry.refused:
            # The same work as a wrong password: no timing tells who exists.
            _bcrypt_hash(secret, self._dummy_cost, b"\0" * 16)
            ok = False
        else:
            ok = entry.check(secret)
        with self._lock:
            if ok:
                self._verified[user] = (keyed, now + _VERIFIED_TTL_S, entry.stored)
            else:
                self._failures.setdefault(client, []).append(now)
        return ok


# =============================================================================
# 48. SERVE: upload sessions and request bodies
# =============================================================================
# An upload session's bytes go to uploads/<id> inside the store (flocked by
# each request that appends); its state travels in the Location the client
# follows, signed with the store's own key (uploads/.key), as distribution
# does: a session survives a restart of the server, and nobody can name a
# session of another repository.  A blob becomes visible only on a verified
# commit: the digest of all its bytes (hashed as they came, or from the file
# after a restart) must be the one the final PUT names.

_UPLOAD_SESSION_MAX_AGE_S = 24 * 3600.0
_SERVE_PIECE_BYTES = 1024 * 1024
_MAX_DRAIN_BYTES = 1024 * 1024  # a refused request's body read to keep its connection
_MAX_CHUNK_LINE_BYTES = 1024


class _ApiError(Exception):
    """A distribution-spec error answer: status, code, message (and headers)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Optional[Mapping[str, str]] = None,
                 details: Sequence[Any] = (None,)) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.details = list(details)  # one error entry each (distribution: one per blob)


class _BodyReader:
    """A request's body: ``Content-Length`` bytes, or ``Transfer-Encoding: chunked``
    (podman and buildah send PATCH bodies so); ``read`` returns b"" at its end."""

    def __init__(self, rfile: BinaryIO, length: Optional[int], chunked: bool) -> None:
        self._rfile = rfile
        # read1: what has arrived, so that a client that stalls loses nothing it sent
        self._read = getattr(rfile, "read1", rfile.read)
        self._left = length or 0
        self._chunked = chunked
        self._chunk_left = 0
        self.done = not chunked and not self._left

    def read(self, size: int = _SERVE_PIECE_BYTES) -> bytes:
        if self.done:
            return b""
        if not self._chunked:
            data = self._read(min(size, self._left))
            if not data:
                raise _ApiError(400, "BLOB_UPLOAD_INVALID", "the request body ended early")
            self._left -= len(data)
            self.done = not self._left
            return data
        if not self._chunk_left:
            line = self._rfile.readline(_MAX_CHUNK_LINE_BYTES)
            try:
                self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ApiError(400, "BLOB_UPLOAD_INVALID", "malformed chunked body") from None
            if self._chunk_left == 0:
                while self._rfile.readline(_MAX_CHUNK_LINE_BYTES) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return b""
        data = self._read(min(size, self._chunk_left))
        if not data:
            raise _ApiError(400, "BLOB_UPLOAD_INVALID", "the request body ended early")
        self._chunk_left -= len(data)
        if not self._chunk_left:
            self._rfile.readline(_MAX_CHUNK_LINE_BYTES)  # the CRLF after a chunk
        return data

    def read_all(self, limit_bytes: int) -> bytes:
        """Return the whole body; a SIZE_INVALID error when it is over ``limit_bytes``."""
        if not self._chunked and self._left > limit_bytes + _MAX_DRAIN_BYTES:
            # Too large to drain after the answer: refused before it is read (a body
            # just over the limit is read, so the connection survives the refusal).
            raise _ApiError(413, "SIZE_INVALID", f"over the {limit_bytes}-byte limit")
        parts, total = [], 0
        while True:
            data = self.read()
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit_bytes:
                raise _ApiError(413, "SIZE_INVALID", f"over the {limit_bytes}-byte limit")
            parts.append(data)

    def drain(self, limit_bytes: int) -> bool:
        """Read and drop what is left (up to ``limit_bytes``); tell whether it all went."""
        total = 0
        try:
            while not self.done and total <= limit_bytes:
                total += len(self.read())
        except (_ApiError, OSError):
            return False
        return self.done


class _UploadSessions:
    """The upload sessions of a store (see above)."""

    def __init__(self, store: "LocalRegistry") -> None:
        self.store = store
        self.directory = os.path.join(store.root, "uploads")
        self._key: Optional[bytes] = None
        self._lock = threading.Lock()
        self._hashers: Dict[str, Tuple[int, Any]] = {}  # id -> (bytes hashed, hasher)
        self._session_locks: Dict[str, threading.Lock] = {}

    def key(self) -> bytes:
        """Return the store's signing key, made (0600) on first use."""
        with self._lock:
            if self._key is None:
                path = os.path.join(self.directory, ".key")
                existing = _read_regular_file(path, 64)
                if existing is None or len(existing) != 32:
                    os.makedirs(self.directory, exist_ok=True)
                    _atomic_write(path, os.urandom(32), mode=0o600)
                    existing = _read_regular_file(path, 64)
                self._key = existing
            assert self._key is not None
            return self._key

    def _path(self, session_id: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{32}", session_id):
            raise _ApiError(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
        return os.path.join(self.directory, session_id)

    def _sign(self, text: str) -> str:
        import hmac
        return hmac.new(self.key(), text.encode(), hashlib.sha256).hexdigest()

    def state(self, name: str, session_id: str, started: int) -> str:
        """Return the signed state of a session, for its Location's ``_state``."""
        body = base64.urlsafe_b64encode(json.dumps(
            {"n": name, "i": session_id, "t": started}, sort_keys=True).encode()).decode()
        return f"{body.rstrip('=')}.{self._sign(body.rstrip('='))}"

    def check(self, name: str, session_id: str, state: str) -> int:
        """Return a session's start time; BLOB_UPLOAD_UNKNOWN unless its state is one we
        signed, for this repository, not stale, and its file is there."""
        import hmac
        unknown = _ApiError(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
        body, _, signature = state.partition(".")
        if not hmac.compare_digest(self._sign(body), signature):
            raise unknown
        try:
            fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, TypeError):
            raise unknown from None
        if fields.get("n") != name or fields.get("i") != session_id or \
                not isinstance(fields.get("t"), int) or \
                time.time() - fields["t"] > _UPLOAD_SESSION_MAX_AGE_S or \
                not os.path.isfile(self._path(session_id)):
            raise unknown
        return int(fields["t"])

    def start(self) -> Tuple[str, int]:
        """Open a session: its id and start time."""
        os.makedirs(self.directory, exist_ok=True)
        self._sweep()
        session_id = os.urandom(16).hex()
        with open(self._path(session_id), "xb"):
            pass
        return session_id, int(time.time())

    def _sweep(self) -> None:
        """Remove the files of sessions older than the longest a session may live."""
        cutoff = time.time() - _UPLOAD_SESSION_MAX_AGE_S
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            if re.fullmatch(r"[0-9a-f]{32}", entry.name):
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def size(self, session_id: str) -> int:
        """Return how many bytes a session holds."""
        try:
            return os.path.getsize(self._path(session_id))
        except OSError:
            raise _ApiError(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown") from None

    def _session_lock(self, session_id: str) -> threading.Lock:
        with self._lock:
            return self._session_locks.setdefault(session_id, threading.Lock())

    def append(self, session_id: str, body: _BodyReader, start: Optional[int]) -> int:
        """Append a request body to a session (at ``start``, when the client says where:
        416 with the session's Range when that is not its end); return its new size."""
        with self._session_lock(session_id), \
                open(self._path(session_id), "ab") as f:
            if not _try_flock(f.fileno()):
                raise _ApiError(416, "BLOB_UPLOAD_INVALID", "another request is writing "
                                "this upload")
            size = os.fstat(f.fileno()).st_size
            if start is not None and start != size:
                raise _ApiError(416, "BLOB_UPLOAD_INVALID",
                                f"chunk starts at {start}, the upload holds {size} bytes",
                                {"Range": f"0-{max(size - 1, 0)}"})
            with self._lock:
                hashed, hasher = self._hashers.get(session_id, (0, hashlib.sha256()))
            if hashed != size:
                hasher = None  # written elsewhere: hashed again from the file at the end
            while True:
                data = body.read()
                if not data:
                    break
                f.write(data)
                size += len(data)
                if hasher is not None:
                    hasher.update(data)
                if size > MAX_BLOB_SIZE_BYTES:
                    raise _ApiError(413, "SIZE_INVALID", "blob too large")
            f.flush()
            with self._lock:
                if hasher is not None:
                    self._hashers[session_id] = (size, hasher)
                else:
                    self._hashers.pop(session_id, None)
            return size

    def commit(self, session_id: str, digest: str, media_type: str = "") -> None:
        """Publish a session's bytes as blob ``digest`` (DIGEST_INVALID, and the session
        gone, when they are not)."""
        path = self._path(session_id)
        with self._session_lock(session_id):
            algorithm = digest.split(":", 1)[0]
            with self._lock:
                hashed, hasher = self._hashers.pop(session_id, (-1, None))
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if hasher is None or hashed != size or algorithm != "sha256":
                    hasher = hashlib.new(algorithm)
                    for piece in iter(lambda: f.read(_SERVE_PIECE_BYTES), b""):
                        hasher.update(piece)
                os.fsync(f.fileno())
            actual = f"{algorithm}:{hasher.hexdigest()}"
            if actual != digest:
                self.cancel(session_id)
                raise _ApiError(400, "DIGEST_INVALID",
                                f"the upload's digest is {actual}, not {digest}")
            if self.store.has_blob(digest):
                self.cancel(session_id)
                return
            self.store.cache.adopt(path, digest, media_type)
            with self._lock:
                self._session_locks.pop(session_id, None)

    def cancel(self, session_id: str) -> bool:
        """Drop a session; tell whether it was there."""
        with self._lock:
            self._hashers.pop(session_id, None)
            self._session_locks.pop(session_id, None)
        try:
            os.unlink(self._path(session_id))
        except FileNotFoundError:
            return False
        return True


# =============================================================================
# 49. SERVE: the pull-through mirror (upstreams, tags kept for a TTL, single-flight blobs)
# =============================================================================
# With ``--upstream``, reads the store cannot answer go to the upstream
# registry through the puller's client (its auth, retries, verification), and
# what comes back is stored under the upstream's name (a pull of
# library/alpine through a mirror of docker.io is local:docker.io/library/alpine
# afterwards).  A tag is resolved upstream by HEAD, at most once per TTL; with
# the upstream down, rate-limiting or failing, the stored tag is served with a
# Warning header that says it may be stale.  A blob the store lacks is
# downloaded once (a flight): every client that asks for it meanwhile reads
# the same spool file as it fills; the last byte is held back until the digest
# checks out, so a download that fails verification cuts its readers off
# short, and only a verified file is adopted into the store.

DEFAULT_UPSTREAM_TTL_S = 60.0
_MAX_FLIGHTS = 64
# Readers of a flight are woken once per this many bytes (and at its end): a
# wake-up per socket read would have them wrestle the downloader for the GIL.
_FLIGHT_NOTIFY_BYTES = 1024 * 1024
# A client waits for the stale answer: no retry upstream (a blob download still
# resumes), and an upstream that failed is not asked again for a few seconds.
_MIRROR_RETRIES = 0
_UPSTREAM_DOWN_S = 5.0
_MIRROR_TAGS_MAX = 100_000
_MIRROR_CLIENTS_MAX = 256
_MIRROR_SIZES_MAX = 100_000
_STALE_WARNING = '110 zlayer-registry "Response is Stale"'
# What an upstream's answer can fail with, beyond "not found".
_UPSTREAM_ERRORS = (RegistryError, ManifestError, DigestMismatchError, _HttpError, OSError)
_UPSTREAM_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?")


class _Upstream:
    """A registry behind the mirror.

    ``host`` is what containerd's ``?ns=`` names and what prefixes the
    store's repositories (``docker.io``); ``registry`` is the host the client
    talks to (``docker.io`` for Docker Hub, whose API host follows).
    """

    def __init__(self, host: str, registry: str, insecure: bool) -> None:
        self.host, self.registry, self.insecure = host, registry, insecure
        self.prefix = host.replace(":", "-")  # a repository path component

    @classmethod
    def parse(cls, text: str) -> "_Upstream":
        """Parse ``URL`` or ``HOST=URL`` (URL: ``[http[s]://]host[:port]``)."""
        host, sep, url = text.partition("=")
        if not sep:
            host, url = "", text
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "", url
        elif scheme.lower() not in ("http", "https"):
            raise ZLayerError(f"upstream {text!r}: the scheme is http or https, not {scheme!r}")
        registry = rest.rstrip("/").lower()
        if "/" in registry or not _UPSTREAM_HOST_RE.fullmatch(registry):
            raise ZLayerError(f"upstream {text!r} is not a registry (host[:port], or "
                              "HOST=URL)")
        if registry in ("registry-1.docker.io", "index.docker.io"):
            registry = _DOCKER_HUB
        host = host.strip().lower() or registry
        if not _UPSTREAM_HOST_RE.fullmatch(host):
            raise ZLayerError(f"upstream {text!r}: {host!r} is not a host name")
        return cls(host, registry, scheme.lower() == "http" and not _is_loopback_host(registry))

    def __repr__(self) -> str:
        return f"_Upstream({self.host!r}, {self.registry!r})"


class _BlobFlight:
    """One upstream download of a blob that every client asking for it reads.

    The downloader reports each attempt's spool file (``begin``), the bytes
    in it (``publish``), that they match the digest (``verify``: readers may
    send the last byte, while the file is synced and stored) and the end
    (``end``: None when the blob is stored).  Readers ``wait`` for more than
    they have sent.
    """

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.size: Optional[int] = None
        self.attempt = 0
        self.path: Optional[str] = None
        self.available = 0
        self._notified = 0
        self.verified = False
        self.finished = False
        self.error: Optional[BaseException] = None
        self._cond = threading.Condition()

    def begin(self, path: str) -> None:
        """A new attempt writes ``path`` from byte 0."""
        with self._cond:
            self.attempt += 1
            self.path, self.available, self._notified = path, 0, 0
            self._cond.notify_all()

    def publish(self, available: int) -> None:
        """The spool file holds ``available`` bytes."""
        with self._cond:
            self.available = available
            if available - self._notified >= _FLIGHT_NOTIFY_BYTES:
                self._notified = available
                self._cond.notify_all()

    def verify(self) -> None:
        """The spool file holds the whole blob, and it matches its digest."""
        with self._cond:
            self.verified = True
            self._cond.notify_all()

    def end(self, error: Optional[BaseException]) -> None:
        """The download is over: verified and stored (None), or failed."""
        with self._cond:
            self.finished, self.error = True, error
            self._cond.notify_all()

    def wait_end(self) -> None:
        """Wait until the blob is stored or the download failed."""
        with self._cond:
            while not self.finished:
                self._cond.wait(1.0)

    def wait(self, sent: int, attempt: int, want: Optional[int] = None
             ) -> Tuple[int, Optional[str], int, bool]:
        """Wait until attempt ``attempt`` has more than ``want`` bytes (default:
        ``sent``), or more than ``sent`` for a tenth of a second (a slow upstream's
        bytes still flow), a new attempt, the digest checked or the end; return
        (attempt, path, available, whether the digest checked out or it ended)."""
        want = sent if want is None else want
        with self._cond:
            while not self.finished and not self.verified and self.attempt == attempt \
                    and self.available <= want:
                if not self._cond.wait(0.1) and self.available > sent:
                    break
            return self.attempt, self.path, self.available, self.finished or self.verified


class _FlightWriter(BlobWriter):
    """A blob writer that spools into the cache's ``tmp/`` with plain writes (readers
    follow the file) and, once verified, has the cache adopt the file."""

    def __init__(self, cache: DirectoryBlobCache, flight: _BlobFlight, digest: str,
                 size: Optional[int], media_type: str) -> None:
        super().__init__(digest, size)
        self._cache, self._flight, self._media_type = cache, flight, media_type
        self._stem = digest.split(":", 1)[1][:16]
        self._fd: Optional[int]
        self._fd, self._path = cache.create_temporary(self._stem)
        flight.begin(self._path)

    def _sink_write(self, data: Any) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot write {self.subject} to cache {self._cache.root}: "
                             f"{exc.strerror or exc}") from exc
        self._flight.publish(self.offset)

    def _sink_truncate(self) -> None:
        # The upstream sends the whole blob again: for the readers, a new attempt.
        self._close()
        os.unlink(self._path)
        self._fd, self._path = self._cache.create_temporary(self._stem)
        self._flight.begin(self._path)

    def check(self, digest: Optional[str] = None) -> None:
        """Verify; the readers may then have the last byte (syncing follows)."""
        super().check(digest)
        self._flight.verify()

    def _sink_commit(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise CacheError(f"cannot store {self.subject}: {exc.strerror or exc}") from exc
        self._close()
        try:
            self._cache.adopt(self._path, str(self.digest), self._media_type)
        except CacheError:
            self._sink_abort()
            raise

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _sink_abort(self) -> None:
        self._close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class _FlightSink:
    """What the fetcher writes a flight's blob into (its ``begin_write``)."""

    def __init__(self, cache: DirectoryBlobCache, flight: _BlobFlight) -> None:
        self.cache, self.flight = cache, flight
        self.read_only = False

    def begin_write(self, digest: str, size: Optional[int], media_type: str = ""
                    ) -> BlobWriter:
        """Start an attempt at the flight's blob."""
        return _FlightWriter(self.cache, self.flight, digest, size, media_type)


class _Mirror:
    """The upstream side of a pull-through mirror: manifests by tag (with a TTL) and
    digest, blobs in single flight, tags and referrers passed through."""

    def __init__(self, store: LocalRegistry, upstreams: Sequence[str], ttl_s: float,
                 note: Callable[[str], None], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 environ: Optional[Mapping[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not upstreams:
            raise ValueError("a mirror needs an upstream")
        self.upstreams = [_Upstream.parse(text) for text in upstreams]
        hosts = [u.host for u in self.upstreams]
        if len(set(hosts)) != len(hosts):
            raise ZLayerError("two upstreams have the same host: name them HOST=URL")
        self.store, self.ttl_s, self._note, self._clock = store, ttl_s, note, clock
        self._environ = os.environ if environ is None else environ
        self._session = _Session(max_workers=1, insecure=False, timeout_s=timeout_s,
                                 retries=_MIRROR_RETRIES, environ=self._environ,
                                 sleep=time.sleep, clock=time.time, ssl_context=None)
        self._lock = threading.Lock()
        self._clients: "OrderedDict[Tuple[str, str], _RegistryClient]" = OrderedDict()
        self._auths: Dict[str, RegistryAuth] = {}
        self._sizes: "OrderedDict[Tuple[str, str, str], int]" = OrderedDict()
        self._tags: Dict[Tuple[str, str], Tuple[str, float]] = {}
        self._tag_locks: Dict[Tuple[str, str], threading.Lock] = {}
        self._down_until: Dict[str, float] = {}
        self._flights: Dict[Tuple[str, str, str], _BlobFlight] = {}
        self._threads: List[threading.Thread] = []
        self._cancel = threading.Event()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the downloads under way (waiting up to ``wait_s``) and close the
        upstream connections."""
        self._cancel.set()
        deadline = time.monotonic() + wait_s
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        self._session.close()

    def describe(self) -> str:
        """Name the upstreams (for the server's first line)."""
        return ", ".join(u.host if u.host == u.registry else f"{u.host}={u.registry}"
                         for u in self.upstreams)

    # -- which upstream, which repository ------------------------------------------

    def upstream(self, query: Mapping[str, str]) -> _Upstream:
        """Return the upstream containerd's ``?ns=`` names, else the first one."""
        ns = query.get("ns")
        if ns is None:
            return self.upstreams[0]
        for upstream in self.upstreams:
            if upstream.host == ns.strip().lower() or upstream.registry == ns.strip().lower():
                return upstream
        raise _ApiError(404, "NAME_UNKNOWN", f"this mirror has no upstream for {ns[:200]!r}")

    @staticmethod
    def repository(upstream: _Upstream, name: str) -> str:
        """Return the store's repository for ``name`` of ``upstream``."""
        return _validate_repository(f"{upstream.prefix}/{name}")

    def client(self, upstream: _Upstream, name: str) -> _RegistryClient:
        """Return (and keep) the client of ``name`` at ``upstream``."""
        key = (upstream.host, name)
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
        repository = name if upstream.registry != _DOCKER_HUB or "/" in name else f"library/{name}"
        reference = Reference(upstream.registry, repository)
        auth = self._auths.get(upstream.host)
        if auth is None:  # once per upstream: a credential helper is a process
            auth = self._auths[upstream.host] = RegistryAuth.from_docker_config(
                upstream.registry, environ=self._environ)
        client = self._session.client(reference, auth, insecure=upstream.insecure)
        with self._lock:
            self._clients[key] = client
            while len(self._clients) > _MIRROR_CLIENTS_MAX:
                self._clients.popitem(last=False)
        return client

    # -- manifests ----------------------------------------------------------------

    def manifest(self, upstream: _Upstream, name: str, reference: str
                 ) -> Tuple[Manifest, bool]:
        """Return the manifest a tag or digest names upstream, and whether it is a
        stored one served because the upstream failed (stale)."""
        repository = self.repository(upstream, name)
        with self._tag_lock(repository, reference):
            if ":" in reference:
                manifest = self.store.get_manifest(repository, _validate_digest(reference))
                if manifest is None:
                    manifest = self._fetch(upstream, name, reference)
                    self.store.put_mirrored(repository, None, manifest)
                stale = False
            else:
                manifest, stale = self._manifest_by_tag(upstream, name, repository, reference)
        self._learn_sizes(upstream, name, manifest)
        return manifest, stale

    def _tag_lock(self, repository: str, reference: str) -> threading.Lock:
        """One resolution of a tag at a time (eight clients asking: one HEAD)."""
        with self._lock:
            if len(self._tag_locks) > _MIRROR_CLIENTS_MAX * 4:
                for key in [k for k, lock in self._tag_locks.items() if not lock.locked()]:
                    del self._tag_locks[key]
            return self._tag_locks.setdefault((repository, reference), threading.Lock())

    def _manifest_by_tag(self, upstream: _Upstream, name: str, repository: str, tag: str
                         ) -> Tuple[Manifest, bool]:
        known = self._tags.get((repository, tag))
        if known is not None and self._clock() - known[1] < self.ttl_s:
            manifest = self.store.get_manifest(repository, known[0])
            if manifest is not None:
                return manifest, False
        stored_digest = self.store.resolve(repository, tag)
        if stored_digest is not None and self._clock() < self._down_until.get(upstream.host, 0):
            stored = self.store.get_manifest(repository, stored_digest)
            if stored is not None:  # the upstream failed a moment ago: not asked again
                return stored, True
        client = self.client(upstream, name)
        try:
            # A tag stored already is checked with a HEAD (which Docker Hub does
            # not count against the pull quota); a new one is fetched at once.
            digest = client.head_manifest(tag) if stored_digest else None
            manifest = self.store.get_manifest(repository, digest) if digest else None
            if manifest is None:
                manifest = client.get_manifest(tag)
        except NotFoundError:
            self._tags.pop((repository, tag), None)
            self.store.delete_tag(repository, tag)  # gone upstream: gone here
            raise _ApiError(404, "MANIFEST_UNKNOWN",
                            f"manifest {name}:{tag} is not known upstream") from None
        except _UPSTREAM_ERRORS as exc:
            self._down_until[upstream.host] = self._clock() + _UPSTREAM_DOWN_S
            stored = self.store.get_manifest(repository, tag)
            if stored is None:
                raise self._unavailable(upstream, exc) from None
            self._note(f"upstream {upstream.host} failed ({exc}); serving the stored "
                       f"{repository}:{tag}, which may be stale")
            self._tags.pop((repository, tag), None)
            return stored, True
        self._down_until.pop(upstream.host, None)
        if self.store.resolve(repository, tag) != manifest.digest:
            self.store.put_mirrored(repository, tag, manifest)
        if len(self._tags) >= _MIRROR_TAGS_MAX:
            self._tags.clear()  # asked again after a HEAD each: a bound, not a loss
        self._tags[(repository, tag)] = (manifest.digest, self._clock())
        return manifest, False

    def _fetch(self, upstream: _Upstream, name: str, digest: str) -> Manifest:
        try:
            return self.client(upstream, name).get_manifest(digest)
        except NotFoundError:
            raise _ApiError(404, "MANIFEST_UNKNOWN",
                            f"manifest {name}@{digest} is not known upstream") from None
        except _UPSTREAM_ERRORS as exc:
            raise self._unavailable(upstream, exc) from None

    def _unavailable(self, upstream: _Upstream, exc: BaseException) -> _ApiError:
        """Return the answer for what the upstream could not give; the log gets the
        details (the mirror's clients are not told about its credentials)."""
        self._note(f"upstream {upstream.host} failed: {exc}")
        if isinstance(exc, RateLimitedError):
            return _ApiError(429, "TOOMANYREQUESTS", f"upstream {upstream.host} is "
                             "rate-limiting this mirror", {"Retry-After": str(int(
                                 exc.retry_after_s or 60))})
        status = getattr(exc, "status", None)
        return _ApiError(503, "UNAVAILABLE", f"upstream {upstream.host} cannot serve it now"
                         f"{f' (it answered {status})' if status else ''}; see the log")

    def _learn_sizes(self, upstream: _Upstream, name: str, manifest: Manifest) -> None:
        """Keep the sizes a manifest gives its blobs: a blob's flight needs one (a
        manifest vouches for its own repository's blobs only)."""
        with self._lock:
            for child in manifest.children:
                if child is not None:
                    self._sizes[(upstream.host, name, child.digest)] = child.size
            while len(self._sizes) > _MIRROR_SIZES_MAX:
                self._sizes.popitem(last=False)

    # -- blobs --------------------------------------------------------------------

    def blob_size(self, upstream: _Upstream, name: str, digest: str) -> int:
        """Return a blob's size: from a manifest served, else a HEAD upstream."""
        with self._lock:
            size = self._sizes.get((upstream.host, name, digest))
        if size is not None:
            return size
        client = self.client(upstream, name)
        try:
            response = client.request("HEAD", f"/v2/{client.repository}/blobs/{digest}")
        except NotFoundError:
            raise _ApiError(404, "BLOB_UNKNOWN", f"blob {digest} is not known upstream"
                            ) from None
        except _UPSTREAM_ERRORS as exc:
            raise self._unavailable(upstream, exc) from None
        response.close()
        length = response.header("Content-Length")
        if not length.isdigit():
            raise self._unavailable(upstream, RegistryError(
                "its answer to a blob HEAD has no Content-Length"))
        return int(length)

    def flight(self, upstream: _Upstream, name: str, digest: str) -> _BlobFlight:
        """Return the download of a blob under way (from that repository of that
        upstream), starting it if there is none."""
        key = (upstream.host, name, digest)
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight
            if len(self._flights) >= _MAX_FLIGHTS:
                raise _ApiError(429, "TOOMANYREQUESTS", "too many blobs on their way from "
                                "upstream", {"Retry-After": "1"})
            flight = self._flights[key] = _BlobFlight(digest)
            thread = threading.Thread(target=self._fly, args=(flight, upstream, name),
                                      name="zlayer-mirror", daemon=True)
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had
            self._landed(key, flight, thread, exc)
            raise _ApiError(503, "UNAVAILABLE", "this mirror is out of threads",
                            {"Retry-After": "1"}) from None
        return flight

    def _landed(self, key: Tuple[str, str, str], flight: _BlobFlight,
                thread: threading.Thread, error: Optional[BaseException]) -> None:
        with self._lock:
            self._flights.pop(key, None)
            if thread in self._threads:
                self._threads.remove(thread)
        flight.end(error)

    def _fly(self, flight: _BlobFlight, upstream: _Upstream, name: str) -> None:
        error: Optional[BaseException] = None
        try:
            if not self.store.has_blob(flight.digest):
                flight.size = self.blob_size(upstream, name, flight.digest)
                fetcher = _Fetcher(cast(BlobStore, _FlightSink(self.store.cache, flight)),
                                   self._session.pool, DEFAULT_RETRIES, None)
                fetcher.stream_blob(_RegistrySource(self.client(upstream, name)),
                                    Descriptor("application/octet-stream", flight.digest,
                                               flight.size), self._cancel)
        except BaseException as exc:  # the readers report it; the server goes on
            error = exc
            if not isinstance(exc, (_ApiError, ZLayerError, _Cancelled)):
                self._note(f"error: mirroring {flight.digest}: {exc.__class__.__name__}: {exc}")
        finally:
            self._landed((upstream.host, name, flight.digest), flight,
                         threading.current_thread(), error)

    def flight_error(self, upstream: _Upstream, flight: _BlobFlight) -> _ApiError:
        """Return the answer for a flight that failed before a byte was sent."""
        error = flight.error
        if isinstance(error, _ApiError):
            return error
        if isinstance(error, NotFoundError):
            return _ApiError(404, "BLOB_UNKNOWN", f"blob {flight.digest} is not known upstream")
        if isinstance(error, DigestMismatchError):
            return _ApiError(502, "UNKNOWN", f"upstream {upstream.host} sent blob "
                             f"{flight.digest} with the wrong content ({error})")
        return self._unavailable(upstream, error or RegistryError("no answer"))

    # -- listings -------------------------------------------------------------------

    def tags(self, upstream: _Upstream, name: str, query: Mapping[str, str]
             ) -> Optional[Tuple[bytes, str]]:
        """Return the upstream's tags/list answer (body, Link), None when it fails."""
        from urllib.parse import urlencode
        client = self.client(upstream, name)
        wanted = {k: query[k] for k in ("n", "last") if k in query}
        path = f"/v2/{client.repository}/tags/list" + (f"?{urlencode(wanted)}" if wanted else "")
        try:
            response = client.request("GET", path)
            with response:
                body = _read_capped(response, MAX_MANIFEST_SIZE_BYTES + 1)
            if len(body) > MAX_MANIFEST_SIZE_BYTES:
                raise RegistryError(f"its tag list is over {MAX_MANIFEST_SIZE_BYTES} bytes")
        except NotFoundError:
            raise _ApiError(404, "NAME_UNKNOWN", f"repository {name} is not known upstream"
                            ) from None
        except _UPSTREAM_ERRORS as exc:
            self._note(f"upstream {upstream.host} failed ({exc}); listing the stored tags")
            return None
        link = response.header("Link")  # the next page, on this server
        return body, re.sub(r"^<[^>?]*", f"</v2/{name}/tags/list", link) if link else ""

    def referrers(self, upstream: _Upstream, name: str, digest: str) -> List[Descriptor]:
        """Return the upstream's referrers of ``digest`` (those stored, when it fails)."""
        try:
            return self.client(upstream, name).referrers(digest)
        except NotFoundError:
            return []
        except _UPSTREAM_ERRORS as exc:
            self._note(f"upstream {upstream.host} failed ({exc}); listing stored referrers")
            return self.store.referrers(self.repository(upstream, name), digest)


# =============================================================================
# 50. SERVE: RegistryServer, the distribution API over the local registry
# =============================================================================
# distribution-spec 1.1, as distribution answers it: errors in the spec's
# {"errors": [{code, message, detail}]} form; every answer with a
# Content-Length (keep-alive) and Docker-Distribution-API-Version; a request
# answered before its body was read has the body drained (or the connection
# closed), so that the next request on that connection is read whole.

_API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
_SERVE_TIMEOUT_S = 60.0
_DEFAULT_MAX_UPLOADS = 32
_PAGE_DEFAULT = 1000


def _error_status(exc: ZLayerError) -> _ApiError:
    """Map a store's refusal to the distribution-spec error it is."""
    if isinstance(exc, ManifestBlobUnknownError):
        return _ApiError(400, "MANIFEST_BLOB_UNKNOWN", str(exc), details=[
            {"digest": digest} for digest in exc.digests])
    if isinstance(exc, (DigestMismatchError, InvalidDigestError)):
        return _ApiError(400, "DIGEST_INVALID", str(exc))
    if isinstance(exc, ManifestError):
        return _ApiError(400, "MANIFEST_INVALID", str(exc))
    if isinstance(exc, InvalidReferenceError):
        return _ApiError(400, "TAG_INVALID" if "tag" in exc.reason else "NAME_INVALID",
                         str(exc))
    return _ApiError(500, "UNKNOWN", "the store failed; see the server's log")


class RegistryServer:
    """Serves a LocalRegistry over the OCI distribution API (distribution-spec 1.1).

    Threads, one per connection, with keep-alive; blobs go out with
    ``sendfile``.  ``read_only`` answers 405 to every write; ``log`` (a text
    stream, None for none) gets one access line per request (JSON with
    ``json_log``); at most ``max_uploads`` requests write at once (429
    beyond).  ``tls_cert``/``tls_key`` (PEM files) serve https: each
    connection's handshake runs in its own thread, bounded by the timeout.
    ``htpasswd`` (a file) asks every request for basic credentials; without
    TLS that is refused on a non-loopback address unless ``insecure_http``.
    ``upstreams`` (``URL`` or ``HOST=URL`` each) make it a pull-through
    mirror of those registries, tags resolved upstream at most once per
    ``upstream_ttl_s``; a mirror takes no pushes.  ``gc_interval_s``
    collects garbage that often while serving (sparing blobs younger than
    ``gc_grace_s``: an upload's blobs wait for their manifest).
    ``start()`` serves from a thread, ``serve_forever()`` from this one;
    ``shutdown()`` stops taking connections and waits for the requests under way.
    """

    def __init__(self, store: LocalRegistry, host: str = "127.0.0.1", port: int = 5000, *,
                 read_only: bool = False, log: Any = None, json_log: bool = False,
                 max_uploads: int = _DEFAULT_MAX_UPLOADS,
                 timeout_s: float = _SERVE_TIMEOUT_S, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, htpasswd: Optional[str] = None,
                 insecure_http: bool = False, upstreams: Sequence[str] = (),
                 upstream_ttl_s: float = DEFAULT_UPSTREAM_TTL_S,
                 gc_interval_s: Optional[float] = None,
                 gc_grace_s: float = DEFAULT_GC_GRACE_S) -> None:
        import http.server
        import socket
        self.tls = _server_tls_context(tls_cert, tls_key)
        if htpasswd is not None and self.tls is None and not insecure_http and \
                not _is_loopback_host(host):
            raise ZLayerError(f"basic credentials would cross the network unencrypted on "
                              f"{host}: give --tls-cert and --tls-key (or --insecure-http)")
        self._log, self._json_log = log, json_log
        self._log_lock = threading.Lock()
        self.users = _Htpasswd(htpasswd, self._note) if htpasswd is not None else None
        self.store = store
        self.mirror = _Mirror(store, upstreams, upstream_ttl_s, self._note) \
            if upstreams else None
        self.read_only = read_only or store.cache.read_only
        self.sessions = _UploadSessions(store)
        self._uploads = threading.BoundedSemaphore(max_uploads)
        self._busy = 0
        self._busy_lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._gc_interval_s, self._gc_grace_s = gc_interval_s, gc_grace_s
        self._stopping = threading.Event()
        self._gc_thread: Optional[threading.Thread] = None
        handler = _request_handler_class(self, timeout_s)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        tls = self.tls

        class Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            request_queue_size = 128

            def finish_request(self, request: Any, client_address: Any) -> None:
                if tls is not None:  # the handshake, in this connection's thread
                    request.settimeout(timeout_s)
                    try:
                        if request.recv(1, socket.MSG_PEEK) not in (b"\x16", b""):
                            _refuse_plain_http(request)
                            return
                        request = tls.wrap_socket(request, server_side=True)
                    except (OSError, ValueError):
                        request.close()
                        return
                super().finish_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                # socketserver prints a traceback; a client that went away (a reset
                # keep-alive connection at shutdown, on 3.8) is no error at all.
                exc = sys.exc_info()[1]
                if isinstance(exc, OSError):
                    return
                _warn(f"serve: a connection from {client_address[0]} failed: "
                      f"{type(exc).__name__}: {exc}")

        try:
            self._server = Server((host, port), handler)
        except OSError as exc:
            if self.mirror is not None:
                self.mirror.close()
            raise ZLayerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    @property
    def address(self) -> Tuple[str, int]:
        """Return the (host, port) it listens on."""
        return self._server.server_address[0], self._server.server_address[1]

    @property
    def url(self) -> str:
        """Return the base URL clients use."""
        host, port = self.address
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (or an exception: Ctrl-C, SIGTERM)."""
        if self._gc_interval_s and self._gc_thread is None and not self.read_only:
            self._gc_thread = threading.Thread(target=self._collect, name="zlayer-gc",
                                               daemon=True)
            self._gc_thread.start()
        self._server.serve_forever(poll_interval=0.2)

    def _collect(self) -> None:
        """Collect garbage every ``gc_interval_s`` while serving (online: uploads and
        manifest writes go on; the collection lock orders them)."""
        while not self._stopping.wait(self._gc_interval_s):
            try:
                freed = self.store.garbage_collect(self._gc_grace_s)
            except ZLayerError as exc:
                self._note(f"gc failed: {exc}")
                continue
            if freed:
                self._note(f"gc: freed {_format_bytes(freed)}")

    def start(self) -> "RegistryServer":
        """Serve from a background thread; return self."""
        self._thread = threading.Thread(target=self.serve_forever, name="zlayer-serve",
                                        daemon=True)
        self._thread.start()
        return self

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Stop taking connections; wait up to ``wait_s`` for requests under way."""
        self._stopping.set()
        if self._gc_thread is not None:
            self._gc_thread.join()
            self._gc_thread = None
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        deadline = time.monotonic() + wait_s
        with self._busy_lock:
            while self._busy and time.monotonic() < deadline:
                self._busy_lock.wait(deadline - time.monotonic())
        if self.mirror is not None:
            self.mirror.close()

    def __enter__(self) -> "RegistryServer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # -- a request --------------------------------------------------------------

    def handle(self, h: Any) -> None:
        """Answer one request (``h``: the http.server handler)."""
        started = time.monotonic()
        with self._busy_lock:
            self._busy += 1
        h.zl_status, h.zl_sent = 0, 0
        length = h.headers.get("Content-Length")
        chunked = "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()
        try:
            size = int(length) if length is not None and not chunked else None
            if size is not None and size < 0:
                raise ValueError
        except ValueError:
            size, h.close_connection = 0, True
        h.zl_body = _BodyReader(h.rfile, size, chunked)
        h.zl_user = None
        try:
            try:
                if self.users is not None:
                    self._authenticate(h)
                self._route(h)
            except _ApiError as exc:
                self._send_error(h, exc)
            except ZLayerError as exc:
                error = _error_status(exc)
                if error.status == 500:
                    self._note(f"error: {exc}")
                self._send_error(h, error)
            if not h.zl_body.drain(_MAX_DRAIN_BYTES):
                h.close_connection = True
        except Exception as exc:
            h.close_connection = True
            if _is_disconnect(exc):
                return
            # A bug, or the disk (full?): answer 500 and keep serving the others.
            self._note(f"error: {exc.__class__.__name__}: {exc}")
            try:
                self._send_error(h, _ApiError(500, "UNKNOWN", "internal error"))
            except OSError:
                pass
        finally:
            self._access(h, time.monotonic() - started)
            with self._busy_lock:
                self._busy -= 1
                self._busy_lock.notify_all()

    def _authenticate(self, h: Any) -> None:
        """Let the request through with a user's right password, else 401 (429 for a
        client that failed too often in the last minute)."""
        assert self.users is not None
        challenge = {"WWW-Authenticate": 'Basic realm="zlayer-registry"'}
        value = h.headers.get("Authorization") or ""
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            raise _ApiError(401, "UNAUTHORIZED", "authentication required", challenge)
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode(
                "utf-8", "surrogateescape").partition(":")
        except ValueError:
            sep = ""
        if not sep:
            raise _ApiError(401, "UNAUTHORIZED", "malformed basic credentials", challenge)
        client = h.client_address[0] if h.client_address else "-"
        if not self.users.allowed(client):
            raise _ApiError(429, "TOOMANYREQUESTS", "too many failed logins; wait a minute",
                            {"Retry-After": "60"})
        if not self.users.verify(client, user, password):
            raise _ApiError(401, "UNAUTHORIZED", "wrong user name or password", challenge)
        h.zl_user = user

    def _route(self, h: Any) -> None:
        from urllib.parse import parse_qs, urlsplit
        parts = urlsplit(h.path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        method = h.command
        if method in ("PUT", "POST", "PATCH", "DELETE") and (self.read_only or self.mirror):
            raise _ApiError(405, "UNSUPPORTED", "this registry is a pull-through mirror: it "
                            "takes no pushes" if self.mirror else "this registry is read-only",
                            {"Allow": "GET, HEAD"})
        if path in ("/v2", "/v2/"):
            self._send(h, 200, b"{}", "application/json")
            return
        if path == "/v2/_catalog" and method in ("GET", "HEAD"):
            self._catalog(h, query)
            return
        for pattern, handler in self._routes:
            match = re.fullmatch(pattern, path)
            if match:
                name = match.group(1)
                _validate_repository(name)
                getattr(self, handler)(h, method, name, match.group(2), query)
                return
        raise _ApiError(404, "NAME_UNKNOWN" if path.startswith("/v2/") else "UNSUPPORTED",
                        "no such endpoint")

    _routes = (
        (r"/v2/(.+)/blobs/uploads/([^/]*)", "_upload"),
        (r"/v2/(.+)/manifests/([^/]+)", "_manifest"),
        (r"/v2/(.+)/blobs/([^/]+)", "_blob"),
        (r"/v2/(.+)/tags/(list)", "_tags"),
        (r"/v2/(.+)/referrers/([^/]+)", "_referrers"),
    )

    # -- manifests ----------------------------------------------------------------

    def _manifest(self, h: Any, method: str, name: str, reference: str,
                  query: Mapping[str, str]) -> None:
        if method == "PUT":
            body = h.zl_body.read_all(MAX_MANIFEST_SIZE_BYTES)
            digest = self.store.put_manifest(name, reference, body,
                                             h.headers.get("Content-Type") or "")
            headers = {"Location": f"/v2/{name}/manifests/{digest}",
                       "Docker-Content-Digest": digest}
            subject = _loads_json(body).get("subject")
            if isinstance(subject, dict) and isinstance(subject.get("digest"), str):
                headers["OCI-Subject"] = subject["digest"]
            self._send(h, 201, b"", headers=headers)
            return
        if method == "DELETE":
            if ":" in reference:
                found = self.store.delete_manifest(name, reference)
            else:
                found = self.store.delete_tag(name, reference)
            if not found:
                raise self._manifest_unknown(name, reference)
            self._send(h, 202, b"")
            return
        if method not in ("GET", "HEAD"):
            raise _ApiError(405, "UNSUPPORTED", f"{method} on a manifest")
        stale = False
        if self.mirror is not None:
            manifest, stale = self.mirror.manifest(self.mirror.upstream(query), name, reference)
        else:
            found = self.store.get_manifest(name, reference)
            if found is None:
                raise self._manifest_unknown(name, reference)
            manifest = found
        accepted = {v.split(";", 1)[0].strip().lower()
                    for header in h.headers.get_all("Accept") or []
                    for v in header.split(",") if v.strip()}
        if accepted and manifest.media_type not in accepted and not accepted & {
                "*/*", "application/*", "application/json"} and \
                manifest.media_type.startswith("application/vnd.oci."):
            # distribution's answer to a client that does not take OCI manifests
            raise _ApiError(404, "MANIFEST_UNKNOWN", f"{manifest.media_type} is not in the "
                            "Accept header of the request")
        headers = {"Docker-Content-Digest": manifest.digest, "ETag": f'"{manifest.digest}"'}
        if stale:
            headers["Warning"] = _STALE_WARNING
        self._send(h, 200, manifest.raw, manifest.media_type, headers, head=method == "HEAD")

    @staticmethod
    def _manifest_unknown(name: str, reference: str) -> _ApiError:
        # distribution says MANIFEST_UNKNOWN in a repository it does not know too
        return _ApiError(404, "MANIFEST_UNKNOWN", f"manifest {name}:{reference} is not known")

    # -- blobs --------------------------------------------------------------------

    def _blob(self, h: Any, method: str, name: str, digest: str,
              query: Mapping[str, str]) -> None:
        _validate_digest(digest)
        if method == "DELETE":
            if not self.store.has_blob(digest):
                raise _ApiError(404, "BLOB_UNKNOWN", f"blob {digest} is not known")
            if self.store.blob_in_use(digest):
                raise _ApiError(405, "UNSUPPORTED", f"blob {digest} is used by a manifest: "
                                "delete the manifest (gc deletes its blobs)")
            self.store.cache.delete(digest)
            self._send(h, 202, b"")
            return
        if method not in ("GET", "HEAD"):
            raise _ApiError(405, "UNSUPPORTED", f"{method} on a blob")
        path = self.store.cache.path(digest)
        if path is None and self.mirror is not None:
            path = self._mirror_blob(h, method, name, digest, query)
            if path is None:
                return  # answered as it came from upstream
        if path is None:
            raise _ApiError(404, "BLOB_UNKNOWN", f"blob {digest} is not known")
        try:
            f = open(path, "rb")
        except OSError:
            raise _ApiError(404, "BLOB_UNKNOWN", f"blob {digest} is not known") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size - 1
            status = 200
            headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"',
                       "Accept-Ranges": "bytes"}
            wanted = h.headers.get("Range")
            if wanted:
                picked = _parse_range(wanted, size)
                if picked is None:
                    raise _ApiError(416, "BLOB_UNKNOWN", "range not satisfiable",
                                    {"Content-Range": f"bytes */{size}"})
                start, end = picked
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            count = max(end - start + 1, 0)
            self._send_headers(h, status, count, "application/octet-stream", headers)
            if method == "GET" and count:
                h.wfile.flush()
                sent = h.connection.sendfile(f, start, count)
                h.zl_sent = sent
                if sent != count:
                    h.close_connection = True

    def _mirror_blob(self, h: Any, method: str, name: str, digest: str,
                     query: Mapping[str, str]) -> Optional[str]:
        """Answer a blob the store lacks from the upstream; return the stored file's
        path when the answer is to come from it (a Range, or a flight that ended),
        None when it is answered."""
        assert self.mirror is not None
        upstream = self.mirror.upstream(query)
        if method == "HEAD":
            size = self.mirror.blob_size(upstream, name, digest)
            self._send_headers(h, 200, size, "application/octet-stream", {
                "Docker-Content-Digest": digest, "ETag": f'"{digest}"',
                "Accept-Ranges": "bytes"})
            return None
        flight = self.mirror.flight(upstream, name, digest)
        attempt, available, finished = 0, 0, False
        while not finished and not available:  # the first bytes: the upstream answered
            attempt, _, available, finished = flight.wait(0, attempt)
        if h.headers.get("Range") or finished:  # from the store, once it is there
            flight.wait_end()
            path = self.store.cache.path(digest)
            if flight.error is not None or path is None:
                raise self.mirror.flight_error(upstream, flight)
            return path
        self._send_flight(h, flight, attempt)
        return None

    def _send_flight(self, h: Any, flight: _BlobFlight, attempt: int) -> None:
        """Send a blob as its flight brings it, holding the last byte back until the
        download is verified; cut the connection if it is not."""
        size = int(flight.size or 0)
        self._send_headers(h, 200, size, "application/octet-stream", {
            "Docker-Content-Digest": flight.digest, "ETag": f'"{flight.digest}"',
            "Accept-Ranges": "bytes"})
        h.wfile.flush()
        sent, f = 0, None
        try:
            while sent < size:
                # a piece at a time; the last byte waits for the digest check
                if sent < size - 1:
                    now, path, available, finished = flight.wait(
                        sent, attempt, min(sent + _FLIGHT_NOTIFY_BYTES - 1, size - 1))
                else:
                    now, path, available, finished = flight.wait(size, attempt)
                if (finished and flight.error is not None) or (now != attempt and sent):
                    h.close_connection = True  # what was sent is not the blob
                    return
                if f is None or now != attempt:
                    if f is not None:
                        f.close()
                    attempt, f = now, None
                    for candidate in (path, self.store.cache.path(flight.digest)):
                        try:
                            f = open(candidate, "rb") if candidate else None
                        except OSError:
                            continue
                        if f is not None:
                            break
                    if f is None:
                        h.close_connection = True
                        return
                limit = available if finished else min(available, size - 1)
                if limit > sent:
                    count = h.connection.sendfile(f, sent, limit - sent)
                    if not count:
                        h.close_connection = True
                        return
                    sent += count
                    h.zl_sent = sent
        finally:
            if f is not None:
                f.close()

    # -- uploads ------------------------------------------------------------------

    def _upload(self, h: Any, method: str, name: str, session_id: str,
                query: Mapping[str, str]) -> None:
        if method == "POST" and not session_id:
            self._start_upload(h, name, query)
            return
        started = self.sessions.check(name, session_id, query.get("_state", ""))
        if method == "GET":
            self._upload_status(h, 204, name, session_id, started)
        elif method == "DELETE":
            self.sessions.cancel(session_id)
            self._send(h, 204, b"")
        elif method in ("PATCH", "PUT"):
            if not self._uploads.acquire(blocking=False):
                raise _ApiError(429, "TOOMANYREQUESTS", "too many uploads at once",
                                {"Retry-After": "1"})
            try:
                self._write_upload(h, method, name, session_id, started, query)
            finally:
                self._uploads.release()
        else:
            raise _ApiError(405, "UNSUPPORTED", f"{method} on an upload")

    def _start_upload(self, h: Any, name: str, query: Mapping[str, str]) -> None:
        mount = query.get("mount")
        if mount:
            _validate_digest(mount)
            if self.store.has_blob(mount):  # every blob of the store is visible to all
                self._send(h, 201, b"", headers={"Location": f"/v2/{name}/blobs/{mount}",
                                                 "Docker-Content-Digest": mount})
                return
        digest = query.get("digest")
        if digest:  # monolithic: POST ?digest= with the blob as its body
            _validate_digest(digest)
            if not self._uploads.acquire(blocking=False):
                raise _ApiError(429, "TOOMANYREQUESTS", "too many uploads at once",
                                {"Retry-After": "1"})
            try:
                self._store_body(h, digest)
            finally:
                self._uploads.release()
            self._send(h, 201, b"", headers={"Location": f"/v2/{name}/blobs/{digest}",
                                             "Docker-Content-Digest": digest})
            return
        session_id, started = self.sessions.start()
        if not h.zl_body.done:  # a body with no digest: the session's first bytes
            self.sessions.append(session_id, h.zl_body, 0)
        self._upload_status(h, 202, name, session_id, started)

    def _store_body(self, h: Any, digest: str) -> None:
        """Stream a request body into the store as blob ``digest`` (verified)."""
        body = h.zl_body
        with self.store.begin_blob(digest) as writer:
            for data in iter(body.read, b""):
                writer.write(data)
            try:
                writer.commit()
            except DigestMismatchError as exc:
                raise _ApiError(400, "DIGEST_INVALID", str(exc)) from exc

    def _write_upload(self, h: Any, method: str, name: str, session_id: str, started: int,
                      query: Mapping[str, str]) -> None:
        start = None
        content_range = h.headers.get("Content-Range")
        if content_range:
            found = re.fullmatch(r"(?:bytes[ =])?(\d+)-(\d+)(?:/\S+)?", content_range.strip())
            if found is None:
                raise _ApiError(416, "BLOB_UPLOAD_INVALID", "malformed Content-Range",
                                {"Range": self._range(session_id)})
            start = int(found.group(1))
        if not h.zl_body.done or start is not None:
            self.sessions.append(session_id, h.zl_body, start)
        if method == "PATCH":
            self._upload_status(h, 202, name, session_id, started)
            return
        digest = query.get("digest")
        if not digest:
            raise _ApiError(400, "DIGEST_INVALID", "the final PUT names no ?digest=")
        _validate_digest(digest)
        self.sessions.commit(session_id, digest)
        self._send(h, 201, b"", headers={"Location": f"/v2/{name}/blobs/{digest}",
                                         "Docker-Content-Digest": digest})

    def _range(self, session_id: str) -> str:
        return f"0-{max(self.sessions.size(session_id) - 1, 0)}"

    def _upload_status(self, h: Any, status: int, name: str, session_id: str,
                       started: int) -> None:
        from urllib.parse import quote
        state = quote(self.sessions.state(name, session_id, started))
        self._send(h, status, b"", headers={
            "Location": f"/v2/{name}/blobs/uploads/{session_id}?_state={state}",
            "Range": self._range(session_id), "Docker-Upload-UUID": session_id})

    # -- listings -----------------------------------------------------------------

    def _tags(self, h: Any, method: str, name: str, _: str, query: Mapping[str, str]) -> None:
        if method not in ("GET", "HEAD"):
            raise _ApiError(405, "UNSUPPORTED", f"{method} on tags")
        stored = name
        if self.mirror is not None:
            upstream = self.mirror.upstream(query)
            answer = self.mirror.tags(upstream, name, query)
            if answer is not None:
                self._send(h, 200, answer[0], "application/json",
                           {"Link": answer[1]} if answer[1] else None, head=method == "HEAD")
                return
            stored = self.mirror.repository(upstream, name)  # upstream down: what is here
        if not self.store.list_manifests(stored):
            raise _ApiError(404, "NAME_UNKNOWN", f"repository {name} is not known")
        page, link = _paginate(self.store.list_tags(stored), query, f"/v2/{name}/tags/list")
        self._send_json(h, {"name": name, "tags": page}, link, head=method == "HEAD")

    def _catalog(self, h: Any, query: Mapping[str, str]) -> None:
        page, link = _paginate(self.store.list_images(), query, "/v2/_catalog")
        self._send_json(h, {"repositories": page}, link, head=h.command == "HEAD")

    def _referrers(self, h: Any, method: str, name: str, digest: str,
                   query: Mapping[str, str]) -> None:
        if method not in ("GET", "HEAD"):
            raise _ApiError(405, "UNSUPPORTED", f"{method} on referrers")
        _validate_digest(digest)
        wanted = query.get("artifactType")
        if self.mirror is not None:
            found = [d for d in self.mirror.referrers(self.mirror.upstream(query), name, digest)
                     if wanted is None or d.artifact_type == wanted]
        else:
            found = self.store.referrers(name, digest, wanted)
        body = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX,
                           "manifests": [d.to_json() for d in found]}).encode()
        self._send(h, 200, body, MEDIA_TYPE_OCI_INDEX,
                   {"OCI-Filters-Applied": "artifactType"} if wanted else None,
                   head=method == "HEAD")

    # -- answers --------------------------------------------------------------------

    def _send_json(self, h: Any, data: Any, link: Optional[str], head: bool) -> None:
        self._send(h, 200, json.dumps(data).encode(), "application/json",
                   {"Link": link} if link else None, head=head)

    def _send_error(self, h: Any, error: _ApiError) -> None:
        if h.zl_status:  # the answer had begun: all that is left is to hang up
            h.close_connection = True
            return
        body = json.dumps({"errors": [{"code": error.code, "message": error.message,
                                       "detail": detail} for detail in error.details]}).encode()
        self._send(h, error.status, body, "application/json", error.headers,
                   head=h.command == "HEAD")

    def _send(self, h: Any, status: int, body: bytes, content_type: str = "",
              headers: Optional[Mapping[str, str]] = None, head: bool = False) -> None:
        self._send_headers(h, status, len(body), content_type, headers)
        if body and not head:
            h.wfile.write(body)
            h.zl_sent = len(body)

    def _send_headers(self, h: Any, status: int, length: int, content_type: str,
                      headers: Optional[Mapping[str, str]]) -> None:
        h.zl_status = status
        h.send_response(status)
        h.send_header(*_API_VERSION_HEADER)
        if content_type:
            h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()

    def _access(self, h: Any, elapsed_s: float) -> None:
        if self._log is None:
            return
        client = h.client_address[0] if h.client_address else "-"
        path = h.path.split("?", 1)[0]  # the query may hold an upload's signed state
        user = getattr(h, "zl_user", None) or "-"
        if self._json_log:
            line = json.dumps({"time": round(time.time(), 3), "client": client, "user": user,
                               "method": h.command, "path": path, "status": h.zl_status,
                               "bytes": h.zl_sent, "seconds": round(elapsed_s, 4)})
        else:
            line = (f'{client} {user} "{h.command} {path}" {h.zl_status} {h.zl_sent} '
                    f'{elapsed_s:.3f}s')
        self._write_log(line)

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._write_log(json.dumps({"time": round(time.time(), 3), "note": text})
                            if self._json_log else f"zlayer-registry: {text}")

    def _write_log(self, line: str) -> None:
        with self._log_lock:
            try:
                self._log.write(line + "\n")
                self._log.flush()
            except (OSError, ValueError):
                pass


def _refuse_plain_http(sock: Any) -> None:
    """Answer plain http on an https port as Go does (clients, ours too, take it as
    "use https"), once the request's head is read: closing on unread bytes would
    reset the connection and lose the answer."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    sock.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                 b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
    sock.close()


def _server_tls_context(cert: Optional[str], key: Optional[str]) -> Any:
    """Return the server's TLS context for a certificate and key (PEM), or None."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ZLayerError("--tls-cert and --tls-key go together: give both")
    ssl = _import_ssl()
    if ssl is None:
        raise ZLayerError("this Python has no ssl module: it cannot serve https")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ZLayerError(f"cannot load the TLS certificate {cert} and key {key}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def _is_disconnect(exc: BaseException) -> bool:
    """Tell whether an exception is the client going away or timing out."""
    import socket
    return isinstance(exc, (ConnectionError, socket.timeout)) or (
        isinstance(exc, OSError) and (exc.errno in (errno.EPIPE, errno.ECONNRESET,
                                                    errno.ETIMEDOUT)
                                      or type(exc).__name__.startswith("SSL")))


def _parse_range(text: str, size: int) -> Optional[Tuple[int, int]]:
    """Return (first, last) of a ``bytes=`` Range within ``size``, None when it cannot
    be satisfied (one range only, as registries serve)."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", text.strip())
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        count = int(last)
        return (max(size - count, 0), size - 1) if count and size else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start <= end and start < size else None


def _paginate(items: List[str], query: Mapping[str, str], path: str
              ) -> Tuple[List[str], Optional[str]]:
    """Return the page ``n``/``last`` asks for and the Link to the next one (if any)."""
    from urllib.parse import quote
    try:
        count = int(query["n"]) if "n" in query else _PAGE_DEFAULT
    except ValueError:
        raise _ApiError(400, "PAGINATION_NUMBER_INVALID", "n is not a number") from None
    if count < 0:
        raise _ApiError(400, "PAGINATION_NUMBER_INVALID", "n is negative")
    last = query.get("last")
    rest = [item for item in items if last is None or item > last]
    page = rest[:count]
    if len(rest) > count and page:
        return page, f'<{path}?n={count}&last={quote(page[-1])}>; rel="next"'
    return page, None


def _request_handler_class(server: RegistryServer, timeout_s: float) -> Any:
    """Return the http.server handler class that hands each request to ``server``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "zlayer-registry"
        sys_version = ""
        timeout = timeout_s

        def do_GET(self) -> None:
            server.handle(self)

        do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the server writes its own access lines

    return Handler


# =============================================================================
# 51. CLI: output, progress, and what every command opens (caches, pullers, credentials)
# =============================================================================

_PROG = "zlayer-registry"


class _UsageError(Exception):
    """Internal: bad command-line usage (exit status 2)."""


class _ArgumentParser:
    """Factory for an argparse parser whose errors are one line and exit 2."""

    @staticmethod
    def make(**kwargs: Any) -> Any:
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message: str) -> None:  # type: ignore[override]
                raise _UsageError(f"{message} (see '{self.prog} --help')")

        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return Parser(**kwargs)


class _Progress:
    """Progress on a terminal's stderr: a line per blob (bytes and rate), a total line.

    Finished blobs are printed once; the active ones and the total are
    redrawn in place, at most every 0.1 s, each cut to the terminal's width
    (``COLUMNS``, else the terminal's).  With ``TERM=dumb`` nothing is
    redrawn: a line per blob as it finishes, and the total at the end.
    ``verb`` starts every line ("unpack").
    """

    def __init__(self, stream: Any, clock: Callable[[], float] = time.monotonic,
                 verb: str = "", environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        self._stream = stream
        self._clock = clock
        self._verb = f"{verb} " if verb else ""
        self._plain = env.get("TERM") == "dumb"
        self._width = _terminal_width(stream, env)
        self._lock = threading.Lock()
        self._active: Dict[str, Tuple[int, int, float]] = {}
        self._sizes: Dict[str, Tuple[int, int]] = {}  # every blob seen: (done, total)
        self._started: Optional[float] = None
        self._lines_drawn = 0
        self._last_draw = 0.0

    def __call__(self, descriptor: Descriptor, done: int, total: int) -> None:
        with self._lock:
            now = self._clock()
            if self._started is None:
                self._started = now
            started = self._active.get(descriptor.digest, (0, 0, now))[2]
            self._active[descriptor.digest] = (done, total, started)
            self._sizes[descriptor.digest] = (done, total)
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            self._draw(now)

    def _fit(self, text: str) -> str:
        return text[:max(self._width - 1, 20)]

    def _line(self, digest: str, now: float) -> str:
        done, total, started = self._active[digest]
        state = "done" if done >= total else \
            f"{_format_bytes(done / max(now - started, 1e-3))}/s"
        return self._fit(f"{self._verb}{digest[:19]}  {_format_bytes(done):>10} / "
                         f"{_format_bytes(total):<10}  {state}")

    def _total(self, now: float) -> str:
        done = sum(d for d, _ in self._sizes.values())
        total = sum(t for _, t in self._sizes.values())
        rate = done / max(now - (self._started or now), 1e-3)
        return self._fit(f"{self._verb}total {len(self._sizes)} blob"
                         f"{'' if len(self._sizes) == 1 else 's'}  {_format_bytes(done):>10} / "
                         f"{_format_bytes(total):<10}  {_format_bytes(rate)}/s")

    def _draw(self, now: float) -> None:
        """Print finished blobs once, then redraw the lines of the active ones and the total."""
        finished = [d for d, (done, total, _) in self._active.items() if done >= total]
        if self._plain:
            lines = [self._line(digest, now) for digest in finished]
            for digest in finished:
                del self._active[digest]
            if lines:
                self._stream.write("".join(f"{line}\n" for line in lines))
                self._stream.flush()
            return
        out = [f"\x1b[{self._lines_drawn}A"] if self._lines_drawn else []
        for digest in finished:
            out.append(f"\x1b[K{self._line(digest, now)}\n")
            del self._active[digest]
        out.extend(f"\x1b[K{self._line(digest, now)}\n" for digest in self._active)
        out.append(f"\x1b[K{self._total(now)}\n\x1b[J")
        self._stream.write("".join(out))
        self._stream.flush()
        self._lines_drawn = len(self._active) + 1

    def finish(self) -> None:
        """Print the total once more, as the last line (plain output: its only one)."""
        with self._lock:
            if self._started is None:
                return
            now = self._clock()
            if self._plain:
                self._stream.write(f"{self._total(now)}\n")
            else:
                up = f"\x1b[{self._lines_drawn}A" if self._lines_drawn else ""
                self._stream.write(f"{up}\x1b[J\x1b[K{self._total(now)}\n")
            self._stream.flush()
            self._lines_drawn = 0


def _terminal_width(stream: Any, environ: Mapping[str, str]) -> int:
    """Return ``COLUMNS``, else the width of the terminal ``stream`` is, else 80."""
    columns = _header_int(environ.get("COLUMNS", ""))
    if columns:
        return columns
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


class _JsonProgress:
    """``--progress=json``: one JSON object per line on stderr as blobs go.

    ``{"event": "start" | "progress" | "done", "action": ..., "digest": ...,
    "bytes": ..., "total": ...}``; progress lines at most every 0.5 s per
    blob, ``{"event": "mounted" | "skipped", ...}`` for a blob a push did not
    send, and ``{"event": "total", ...}`` at the end.  ``action`` is
    "download", "upload" or "unpack".
    """

    def __init__(self, stream: Any, action: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream, self._action, self._clock = stream, action, clock
        self._lock = threading.Lock()
        self._last: Dict[str, float] = {}
        self._sizes: Dict[str, Tuple[int, int]] = {}
        self._unsent: Dict[str, int] = {}
        self._started: Optional[float] = None

    def __call__(self, descriptor: Descriptor, done: int, total: int) -> None:
        with self._lock:
            now = self._clock()
            if self._started is None:
                self._started = now
            digest = descriptor.digest
            first = digest not in self._last
            if not first and done < total and now - self._last[digest] < 0.5:
                return
            if self._sizes.get(digest, (-1, 0))[0] >= total and done >= total:
                return  # said done already
            self._last[digest] = now
            self._sizes[digest] = (done, total)
            event = "done" if done >= total else "start" if first else "progress"
            if first and event == "done":
                self._emit({"event": "start", "action": self._action, "digest": digest,
                            "bytes": 0, "total": total})
            self._emit({"event": event, "action": self._action, "digest": digest,
                        "bytes": done, "total": total})

    def settled(self, descriptor: Descriptor, fate: str) -> None:
        """Say that a push did not send a blob: the registry had it, or mounted it."""
        if fate == "uploaded":
            return
        with self._lock:
            if self._started is None:
                self._started = self._clock()
            self._unsent[fate] = self._unsent.get(fate, 0) + 1
            self._emit({"event": fate, "action": self._action, "digest": descriptor.digest,
                        "bytes": 0, "total": descriptor.size})

    def _emit(self, record: Dict[str, Any]) -> None:
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """Print the total record, once blobs went."""
        with self._lock:
            if self._started is None:
                return
            self._emit(dict({"event": "total", "action": self._action,
                             "blobs": len(self._sizes),
                             "bytes": sum(d for d, _ in self._sizes.values()),
                             "seconds": round(self._clock() - self._started, 3)},
                            **self._unsent))
            self._started = None


# Caches the running command opened; main() closes them when it ends.
_CLI_CACHES: List[Tuple[BlobStore, bool]] = []


def _cli_cache(args: Any, create: bool = True) -> Any:
    """Open the command's cache: --cache DIR (or the default), or an S3 bucket
    (``s3://BUCKET[/PREFIX]``) as the only store."""
    root = args.cache if args.cache is not None else BlobCache.default_path()
    if root == "":
        raise CacheError("--cache is empty (an unset variable?)")
    if root.startswith("s3://"):
        remote = S3BlobCache.from_url(root)
        _CLI_CACHES.append((remote, False))
        return remote
    if not create and not os.path.isdir(root):  # a mistyped --cache must not make one
        if os.path.exists(root):
            raise CacheError(f"{os.path.abspath(root)} is not a directory, so not a cache")
        raise CacheError(f"no cache at {os.path.abspath(root)} (nothing was pulled there)")
    created = not os.path.exists(root)
    cache = BlobCache.open(root)
    _CLI_CACHES.append((cache, created))
    return cache


def _close_cli_caches(failed: bool) -> None:
    """Close the command's caches; one it created for nothing (it failed before any
    blob was stored) is removed again."""
    import shutil
    while _CLI_CACHES:
        cache, created = _CLI_CACHES.pop()
        try:
            cache.close()
            if failed and created and cache.is_empty() and not cache.references():
                shutil.rmtree(cache.root, ignore_errors=True)
        except (ZLayerError, OSError):
            pass  # the index only speeds things up; the next open rebuilds it


def _cli_remote_cache(args: Any, cache: BlobStore) -> Optional[S3BlobCache]:
    """Open --remote-cache (or $ZLAYER_REMOTE_CACHE): the bucket behind the local cache."""
    url = getattr(args, "remote_cache", None)
    if url is None:
        url = os.environ.get("ZLAYER_REMOTE_CACHE") or None
        if url is None or isinstance(cache, S3BlobCache):
            return None  # the variable sets a default; --cache s3://... alone is S3 only
    if isinstance(cache, S3BlobCache):
        raise _UsageError("--remote-cache goes with a local --cache DIR in front of it; "
                          f"the cache is {cache.url} already")
    if not url.startswith("s3://"):
        raise _UsageError(f"--remote-cache (or ZLAYER_REMOTE_CACHE) is s3://BUCKET[/PREFIX], "
                          f"not {url!r}")
    return S3BlobCache.from_url(url, retries=_TIER_RETRIES)


def _cli_puller(args: Any, cache: BlobStore, progress: Optional[_ProgressCallback] = None
                ) -> ImagePuller:
    return ImagePuller(cache, platform=getattr(args, "platform", None),
                       insecure=getattr(args, "insecure", False),
                       max_workers=getattr(args, "max_workers", DEFAULT_MAX_WORKERS),
                       progress=progress, sleep=_retry_announcer(),
                       remote_cache=_cli_remote_cache(args, cache),
                       offline=getattr(args, "offline", False))


class _Pulling:
    """``with _Pulling(args, cache) as puller``: a command's puller; its end waits
    for the remote cache's uploads unless --no-wait-remote leaves them to the next host."""

    def __init__(self, args: Any, cache: BlobStore,
                 progress: Optional[_ProgressCallback] = None) -> None:
        self._args = args
        self.puller = _cli_puller(args, cache, progress)

    def __enter__(self) -> ImagePuller:
        return self.puller

    def __exit__(self, *exc_info: Any) -> None:
        self.puller.close(wait_remote=not getattr(self._args, "no_wait_remote", False))


# A retry after an attempt this slow is announced: a registry that stalls
# takes five 30 s timeouts to give up on, and silence looks like a hang.
_SLOW_ATTEMPT_S = 5.0


def _retry_announcer(clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep,
                     stream: Optional[Any] = None) -> Callable[[float], None]:
    """Return the CLI's wait before a retry: it says so on stderr when the attempt
    before it took ``_SLOW_ATTEMPT_S`` or more (quick retries stay quiet)."""
    last = [clock()]

    def wait(seconds: float) -> None:
        if clock() - last[0] >= _SLOW_ATTEMPT_S:
            print(f"{_PROG}: no answer for {clock() - last[0]:.0f} s; retrying in "
                  f"{seconds:.1f} s", file=stream or sys.stderr)
        sleep(seconds)
        last[0] = clock()
    return wait


def _cli_auth(args: Any, registry: str, side: str = "") -> RegistryAuth:
    """Return the credentials --creds or --authfile give (``side`` "src_" or "dest_":
    that side's), else docker's and podman's."""
    creds = getattr(args, f"{side}creds", None)
    if creds is None:
        return RegistryAuth.from_docker_config(
            registry, auth_file=getattr(args, f"{side}authfile", None))
    username, sep, password = creds.partition(":")
    if not sep:
        password = _read_password(username, registry)
    return RegistryAuth("basic", username=username, password=password, source="--creds")


def _read_password(username: str, registry: str) -> str:
    """Return a password typed at a prompt, or the first line of piped stdin."""
    if sys.stdin is None:
        raise _UsageError("--creds USER without :PASS needs the password on stdin")
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass(f"password for {username} at {registry}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _UsageError(f"--creds {username}: no password given (on stdin or after ':')")
    return password


def _cli_progress(args: Any, verb: str = "", action: str = "download") -> Any:
    """Return the progress display: JSON records with ``--progress=json``, else
    lines for stderr when it is a terminal and output is not quiet."""
    shown = getattr(args, "progress", "auto")
    if shown == "json":
        return _JsonProgress(sys.stderr, "unpack" if verb == "unpack" else action)
    if shown == "none" or getattr(args, "quiet", False) or getattr(args, "json", False) \
            or not sys.stderr.isatty():
        return None
    return _Progress(sys.stderr, verb=verb)


def _then(first: Optional[_Progress], second: Optional[_Progress]) -> Optional[_Progress]:
    """Finish ``first`` (the downloads) when ``second`` (what follows) is first called."""
    if first is None or second is None:
        return second

    def report(descriptor: Descriptor, done: int, total: int) -> None:
        _finish(first)
        second(descriptor, done, total)
    return report  # type: ignore[return-value]


def _finish(progress: Optional[_Progress]) -> None:
    """Print the total line of a progress display, if there is one."""
    if progress is not None:
        progress.finish()


def _print_summary(result: PullResult, cache: Any, then: str = "") -> None:
    """Print what a pull did: reference, platform and digest; layers and bytes."""
    platform = f" ({result.platform})" if result.platform else ""
    print(f"{result.reference}{platform}: {result.manifest.digest}")
    print(f"{_layers(len(result.layers))}; {_format_bytes(result.bytes_downloaded)} "
          f"downloaded, {_format_bytes(result.bytes_from_cache)} from cache "
          f"({cache.root}){then}")


def _count(count: int, noun: str) -> str:
    """Return "1 layer", "2 layers" (for any noun that takes an s)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _layers(count: int) -> str:
    """Return "1 layer" or "N layers"."""
    return _count(count, "layer")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _warn_foreign_platform(args: Any, result: PullResult) -> None:
    """Warn, as docker does, when an image chosen without --platform will not run here."""
    if result.artifact_type.is_wasm():
        return
    _warn_if_foreign(args, str(result.reference), result.platform)


def _warn_if_foreign(args: Any, name: str, platform: Optional[Platform]) -> None:
    """Warn when ``platform`` (what ``name`` was built for) will not run on this host."""
    if args.platform or platform is None:
        return
    host = host_platform()
    if _platform_rank(host, platform) is None:
        print(f"{_PROG}: warning: {name} is a {platform} image; this host is {host}",
              file=sys.stderr)


def _cli_target(args: Any) -> Tuple[Reference, RegistryAuth]:
    """Parse REF as a registry reference and find its credentials (before any
    cache directory is made, so a usage error leaves nothing behind)."""
    location = _parse_location(args.reference)
    if location.transport == "local":
        raise _UsageError(f"{args.command} takes a registry reference, not the local "
                          f"registry's image {args.reference} (copy reads it)")
    if location.reference is None:
        what = "layout" if location.is_layout else "archive"
        raise _UsageError(f"{args.command} takes a registry reference, not the local {what} "
                          f"{args.reference}: import and unpack read layouts")
    reference = location.reference
    transport, _, rest = args.reference.partition(":")
    if transport in _LAYOUT_TRANSPORTS and not re.match(r"[0-9]+/", rest):
        # oci:NAME is a layout only where NAME exists (see _parse_location).
        print(f"{_PROG}: warning: no layout {rest.split(':')[0]} here; taken as the image "
              f"{reference}", file=sys.stderr)
    return reference, _cli_auth(args, reference.registry)


# =============================================================================
# 52. CLI: the commands
# =============================================================================

def _cmd_pull(args: Any) -> int:
    reference, auth = _cli_target(args)
    progress = _cli_progress(args)
    cache = _cli_cache(args)
    with _Pulling(args, cache, progress) as puller:
        result = puller.pull_image(reference, auth, verify=args.verify)
        target = _parse_pull_output(args.output) if args.output else None
        if target is not None and target.transport == "local":
            # What was pulled (this platform's image) is stored: its blobs are there.
            LocalRegistry(cache).store_image(target.path, target.digest or str(target.tag),
                                             result.manifest)
        elif args.output:
            # Only what was pulled (this platform's image) goes into the layout.
            puller.export_image(result.reference.with_digest(result.manifest.digest)
                                if result.index else result.reference, args.output,
                                auth=auth)
        # The image is local: say so now; leaving the block waits for the uploads.
        _finish(progress)
        _warn_foreign_platform(args, result)
        if args.json:
            _print_json(result.to_json())
        elif args.quiet:
            print(result.manifest.digest)
        else:
            _print_summary(result, cache, f"; written to {args.output}" if args.output else "")
        sys.stdout.flush()
    return 0


def _cmd_inspect(args: Any) -> int:
    reference, auth = _cli_target(args)
    with _Pulling(args, _cli_cache(args)) as puller:
        data = puller.inspect(reference, auth)
    if args.json:
        _print_json(data)
        return 0
    if args.quiet:
        print(data["digest"])
        return 0
    print(f"reference:  {data['reference']}")
    print(f"digest:     {data['digest']}")
    print(f"media type: {data['media_type']}")
    for item in data.get("platforms", []):
        platform = "/".join(p for p in (item["os"], item["architecture"], item["variant"]) if p)
        print(f"  platform  {platform:<20} {item['digest']}")
    if "config" not in data:
        return 0
    if data.get("platform"):
        print(f"platform:   {data['platform']} -> {data['manifest_digest']}")
    print(f"artifact:   {data['artifact_type']}"
          + (f" ({data['wasi_version']})" if data.get("wasi_version") else ""))
    print(f"config:     {data['config']['digest']} ({data['config']['media_type']})")
    for layer in data["layers"]:
        print(f"  layer     {layer['digest']} {_format_bytes(layer['size']):>10} "
              f"{layer['media_type']}")
    _print_config_summary(data.get("config_data") or {})
    return 0


def _print_config_summary(config: Mapping[str, Any]) -> None:
    """Print what an image runs: created, entrypoint, cmd, working dir, user, env."""
    runs = config.get("config") if isinstance(config.get("config"), dict) else {}
    rows = [("created", config.get("created")), ("entrypoint", runs.get("Entrypoint")),
            ("cmd", runs.get("Cmd")), ("workdir", runs.get("WorkingDir")),
            ("user", runs.get("User"))]
    for label, value in rows:
        if value:
            shown = json.dumps(value) if isinstance(value, list) else str(value)
            print(f"{label + ':':<12}{shown}")
    for variable in runs.get("Env") or []:
        print(f"  env       {variable}")


def _cmd_export(args: Any) -> int:
    reference, auth = _cli_target(args)
    _parse_destination(args.destination)  # a bad destination fails before any download
    progress = _cli_progress(args)
    with _Pulling(args, _cli_cache(args), progress) as puller:
        info = puller.export_image(reference, args.destination, platform=args.platform,
                                   auth=auth)
    _finish(progress)
    if args.json:
        _print_json(info.to_json())
    elif args.quiet:
        print(info.digest)
    else:
        print(f"{info.reference}: {info.digest} -> {info.format}:{info.destination}"
              f"{':' + info.tag if info.tag and info.format != 'docker-archive' else ''} "
              f"({_count(info.blobs, 'blob')}, {_format_bytes(info.size_bytes)})")
    return 0


def _cmd_import(args: Any) -> int:
    cache = _cli_cache(args)
    with _Pulling(args, cache) as puller:
        infos = puller.import_image(args.source)
    if args.destination:
        if len({info.digest for info in infos}) != 1:
            raise LayoutError(f"{args.source} holds {len(infos)} images: name one with :TAG")
        target = _parse_local_destination(args.destination)
        raw = cache.read_small(infos[0].digest, MAX_MANIFEST_SIZE_BYTES)
        assert raw is not None  # imported just now
        LocalRegistry(cache).store_image(
            target.path, target.digest or str(target.tag),
            parse_manifest(raw, infos[0].media_type, infos[0].digest))
        if not args.json and not args.quiet:
            print(f"stored as {target}")
    if args.json:
        _print_json([info.to_json() for info in infos])
    else:
        for info in infos:
            print(info.digest if args.quiet else
                  f"{info.cached_as}: {info.digest} ({info.media_type})")
    return 0


def _cli_side(args: Any, text: str, side: str, allowed: Sequence[str] = tuple(_LOCATION_FORMS)
              ) -> Tuple[_Location, Optional[RegistryAuth]]:
    """Parse one side of a copy, and find its credentials when it is a registry."""
    what = "source" if side == "src_" else "destination"
    location = _parse_location(text, allowed, what)
    if location.reference is None:
        return location, None
    return location, _cli_auth(args, location.reference.registry, side)


def _cmd_copy(args: Any) -> int:
    destinations = ("docker",) if args.command == "push" else tuple(_LOCATION_FORMS)
    source, src_auth = _cli_side(args, args.source, "src_")
    target, dst_auth = _cli_side(args, args.destination, "dest_", destinations)
    if args.all and args.platform:
        raise _UsageError("--all and --platform contradict each other: give one")
    progress = _cli_progress(args, action="upload" if target.reference else "download")
    insecure = getattr(args, "insecure", False)
    cache = _cli_cache(args)
    with ImagePusher(cache, max_workers=args.max_workers,
                     remote_cache=_cli_remote_cache(args, cache),
                     insecure=insecure or args.dest_insecure,
                     src_insecure=insecure or args.src_insecure, chunk_bytes=args.chunk_size,
                     progress=progress, sleep=_retry_announcer(),
                     on_blob=progress.settled if isinstance(progress, _JsonProgress)
                     else None) as pusher:
        result = pusher.copy(args.source if source.reference is None else
                             f"docker://{source.reference}",
                             args.destination if target.reference is None else
                             f"docker://{target.reference}",
                             src_auth=src_auth, dst_auth=dst_auth, platform=args.platform,
                             referrers=args.referrers)
    _finish(progress)
    if args.json:
        _print_json(result.to_json())
    elif args.quiet:
        print(result.digest)
    else:
        blobs = len(result.uploaded) + len(result.mounted) + len(result.skipped)
        verb = "uploaded" if target.reference else "written"
        parts = [f"{len(result.uploaded)} {verb} "
                 f"({_format_bytes(sum(d.size for d in result.uploaded))})"] \
            if result.uploaded or not blobs else []
        parts += [f"{len(result.mounted)} mounted (not sent)"] if result.mounted else []
        parts += [f"{len(result.skipped)} already there"] if result.skipped else []
        print(f"{result.source} -> {result.destination}: {result.digest}")
        print(f"{_count(blobs, 'blob')}: {', '.join(parts)}; "
              f"{_count(result.manifests, 'manifest')}"
              + (f" ({_count(len(result.referrers), 'referrer')})" if args.referrers else ""))
    return 0


def _cmd_serve(args: Any) -> int:
    root = args.root if args.root is not None else BlobCache.default_path()
    if root == "":
        raise CacheError("--root is empty (an unset variable?)")
    with LocalRegistry(root) as store:
        server = RegistryServer(store, args.host, args.port, read_only=args.read_only,
                                log=None if args.quiet else sys.stderr,
                                json_log=args.json_log, tls_cert=args.tls_cert,
                                tls_key=args.tls_key, htpasswd=args.htpasswd,
                                insecure_http=args.insecure_http, upstreams=args.upstream,
                                upstream_ttl_s=args.upstream_ttl,
                                gc_interval_s=args.gc_interval or None,
                                gc_grace_s=args.gc_grace)
        if server.mirror is not None:
            what = f"a pull-through mirror of {server.mirror.describe()}, stored in {store.root}"
        else:
            mode = "read-only" if server.read_only else "read-write"
            what = f"the local registry {store.root} ({mode})"
        print(f"{_PROG}: serving {what} at {server.url}", file=sys.stderr, flush=True)
        if not _is_loopback_host(server.address[0]) and server.users is None:
            print(f"{_PROG}: warning: {server.address[0]} is not a loopback address, and "
                  "this server asks for no credentials", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the way to stop it
            pass
        finally:
            server.shutdown()
        print(f"{_PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def _cmd_unpack(args: Any) -> int:
    unpacking = _cli_progress(args, "unpack")
    if _parse_location(args.reference).is_layout:
        with _Pulling(args, _cli_cache(args)) as puller:
            manifest = puller.unpack_layout(args.reference, args.directory, progress=unpacking)
            if manifest.config is not None:
                _warn_if_foreign(args, args.reference, _config_platform(
                    puller.read_config(manifest)))
        _finish(unpacking)
        if not args.quiet:
            print(f"{args.reference}: {manifest.digest}\n{_layers(len(manifest.layers))} "
                  f"unpacked into {os.path.abspath(args.directory)}")
        return 0
    reference, auth = _cli_target(args)
    downloads = _cli_progress(args)
    cache = _cli_cache(args)
    with _Pulling(args, cache, downloads) as puller:
        result = puller.unpack(reference, args.directory, auth,
                               progress=_then(downloads, unpacking))
    _finish(unpacking)
    _warn_foreign_platform(args, result)
    if not args.quiet:
        _print_summary(result, cache, f"; unpacked into {os.path.abspath(args.directory)}")
    return 0


def _cmd_pull_wasm(args: Any) -> int:
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        raise _UsageError("-o - would write a binary module to the terminal: redirect "
                          "or pipe stdout")
    reference, auth = _cli_target(args)
    cache = _cli_cache(args)
    with _Pulling(args, cache) as puller:
        result = puller.pull_image(reference, auth, prefer_wasm=True)
        info = result.wasm_module_info()
    output = "-" if to_stdout else os.path.abspath(args.output)
    layer = next(l for l in result.layers if l.digest == info.wasm_layer_digest)
    _copy_verified(layer, output)
    # The module took stdout: then the summary, JSON or not, goes to stderr.
    summary = sys.stderr if to_stdout else sys.stdout
    if args.json:
        print(json.dumps(dict({"reference": str(reference), "digest": result.manifest.digest,
                               "destination": output}, **info.to_json()), indent=2),
              file=summary)
    elif args.quiet:
        print(result.manifest.digest, file=summary)
    else:
        print(f"{'stdout' if to_stdout else output}: {info.wasi_version} "
              f"({info.wasi_version.target_triple_suffix()}), {info.wasm_size} bytes, "
              f"layer {info.wasm_layer_digest}"
              + (f", module {info.module_name}" if info.module_name else ""), file=summary)
    return 0


def _copy_layer_into(layer: Layer, f: BinaryIO) -> None:
    """Write a cached layer into ``f``, hashed on the way (``Layer.open`` checks it at
    its end: DigestMismatchError if it changed)."""
    with layer.open() as reader:
        while True:
            try:
                data = reader.read(_READ_CHUNK_BYTES)
            except OSError as exc:  # not the output's fault: say which file failed
                raise CacheError(f"cannot read cached layer {layer.digest}: "
                                 f"{exc.strerror or exc}") from exc
            if not data:
                break
            f.write(data)


def _copy_verified(layer: Layer, output: str) -> None:
    """Copy a cached layer to a new file (``-`` is stdout), hashed on the way:
    no file, and nothing on stdout, unless the bytes check out."""
    if output == "-":
        with open(os.devnull, "wb") as sink:
            _copy_layer_into(layer, sink)  # checked before a byte goes out
        _copy_layer_into(layer, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    try:
        _atomic_write(output, lambda f: _copy_layer_into(layer, f))
    except OSError as exc:
        raise CacheError(f"cannot write {output}: {exc.strerror or exc}") from exc


def _cmd_wasm_export(args: Any) -> int:
    target = _parse_location(args.destination, ("oci",), "destination")
    directory, tag = target.path, target.tag
    manifest = export_wasm_as_oci(args.file, directory, tag=tag or "latest",
                                  module_name=args.name)
    info = extract_wasm_info(manifest)
    if args.json:
        _print_json({"reference": f"oci:{os.path.abspath(directory)}:{tag or 'latest'}",
                     "digest": manifest.digest, "destination": os.path.abspath(directory),
                     "tag": tag or "latest", **(info.to_json() if info else {})})
    elif args.quiet:
        print(manifest.digest)
    else:
        print(f"oci:{directory}:{tag or 'latest'}: {manifest.digest} "
              f"({info.wasi_version if info else 'unknown'})")
    return 0


def _forget_references(cache: BlobStore, names: Sequence[str], quiet: bool = False) -> int:
    """Forget recorded references (as given, or as their normalised image reference)."""
    recorded = cache.references()
    for name in names:
        reference = name
        if name not in recorded:
            try:
                reference = str(parse_reference(name))
            except InvalidReferenceError:
                pass
        if reference not in recorded:
            raise CacheError(f"no reference {name} in the cache ('cache ls' lists them)")
        cache.forget_reference(reference)
        if not quiet:
            print(f"forgot {reference} ('cache gc' deletes what nothing else uses)")
    return 0


def _cmd_cache(args: Any) -> int:
    cache = _cli_cache(args, create=False)
    action, quiet = args.action, getattr(args, "quiet", False)
    if action == "ls":
        entries = cache.entries()
        records = cache.reference_records()
        if args.json:
            _print_json({"root": cache.root, "blobs": entries,
                         "references": {r["reference"]: r["digest"] for r in records},
                         "incomplete": [r["reference"] for r in records if not r["complete"]]})
            return 0
        by_digest = [r for r in records if _is_local_record(r["reference"])
                     and "@" in r["reference"]]
        for record in records:
            if record in by_digest:
                continue  # the local registry's manifests by digest: --json lists them
            print(record["reference"] if quiet else f"{record['reference']}  {record['digest']}"
                  + ("" if record["complete"] else "  (incomplete: its pull did not finish)"))
        if quiet:
            return 0
        for entry in entries:
            print(f"{entry['digest']}  {_format_bytes(entry['size']):>10}  "
                  f"{entry['media_type'] or '-'}")
        stats = cache.stats()
        print(f"{_count(stats['blobs'], 'blob')}, {_format_bytes(stats['size_bytes'])} "
              f"in {cache.root}")
        return 0
    if action == "verify":
        checked = len(cache.entries())  # before --remove takes the corrupt ones out
        bad = cache.verify(remove=args.remove)
        for digest in bad:
            print(f"corrupt: {digest}" + (" (removed)" if args.remove else ""))
        if not quiet:
            print(f"{_count(max(checked, len(bad)), 'blob')} checked, {len(bad)} corrupt")
        return 1 if bad else 0
    if action == "rm":
        return _forget_references(cache, args.references, quiet)
    if action == "prune":
        removed = cache.prune(args.max_bytes)
        if not quiet:
            print(f"removed {_count(len(removed), 'blob')}; "
                  f"{_format_bytes(cache.stats()['size_bytes'])} remain")
        return 0
    sizes = {e["digest"]: e["size"] for e in cache.entries()}
    removed = cache.gc(args.grace, args.dry_run)
    if args.dry_run:
        for digest in removed:
            print(f"would remove {digest}  {_format_bytes(sizes.get(digest, 0))}")
    if not quiet:
        print(f"{'would remove' if args.dry_run else 'removed'} "
              f"{_count(len(removed), 'unreferenced blob')} "
              f"({_format_bytes(sum(sizes.get(d, 0) for d in removed))})")
    return 0


# =============================================================================
# 53. CLI: argument types, the command table, the parser, main
# =============================================================================

def _parse_destination(text: str) -> _Location:
    """Parse where ``export`` writes: a layout or an archive."""
    return _parse_location(text, _FILE_TRANSPORTS)


def _parse_pull_output(text: str) -> _Location:
    """Parse where ``pull --output`` writes: a layout, an archive or the local registry."""
    return _parse_location(text, _FILE_TRANSPORTS + ("local",))


def _parse_local_destination(text: str) -> _Location:
    """Parse an image of the local registry (``local:NAME[:TAG]``)."""
    return _parse_location(text, ("local",), "destination")


def _positive_int(text: str) -> int:
    """Parse a whole number of at least 1 (argparse type)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _creds_arg(text: str) -> str:
    """Check USER[:PASS] (argparse type); the message never repeats the text."""
    import argparse
    username, sep, password = text.partition(":")
    if not username:
        raise argparse.ArgumentTypeError("expected USER[:PASS] with a user name")
    if sep and not password:
        raise argparse.ArgumentTypeError("expected a password after 'USER:' (or leave out "
                                         "the ':' to type it)")
    return text


def _checked_argument(check: Callable[[str], Any]) -> Callable[[str], str]:
    """Make an argparse type that keeps the text ``check`` accepts: a value it
    refuses is a usage error (exit 2), not a failure."""
    def argument(text: str) -> str:
        import argparse
        try:
            check(text)
        except ZLayerError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return argument


_platform_arg = _checked_argument(parse_platform)            # OS/ARCH[/VARIANT]
_location_arg = _checked_argument(_parse_destination)        # oci:DIR[:TAG] and the like
_output_arg = _checked_argument(_parse_pull_output)         # those, and local:NAME[:TAG]
_local_arg = _checked_argument(_parse_local_destination)    # local:NAME[:TAG]
_layout_arg = _checked_argument(lambda text: _parse_location(text, ("oci",), "destination"))
_import_arg = _checked_argument(_parse_import_source)        # oci: or oci-archive:


def _parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``10m``, ``1h``, ``2d`` into seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip().lower())
    if not match:
        import argparse
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 90s, 10m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[
        match.group(2)]


def _parse_size(text: str) -> int:
    """Parse ``500M``, ``1.5G``, ``1024`` into bytes (binary units)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", text.strip().lower())
    if not match:
        import argparse
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 500M, 1.5G, 1048576)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


_HOST_PLATFORM_HELP = ("platform to pick from an index (default: this host's); a single "
                       "image must be for it")
_JSON_HELP = "print one JSON object"
_CACHE_HELP = ("cache directory, or s3://BUCKET[/PREFIX] for a bucket alone (default: "
               "$ZLAYER_REGISTRY_CACHE, else ~/.cache/zlayer-registry)")


class _Command:
    """One subcommand: its name and help, the function that runs it, the function that
    adds its own arguments, the shared options it takes (see ``_add_subcommand``) and
    its examples (the first is shown in the top-level help)."""

    __slots__ = ("name", "help", "run", "add_arguments", "options", "examples")

    def __init__(self, name: str, help_text: str, run: Callable[[Any], int],
                 add_arguments: Optional[Callable[[Any], None]], options: Dict[str, Any],
                 examples: Sequence[str]) -> None:
        self.name, self.help, self.run = name, help_text, run
        self.add_arguments, self.options, self.examples = add_arguments, options, examples


def _build_parser(only: Optional[str] = None) -> Any:
    """Build the argument parser; with ``only`` (a subcommand), leave the others out.

    Each argparse parser costs gettext lookups and terminal-size queries,
    paid on every CLI run, while parsing ``pull ...`` needs only the ``pull``
    parser.
    """
    parser = _ArgumentParser.make(
        prog=_PROG, description="Pull container images and WebAssembly artifacts "
        "from OCI/Docker registries into a verified local cache.",
        epilog="examples (COMMAND --help shows more):\n" + "\n".join(
            f"  {command.examples[0]}" for command in _COMMAND_TABLE) +
        "\n\nCredentials come from --creds or --authfile, else ~/.docker/config.json (and "
        "credential helpers) or podman's auth.json.\nLoopback registries are spoken to "
        "over plain http; others over https (--insecure: unchecked, or plain http).\n"
        "The cache defaults to $ZLAYER_REGISTRY_CACHE, else $XDG_CACHE_HOME/zlayer-registry.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMAND_TABLE:
        if only is None or command.name == only:
            sub = _add_subcommand(commands, command)
            if command.add_arguments is not None:
                command.add_arguments(sub)
    return parser


def _add_subcommand(commands: Any, command: _Command) -> Any:
    """Add a subcommand with the options most commands share (as its record asks)."""
    import argparse
    options = command.options
    cache, reference = options.get("cache", True), options.get("reference", True)
    platform = options.get("platform", _HOST_PLATFORM_HELP)
    json_help = options.get("json_help", _JSON_HELP)
    example = options.get("example", "alpine:3.20")
    sub = commands.add_parser(command.name, help=command.help, description=command.help,
                              epilog="examples:\n" + "\n".join(
                                  f"  {line}" for line in command.examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--debug", action="store_true", default=_suppress(),
                     help="show tracebacks on errors")
    if cache:
        sub.add_argument("--cache", metavar="DIR", help=_CACHE_HELP)
    if reference:
        sub.add_argument("reference", metavar="REF", help=f"image reference, e.g. {example}")
        if cache:
            _add_remote_cache_arguments(sub)
        sub.add_argument("--insecure", action="store_true",
                         help="skip the registry's TLS certificate check, and use plain "
                              "http if it has no TLS")
        credentials = sub.add_mutually_exclusive_group()
        credentials.add_argument("--authfile", metavar="FILE",
                                 help="credentials file (docker config.json or podman "
                                      "auth.json) instead of the default ones")
        credentials.add_argument("--creds", metavar="USER[:PASS]", type=_creds_arg,
                                 help="username and password (other users can see "
                                      "arguments: without :PASS it is read from stdin)")
    if platform:
        sub.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", type=_platform_arg,
                         help=platform)
    if json_help:
        sub.add_argument("--json", action="store_true", help=json_help)
    sub.add_argument("-q", "--quiet", action="store_true", default=_suppress() if
                     command.name == "cache" else False,
                     help=options.get("quiet_help", "print only the digest of the result"))
    return sub


def _add_remote_cache_arguments(sub: Any) -> None:
    """Add --remote-cache, --no-wait-remote and --offline (commands that pull)."""
    sub.add_argument("--remote-cache", metavar="s3://BUCKET[/PREFIX]",
                     help="an S3 bucket between the cache and the registry, shared by "
                          "hosts (default: $ZLAYER_REMOTE_CACHE): blobs missing here come "
                          "from it, and what comes from the registry is uploaded to it; "
                          "the result is printed once the image is local, then the "
                          "command waits for the uploads. Credentials, region and endpoint "
                          "as the AWS CLI finds them (AWS_PROFILE, AWS_ENDPOINT_URL, ...)")
    sub.add_argument("--no-wait-remote", action="store_true",
                     help="exit without waiting for the uploads to the remote cache "
                          "(the next host that misses those blobs uploads them)")
    sub.add_argument("--offline", action="store_true",
                     help="never ask the registry: a tag is the digest recorded in the "
                          "cache or the remote cache (it may be stale)")


def _add_pull_arguments(pull: Any) -> None:
    pull.add_argument("--output", metavar="DEST", type=_output_arg,
                      help="also write the pulled image to oci:DIR[:TAG], "
                           "oci-archive:FILE[:TAG], docker-archive:FILE[:NAME[:TAG]] or "
                           "the local registry, local:NAME[:TAG]")
    pull.add_argument("--verify", action="store_true",
                      help="hash every cached blob the image uses again (a warm pull "
                           "trusts what the cache verified when it stored it), and "
                           "download again one that changed")
    _add_transfer_arguments(pull, "downloads")


def _add_export_arguments(export: Any) -> None:
    export.add_argument("destination", metavar="DEST", type=_location_arg,
                        help="oci:DIR[:TAG], oci-archive:FILE[:TAG] or "
                             "docker-archive:FILE[:NAME[:TAG]]")


def _add_import_arguments(importer: Any) -> None:
    importer.add_argument("source", metavar="SRC", type=_import_arg,
                          help="oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    importer.add_argument("destination", metavar="DEST", type=_local_arg, nargs="?",
                          help="also store the image in the local registry as "
                               "local:NAME[:TAG] (the layout must hold one image)")


def _add_unpack_arguments(unpack: Any) -> None:
    unpack.add_argument("directory", metavar="DIR",
                        help="root filesystem to create (must not exist, or be empty)")


def _add_pull_wasm_arguments(pull_wasm: Any) -> None:
    pull_wasm.add_argument("-o", "--output", required=True, metavar="FILE",
                           help="where to write the verified .wasm ('-': stdout)")


def _add_wasm_export_arguments(wasm_export: Any) -> None:
    wasm_export.add_argument("file", metavar="FILE", help="the .wasm module or component")
    wasm_export.add_argument("destination", metavar="oci:DIR[:TAG]", type=_layout_arg,
                             help="OCI layout to write")
    wasm_export.add_argument("--name", help="module name (default: the file name)")


_PROGRESS_HELP = ("auto: lines on a terminal; json: one JSON object per line on stderr as "
                  "blobs start, advance and finish; none")
_COPY_SOURCE_HELP = ("[docker://]REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                     "docker-archive:FILE[:NAME[:TAG]] (what docker save or podman save "
                     "wrote) or local:NAME[:TAG] (the local registry)")


def _add_transfer_arguments(sub: Any, what: str) -> None:
    """Add --max-workers and --progress (pull, push, copy)."""
    sub.add_argument("--max-workers", type=_positive_int, default=DEFAULT_MAX_WORKERS,
                     metavar="N", help=f"parallel blob {what} (default {DEFAULT_MAX_WORKERS})")
    sub.add_argument("--progress", choices=("auto", "json", "none"), default="auto",
                     help=_PROGRESS_HELP)


def _add_side_arguments(sub: Any, side: str, flag: str, what: str) -> None:
    """Add --SIDE-creds, --SIDE-authfile and --SIDE-insecure (``flag`` "" for push's
    destination: --creds, --authfile, --insecure)."""
    credentials = sub.add_mutually_exclusive_group()
    credentials.add_argument(f"--{flag}authfile", dest=f"{side}authfile", metavar="FILE",
                             help=f"credentials file for the {what} registry")
    credentials.add_argument(f"--{flag}creds", dest=f"{side}creds", metavar="USER[:PASS]",
                             type=_creds_arg,
                             help=f"username and password for the {what} registry "
                                  "(without :PASS it is read from stdin)")
    sub.add_argument(f"--{flag}insecure", dest=f"{side}insecure", action="store_true",
                     help=f"skip the {what} registry's TLS check, or use plain http")


def _add_copy_arguments(copy: Any, push: bool = False) -> None:
    copy.add_argument("source", metavar="SRC", help=_COPY_SOURCE_HELP)
    copy.add_argument("--remote-cache", metavar="s3://BUCKET[/PREFIX]",
                      help="read a registry source through this S3 bucket, as pull does "
                           "(default: $ZLAYER_REMOTE_CACHE); waits for its uploads at the end")
    if push:
        copy.add_argument("destination", metavar="REF",
                          help="registry reference to push to ([docker://]REF)")
        _add_side_arguments(copy, "dest_", "", "destination")
    else:
        copy.add_argument("destination", metavar="DST",
                          help="[docker://]REF, oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                               "docker-archive:FILE[:NAME[:TAG]] or local:NAME[:TAG]")
        _add_side_arguments(copy, "dest_", "dest-", "destination")
        copy.add_argument("--insecure", action="store_true",
                          help="--src-insecure and --dest-insecure both")
    _add_side_arguments(copy, "src_", "src-", "source")
    copy.add_argument("--all", action="store_true",
                      help="copy every platform of an index (the default, as crane does; "
                           "skopeo copies this host's only unless --all). A "
                           "docker-archive holds one image: this host's, or --platform's")
    copy.add_argument("--chunk-size", type=_parse_size, metavar="N",
                      help="upload blobs in PATCH chunks of this size (e.g. 16M); by "
                           "default a blob goes in one request, and in 16 MiB chunks once "
                           "the registry refuses one that large (413)")
    copy.add_argument("--referrers", action="store_true",
                      help="copy the image's referrers too (signatures, SBOMs, attestations: "
                           "what the referrers API, or its sha256-<hex> tag fallback, lists "
                           "for each manifest copied), between registries and local:")
    _add_transfer_arguments(copy, "transfers")


def _add_serve_arguments(serve: Any) -> None:
    serve.add_argument("--root", metavar="DIR",
                       help="the store: a cache directory (default: the default cache, "
                            "which pulls fill too)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this host only)")
    serve.add_argument("--port", type=_port_arg, default=5000,
                       help="port (default: 5000; 0: any free one)")
    serve.add_argument("--read-only", action="store_true",
                       help="serve what is stored; answer 405 to every write")
    serve.add_argument("--json-log", action="store_true",
                       help="access log lines as JSON objects")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve https with this certificate (PEM; with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's key (PEM)")
    serve.add_argument("--htpasswd", metavar="FILE",
                       help="ask for basic credentials, checked against this file "
                            "(htpasswd -B: bcrypt; also -m, -s, -2, -5; re-read when it "
                            "changes)")
    serve.add_argument("--insecure-http", action="store_true",
                       help="allow --htpasswd without TLS on a non-loopback address")
    serve.add_argument("--upstream", action="append", metavar="REGISTRY", default=[],
                       help="be a pull-through mirror of this registry (docker.io, "
                            "https://ghcr.io, http://127.0.0.1:5001); repeat as HOST=URL for "
                            "several, which containerd's ?ns=HOST picks (default: the first)")
    serve.add_argument("--upstream-ttl", type=_parse_duration, metavar="D",
                       default=DEFAULT_UPSTREAM_TTL_S,
                       help="ask the upstream what a tag names at most this often "
                            f"(default: {DEFAULT_UPSTREAM_TTL_S:.0f}s)")
    serve.add_argument("--gc-interval", type=_parse_duration, metavar="D",
                       help="collect garbage this often while serving (e.g. 1h); "
                            "`cache gc --dry-run` lists what it would delete")
    serve.add_argument("--gc-grace", type=_parse_duration, metavar="D",
                       default=DEFAULT_GC_GRACE_S,
                       help="spare blobs stored less than this ago "
                            f"(default: {DEFAULT_GC_GRACE_S / 3600:.0f}h)")


def _port_arg(text: str) -> int:
    """Parse a TCP port (0 to 65535)."""
    import argparse
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0 to 65535)")
    return int(text)


def _add_push_arguments(push: Any) -> None:
    _add_copy_arguments(push, push=True)


def _add_cache_actions(cache: Any) -> None:
    """Add the ``cache ls | verify | rm | prune | gc`` actions."""
    cache_actions = cache.add_subparsers(dest="action", metavar="ACTION")
    for name, help_text in (("ls", "list blobs and references"),
                            ("verify", "re-hash every blob; exit 1 if any is corrupt"),
                            ("rm", "forget references, so that gc can delete their blobs"),
                            ("prune", "delete least recently used blobs down to a size"),
                            ("gc", "delete blobs no recorded reference uses")):
        action = cache_actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("--cache", metavar="DIR", default=_suppress(), help=_CACHE_HELP)
        action.add_argument("--debug", action="store_true", default=_suppress(),
                            help="show tracebacks on errors")
        action.add_argument("-q", "--quiet", action="store_true", default=_suppress(),
                            help="print only what was asked for (ls: the references; "
                                 "verify: corrupt blobs), or nothing")
        if name == "ls":
            action.add_argument("--json", action="store_true", help="print JSON")
        if name == "verify":
            action.add_argument("--remove", action="store_true",
                                help="delete corrupt blobs")
        if name == "rm":
            action.add_argument("references", metavar="REF", nargs="+",
                                help="a reference as 'cache ls' lists it (alpine:3.20 will do)")
        if name == "prune":
            action.add_argument("--max-bytes", type=_parse_size, required=True, metavar="N",
                                help="size to prune down to (e.g. 2G, 500M, 1048576)")
        if name == "gc":
            action.add_argument("--grace", type=_parse_duration, metavar="D",
                                help="spare blobs stored less than this ago (e.g. 10m, 1h, "
                                     "0; default: 1h where the cache holds a local registry, "
                                     "else 0)")
            action.add_argument("--dry-run", action="store_true",
                                help="list what would be deleted; delete nothing")


def _suppress() -> Any:
    """Return argparse.SUPPRESS (argparse is imported on first use)."""
    import argparse
    return argparse.SUPPRESS


# The subcommands, in --help order: a new one is added here and nowhere else.
_COMMAND_TABLE: Tuple[_Command, ...] = (
    _Command("pull", "pull an image into the cache", _cmd_pull, _add_pull_arguments,
             {"quiet_help": "no progress; print only the manifest digest"}, (
        "zlayer-registry pull alpine:3.20",
        "zlayer-registry pull ghcr.io/org/app:v1 --platform linux/arm64 --json",
        "zlayer-registry pull localhost:5000/team/app@sha256:<64 hex> --cache /var/cache/zl")),
    _Command("inspect", "show manifest, config and platforms without downloading layers",
             _cmd_inspect, None, {}, (
                 "zlayer-registry inspect debian:12",
                 "zlayer-registry inspect ghcr.io/org/app:v1 --json")),
    _Command("export", "pull an image and write it as an OCI layout or archive",
             _cmd_export, _add_export_arguments,
             {"platform": "export only this platform of an index (default: all)"}, (
                 "zlayer-registry export alpine:3.20 oci:./alpine-layout:3.20",
                 "zlayer-registry export ghcr.io/org/app:v1 oci-archive:app.tar:v1 "
                 "--platform linux/amd64",
                 "zlayer-registry export debian:12 docker-archive:debian.tar     "
                 "# then: docker load -i debian.tar")),
    _Command("push", "push an image from a layout, an archive or a registry to a registry",
             _cmd_copy, _add_push_arguments,
             {"reference": False, "platform": "push only this platform of an index "
                                              "(default: all)",
              "json_help": "print one JSON object: the blobs uploaded, mounted and skipped"},
             (
                 "zlayer-registry push oci:./app-layout:v1 registry.example/org/app:v1",
                 "zlayer-registry push docker-archive:app.tar localhost:5000/app:v1 "
                 "--creds ci",
                 "zlayer-registry push oci-archive:app.tar:v1 localhost:5000/app:v1 "
                 "--chunk-size 8M --json")),
    _Command("copy", "copy an image between registries, OCI layouts and archives",
             _cmd_copy, _add_copy_arguments,
             {"reference": False, "platform": "copy only this platform of an index "
                                              "(default: all)",
              "json_help": "print one JSON object: the blobs uploaded, mounted and skipped"},
             (
                 "zlayer-registry copy docker.io/library/alpine:3.20 "
                 "registry.example/mirror/alpine:3.20",
                 "zlayer-registry copy ghcr.io/org/app:v1 oci:./app-layout:v1 "
                 "--platform linux/arm64",
                 "zlayer-registry copy docker-archive:saved.tar oci-archive:app.tar:v1",
                 "zlayer-registry copy alpine:3.20 local:alpine:3.20   "
                 "# into the local registry",
                 "zlayer-registry copy localhost:5000/a:1 localhost:5000/b:1   "
                 "# layers mounted, not sent")),
    _Command("import", "verify an OCI layout or archive and add its images to the cache",
             _cmd_import, _add_import_arguments,
             {"reference": False, "platform": None,
              "json_help": "print a list of {reference (the name the cache records), tag, "
                           "digest, media_type}",
              "quiet_help": "print only the digest of each image imported"}, (
                 "zlayer-registry import oci:./alpine-layout:3.20",
                 "zlayer-registry import oci:./build-output local:team/app:v1",
                 "zlayer-registry import oci-archive:app.tar --json")),
    _Command("serve", "serve the local registry over the OCI distribution API, or be a "
                      "pull-through mirror",
             _cmd_serve, _add_serve_arguments,
             {"cache": False, "reference": False, "platform": None, "json_help": None,
              "quiet_help": "no access log lines"}, (
                 "zlayer-registry serve --port 5000     # then: skopeo copy ... "
                 "docker://127.0.0.1:5000/app:v1",
                 "zlayer-registry serve --root /srv/registry --host 0.0.0.0 --read-only",
                 "zlayer-registry serve --port 0 --json-log   # any free port",
                 "zlayer-registry serve --host 0.0.0.0 --upstream docker.io   # a Docker Hub "
                 "mirror")),
    _Command("unpack", "unpack an image (pulled, or from an OCI layout) into a new root "
                       "filesystem directory",
             _cmd_unpack, _add_unpack_arguments,
             {"json_help": None, "quiet_help": "no progress; print nothing on success",
              "example": "alpine:3.20, or oci:DIR[:TAG] or "
                         "oci-archive:FILE[:TAG] for a local layout"}, (
                 "zlayer-registry unpack alpine:3.20 ./rootfs",
                 "zlayer-registry unpack ghcr.io/org/app:v1 /srv/app/rootfs "
                 "--platform linux/arm64",
                 "zlayer-registry unpack oci:./app-layout:v1 ./rootfs      "
                 "(a local OCI layout)")),
    _Command("pull-wasm", "pull a WebAssembly artifact and write the module to a file",
             _cmd_pull_wasm, _add_pull_wasm_arguments,
             {"platform": "index entry to pick (default: wasip2, wasip1, then wasi)",
              "example": "ghcr.io/org/plugin:1.0"}, (
                 "zlayer-registry pull-wasm ghcr.io/org/plugin:1.0 -o plugin.wasm",
                 "zlayer-registry pull-wasm localhost:5000/fn:latest -o fn.wasm --json",
                 "zlayer-registry pull-wasm ghcr.io/org/plugin:1.0 -o - | wasm-objdump -h -")),
    _Command("wasm-export", "write a .wasm file as an OCI artifact (CNCF Wasm layout)",
             _cmd_wasm_export, _add_wasm_export_arguments,
             {"cache": False, "reference": False, "platform": None}, (
                 "zlayer-registry wasm-export plugin.wasm oci:./plugin-layout:1.0",
                 "skopeo copy oci:./plugin-layout:1.0 "
                 "docker://registry.example/org/plugin:1.0")),
    _Command("cache", "list, verify, forget, prune or garbage-collect the cache",
             _cmd_cache, _add_cache_actions,
             {"reference": False, "platform": None, "json_help": None}, (
                 "zlayer-registry cache ls",
                 "zlayer-registry cache verify",
                 "zlayer-registry cache prune --max-bytes 2G",
                 "zlayer-registry cache rm alpine:3.20 && zlayer-registry cache gc")),
)
_COMMANDS: Dict[str, _Command] = {command.name: command for command in _COMMAND_TABLE}


def _named_subcommand(args: Sequence[str]) -> Optional[str]:
    """Return the subcommand ``args`` name when only its parser is needed, else None.

    ``--debug`` is the one top-level option that may come first; ``-h`` or
    ``--version`` there, or an unknown command, needs the full parser.
    """
    for arg in args:
        if arg != "--debug":
            return arg if arg in _COMMANDS else None
    return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the CLI: unwinds as Ctrl-C does (downloads stop, partial files go)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _unrecognized(extras: Sequence[str], command: Optional[str],
                  args: Sequence[str]) -> _UsageError:
    """Return the usage error for arguments no parser took."""
    where = f"{_PROG} {command}" if command else _PROG
    # "--creds user s3cret" (a space for the colon) leaves the password over.
    if _creds_passwords(args) is not None:
        count = f"{len(extras)} unrecognized argument{'' if len(extras) == 1 else 's'}"
        return _UsageError(f"{count} (not shown, as --creds is given; see '{where} --help')")
    return _UsageError(f"unrecognized arguments: {' '.join(extras)} (see '{where} --help')")


def _creds_passwords(args: Sequence[str]) -> Optional[List[str]]:
    """Return the passwords --creds gives in ``args`` (the user names are no secret),
    None without --creds."""
    values: Optional[List[str]] = None
    for index, arg in enumerate(args):
        flag = arg.partition("=")[0]
        if flag in ("--creds", "--src-creds", "--dest-creds"):
            value = arg.partition("=")[2] if "=" in arg else \
                (args[index + 1] if index + 1 < len(args) else "")
            values = (values or []) + [p for p in (value.partition(":")[2],) if p]
    return values


def _hint(exc: ZLayerError) -> str:
    """Return what the CLI adds to a library error: the flags that would help."""
    if getattr(exc, "needs_credentials", False):
        return ("; give --creds or --authfile, log in with docker or podman, or point "
                "DOCKER_CONFIG or REGISTRY_AUTH_FILE at a file holding them")
    return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage,
    130 interrupted, 141 output closed, 143 terminated)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(_named_subcommand(args_list))
    debug = "--debug" in args_list
    try:
        args, extras = parser.parse_known_args(args_list)
        if extras:
            raise _unrecognized(extras, args.command, args_list)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "cache" and args.action is None:
            raise _UsageError("cache needs an action: ls, verify, rm, prune or gc "
                              f"(see '{_PROG} cache --help')")
        failed = True
        try:
            status = _COMMANDS[args.command].run(args)
            failed = status != 0
            return status
        finally:
            _close_cli_caches(failed)
    except _UsageError as exc:
        message = str(exc)
        for value in _creds_passwords(args_list) or ():
            message = message.replace(value, "<redacted>")
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 2
    except ZLayerError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{_PROG}: error: {exc}{_hint(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Terminated):
            print(f"{_PROG}: terminated", file=sys.stderr)
            return 143  # 128 + SIGTERM, as a shell reports a process it ended
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cache ls | head`): as a killed-by-SIGPIPE
        # command ends, quietly; output is redirected so the final flush
        # cannot fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout without a descriptor
            pass
        return 141
    except OSError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{_PROG}: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if getattr(exc, "filename", None) else ""),
              file=sys.stderr)
        return 1


def _console_main() -> None:
    """Entry point of ``python -m zlayer_registry`` and the console script.

    SIGTERM (sent by timeout, systemd, docker stop and CI cancels) takes
    Ctrl-C's way out, so it too leaves no partial file or staging directory.
    Ends with ``os._exit`` once the output is flushed: the interpreter's
    teardown (module and object cleanup) does nothing a finished command
    needs, as main() has closed the cache and no download is left running.
    """
    import signal
    signal.signal(signal.SIGTERM, _raise_terminated)
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = status or 120  # as Python itself exits when the final flush fails
    os._exit(status)


if __name__ == "__main__":
    _console_main()
