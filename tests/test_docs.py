"""The documents a reader finds from the README: a page for every study registered in `studies/`, linked from the
README, and no page for a study that does not exist. Reads the studies' source only (no torch)."""

import ast
import re
from pathlib import Path

from toylab.registry import registered_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def registered_studies() -> set[str]:
    """The names the modules of `studies/` register (`@register_study("name")`), read from their source."""
    return {name for path in (ROOT / "studies").glob("[!_]*.py")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if (name := registered_name(node)) is not None}


def test_every_study_has_a_page_and_every_page_a_study() -> None:
    studies = registered_studies()
    assert len(studies) >= 12
    pages = {path.stem for path in (ROOT / "docs" / "studies").glob("*.md")}
    assert studies - pages == set(), "a study without docs/studies/NAME.md"
    assert pages - studies == set(), "a page for a study that is not registered in studies/"


def test_the_readme_links_every_study_page_and_every_link_resolves() -> None:
    text = README.read_text()
    linked = set(re.findall(r"\]\(docs/studies/([\w-]+)\.md\)", text))
    assert registered_studies() - linked == set(), "a study the README does not link to"
    targets = re.findall(r"\]\(((?:docs/)[^)#\s]+)", text)
    assert [target for target in targets if not (ROOT / target).exists()] == []


def test_links_between_the_documents_resolve() -> None:
    broken = [(page.name, target) for page in (ROOT / "docs").rglob("*.md")
              for target in re.findall(r"\]\(([^)#\s:]+\.md)", page.read_text())
              if not (page.parent / target).exists()]
    assert broken == []
