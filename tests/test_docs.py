"""The README and docs/ link to each other: every relative link must reach a file and a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# A path into the repository as the docs write it (`bench/load.py`, `infra/k8s/base/config.yaml`).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:producer|worker|tests|bench|infra|docs)/[\w./-]*\w)")
# SPEC.md is the team's shared spec, copied as it is.
OURS = [document for document in DOCUMENTS if document.name != "SPEC.md"]


def anchors(document: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def relative_links(document: Path) -> list[str]:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_reaches_a_file_and_a_heading(document: Path) -> None:
    for link in relative_links(document):
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        assert path.is_file(), f"{document.name}: {link} points at no file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{document.name}: {link} points at no heading"


def test_the_readme_links_every_document_in_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for document in DOCUMENTS[1:]:
        assert f"docs/{document.name}" in readme


@pytest.mark.parametrize("document", OURS, ids=lambda path: path.name)
def test_every_repository_path_the_docs_name_exists(document: Path) -> None:
    named = set(REPO_PATH.findall(document.read_text(encoding="utf-8")))
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
