"""The repository is self-contained: nothing in it cites a document that lives outside it, and
every docs page, numbered section and quoted heading that the code or the docs cite exists.

Fast (text scanning only). Files scanned: ``git ls-files`` (tracked plus untracked, not ignored),
or a walk of the tree without .venv/.git/results/figures when git is unavailable.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "results", "figures", "runs", "build", "dist", "__pycache__", ".pytest_cache",
             ".hypothesis", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = {".png", ".pdf", ".npz", ".npy", ".gguf", ".safetensors", ".pt", ".bin", ".parquet", ".pkl",
                 ".gz", ".zip", ".whl", ".so", ".pyc", ".jpg", ".jpeg", ".svg"}
MAX_BYTES = 2_000_000

# Documents outside the repository (spelled in pieces so that this file does not cite them).
FORBIDDEN = [
    re.compile("THEORY" + r"\.md"),
    re.compile("CONVENTIONS" + r"\.md"),
    re.compile(r"(?:\.\./)+" + "shared" + r"\b"),
    re.compile(r"/work/" + "shared" + r"\b"),
]

NUM = r"\d+(?:\.\d+)?"
NUMS = rf"{NUM}(?:\s*(?:-|–|,|and|&)\s*{NUM})*"
DOC = r"(?<![\w./-])(?P<doc>(?:\.\./)?(?:docs/)?[A-Za-z0-9_-]+\.md)"
LINK = r"\]?(?:\((?P<target>[^)\s]*)\))?"
# "docs/theory.md section 5", "[theory.md](theory.md) sections 2-4", "theory_kl.md, section 3"
CITE_AFTER = re.compile(DOC + LINK + rf",?\s+(?:sections?|§)\s+(?P<nums>{NUMS})")
# "section 7 of [docs/theory.md](docs/theory.md)"
CITE_BEFORE = re.compile(rf"\b[Ss]ections?\s+(?P<nums>{NUMS})\s+of\s+\[?" + DOC)
# 'docs/llm_losses.md, "Notation"': a quoted heading
CITE_HEADING = re.compile(DOC + LINK + r',\s+"(?P<heading>[^"\n]{2,80})"')
DOCS_PATH = re.compile(r"(?<![\w./-])docs/(?P<name>[A-Za-z0-9_-]+)\.md")
MD_LINK = re.compile(r"\]\((?P<target>[^)\s#]+\.md)(?:#[^)]*)?\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$", re.M)


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode("utf-8", "surrogateescape")
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = [p for p in ROOT.rglob("*") if p.is_file()]
    keep = []
    for p in paths:
        rel = p.relative_to(ROOT)
        if set(rel.parts[:-1]) & SKIP_DIRS or rel.parts[0] in SKIP_DIRS or p.suffix.lower() in SKIP_SUFFIXES:
            continue
        if p.is_file() and p.stat().st_size <= MAX_BYTES:
            keep.append(p)
    return sorted(keep)


@lru_cache(maxsize=None)
def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _texts() -> list[tuple[Path, str]]:
    return [(p, t) for p in _files() if (t := _text(p)) is not None]


def _where(path: Path, text: str, pos: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, pos) + 1}"


def _resolve(doc: str, citing: Path, target: str | None = None) -> Path | None:
    """The file a citation names: a link target relative to the citing file, else the name
    relative to the citing file, the repository root or docs/."""
    cands = []
    if target and target.endswith(".md") and "://" not in target:
        cands.append(citing.parent / target)
    cands += [citing.parent / doc, ROOT / doc, ROOT / "docs" / Path(doc).name]
    for c in cands:
        if c.is_file():
            return c.resolve()
    return None


def _numbers(nums: str) -> list[str]:
    out = []
    parts = re.split(r"\s*(?:,|and|&)\s*", nums)
    for part in parts:
        m = re.fullmatch(rf"({NUM})\s*[-–]\s*({NUM})", part)
        if m and "." not in part:
            out += [str(k) for k in range(int(m.group(1)), int(m.group(2)) + 1)]
        elif m:
            out += [m.group(1), m.group(2)]
        elif part:
            out.append(part)
    return out


def _section_numbers(doc: Path) -> set[str]:
    found = set()
    for m in HEADING.finditer(_text(doc) or ""):
        title = m.group("title") + " "
        n = re.match(r"(\d+(?:\.\d+)*)[.):\s]", title)
        if n:
            found.add(n.group(1))
        r = re.match(r"(\d+)\s*[-–]\s*(\d+)[.):\s]", title)  # "## 6-9. ..." covers sections 6 to 9
        if r:
            found.update(str(k) for k in range(int(r.group(1)), int(r.group(2)) + 1))
        b = re.match(r"(\d+)[a-z][.):\s]", title)  # "## 9b. ..." is cited as "section 9b", read as 9
        if b:
            found.add(b.group(1))
    return found


def _headings(doc: Path) -> list[str]:
    return [m.group("title").lower() for m in HEADING.finditer(_text(doc) or "")]


def test_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p, _ in _texts()}
    assert {"README.md", "docs/theory.md", "drdpo_theory/__init__.py"} <= files


def test_nothing_cites_a_document_outside_the_repository():
    hits = []
    for path, text in _texts():
        lines = text.splitlines()
        for rx in FORBIDDEN:
            for m in rx.finditer(text):
                lineno = text.count("\n", 0, m.start())
                hits.append(f"{_where(path, text, m.start())}: {lines[lineno].strip()[:120]}")
    assert not hits, ("cites a file outside the repository (move what it needs into docs/ and cite that):\n"
                      + "\n".join(hits))


def test_cited_docs_pages_exist():
    missing = []
    for path, text in _texts():
        for m in DOCS_PATH.finditer(text):
            if not (ROOT / "docs" / f"{m.group('name')}.md").is_file():
                missing.append(f"{_where(path, text, m.start())}: docs/{m.group('name')}.md")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(text):
                t = m.group("target")
                if "://" not in t and not (path.parent / t).is_file():
                    missing.append(f"{_where(path, text, m.start())}: link {t}")
    assert not missing, "cited docs page missing:\n" + "\n".join(missing)


def test_cited_sections_exist():
    bad = []
    for path, text in _texts():
        if path.resolve() == Path(__file__).resolve():
            continue
        for rx in (CITE_AFTER, CITE_BEFORE):
            for m in rx.finditer(text):
                doc = _resolve(m.group("doc"), path, m.groupdict().get("target"))
                if doc is None:
                    bad.append(f"{_where(path, text, m.start())}: {m.group('doc')} not found")
                    continue
                have = _section_numbers(doc)
                for n in _numbers(m.group("nums")):
                    if n not in have:
                        bad.append(f"{_where(path, text, m.start())}: {doc.relative_to(ROOT)} has no section {n}"
                                   f" (numbered headings: {', '.join(sorted(have)) or 'none'})")
        for m in CITE_HEADING.finditer(text):
            doc = _resolve(m.group("doc"), path, m.group("target"))
            if doc is None:
                continue  # reported by test_cited_docs_pages_exist when it is a docs/ page
            want = m.group("heading").lower()
            if not any(want in h for h in _headings(doc)):
                bad.append(f"{_where(path, text, m.start())}: {doc.relative_to(ROOT)} has no heading \"{m.group('heading')}\"")
    assert not bad, "cited section missing:\n" + "\n".join(bad)


def test_section_citation_parser():
    """The citation patterns read the forms the repository uses."""
    assert _numbers("1, 3 and 5") == ["1", "3", "5"]
    assert _numbers("2-4") == ["2", "3", "4"]
    assert _numbers("2, 3.1 and 6") == ["2", "3.1", "6"]
    m = CITE_AFTER.search("see [theory.md](theory.md) sections 2-4 and more")
    assert m and m.group("doc") == "theory.md" and m.group("target") == "theory.md" and m.group("nums") == "2-4"
    m = CITE_AFTER.search("(docs/theory_wasserstein.md, section 8)")
    assert m and m.group("doc") == "docs/theory_wasserstein.md" and m.group("nums") == "8"
    m = CITE_AFTER.search("(docs/theory.md\n    section 5, foo)")
    assert m and m.group("nums") == "5"
    m = CITE_BEFORE.search("the gap of section 7 of [docs/theory.md](docs/theory.md).")
    assert m and m.group("doc") == "docs/theory.md" and m.group("nums") == "7"
    m = CITE_HEADING.search('[llm_losses.md](llm_losses.md), "KLDPO weights"; more')
    assert m and m.group("heading") == "KLDPO weights"
    assert not CITE_AFTER.search("paper_repro.md. Section 2 of the report")
    assert _section_numbers(ROOT / "docs" / "theory.md") >= {"1", "2", "3", "3.1", "3.2", "4", "5", "6"}
