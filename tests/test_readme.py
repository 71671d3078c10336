"""The README's job YAML reference is generated from the schema: they must agree."""

from __future__ import annotations

from hone.config import reference_markdown

BEGIN = "<!-- BEGIN job-reference (generated: hone schema --markdown) -->"
END = "<!-- END job-reference -->"


def test_readme_reference_matches_schema(repo):
    text = (repo / "README.md").read_text()
    assert BEGIN in text and END in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == reference_markdown().strip(), "README job reference is stale: run `make docs`"


def test_readme_shows_the_two_commands(repo):
    text = (repo / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
