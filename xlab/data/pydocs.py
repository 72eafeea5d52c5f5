"""`data=pydocs`: English text that ships with every CPython, so the default run needs no network.

Documents are the help topics of `pydoc_data.topics` (the text behind `help('FORMATTING')`) and, per standard
library module, its module/class/function docstrings read with `ast` (nothing is imported or executed).
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from pathlib import Path

from xlab.data.config import DataConfig
from xlab.data.sources import SOURCES, Source, fingerprint

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(path: Path) -> str:
    """The docstrings of one module in source order, each headed by the qualified name it documents."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):  # lib2to3 fixtures and the like
        return ""
    parts: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n{doc}")
                visit(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    visit(tree, "")
    return "\n\n".join(parts)


def pydocs_documents() -> tuple[list[str], list[str]]:
    """(ids, texts) in a deterministic order."""
    from pydoc_data.topics import topics  # a 1 MB module: only when the corpus is built

    ids = [f"topic/{name}" for name in sorted(topics)]
    texts = [topics[name] for name in sorted(topics)]
    root = _stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        text = _docstrings(path)
        if text:
            ids.append(f"module/{rel.with_suffix('').as_posix()}")
            texts.append(text)
    return ids, texts


def _fingerprint(cfg: DataConfig) -> str:
    # The stdlib's text is fixed by the interpreter build, so its version and location name the corpus.
    return fingerprint("pydocs-v1", sys.version, str(_stdlib_dir()))


@functools.lru_cache(maxsize=1)
def _dataset():
    import datasets  # datasets: lazily, only when used

    ids, texts = pydocs_documents()
    return datasets.Dataset.from_dict({"id": ids, "text": texts})


def _load(cfg: DataConfig, ids_only: bool = False):
    # 2.4 MB, but parsing the stdlib takes seconds: build it once per process for the passes of a preparation.
    return _dataset()


SOURCES.register("pydocs")(Source(fingerprint=_fingerprint, load=_load))
