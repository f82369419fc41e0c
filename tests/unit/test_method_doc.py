"""docs/method.md, the statement of the maths, and the references to it.

Docstrings, configs, tests, benchmarks and guides cite its sections as ``docs/method.md §N``
(or ``§N.M``). These tests check that the document has its seven numbered sections, that every
cited section exists, that every citation names the file by its path in the repository, and
that the files its "In the code:" lines name exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

METHOD_DOC = REPO / "docs" / "method.md"
#: Where references to the document are looked for (globs relative to the repository root).
SEARCHED = ("vdu_lightning/**/*.py", "tests/**/*.py", "benchmarks/*.py", "docs/*.md",
            "README.md", "configs/**/*.yaml")
#: A reference: the file name, then § and a section number N or N.M (group 2); group 1 is
#: the path written before the file name. A backtick may close the file name.
REFERENCE = re.compile(r"((?:[\w.-]+/)*)method\.md`? ?§(\d+(?:\.\d+)?)")
#: The one way of writing the file's path that a reader can follow from the repository root.
PROPER_PREFIX = "docs/"
SECTION = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
SUBSECTION = re.compile(r"^### (\d+\.\d+) \S", re.MULTILINE)
CODE_LINE = "In the code:"
PATH_ROOTS = ("vdu_lightning/", "configs/", "docs/")


def searched_files() -> Iterator[Path]:
    """Every file that may cite the document, once each."""
    seen: set[Path] = set()
    for pattern in SEARCHED:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and path not in seen and "__pycache__" not in path.parts:
                seen.add(path)
                yield path


def references() -> list[tuple[str, str, str]]:
    """(file:line, prefix written before ``method.md``, section) of every reference."""
    found = []
    for path in searched_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            for match in REFERENCE.finditer(line):
                where = f"{path.relative_to(REPO)}:{number}"
                found.append((where, match.group(1), match.group(2)))
    return found


def document_sections() -> set[str]:
    """The numbers of the document's ``## N.`` sections and ``### N.M`` subsections."""
    text = METHOD_DOC.read_text(encoding="utf-8")
    return set(SECTION.findall(text)) | set(SUBSECTION.findall(text))


def code_paragraphs() -> list[str]:
    """The "In the code:" paragraphs of the document (a wrapped paragraph counts as one)."""
    paragraphs = re.split(r"\n\s*\n", METHOD_DOC.read_text(encoding="utf-8"))
    return [" ".join(p.split()) for p in paragraphs if p.lstrip().startswith(CODE_LINE)]


def test_the_document_has_the_seven_sections_in_order_each_with_its_code() -> None:
    text = METHOD_DOC.read_text(encoding="utf-8")
    assert SECTION.findall(text) == [str(n) for n in range(1, 8)]
    for body in re.split(r"^## \d+\. ", text, flags=re.MULTILINE)[1:]:
        heading = body.splitlines()[0]
        assert CODE_LINE in body, f"section {heading!r} has no {CODE_LINE!r} line"
    for number in SUBSECTION.findall(text):
        assert number.split(".")[0] in SECTION.findall(text), f"### {number} has no parent"


def test_every_cited_section_exists() -> None:
    sections = document_sections()
    found = references()
    assert found, "no reference to method.md found: the search patterns are wrong"
    unknown = [f"{where}: §{number}" for where, _, number in found if number not in sections]
    assert not unknown, (f"references to sections that docs/method.md lacks (it has "
                         f"{sorted(sections)}): {unknown}")


def test_every_reference_names_the_file_by_its_path() -> None:
    loose = [f"{where}: {prefix}method.md §{number}" for where, prefix, number in references()
             if prefix != PROPER_PREFIX]
    assert not loose, ("write these as `docs/method.md §N`, the path a reader can open: "
                       f"{loose}")


def test_the_paths_named_in_the_code_lines_exist() -> None:
    paragraphs = code_paragraphs()
    assert len(paragraphs) >= 7, f"expected an {CODE_LINE!r} line per section"
    named = [name for paragraph in paragraphs for name in re.findall(r"`([^`]+)`", paragraph)
             if "/" in name and name.startswith(PATH_ROOTS)]
    assert named, f"the {CODE_LINE!r} lines name no path"
    missing = [name for name in named
               if not (any(REPO.glob(name)) if "*" in name else (REPO / name).exists())]
    assert not missing, f"paths named in docs/method.md that do not exist: {missing}"
