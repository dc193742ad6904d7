"""Registers the test markers, so ``pytest --strict-markers`` accepts them."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interop: talks to real tools (CNCF distribution, skopeo) on 127.0.0.1; "
        "skipped when they are missing unless ZLAYER_REQUIRE_INTEROP=1, which fails instead",
    )
