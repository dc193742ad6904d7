"""Shared pytest setup: the test markers, the ``zr`` fixture of the interop suites, and
the fixtures several hermetic suites use (a fake registry, a TLS certificate)."""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interop: talks to real tools (CNCF distribution, skopeo) on 127.0.0.1; "
        "skipped when they are missing unless ZLAYER_REQUIRE_INTEROP=1, which fails instead",
    )


@pytest.fixture
def registry():
    """A programmable registry (``_fake_registry``) on 127.0.0.1:0; a suite may define its own."""
    import _fake_registry as fake
    server = fake.FakeRegistry()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for registry.test and 127.0.0.1 (made with openssl)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=registry.test",
                    "-addext", "subjectAltName=DNS:registry.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="session")
def zr() -> types.ModuleType:
    """Imports zlayer_registry from this checkout, never from site-packages."""
    import _oci_testkit as kit
    if not (HERE / "zlayer_registry.py").exists():
        kit.unavailable("zlayer_registry.py is not in %s" % HERE)
    module = importlib.import_module("zlayer_registry")
    assert Path(module.__file__).resolve() == HERE / "zlayer_registry.py", module.__file__
    return module
