"""The project carries what it cites: every `docs/<page>.md#<section>` named in the code, configs, tests and
README is a file in the repository with that section, and nothing cites the old, unshipped REFERENCE.md."""

import re

from helpers import ROOT

CITED = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    text = (ROOT / "docs" / page).read_text()
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def citing_files() -> list:
    files = [ROOT / "README.md", ROOT / "train.py", ROOT / "eval.py", ROOT / "tracin.py"]
    for folder, pattern in (("conf", "*.yaml"), ("kd_lightning", "*.py"), ("tests", "*.py"), ("docs", "*.md")):
        files += sorted((ROOT / folder).rglob(pattern))
    return [f for f in files if f.is_file() and f.name != "test_docs.py"]


def test_every_cited_section_of_docs_reference_exists() -> None:
    cited = []
    for path in citing_files():
        text = path.read_text()
        assert "REFERENCE.md" not in text, f"{path} cites REFERENCE.md, which is not in the repository"
        cited += [(path, page, anchor) for page, anchor in CITED.findall(text) if page == "reference.md"]
    assert len(cited) >= 10  # the 8 experiment configs, test_models.py, README
    sections = anchors("reference.md")
    for path, page, anchor in cited:
        assert not anchor or anchor in sections, f"{path} cites docs/{page}#{anchor}; sections: {sorted(sections)}"


def test_slug_follows_github() -> None:
    assert slug("CIFAR ResNets and TracIn") == "cifar-resnets-and-tracin"
    assert slug("Influence (TracIn)") == "influence-tracin"
