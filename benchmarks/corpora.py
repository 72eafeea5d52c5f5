"""Build three natural-English text corpora, offline, for the recipe benchmark.

    python benchmarks/corpora.py                      # both, into ~/.cache/xlab/corpora
    python benchmarks/corpora.py --out DIR --only small

Then train on one with `python -m xlab.train data=text_files data.data_files=DIR/small.jsonl` (add
`data.id_column=id` to name documents by their source path rather than by line number).

- `small.jsonl` (0.8-1.5 MB of text): "The Rust Programming Language" book as installed by rustup
  (`<rust-docs>/book/`, mdBook HTML), one document per chapter page (the pages its toc.html links to), the text
  of the page's `<main>`: navigation, sidebar, scripts and styles dropped, code blocks kept as plain text (less
  the lines mdBook hides), HTML entities decoded. The Rustonomicon
  (`<rust-docs>/nomicon/`) is added only if the book alone is under 0.8 MB.
- `large.jsonl` (>= 20 MB, stops once past 22 MB): the English man pages in `<man-dir>/man[1-8]/`, one document
  per page, rendered to plain text by `groff -man -Tutf8` (a small pure-Python roff stripper when groff is not
  installed), in sorted path order. `.so` redirects, symlinked aliases and pages whose text repeats an earlier
  page are skipped, and so are the ~16,600 machine-generated `gcloud` pages: they are the same flag boilerplate
  over and over and would otherwise be nine tenths of the corpus.

- `manual.jsonl` (~0.7 MB): the Vim user manual (`<vim-docs>/usr_NN.txt`), a tutorial in plain English prose,
  one document per numbered section (`*02.1* Running Vim for the First Time`), its title as the first line.

Why: comparing training recipes needs natural English at two sizes (about 1 MB, which a small model sees many
times over in minutes, and about 20 times that), built from text already on the machine so that no network is
needed, and never the test split of anything we score on.

Each line is `{"id": <path relative to the source dir>, "text": ...}`; inputs are read in sorted order, so
rebuilding on the same machine gives byte-identical files. Rebuild with the command above: each file is written
to a temporary name and moved into place, so an interrupted build leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from html.parser import HTMLParser
from multiprocessing.pool import ThreadPool
from pathlib import Path

RUST_DOCS = Path("~/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html").expanduser()
MAN_DIR = Path("/usr/share/man")
VIM_DOCS = Path("/usr/share/vim/vim90/doc")
DEFAULT_OUT = Path("~/.cache/xlab/corpora").expanduser()

SMALL_MIN, SMALL_MAX, SMALL_CAP = 0.8e6, 1.5e6, 1.1e6  # bytes of UTF-8 text
LARGE_MIN, LARGE_TARGET = 20e6, 22e6

# mdBook pages that are not chapters: the whole book on one page, the sidebar frame, the 404 page, and index.html,
# which is a copy of the first chapter.
NON_CHAPTERS = {"print.html", "404.html", "toc.html", "index.html"}
EXCLUDED_MAN_PREFIXES = ("gcloud",)  # see the module docstring

Doc = tuple[str, str]  # (id, text)


class SourceMissing(Exception):
    """A source directory is not on this machine; the message names it and the corpus that needs it."""


def _tidy(text: str) -> str:
    """Trailing spaces off every line, runs of blank lines collapsed to one, no blank edges."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


# ---------------------------------------------------------------------------------------------- mdBook HTML

BLOCKS = {"p", "div", "section", "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol",
          "li", "dl", "dt", "dd", "table", "tr", "blockquote", "figure", "figcaption", "hr", "details", "summary"}
SKIPPED = {"script", "style", "nav", "noscript", "template", "svg", "button"}
VOID = {"br", "hr", "img", "input", "meta", "link", "wbr", "source", "col", "area", "base", "embed", "track"}


class _MainText(HTMLParser):
    """Collects the text inside <main> as blocks: prose with its whitespace collapsed, <pre> kept verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive decoded in handle_data
        self.found = self.inside = False
        self.skip = 0  # open elements since entering a skipped one (script, nav, ...); 0 = not skipping
        self.pre = 0
        self.blocks: list[tuple[str, bool]] = []  # (text, is a list item or a table row)
        self.row = False
        self.line: list[str] = []

    def _flush(self) -> None:
        text = "".join(self.line)
        self.line = []
        if text.strip() == "-" and not self.pre:
            self.line = ["- "]  # a list item that opens with a paragraph: keep its bullet for that paragraph
            return
        if self.pre:
            self.blocks.append((text.strip("\n"), False))
        elif text.strip():
            text = re.sub(r"[ \t\r\f\v]+", " ", text)  # a \n here only comes from <br>
            text = re.sub(r" *\n *", "\n", text).strip(" ")
            self.blocks.append((re.sub(r"( \|)+$", "", text) if self.row else text, self.row))  # no empty last cells
        self.row = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "main":
            self.found = self.inside = True
        if not self.inside:
            return
        hidden = tag == "span" and "boring" in (dict(attrs).get("class") or "").split()  # mdBook's hidden code lines
        if tag not in VOID and (self.skip or tag in SKIPPED or hidden):
            self.skip += 1
        if self.skip:
            return
        if tag == "pre" or tag in BLOCKS:
            self._flush()
        self.pre += tag == "pre"
        self.row = self.row or tag in ("li", "tr")
        if tag == "br":
            self.line.append("\n")
        elif tag == "li":
            self.line.append("- ")
        elif tag in ("td", "th") and self.line:
            self.line.append(" | ")  # the cells of a row on one line

    def handle_endtag(self, tag: str) -> None:
        if not self.inside or tag in VOID:
            return
        if self.skip:
            self.skip -= 1
            return
        if tag == "pre" or tag in BLOCKS or tag == "main":
            self._flush()
        self.pre -= tag == "pre" and self.pre > 0
        self.inside = tag != "main"

    def handle_data(self, data: str) -> None:
        if self.inside and not self.skip:
            self.line.append(data if self.pre else data.replace("\n", " "))


def html_text(html: str) -> str | None:
    """The plain text of an mdBook page's <main>, or None for a page without one (redirects, rustdoc stubs)."""
    parser = _MainText()
    parser.feed(html)
    parser.close()
    parser._flush()
    if not parser.found:
        return None
    out = []
    for i, (text, item) in enumerate(parser.blocks):
        if i:  # list items and table rows one per line, every other block a paragraph of its own
            out.append("\n" if item and parser.blocks[i - 1][1] else "\n\n")
        out.append(text)
    return _tidy("".join(out))


def chapter_pages(book: Path) -> list[Path]:
    """The mdBook's chapter pages in sorted path order: the ones its table of contents (toc.html) links to, so
    not the stubs left for retired editions; every page when there is no toc.html."""
    pages = sorted(book.rglob("*.html"))
    toc = book / "toc.html"
    if toc.is_file():
        links = re.findall(r'href="([^"#?:]+\.html)', toc.read_text(encoding="utf-8", errors="replace"))
        linked = {(book / link).resolve() for link in links}
        pages = [p for p in pages if p.resolve() in linked]
    return [p for p in pages if p.name not in NON_CHAPTERS]


def book_documents(book: Path, root: Path) -> Iterator[Doc]:
    """One document per chapter page of the mdBook in `book`, ids relative to `root`."""
    seen: set[str] = set()
    for path in chapter_pages(book):
        text = html_text(path.read_text(encoding="utf-8", errors="replace"))
        if text is None or text in seen:  # no <main>: a redirect; the same text: a copy (title page, index)
            continue
        seen.add(text)
        yield path.relative_to(root).as_posix(), text


def small_documents(rust_docs: Path) -> list[Doc]:
    """The Rust book, plus the Rustonomicon if the book is too short, capped if it is too long."""
    book = rust_docs / "book"
    if not book.is_dir():
        raise SourceMissing(f"{book} not found: the small corpus needs the Rust book's HTML "
                            "(`rustup component add rust-docs`), or pass --rust-docs")
    docs = list(book_documents(book, rust_docs))
    size = _size(docs)
    nomicon = rust_docs / "nomicon"
    if size < SMALL_MIN and nomicon.is_dir():
        docs += book_documents(nomicon, rust_docs)
    elif size > SMALL_MAX:
        docs = _take(docs, SMALL_CAP)
    return docs


def _size(docs: Iterable[Doc]) -> int:
    return sum(len(text.encode()) for _, text in docs)


def _take(docs: Iterable[Doc], target: float) -> list[Doc]:
    """Documents in order until their text reaches `target` bytes (the one that crosses it included)."""
    out, size = [], 0
    for doc in docs:
        if size >= target:
            break
        out.append(doc)
        size += len(doc[1].encode())
    return out


# ---------------------------------------------------------------------------------------------- man pages

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}


def roff_source(path: Path) -> str:
    """The page's roff source, decompressed; Latin-1 for the few old pages that are not UTF-8."""
    with OPENERS.get(path.suffix, open)(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def is_redirect(src: str) -> bool:
    """A page that only sources another one (`.so man1/foo.1`): an alias, its text is the other page's."""
    lines = [s for s in src.splitlines() if s.strip() and not re.match(r"^[.']\s*\\\"", s)]
    return bool(lines) and all(re.match(r"^\.so\s", s) for s in lines)


def man_pages(man_dir: Path) -> list[Path]:
    """The English pages under man_dir/man[1-8]/, sorted; symlinks are aliases of pages already listed."""
    sections = sorted(p for p in man_dir.glob("man[1-8]") if p.is_dir())
    if not sections:
        raise SourceMissing(f"{man_dir}/man[1-8] not found: the large corpus needs the system's English man pages "
                            "(install man-db and unminimize the image), or pass --man-dir")
    return sorted(p for d in sections for p in d.iterdir()
                  if p.is_file() and not p.is_symlink() and not p.name.startswith(EXCLUDED_MAN_PREFIXES))


def render_groff(src: str) -> str:
    """The page as `man` shows it, minus bold/underline, hyphenation and justification (they only add noise)."""
    hint = re.match(r"^'\\\" ([a-z]+)", src)  # `'\" t` asks for preprocessors: t = tbl, e = eqn, p = pic
    flags = {"-t"} | {f"-{c}" for c in (hint.group(1) if hint else "") if c in "ep"}
    cmd = ["groff", "-man", "-Tutf8", "-Kutf-8", "-P-cbou", "-rHY=0", *sorted(flags)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(cmd, input=(".ad l\n" + src).encode(), capture_output=True, env=env, timeout=300)
    text = proc.stdout.decode("utf-8", errors="replace")
    return _tidy(re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text))  # no terminal controls left in the corpus


# The fallback: good enough to read, nowhere near a typesetter.
GLYPHS = {"em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
          "aq": "'", "dq": '"', "co": "©", "rg": "®", "tm": "™", "de": "°", "<=": "≤", ">=": "≥", "->": "→",
          "<-": "←", "ti": "~", "ha": "^", "rs": "\\", "ba": "|", "or": "|", "mu": "×", "+-": "±"}
FONT_MACROS = {"B", "I", "SM", "SB"}  # arguments joined with spaces
ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}  # arguments joined without
BREAKS = {"PP", "LP", "P", "HP", "sp", "br", "TP", "TQ", "IP", "RS", "RE", "EX", "EE", "nf", "fi", "TS", "TE"}
ESCAPES = re.compile(
    r"\\(?:\((?P<g2>..)|\[(?P<gl>[^]]*)\]"  # glyphs: \(em \[em]
    r"|\*(?:\((?P<s2>..)|\[(?P<sl>[^]]*)\]|(?P<s1>.))"  # strings: \*(L" \*[R] \*R
    r"|f(?:\(..|\[[^]]*\]|.)|[sn][-+]?(?:\(..|\[[^]]*\]|\d|.)"  # font and size changes, registers
    r"|[hvwlLbxXoDkzjZHSRNC]'[^']*'"  # motions, lines and the like: print nothing
    r"|(?P<c>.))", re.S)
SIMPLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'", "`": "`", ".": ".",
          "E": "\\"}  # every other one-character escape (\& \| \^ \c \% ...) prints nothing
STRINGS = {'L"': '"', 'R"': '"', "C`": '"', "C'": '"', "lq": "“", "rq": "”", "Aq": "'", "R": "®", "Tm": "™"}


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        if m["g2"] or m["gl"]:
            return GLYPHS.get(m["g2"] or m["gl"], "")
        if m["s2"] or m["sl"] or m["s1"]:
            return STRINGS.get(m["s2"] or m["sl"] or m["s1"], "")
        return SIMPLE.get(m["c"], "") if m["c"] else ""

    return ESCAPES.sub(one, re.sub(r'\\".*', "", text))  # \" starts a comment that runs to the end of the line


def _macro_text(name: str, args: str) -> str | None:
    """The text a macro line stands for; None for requests that print nothing."""
    words = [a[1:-1] if len(a) > 1 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"?|\S+', args)]
    if name in ("SH", "SS"):
        return "\n\n" + " ".join(words) + "\n"
    if name in FONT_MACROS:
        return " ".join(words)
    if name in ALTERNATING or name in ("UR", "MT", "OP"):
        return "".join(words)
    if name in ("IP", "TP", "TQ", "HP", "PP", "LP", "P", "sp"):
        return "\n" + (words[0] if name == "IP" and words else "")
    return "" if name in BREAKS else None


def strip_roff(src: str) -> str:
    """Roff source to plain text without groff: macros become their text, other requests and escapes go."""
    out: list[str] = []
    table_format = False  # between .TS and the format line that ends with "."
    for line in re.sub(r"\\\n", "", src).splitlines():  # continuation lines joined first
        if table_format:
            table_format = not line.rstrip().endswith(".")
            continue
        if re.match(r"^[.']\s*\\\"", line):
            continue
        m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
        if not m:
            out.append(_unescape(line).replace("\t", "  "))
            continue
        table_format = m.group(1) == "TS"
        text = _macro_text(m.group(1), m.group(2))
        if text is not None:
            out.append(_unescape(text))
    return _tidy("\n".join(out))


def render_page(args: tuple[str, str]) -> Doc | None:
    """Worker: (path, renderer) -> (path, text), or None for a redirect or an empty page."""
    path, renderer = args
    src = roff_source(Path(path))
    if is_redirect(src):
        return None
    text = render_groff(src) if renderer == "groff" else strip_roff(src)
    return (path, text) if text.strip() else None


def large_documents(man_dir: Path, target: float = LARGE_TARGET, renderer: str | None = None,
                    processes: int = 2) -> Iterator[Doc]:
    """Rendered man pages in sorted path order, duplicates dropped, until their text passes `target` bytes.
    `renderer`: "groff" or "python"; by default groff when it is installed (it was measured to be both faster and
    better than `man -l | col -b`: 24 vs 64 ms a page; the Python stripper takes 1.3 ms but reads worse)."""
    pages = man_pages(man_dir)
    renderer = renderer or ("groff" if shutil.which("groff") else "python")
    print(f"large: rendering with {renderer}, {len(pages)} candidate pages", flush=True)
    seen: set[bytes] = set()
    size = 0
    # Threads are enough: the work is in the groff processes they wait on (the Python stripper is fast anyway), and
    # unlike a process pool they need no importable __main__. imap keeps the input order, so the same pages are
    # taken whatever the workers' timing.
    with ThreadPool(processes) as pool:
        for doc in pool.imap(render_page, [(str(p), renderer) for p in pages], chunksize=4):
            if doc is None:
                continue
            digest = hashlib.sha1(doc[1].encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            yield Path(doc[0]).relative_to(man_dir).as_posix(), doc[1]
            size += len(doc[1].encode())
            if size >= target:
                pool.terminate()  # the rest of the pages are not needed
                return


# ---------------------------------------------------------------------------------------------- output

MANUAL_MIN = 0.5e6
MANUAL_SECTION = re.compile(r"^\*(\d\d\.\d+)\*\s+(.+)$", re.M)  # `*02.1*	Running Vim for the First Time`


def manual_documents(vim_docs: Path) -> list[Doc]:
    """The Vim user manual (usr_NN.txt, a tutorial in English prose), one document per numbered section, the
    section title as its first line; the chapters' navigation headers and the rule lines dropped."""
    chapters = sorted(vim_docs.glob("usr_[0-9][0-9].txt"))
    if not chapters:
        raise SourceMissing(f"no Vim user manual (usr_NN.txt) in {vim_docs}: the manual corpus needs the vim "
                            "package's docs (apt-get install vim-runtime), or pass --vim-docs")
    docs = []
    for chapter in chapters:
        text = chapter.read_text(encoding="utf-8", errors="replace")
        starts = [m.start() for m in MANUAL_SECTION.finditer(text)]
        for begin, end in zip(starts, [*starts[1:], len(text)]):
            section = re.sub(r"^=+$", "", text[begin:end], flags=re.M)  # the rules between sections
            number, title = MANUAL_SECTION.match(section).groups()
            body = _tidy(MANUAL_SECTION.sub("", section, count=1))
            if body:
                docs.append((f"{chapter.name}#{number}", _tidy(f"{title.strip()}\n\n{body}")))
    return docs


def write_jsonl(docs: Iterable[Doc], path: Path) -> tuple[int, int]:
    """Writes one JSON object per line to a temp file, then moves it into place; returns (documents, text bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: os.replace is then atomic
    n = size = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc_id, text in docs:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                n, size = n + 1, size + len(text.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n, size


def build(name: str, docs: Callable[[], Iterable[Doc]], out: Path, minimum: float) -> Path:
    """Builds one corpus into out/<name>.jsonl and prints its summary line."""
    start = time.perf_counter()
    path = out / f"{name}.jsonl"
    n, size = write_jsonl(docs(), path)
    seconds = time.perf_counter() - start
    note = "" if size >= minimum else f"  (warning: under the {minimum / 1e6:.1f} MB aimed for)"
    print(f"{name}: {n} documents, {size / 1e6:.2f} MB of text, {seconds:.1f} s -> {path}{note}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--only", choices=("small", "large", "manual"), help="build just one of the corpora")
    parser.add_argument("--vim-docs", type=Path, default=VIM_DOCS, help="the directory holding usr_NN.txt")
    parser.add_argument("--rust-docs", type=Path, default=RUST_DOCS, help="rustup's share/doc/rust/html")
    parser.add_argument("--man-dir", type=Path, default=MAN_DIR, help="directory holding man1/ ... man8/")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    try:
        if args.only in (None, "small"):
            build("small", lambda: small_documents(args.rust_docs), out, SMALL_MIN)
        if args.only in (None, "large"):
            build("large", lambda: large_documents(args.man_dir), out, LARGE_MIN)
        if args.only in (None, "manual"):
            build("manual", lambda: manual_documents(args.vim_docs), out, MANUAL_MIN)
    except SourceMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
