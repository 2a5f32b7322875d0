"""Every relative link in README.md and docs/*.md resolves: the file (or folder) exists, and a
#anchor names a heading of the target markdown file by GitHub's slug rules. Web and mail links are
not followed."""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = ("http://", "https://", "mailto:")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", flags=re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")  # [text](target "title"), images too
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=[\"']([^\"']+)[\"']", flags=re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", flags=re.M)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans removed (links there are code)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation other than '-' and
    '_' removed, each space a '-' (runs of spaces are not merged)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    text = without_code(text)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text) + HTML_LINK.findall(text)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file: link (why)' for each relative link of ``path`` that does not resolve (file named from ``root``)."""
    broken = []
    for link in links(path.read_text(encoding="utf-8")):
        if not link or link.lower().startswith(SKIPPED):
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / unquote(target)).resolve() if target else path
        where = f"{path.relative_to(root)}: {link}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix.lower() == ".md" and unquote(anchor).lower() not in anchors(resolved):
            broken.append(f"{where} (no heading with that anchor in {resolved.name})")
    return broken


def test_relative_links_resolve():
    files = markdown_files()
    assert (ROOT / "docs" / "methods.md") in files
    broken = [b for path in files for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert slug("2. A-STAR") == "2-a-star"
    assert slug("The held-out result: searching at w = 0.5") == "the-held-out-result-searching-at-w--05"
    assert slug("IR-Diffusion (issue 13): the held-out rows") == "ir-diffusion-issue-13-the-held-out-rows"
    assert slug("`sparse_pool` and [links](x.md)") == "sparse_pool-and-links"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#not-a-heading) "
                    "[web](https://example.com/x) `[code](nowhere.md)` [self](#top)\n\n# Top\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                     "page.md: other.md#not-a-heading (no heading with that anchor in other.md)"]
