"""BM25 search over a passage corpus: the agent's one tool, ``wiki_search(query)``.

The corpus is JSONL (``.gz`` accepted) of ``{"id", "title", "text"}`` passages. We index
"title. text" with English stop words and no stemming. Two engines:

- ``bm25s`` (default): sparse-matrix BM25; the index is built once, saved in a cache folder named
  after the corpus file's sha256 (a changed corpus gets a new index, never a stale one) and
  memory-mapped on later runs. 924x faster per query than rank-bm25 on the 286k-passage corpus
  (bench/bench_search.py; the README's Search section has the measurement).
- ``rank_bm25``: the pure-Python reference (``BM25Okapi``), rebuilt in memory each run; readable,
  fine for a few thousand passages, far too slow for Wikipedia.

    python search.py --corpus PATH --k 3 "Bram Stoker novels"    # top-3, readable
    python search.py --corpus PATH --json < queries.txt           # one JSON line per query
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from data import CACHE_DIR, DataError, check_fields, file_fingerprint, publish_dir, read_jsonl

MAX_QUERY_TOKENS = 64  # a runaway tool argument is cut, not an error: it is model output
ENGINES = ("bm25s", "rank_bm25")
INDEX_VERSION = "v1"  # bump when the tokenisation below changes: old cached indexes are then ignored


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens minus English stop words (passages and queries alike)."""
    import bm25s

    return bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)[0]


def load_corpus(corpus_path: str | Path) -> list[dict]:
    if not Path(corpus_path).is_file():
        raise DataError(f"{corpus_path}: corpus not found. Use ../shared/data/wiki/passages.jsonl.gz, "
                        f"the demo world's corpus (python data.py), or a JSONL of {{id, title, text}} rows.")
    rows = read_jsonl(corpus_path)
    check_fields(rows, {"id": str, "title": str, "text": str}, corpus_path)
    if not rows:
        raise DataError(f"{corpus_path}: the corpus has no passages")
    return rows


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the ``k`` highest positive scores, best first; a tie goes to the lower row id.

    Why not ``np.argpartition`` (what bm25s's ``retrieve`` uses)? Most of a corpus shares no word
    with the query, so most scores are exactly 0, and numpy's partition slows down badly on so
    many ties: ~30 ms for 286k scores, against ~1 ms to compute them. A few ``argmax`` passes
    (each a fast linear scan) cost ~0.04 ms each, so we take the best, blank it, and repeat.
    For a large ``k`` we sort the positive scores instead. Both give the same order.
    """
    if k <= 16:
        scores, best = scores.copy(), []
        for _ in range(min(k, len(scores))):
            i = int(np.argmax(scores))  # the first (lowest) row among equal maxima
            if not scores[i] > 0:
                break
            best.append(i)
            scores[i] = -np.inf
        return np.array(best, dtype=np.int64)
    rows = np.flatnonzero(scores > 0)
    return rows[np.lexsort((rows, -scores[rows]))][:k]  # by score descending, then row ascending


class Index:
    """A searchable corpus. ``search(query, k)`` -> ``[{"id", "title", "text", "score"}, ...]`` best first."""

    def __init__(self, engine: str, model, passages):
        self.engine, self.model, self.passages = engine, model, passages

    def __len__(self) -> int:
        return len(self.passages)

    def terms(self, query: str) -> list[str]:
        """The query's tokens that are scored: at most the first MAX_QUERY_TOKENS, and for bm25s only
        words of the corpus vocabulary (bm25s rejects unknown words)."""
        terms = tokenize(query if isinstance(query, str) else str(query))[:MAX_QUERY_TOKENS]
        if self.engine == "bm25s":
            terms = [t for t in terms if t in self.model.vocab_dict]
        return terms

    def search(self, query: str, k: int = 1) -> list[dict]:
        terms = self.terms(query)
        if not terms or k < 1:
            return []
        k = min(k, len(self.passages))
        if self.engine == "bm25s":  # the same scores as model.retrieve(), about 30x faster (see top_k)
            all_scores = self.model.get_scores_from_ids(self.model.get_tokens_ids(terms))
            ids = top_k(all_scores, k)
        else:
            all_scores = self.model.get_scores(terms)
            ids = np.argsort(-all_scores, kind="stable")[:k]
        scores = all_scores[ids]
        hits = []
        for i, s in zip(ids, scores):
            if s <= 0:  # no query word occurs in it: not a hit
                continue
            p = self.passages[int(i)]
            hits.append({"id": p["id"], "title": p["title"], "text": p["text"], "score": float(s)})
        return hits


def _build_bm25s(passages: list[dict], folder: Path) -> None:
    """Index and save atomically: a crash mid-build leaves no folder that looks complete, and a process that
    indexes the same corpus at the same time finds one whole index (data.publish_dir)."""
    import bm25s

    texts = [f"{p['title']}. {p['text']}" for p in passages]
    model = bm25s.BM25()
    model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    model.save(tmp, corpus=[{"id": p["id"], "title": p["title"], "text": p["text"]} for p in passages],
               show_progress=False)
    (tmp / "manifest.json").write_text(json.dumps({"n_passages": len(passages), "version": INDEX_VERSION}))
    publish_dir(tmp, folder, lambda f: (f / "manifest.json").is_file())


def _load_bm25s(folder: Path):
    import bm25s

    manifest = json.loads((folder / "manifest.json").read_text())
    model = bm25s.BM25.load(folder, load_corpus=True, mmap=True, show_progress=False)
    passages, model.corpus = model.corpus, None  # we look passages up ourselves; retrieve() returns row ids
    if len(passages) != manifest["n_passages"] or model.scores["num_docs"] != manifest["n_passages"]:
        raise ValueError("index and manifest disagree")
    passages[len(passages) - 1]  # touch the last row: a truncated corpus file fails here, not mid-episode
    return model, passages


def load_index(corpus_path: str | Path, engine: str = "bm25s", cache_dir: Path | None = None) -> Index:
    """Load (building once, then caching) the BM25 index of a corpus."""
    if engine not in ENGINES:
        raise DataError(f"unknown search engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "rank_bm25":
        from rank_bm25 import BM25Okapi

        passages = load_corpus(corpus_path)
        model = BM25Okapi([tokenize(f"{p['title']}. {p['text']}") for p in passages])
        return Index(engine, model, passages)
    if not Path(corpus_path).is_file():
        load_corpus(corpus_path)  # raises the helpful error
    name = f"{Path(corpus_path).name}-{file_fingerprint(corpus_path)}-{INDEX_VERSION}"
    folder = Path(cache_dir or CACHE_DIR) / "index" / name
    if folder.is_dir():
        try:
            return Index(engine, *_load_bm25s(folder))
        except Exception as e:  # truncated or corrupt files: rebuild rather than answer wrongly
            logging.warning("search index %s is unreadable (%s); rebuilding it", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    _build_bm25s(load_corpus(corpus_path), folder)
    return Index(engine, *_load_bm25s(folder))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="BM25 search over a passage corpus (JSONL of id, title, text).")
    ap.add_argument("--corpus", help="corpus JSONL(.gz); default: the demo world's corpus")
    ap.add_argument("--k", type=int, default=3, help="passages per query (default 3)")
    ap.add_argument("--engine", default="bm25s", choices=ENGINES)
    ap.add_argument("--json", action="store_true", help="one JSON object per query")
    ap.add_argument("query", nargs="*", help="the query; none: read queries from stdin, one a line")
    args = ap.parse_args(argv)
    try:
        if args.corpus is None:
            from data import demo_world

            args.corpus = demo_world()["corpus"]
        index = load_index(args.corpus, args.engine)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    queries = [" ".join(args.query)] if args.query else (line.rstrip("\n") for line in sys.stdin)
    for query in queries:
        hits = index.search(query, args.k)
        if args.json:
            print(json.dumps({"query": query, "hits": hits}, ensure_ascii=False), flush=True)
            continue
        print(f"query: {query}")
        for rank, h in enumerate(hits, 1):
            print(f"  {rank}. [{h['score']:.2f}] {h['title']} ({h['id']}): {h['text'][:300]}")
        if not hits:
            print("  (no results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
