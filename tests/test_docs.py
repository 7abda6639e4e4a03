"""The README and the pages under docs/ link to each other and to the code: a moved section or a renamed file must
not leave a reader at a dead link."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces as
    hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a "# comment" in a code block is no heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("Publishing a run: `erasure export`") == "publishing-a-run-erasure-export"
    assert github_anchor("More than one GPU (or CPU process)") == "more-than-one-gpu-or-cpu-process"
    assert github_anchor("Devices, precision and memory") == "devices-precision-and-memory"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    links = [m.group(1) for m in LINK.finditer(page.read_text())]
    assert links, f"{page.name} links nowhere: the pattern no longer reads its links"
    dead = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            dead.append(link)
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            dead.append(link)
    assert not dead, f"dead links in {page.name}: {dead}"


def test_every_page_under_docs_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(readme.read_text())}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README never links to: {orphans}"
