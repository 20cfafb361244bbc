"""Pointers from code to the docs: only docs/ files users have, and only anchors that exist.

Comments once cited internal notes that never shipped with attnopt (the algorithm notes and the
torch hooks notes); algorithm facts now live in docs/algorithms.md and torch / Inductor facts in
docs/design.md. Anchors are GitHub's: the heading lowercased, punctuation dropped, spaces -> '-'.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("attnopt", "tests", "benchmarks", "examples")
SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml"}

# The internal notes' names, built here so that this file does not mention them itself. A mention
# is allowed only as docs/<name>.md for the note that became a doc ("algorithms"); the torch notes
# became docs/design.md, so their file name must not appear at all.
_ALGO = "algorithms"
_HOOKS = "torch-" + "hooks"
STALE = [
    (re.compile(r"(?<!docs/)\b" + _ALGO + r"\.md"), "docs/" + _ALGO + ".md#<section>"),
    (re.compile(re.escape(_HOOKS) + r"\.md"), "docs/design.md#torch-integration-facts"),
]

# Lines in files other engineers are rewriting (issue 14, item 7): their pointer is changed there.
# Keyed by the exact line, so a new stale mention, or this one moved elsewhere, still fails.

DOC_REF = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\((?!https?:)([^)\s#]*)(?:#([^)\s]+))?\)")


def _files() -> list[pathlib.Path]:
    out = [ROOT / "README.md"]
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts:
                out.append(p)
    return out


def _lines():
    for p in _files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = p.relative_to(ROOT).as_posix()
        for i, line in enumerate(text.splitlines(), 1):
            yield rel, i, line


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lowercase, drop what is not a word character, space or hyphen,
    spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: pathlib.Path) -> set[str]:
    """Every heading id of a markdown file (repeated headings get -1, -2, ... as on GitHub);
    headings inside fenced code blocks do not count."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = github_anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_github_anchor_rule():
    assert github_anchor("Q and K quantization (INT8, FP8)") == "q-and-k-quantization-int8-fp8"
    assert github_anchor("Second stage: skipping P.V") == "second-stage-skipping-pv"
    assert github_anchor("torch integration facts") == "torch-integration-facts"


def test_no_pointer_to_internal_notes():
    bad = []
    for rel, i, line in _lines():
        for pattern, instead in STALE:
            if pattern.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}  (point to {instead})")
    assert not bad, "pointers to notes users do not have:\n" + "\n".join(bad)


def _doc_refs():
    for rel, i, line in _lines():
        for m in DOC_REF.finditer(line):
            yield rel, i, m.group(1), m.group(2)


def test_doc_pointers_resolve():
    refs = list(_doc_refs())
    assert any(doc == _ALGO + ".md" and anchor for _, _, doc, anchor in refs), \
        "no code points into docs/algorithms.md any more: is this test still scanning the tree?"
    cache: dict[str, set[str]] = {}
    bad = []
    for rel, i, doc, anchor in refs:
        path = DOCS / doc
        if not path.is_file():
            bad.append(f"{rel}:{i}: docs/{doc} does not exist")
            continue
        if anchor is None:
            continue
        have = cache.setdefault(doc, anchors(path))
        if anchor not in have:
            bad.append(f"{rel}:{i}: docs/{doc}#{anchor}: no such heading")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_inside_docs_resolve(doc):
    """`[text](#anchor)` and `[text](other.md#anchor)` links within docs/ point at headings that
    exist (links to files elsewhere in the repository must name an existing file)."""
    path = DOCS / doc
    bad = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for m in MD_LINK.finditer(line):
            target, anchor = m.group(1), m.group(2)
            dest = path if not target else (path.parent / target).resolve()
            if not dest.exists():
                bad.append(f"docs/{doc}:{i}: {target} does not exist")
            elif anchor is not None and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"docs/{doc}:{i}: #{anchor} is not a heading of {dest.name}")
    assert not bad, "\n".join(bad)


def test_readme_links_the_algorithms_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/" + _ALGO + ".md)" in readme
