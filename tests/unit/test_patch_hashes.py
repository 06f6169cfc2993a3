"""The hashes a metadata patch carries over for the files it republishes unchanged."""

from __future__ import annotations

from converters.patch.metapatch import carried_hashes
from converters.core.report import SCHEMA_VERSION, Report

CHART, IMATRIX, Q8 = "size-vs-kld.png", "M-imatrix.gguf", "M-Q8_0.gguf"


def report(file_hashes: dict, publication: dict | None) -> Report:
    d = {"schema_version": SCHEMA_VERSION, "model_name": "M", "file_hashes": file_hashes}
    return Report.from_json(d if publication is None else {**d, "publication": publication})


def test_the_earlier_reports_hashes_are_kept_except_for_the_patched_files() -> None:
    old = report({Q8: {"size": 3, "sha256": "q"}, IMATRIX: {"size": 2, "sha256": "i"},
                  CHART: {"size": 1, "sha256": "c"}}, None)
    assert carried_hashes(old, {Q8}) == {IMATRIX: {"size": 2, "sha256": "i"}, CHART: {"size": 1, "sha256": "c"}}


def test_a_chart_published_before_charts_were_hashed_takes_the_publication_blocks_hash() -> None:
    pub = {"files": {CHART: {"size": 1, "sha256": "c-published"}, Q8: {"size": 3, "sha256": "q-old"},
                     "bad": {"size": 1, "sha256": None}}}
    old = report({Q8: {"size": 3, "sha256": "q"}, IMATRIX: {"size": 2, "sha256": "i"}}, pub)
    got = carried_hashes(old, {Q8})
    assert got == {IMATRIX: {"size": 2, "sha256": "i"}, CHART: {"size": 1, "sha256": "c-published"}}
    # a measured hash is never replaced by the publication block's
    old = report({CHART: {"size": 1, "sha256": "c-measured"}}, pub)
    assert carried_hashes(old, set())[CHART]["sha256"] == "c-measured"
