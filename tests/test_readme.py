"""The front page and the guides: the YAML reference is generated from the schemas and current, the README shows the
two commands and every link it has lands on a page (and heading) that exists. The site's own strict build (broken
links and anchors inside docs/) runs in `make test` before pytest (`make docs-check`)."""

from __future__ import annotations

import re

from hone.config.reference import reference_page


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_the_reference_page_matches_the_schemas(repo):
    assert (repo / "docs" / "reference.md").read_text() == reference_page(), "docs/reference.md is stale: run `make docs`"


def test_the_site_home_is_the_readme(repo):
    expected = (repo / "README.md").read_text().replace("](docs/", "](")
    assert (repo / "docs" / "index.md").read_text() == expected, "docs/index.md is stale: run `make docs`"


def test_readme_shows_the_two_commands_and_its_links_land(repo):
    text = (repo / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
    links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)", text)
    assert len(links) >= 10, "the front page links to the guides"
    for target, anchor in links:
        page = repo / target
        assert page.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to {target}#{anchor}: no such heading"
    assert len(text.splitlines()) <= 300, "the README is the front page: the guides live in docs/"
