"""The committed example reports (docs/example-report) come from the code in this tree: their provenance names the
source digest of the code that wrote them (vadclip, study, the study YAMLs, torch and numpy versions)."""

import re
from pathlib import Path

import pytest

from study.reuse import source_digest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "example-report"


@pytest.mark.parametrize("name", ["ablation_lgt.md", "reproduce.md", "search_window.md"])
def test_example_report_comes_from_this_code(name):
    text = (EXAMPLES / name).read_text()
    found = re.search(r"source digest ([0-9a-f]{16})", text)
    assert found is not None, f"{name}: its provenance names no source digest"
    assert found[1] == source_digest(), (f"docs/example-report/{name} was written by other code (source digest "
                                        f"{found[1]}, this tree {source_digest()}): run "
                                        f"docs/example-report/regenerate.sh")
