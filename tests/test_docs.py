"""The docs state what the code does: the configuration printed in docs/PIPELINE.md is the quick preset
as the schema resolves it (so a changed default fails here until the docs say it too)."""
import dataclasses
import re
from pathlib import Path

import yaml

from vesselfast.pipeline.config import resolve

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_pipeline_doc_shows_the_quick_preset_as_resolved():
    text = (DOCS / "PIPELINE.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("preset: quick")]
    assert len(blocks) == 1, "docs/PIPELINE.md must show the quick preset's config once"
    assert yaml.safe_load(blocks[0]) == dataclasses.asdict(resolve("quick"))
