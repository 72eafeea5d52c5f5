"""benchmarks/corpora.py on tiny sources written here (CI machines may have neither the Rust docs nor man pages):
what text it extracts from mdBook HTML and roff, the JSONL it writes, and that two builds are byte-identical."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpora  # noqa: E402

PAGE = """<!DOCTYPE html><html><head><title>{title}</title><style>body {{ color: red }}</style>
<script>var sidebar = "SCRIPT TEXT";</script></head><body>
<nav id="sidebar"><ol class="chapter"><li><a href="ch01.html">SIDEBAR ENTRY</a></li></ol></nav>
<div id="content"><main>
{body}
<script>window.playground_copyable = "INLINE SCRIPT";</script>
</main><nav class="nav-wrapper"><a rel="next" href="ch02.html">NEXT CHAPTER</a></nav></div></body></html>"""

CH01 = """<h1 id="hello"><a class="header" href="#hello">Hello, World!</a></h1>
<p>Rust&rsquo;s rules  are
checked &amp; enforced by the compiler: <code>Vec&lt;T&gt;</code> owns its data.</p>
<ul><li>one owner</li><li><p>dropped at the end of scope</p></li></ul>
<pre><code class="language-rust"><span class="boring">#![allow(unused)]
</span>fn main() {
    let s = "hello";



    println!("{s}");
}</code></pre>
<p>That is all.</p>"""

CH02 = """<h1>Tables</h1><table><thead><tr><th>Operator</th><th>Meaning</th></tr></thead>
<tbody><tr><td><code>+</code></td><td>addition</td></tr><tr><td><code>!</code></td><td></td></tr></tbody></table>"""

TOC = '<html><body><ol><li><a href="ch01.html">1.</a></li><li><a href="ch02.html">2.</a></li></ol></body></html>'
REDIRECT = '<html><head><meta http-equiv="refresh" content="0; URL=ch01.html"></head><body>Redirecting</body></html>'

ALPHA = r""".\" a comment that must not show
.TH ALPHA 1 "May 2024" "alpha 1.0" "User Commands"
.SH NAME
alpha \- print the first letter
.SH DESCRIPTION
.B alpha
prints \fIone\fR letter \(em and \fBonly\fP one.
.PP
See
.BR beta (1).
"""
BETA = r"""'\" t
.TH BETA 1 "May 2024" "beta 2.0" "User Commands"
.SH NAME
beta \- the second letter
.SH OPTIONS
.TP
.B \-v
Be verbose.
.TS
l l.
key	value
.TE
"""


def write_sources(root: Path) -> tuple[Path, Path]:
    """A rustup-like html/ with a book and a nomicon, and a man/ tree; returns (rust docs, man dir)."""
    book = root / "html" / "book"
    (book / "old").mkdir(parents=True)
    (book / "ch01.html").write_text(PAGE.format(title="Hello", body=CH01))
    (book / "ch02.html").write_text(PAGE.format(title="Tables", body=CH02))
    (book / "print.html").write_text(PAGE.format(title="All", body=CH01 + CH02))  # the whole book on one page
    (book / "old" / "stub.html").write_text(PAGE.format(title="Old", body="<p>No longer distributed.</p>"))
    (book / "redirect.html").write_text(REDIRECT)
    (book / "toc.html").write_text(TOC.replace("</ol>", '<li><a href="redirect.html">r</a></li></ol>'))
    nomicon = root / "html" / "nomicon"
    nomicon.mkdir()
    (nomicon / "intro.html").write_text(PAGE.format(title="Nomicon", body="<p>The Dark Arts of Unsafe Rust.</p>"))

    man = root / "man"
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)
    (man / "man1" / "alpha.1.gz").write_bytes(gzip.compress(ALPHA.encode(), mtime=0))
    (man / "man1" / "beta.1").write_text(BETA)
    (man / "man1" / "copy.1.gz").write_bytes(gzip.compress(ALPHA.encode(), mtime=0))  # same text as alpha
    (man / "man1" / "gamma.1.gz").write_bytes(gzip.compress(b'.\\" alias\n.so man1/alpha.1\n'))
    (man / "man1" / "gcloud_foo.1").write_text(ALPHA.replace("alpha", "gcloud"))
    (man / "man1" / "link.1.gz").symlink_to("alpha.1.gz")
    (man / "de" / "man1" / "alpha.1").write_text(ALPHA.replace("letter", "Buchstabe"))
    return root / "html", man


def read_jsonl(path: Path) -> dict[str, str]:
    docs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert list(row) == ["id", "text"] and isinstance(row["text"], str)
        docs[row["id"]] = row["text"]
    return docs


def test_mdbook_page_text_keeps_prose_and_code_and_drops_the_rest():
    text = corpora.html_text(PAGE.format(title="Hello", body=CH01))
    assert text.startswith("Hello, World!\n\nRust’s rules are checked & enforced by the compiler: Vec<T> owns")
    assert "- one owner\n- dropped at the end of scope\n\n" in text
    assert 'fn main() {\n    let s = "hello";\n\n    println!("{s}");\n}\n\nThat is all.' in text  # one blank line
    for gone in ("SCRIPT", "SIDEBAR", "NEXT CHAPTER", "color: red", "allow(unused)", "&amp;", "<code>"):
        assert gone not in text
    table = corpora.html_text(PAGE.format(title="Tables", body=CH02))
    assert table == "Tables\n\nOperator | Meaning\n+ | addition\n!"
    assert corpora.html_text(REDIRECT) is None


def test_small_corpus_takes_chapters_from_the_toc_and_adds_the_nomicon_when_short(tmp_path, monkeypatch):
    rust_docs, _ = write_sources(tmp_path)
    docs = corpora.small_documents(rust_docs)
    assert [i for i, _ in docs] == ["book/ch01.html", "book/ch02.html", "nomicon/intro.html"]
    monkeypatch.setattr(corpora, "SMALL_MIN", 0)
    monkeypatch.setattr(corpora, "SMALL_MAX", 10)
    monkeypatch.setattr(corpora, "SMALL_CAP", 10)
    assert [i for i, _ in corpora.small_documents(rust_docs)] == ["book/ch01.html"]  # too long: capped, in order


RENDERERS = ["python", pytest.param("groff", marks=pytest.mark.skipif(not shutil.which("groff"),
                                                                        reason="groff is not installed"))]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_man_pages_become_text_without_redirects_aliases_or_copies(tmp_path, renderer):
    _, man = write_sources(tmp_path)
    docs = dict(corpora.large_documents(man, renderer=renderer, processes=2))
    assert list(docs) == ["man1/alpha.1.gz", "man1/beta.1"]  # not the .so, the symlink, the copy, gcloud, de/
    alpha, beta = (" ".join(docs[k].split()) for k in docs)  # the renderers differ in line breaks and indents
    assert "NAME alpha - print the first letter DESCRIPTION alpha prints one letter — and only one." in alpha
    assert "See beta(1)." in alpha
    assert "-v Be verbose." in beta and "key value" in beta
    for gone in ("\\", ".TH", ".SH", ".B", "comment", "l l.", ".TS"):
        assert gone not in alpha + beta
    assert list(corpora.large_documents(man, target=1, renderer=renderer))[0][0] == "man1/alpha.1.gz"
    assert len(list(corpora.large_documents(man, target=1, renderer=renderer))) == 1  # stops at the target


VIM_CHAPTER = """*usr_02.txt*\tFor Vim version 9.0.

\t\t     VIM USER MANUAL - by Bram Moolenaar

\t\t\tThe first steps in Vim

 Next chapter: |usr_03.txt|  Moving around
==============================================================================
*02.1*\tRunning Vim for the First Time

To start Vim, enter this command: >

\tgvim file.txt

==============================================================================
*02.2*\tInserting text

The Vim editor is a modal editor.\u00a0That means the editor behaves differently.
"""


def test_the_vim_manual_becomes_one_document_per_section(tmp_path):
    (tmp_path / "usr_02.txt").write_text(VIM_CHAPTER)
    (tmp_path / "usr_toc.txt").write_text("*01.1* not a chapter\n\nskipped\n")
    docs = corpora.manual_documents(tmp_path)
    assert [d[0] for d in docs] == ["usr_02.txt#02.1", "usr_02.txt#02.2"]
    first = docs[0][1]
    assert first.startswith("Running Vim for the First Time\n\nTo start Vim") and "gvim file.txt" in first
    assert "=====" not in first and "Next chapter" not in first and "Inserting" not in first


def test_two_builds_write_identical_jsonl(tmp_path, capsys):
    rust_docs, man = write_sources(tmp_path)
    (tmp_path / "vim").mkdir()
    (tmp_path / "vim" / "usr_02.txt").write_text(VIM_CHAPTER)
    sources = ["--rust-docs", str(rust_docs), "--man-dir", str(man), "--vim-docs", str(tmp_path / "vim")]
    assert corpora.main(["--out", str(tmp_path / "a"), *sources]) == 0
    assert re.search(r"^small: 3 documents, 0\.00 MB of text, [\d.]+ s", capsys.readouterr().out, re.M)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpora.py"), "--out", str(tmp_path / "b"),
                           *sources], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^large: 2 documents, 0\.00 MB of text, [\d.]+ s", proc.stdout, re.M), proc.stdout
    for name in ("small.jsonl", "large.jsonl", "manual.jsonl"):
        a, b = (tmp_path / d / name for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        if name == "manual.jsonl":
            continue
        assert "’" in a.read_text(encoding="utf-8") or "—" in a.read_text(encoding="utf-8")  # ensure_ascii=False
        assert set(read_jsonl(a)) == ({"book/ch01.html", "book/ch02.html", "nomicon/intro.html"} if name[0] == "s"
                                      else {"man1/alpha.1.gz", "man1/beta.1"})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["large.jsonl", "manual.jsonl", "small.jsonl"]


@pytest.mark.parametrize("only,flag", [("small", "--rust-docs"), ("large", "--man-dir"), ("manual", "--vim-docs")])
def test_a_missing_source_is_a_one_line_error(tmp_path, only, flag):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpora.py"), "--out", str(tmp_path / "out"),
                           "--only", only, flag, str(missing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and str(missing) in proc.stderr
    assert f"the {only} corpus needs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / f"{only}.jsonl").exists()
