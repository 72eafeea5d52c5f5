"""Synthetic corpora with Wikipedia's parquet schema (id, url, title, text), for tests, benchmarks and smoke runs.

The hub is not reachable everywhere XLab is tested, so `data=wikipedia data.data_files=GLOB` is exercised on files
written here. The text is made of pseudo-words drawn from a Zipf distribution (like real word frequencies), in
sentences and paragraphs, with some non-ASCII words, so tokenizers see realistic statistics and throughput.

    python -m xlab.data.synthetic OUT_DIR --mb 50 --shards 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

_SYLLABLES = ("ka ri to an el mo su ne la tri ver on is ax ul ze ba co di fa ge hu jo ke lu mi no pe qu ra se ti "
              "vo wa xe yu za ber tion ment ing ous al ic").split()
_UNICODE = ["café", "naïve", "Zürich", "Ångström", "São", "東京", "Москва", "Ελλάδα", "façade", "über", "–", "€5"]


def _vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    words = set()
    while len(words) < size:
        n = int(rng.integers(1, 5))
        words.add("".join(rng.choice(_SYLLABLES, n)))
    vocab = sorted(words)
    rng.shuffle(vocab)
    vocab[100 : 100 + 20 * len(_UNICODE) : 20] = _UNICODE  # mixed in among the fairly common words
    return np.array(vocab, dtype=object)


class ArticleWriter:
    """Deterministic articles: the same seed gives the same corpus."""

    def __init__(self, seed: int = 0, vocab_size: int = 30_000, mean_chars: int = 3000) -> None:
        self.rng = np.random.default_rng(seed)
        self.vocab = _vocabulary(self.rng, vocab_size)
        ranks = np.arange(1, vocab_size + 1)
        p = 1.0 / ranks**1.1
        self.cdf = np.cumsum(p / p.sum())
        self.mean_words = mean_chars / 7.0  # ~6 letters and a space per word

    def _words(self, n: int) -> list[str]:
        return self.vocab[np.searchsorted(self.cdf, self.rng.random(n))].tolist()

    def article(self, i: int) -> dict[str, str]:
        title = " ".join(w.capitalize() for w in self._words(int(self.rng.integers(1, 4))))
        n_words = max(20, int(self.rng.lognormal(np.log(self.mean_words) - 0.32, 0.8)))  # mean = mean_words
        words = self._words(n_words)
        lengths = self.rng.integers(5, 25, size=n_words // 5 + 1)
        paragraphs, sentences, pos = [], [], 0
        for length in lengths:
            if pos >= n_words:
                break
            sent = words[pos : pos + length]
            pos += length
            sent[0] = sent[0].capitalize()
            if self.rng.random() < 0.2:
                sent.insert(int(self.rng.integers(0, len(sent))), str(int(self.rng.integers(1, 2030))))
            sentences.append(" ".join(sent) + ".")
            if len(sentences) >= self.rng.integers(3, 9):
                paragraphs.append(" ".join(sentences))
                sentences = []
        if sentences:
            paragraphs.append(" ".join(sentences))
        text = "\n\n".join(paragraphs)
        doc_id = str(12 + 7 * i)  # Wikipedia page ids are numeric strings
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        return {"id": doc_id, "url": url, "title": title, "text": text}


def write_wikipedia_parquet(
    out_dir: str | Path,
    *,
    articles: int | None = None,
    mb: float | None = None,
    shards: int = 4,
    seed: int = 0,
    row_group_size: int = 1000,
) -> list[Path]:
    """Write `articles` articles (or about `mb` MB of text) as `train-0000i-of-0000n.parquet` shards, like the hub's
    wikimedia/wikipedia files; returns the shard paths."""
    import pyarrow as pa  # pyarrow: 0.3 s of start-up, for the data stage only
    import pyarrow.parquet as pq

    if (articles is None) == (mb is None):
        raise ValueError("give exactly one of articles= or mb=")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ArticleWriter(seed)
    rows = [writer.article(i) for i in range(articles)] if articles is not None else None
    if rows is None:  # generate until the text reaches the size, then cut into shards
        rows, size = [], 0
        while size < mb * 1e6:
            rows.append(writer.article(len(rows)))
            size += len(rows[-1]["text"].encode()) + len(rows[-1]["title"].encode())
    schema = pa.schema([(k, pa.string()) for k in ("id", "url", "title", "text")])
    paths = []
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    for s in range(shards):
        path = out / f"train-{s:05d}-of-{shards:05d}.parquet"
        part = rows[bounds[s] : bounds[s + 1]]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--mb", type=float, default=None, help="about this many MB of text")
    parser.add_argument("--articles", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mb = args.mb if args.mb is not None or args.articles is not None else 10.0
    paths = write_wikipedia_parquet(args.out_dir, articles=args.articles, mb=mb, shards=args.shards, seed=args.seed)
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
