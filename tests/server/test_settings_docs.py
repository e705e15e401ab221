"""The README's configuration table lists every setting, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from tensorline.server import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"^\| `TENSORLINE_([A-Z0-9_]+)` \|", README.read_text(), re.M))
    expected = {name.upper() for name in Settings.model_fields}
    assert documented == expected, (
        f"missing from README: {sorted(expected - documented)}; "
        f"not settings: {sorted(documented - expected)}")
