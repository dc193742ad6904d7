"""Shared pytest setup: the test markers and the ``zr`` fixture of the interop suites."""

import importlib
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


@pytest.fixture(scope="session")
def zr() -> types.ModuleType:
    """Imports zlayer_registry from this checkout, never from site-packages."""
    import _oci_testkit as kit
    if not (HERE / "zlayer_registry.py").exists():
        kit.unavailable("zlayer_registry.py is not in %s" % HERE)
    module = importlib.import_module("zlayer_registry")
    assert Path(module.__file__).resolve() == HERE / "zlayer_registry.py", module.__file__
    return module
