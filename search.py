"""BM25 search over a passage corpus: the agent's one tool, ``wiki_search(query)``.

The corpus is JSONL (``.gz`` accepted) of ``{"id", "title", "text"}`` passages. We index
"title. text" with English stop words; BM25's k1 and b and the stemmer are settings of the index (a run's:
--bm25-k1, --bm25-b, --stemmer). The defaults are the seed's (pyserini's LuceneSearcher on the KILT index
ranks with Anserini's: k1 0.9, b 0.4, Porter stemming), chosen over bm25s's own (k1 1.5, b 0.75, no stemming)
by the alias hit on the shared TriviaQA questions (bench/bench_retriever.py, bench/results/retriever.md).
Two engines:

- ``bm25s`` (default): sparse-matrix BM25; the index is built once, saved in a cache folder named
  after the corpus file's sha256 and the settings (a changed corpus or setting gets a new index,
  never a stale one) and memory-mapped on later runs. Much faster per query than rank-bm25 on the 286k-passage corpus
  (bench/bench_search.py measures it; docs/performance.md, "Search", has the figures).
- ``rank_bm25``: the pure-Python reference (``BM25Okapi``), rebuilt in memory each run; readable,
  fine for a few thousand passages, far too slow for Wikipedia.

    python search.py --corpus PATH --k 3 "Bram Stoker novels"    # top-3, readable
    python search.py --corpus PATH --json < queries.txt           # one JSON line per query
    python search.py --corpus PATH --k1 0.9 --b 0.4 --stemmer porter "Bram Stoker novels"  # the seed's BM25
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import bm25s
import numpy as np

from config import STEMMERS, Config
from data import CACHE_DIR, DataError, check_fields, file_fingerprint, publish_dir, read_jsonl

MAX_QUERY_TOKENS = 64  # a runaway tool argument is cut, not an error: it is model output
ENGINES = ("bm25s", "rank_bm25")
# Bump when the tokenisation below changes: old cached indexes are then ignored. v2: k1, b and the stemmer
# are in the cache folder's name and the manifest (v1 folders, always k1 1.5, b 0.75, unstemmed, go unused).
INDEX_VERSION = "v2"
PYSTEMMER_FIX = "pip install PyStemmer==2.2.0.3 (requirements.txt)"
_local = threading.local()  # its __dict__: this thread's stemmers, by name


def _stemmer(name: str):
    """None for "none"; for "porter", PyStemmer's Porter stemmer: Porter's original algorithm, as in Lucene's
    PorterStemFilter that the seed's index uses (not Snowball's "english", a later revision)."""
    if name == "none":
        return None
    stemmers = _local.__dict__  # this thread's: a PyStemmer object is not thread-safe
    if name not in stemmers:
        stemmers[name] = _new_stemmer(name)
    return stemmers[name]


def _new_stemmer(name: str):
    if name not in STEMMERS:
        raise DataError(f"unknown stemmer {name!r}: choose one of {', '.join(STEMMERS)}")
    try:
        import Stemmer  # PyStemmer; imported only when asked for, so unstemmed search does not need it
    except ImportError:
        raise DataError(f"stemmer {name!r} needs PyStemmer: {PYSTEMMER_FIX}") from None
    return Stemmer.Stemmer(name)


def tokenize(text: str, stemmer: str = "none") -> list[str]:
    """Lower-cased word tokens minus English stop words, stemmed if asked (passages and queries alike:
    an index stemmed one way must be queried the same way, or stemmed words never match)."""
    return bm25s.tokenize([text], stopwords="en", stemmer=_stemmer(stemmer), return_ids=False,
                          show_progress=False)[0]


def check_settings(k1: float, b: float, stemmer: str) -> tuple[float, float, str]:
    """The BM25 settings as (float k1, float b, stemmer), or a DataError that names the bad one."""
    _stemmer(stemmer)  # an unknown name fails here, before any work
    if not (isinstance(k1, (int, float)) and math.isfinite(k1) and k1 >= 0):
        raise DataError(f"BM25 k1 must be a number >= 0, not {k1!r}")
    if not (isinstance(b, (int, float)) and 0 <= b <= 1):
        raise DataError(f"BM25 b must be a number from 0 to 1, not {b!r}")
    return float(k1), float(b), stemmer


def index_folder(corpus_path: str | Path, cache_dir: Path | None = None, *, k1: float = Config.bm25_k1,
                 b: float = Config.bm25_b, stemmer: str = Config.stemmer) -> Path:
    """Where the bm25s index of a corpus is cached: named after the file's sha256 (a changed corpus gets a new
    index) and the settings, which are baked into the saved scores (so two settings never share a folder)."""
    k1, b, stemmer = check_settings(k1, b, stemmer)
    name = f"{Path(corpus_path).name}-{file_fingerprint(corpus_path)}-{INDEX_VERSION}-k1_{k1!r}-b_{b!r}-{stemmer}"
    return Path(cache_dir or CACHE_DIR) / "index" / name


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
    """Row ids of the ``k`` highest positive scores, best first; a tie goes to the lower row id. Found by k argmax
    passes, fast linear scans: most scores are exactly 0, and bm25s's ``np.argpartition`` of so many ties is slow."""
    scores, best = scores.copy(), []
    for _ in range(min(k, len(scores))):
        i = int(np.argmax(scores))  # the first (lowest) row among equal maxima
        if not scores[i] > 0:  # no query word occurs in it: not a hit
            break
        best.append(i)
        scores[i] = -np.inf
    return np.array(best, dtype=np.int64)


class Index:
    """A searchable corpus. ``search(query, k)`` -> ``[{"id", "title", "text", "score"}, ...]`` best first.
    ``stemmer``: the one the passages were indexed with, so that queries are tokenised the same way."""

    def __init__(self, engine: str, model, passages, stemmer: str = "none"):
        self.engine, self.model, self.passages, self.stemmer = engine, model, passages, stemmer

    def __len__(self) -> int:
        return len(self.passages)

    def terms(self, query: str) -> list[str]:
        """The query's scored tokens: the first MAX_QUERY_TOKENS, for bm25s those in the corpus vocabulary."""
        terms = tokenize(query if isinstance(query, str) else str(query), self.stemmer)[:MAX_QUERY_TOKENS]
        if self.engine == "bm25s":
            terms = [t for t in terms if t in self.model.vocab_dict]
        return terms

    def search(self, query: str, k: int = 1) -> list[dict]:
        terms = self.terms(query)
        if not terms or k < 1:
            return []
        if self.engine == "bm25s":  # the same scores as model.retrieve(), about 30x faster (see top_k)
            scores = self.model.get_scores_from_ids(self.model.get_tokens_ids(terms))
        else:
            scores = self.model.get_scores(terms)
        return [{"id": self.passages[i]["id"], "title": self.passages[i]["title"], "text": self.passages[i]["text"],
                 "score": float(scores[i])} for i in top_k(scores, k).tolist()]


def _build_bm25s(passages: list[dict], folder: Path, settings: dict) -> None:
    """Index and save atomically: a crash mid-build leaves no folder that looks complete, and a process that
    indexes the same corpus at the same time finds one whole index (data.publish_dir). ``settings``: k1, b and
    stemmer, also written to the manifest so that a load can check them."""
    texts = [f"{p['title']}. {p['text']}" for p in passages]
    model = bm25s.BM25(k1=settings["k1"], b=settings["b"])  # method "lucene": Lucene's idf and tf terms
    tokens = bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(settings["stemmer"]), show_progress=False)
    model.index(tokens, show_progress=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    model.save(tmp, corpus=[{"id": p["id"], "title": p["title"], "text": p["text"]} for p in passages],
               show_progress=False)
    (tmp / "manifest.json").write_text(json.dumps({"n_passages": len(passages), "version": INDEX_VERSION,
                                                   **settings}))
    publish_dir(tmp, folder, lambda f: (f / "manifest.json").is_file())


def _load_bm25s(folder: Path, settings: dict):
    manifest = json.loads((folder / "manifest.json").read_text())
    if {key: manifest.get(key) for key in ("version", *settings)} != {"version": INDEX_VERSION, **settings}:
        raise ValueError(f"it was built with other settings: {manifest}")  # never rank with the wrong k1, b
    model = bm25s.BM25.load(folder, load_corpus=True, mmap=True, show_progress=False)
    passages, model.corpus = model.corpus, None  # we look passages up ourselves; retrieve() returns row ids
    if len(passages) != manifest["n_passages"] or model.scores["num_docs"] != manifest["n_passages"]:
        raise ValueError("index and manifest disagree")
    passages[len(passages) - 1]  # touch the last row: a truncated corpus file fails here, not mid-episode
    return model, passages


def load_index(corpus_path: str | Path, engine: str = "bm25s", cache_dir: Path | None = None, *,
               k1: float = Config.bm25_k1, b: float = Config.bm25_b, stemmer: str = Config.stemmer) -> Index:
    """Load (building once, then caching) the BM25 index of a corpus, ranked with ``k1`` and ``b`` and
    tokenised with ``stemmer`` ("none" or "porter"). The defaults are a run's (config.py): the seed's."""
    if engine not in ENGINES:
        raise DataError(f"unknown search engine {engine!r}: choose one of {', '.join(ENGINES)}")
    k1, b, stemmer = check_settings(k1, b, stemmer)
    if engine == "rank_bm25":
        from rank_bm25 import BM25Okapi

        passages = load_corpus(corpus_path)
        model = BM25Okapi([tokenize(f"{p['title']}. {p['text']}", stemmer) for p in passages], k1=k1, b=b)
        return Index(engine, model, passages, stemmer)
    if not Path(corpus_path).is_file():
        load_corpus(corpus_path)  # raises the helpful error
    settings = {"k1": k1, "b": b, "stemmer": stemmer}
    folder = index_folder(corpus_path, cache_dir, **settings)
    if folder.is_dir():
        try:
            return Index(engine, *_load_bm25s(folder, settings), stemmer)
        except Exception as e:  # truncated, corrupt or mislabelled: rebuild rather than answer wrongly
            logging.warning("search index %s is unreadable (%s); rebuilding it", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    _build_bm25s(load_corpus(corpus_path), folder, settings)
    return Index(engine, *_load_bm25s(folder, settings), stemmer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="BM25 search over a passage corpus (JSONL of id, title, text).")
    ap.add_argument("--corpus", help="corpus JSONL(.gz); default: the demo world's corpus")
    ap.add_argument("--k", type=int, default=3, help="passages per query (default 3)")
    ap.add_argument("--engine", default="bm25s", choices=ENGINES)
    ap.add_argument("--k1", type=float, default=Config.bm25_k1, help=f"BM25 k1, term-frequency saturation "
                                                                     f"(default {Config.bm25_k1}, a run's; bm25s's: 1.5)")
    ap.add_argument("--b", type=float, default=Config.bm25_b, help=f"BM25 b, length normalisation (default "
                                                                   f"{Config.bm25_b}, a run's; bm25s's: 0.75)")
    ap.add_argument("--stemmer", default=Config.stemmer, choices=STEMMERS, help=f"default {Config.stemmer}, a run's")
    ap.add_argument("--json", action="store_true", help="one JSON object per query")
    ap.add_argument("query", nargs="*", help="the query; none: read queries from stdin, one a line")
    args = ap.parse_args(argv)
    try:
        if args.corpus is None:
            from data import demo_world

            args.corpus = demo_world()["corpus"]
        index = load_index(args.corpus, args.engine, k1=args.k1, b=args.b, stemmer=args.stemmer)
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
