"""The OCI distribution-spec conformance checks (``_conformance.py``) against our server
(hermetic: every check passes) and against distribution 2.8 (interop: a check of the
runner itself, where exactly the checks of what 2.8 lacks fail)."""

from __future__ import annotations

import pytest

import _conformance as conformance
import _oci_testkit as kit
from _testsupport import zr

# What distribution 2.8 does not do: the referrers API and OCI-Subject (distribution-spec
# 1.1, PR distribution#4828), a 416 for a PATCH that leaves a gap (2.8 ignores
# Content-Range on PATCH), and n/last on tags/list (2.8 answers every tag, unsorted).
DISTRIBUTION_28_LACKS = {"manifest_with_subject_answers_oci_subject", "referrers",
                         "referrers_filtered", "referrers_of_an_unknown_subject_are_empty",
                         "chunked_out_of_order", "tags_list_n", "tags_list_last"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    store = zr.LocalRegistry(tmp_path_factory.mktemp("conformance") / "store")
    server = zr.RegistryServer(store, "127.0.0.1", 0).start()
    try:
        yield {r["name"]: r for r in conformance.run("%s:%d" % server.address)}
    finally:
        server.shutdown()
        store.close()


def test_the_runner_has_the_four_workflows():
    categories = {category for category, _, _ in conformance.CHECKS}
    assert categories == {"pull", "push", "discovery", "management"}
    assert len({name for _, name, _ in conformance.CHECKS}) == len(conformance.CHECKS)


@pytest.mark.parametrize("name", [name for _, name, _ in conformance.CHECKS])
def test_our_server_passes(results, name):
    assert results[name]["passed"], results[name]["message"]


@pytest.mark.interop
def test_distribution_fails_exactly_what_it_lacks(tmp_path):
    for registry in kit.running_registry(tmp_path / "distribution"):
        failed = {r["name"]: r["message"] for r in conformance.run(registry.host)
                  if not r["passed"]}
        assert set(failed) == DISTRIBUTION_28_LACKS, failed
