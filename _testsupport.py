"""What the hermetic suites share: the module under test, bytes, pullers and the CLI.

Test-only, standard library only.  ``zr`` is this checkout's zlayer_registry.py
(never an installed copy); the CLI runs as ``python -m zlayer_registry``, as
users are told to run it (the script form compiles the whole file every time).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _load_module() -> Any:
    """Import zlayer_registry.py from this checkout, once, as ``zlayer_registry``."""
    loaded = sys.modules.get("zlayer_registry")
    if loaded is not None and Path(loaded.__file__).resolve() == HERE / "zlayer_registry.py":
        return loaded
    spec = importlib.util.spec_from_file_location("zlayer_registry", HERE / "zlayer_registry.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zlayer_registry"] = module
    spec.loader.exec_module(module)
    return module


zr = _load_module()

SHA_A = "sha256:" + "a" * 64
SHA_B = "sha256:" + "b" * 64
KiB = 1024
MiB = 1024 * KiB


class Sleeps(list):
    """A sleep() stand-in that records the delays asked for."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def layer_bytes(seed: int, size: int = 200_000) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def tar_gz(files: Sequence[Tuple[str, bytes]]) -> bytes:
    """A gzip-compressed tar of regular files (name, bytes), in order, mtime 0."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def make_puller(cache: Any = None, sleeps: Optional[Sleeps] = None, **kwargs: Any) -> Any:
    """An ImagePuller for linux/amd64 with no environment, whose backoff never sleeps."""
    kwargs.setdefault("environ", {})
    kwargs.setdefault("platform", "linux/amd64")
    return zr.ImagePuller(cache if cache is not None else zr.BlobCache(),
                          sleep=sleeps if sleeps is not None else Sleeps(), **kwargs)


# ``python -m zlayer_registry``; cli_env() puts this checkout on its path.
CLI: List[str] = [sys.executable, "-m", "zlayer_registry"]


def cli_env(home: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a CLI run: no credentials, proxies or cache of the user's."""
    env = dict(os.environ)
    for name in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "HTTP_PROXY",
                 "HTTPS_PROXY", "http_proxy", "https_proxy", "ZLAYER_REGISTRY_CACHE",
                 "ZLAYER_REMOTE_CACHE"):
        env.pop(name, None)
    for name in [n for n in env if n.startswith("AWS_")]:  # no AWS credentials of the user's
        env.pop(name)
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in (env.get("PYTHONPATH"),) if p])
    env.update(extra or {})
    return env


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
            timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the CLI in ``cwd`` (also its HOME) and return what it did."""
    home = Path(cwd or HERE)
    return subprocess.run([*CLI, *args], capture_output=True, text=True,
                          env=cli_env(home, env), cwd=str(home), timeout=timeout, **kwargs)


def start_cli(*args: str, home: Path, env: Optional[Dict[str, str]] = None,
              **kwargs: Any) -> subprocess.Popen:
    """Start the CLI in ``home`` without waiting for it."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen([*CLI, *args], env=cli_env(home, env), cwd=str(home), **kwargs)


def run_python(code: str, *, timeout: float = 60,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout first on its path."""
    prelude = f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=timeout, env=env)


def dead_pid() -> int:
    """Return the PID of a process that has ended (for crash-leftover names)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip())
