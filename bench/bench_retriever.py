"""Which BM25 finds the answer more often: bm25s's defaults or the seed's? Alias hit rate in the top 3.

    nice -n 10 python bench/bench_retriever.py   # 2,400 TriviaQA questions x 286k passages: bench/results/retriever.md
    python bench/bench_retriever.py --quick      # 200 questions x a 20k-passage subset in a temp dir; prints only

The seed (the paper's code) searches with pyserini's LuceneSearcher, that is with Anserini's defaults: BM25
k1 0.9, b 0.4 and Porter stemming. search.py defaults to bm25s's: k1 1.5, b 0.75, no stemming. Both use the
same 33 English stop words. Four settings separate the two changes:

    A  k1 1.5, b 0.75, no stemming   (bm25s's defaults, search.py's)
    B  k1 0.9, b 0.4,  Porter        (the seed's)
    C  k1 0.9, b 0.4,  no stemming   (the seed's k1 and b alone)
    D  k1 1.5, b 0.75, Porter        (stemming alone)

The measure is what the search_answer reward sees: the question text is the query, k = 3, and a question is a
hit when one of its aliases (lower-cased, stripped, blanks dropped: rewards._aliases) is a substring of the
lower-cased tool reply, the top-3 passages' titles and texts joined as env.py joins them. Top-1 hit: the same
test on the first passage alone (the environment's default k is 1).

Statistics, over the same questions for every setting: each hit rate with a 95% Wilson interval; for each of
B, C, D the paired difference X - A (and B - C, B - D: each change made on top of the other), with McNemar's
discordant counts (b: X hits where Y misses, c: Y hits where X misses), the exact two-sided McNemar p-value
(binomial on the discordant pairs), and a 95% normal-approximation (Wald) interval for the difference of paired
proportions, d +- 1.96 sqrt(b + c - n d^2) / n, d = (b - c) / n.

Every index is built through search.load_index, cached in --cache-dir (default: <system temp>/mt-grpo-bench-
retriever, so the four Wikipedia indexes, ~0.3 GB each, stay out of the project's cache): the first run builds
them and reports the build time, a later run loads them and says so. Build and query times are informational
(2 shared cores). The script writes its own result file; never edit it by hand.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from common import ROOT, write_result  # first: puts the repo root on sys.path

import data
import rewards
import search

SETTINGS = {  # name: (what it is, load_index settings)
    "A": ("bm25s defaults", {"k1": 1.5, "b": 0.75, "stemmer": "none"}),
    "B": ("the seed's", {"k1": 0.9, "b": 0.4, "stemmer": "porter"}),
    "C": ("seed k1, b; no stemming", {"k1": 0.9, "b": 0.4, "stemmer": "none"}),
    "D": ("bm25s k1, b; Porter", {"k1": 1.5, "b": 0.75, "stemmer": "porter"}),
}
K = 3
Z = 1.959963984540054  # the 97.5% normal quantile: 95% two-sided intervals
PAIRS = [("B", "A", "the seed's against bm25s's"), ("C", "A", "k1 0.9, b 0.4 alone"),
         ("D", "A", "Porter alone"), ("B", "C", "Porter, at k1 0.9, b 0.4"), ("B", "D", "k1 0.9, b 0.4, with Porter")]
QUICK_QUESTIONS, QUICK_PASSAGES = 200, 20_000
WARMUP = 20  # untimed queries before the timed ones: page the memory-mapped index in


# --------------------------------------------------------------------------- statistics


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound near 0 and 1, unlike p +- 1.96 se."""
    p, z2 = hits / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant question is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until the one division


def paired_difference(x: list[bool], y: list[bool]) -> dict:
    """X - Y over the same questions: discordant counts, the difference, its 95% Wald interval, McNemar's p."""
    n = len(y)
    b = sum(xi and not yi for xi, yi in zip(x, y))  # X hits, Y misses
    c = sum(yi and not xi for xi, yi in zip(x, y))  # Y hits, X misses
    d = (b - c) / n
    se = math.sqrt(max(b + c - n * d * d, 0.0)) / n
    return {"b": b, "c": c, "d": d, "lo": d - Z * se, "hi": d + Z * se, "p": mcnemar_exact_p(b, c)}


# --------------------------------------------------------------------------- the measurement


def reply_text(hits: list[dict]) -> str:
    """The search tool's reply as env.py writes it (titles and texts, blank-line separated), lower-cased."""
    return "\n\n".join(f"{h['title']}\n{h['text']}".strip() for h in hits).lower()


def has_alias(hits: list[dict], aliases: list[str]) -> bool:
    text = reply_text(hits)
    return any(a in text for a in aliases)


def measure(corpus: Path, questions: list[dict], cache_dir: Path, settings: dict) -> dict:
    """Load (or build) one index through search.load_index, then run every question through it."""
    cached = search.index_folder(corpus, cache_dir, **settings).is_dir()
    start = time.perf_counter()
    index = search.load_index(corpus, cache_dir=cache_dir, **settings)
    load_s = time.perf_counter() - start
    for q in questions[:WARMUP]:
        index.search(q["question"], K)
    top3, top1, ids, query_s = [], [], [], 0.0
    for q in questions:
        start = time.perf_counter()
        hits = index.search(q["question"], K)
        query_s += time.perf_counter() - start
        aliases = rewards._aliases(q["aliases"])  # the reward's own normalisation
        top3.append(has_alias(hits, aliases))
        top1.append(has_alias(hits[:1], aliases))
        ids.append([h["id"] for h in hits])
    return {"cached": cached, "load_s": load_s, "n_passages": len(index), "ms_per_query": query_s / len(questions) * 1000,
            "top3": top3, "top1": top1, "ids": ids}


# --------------------------------------------------------------------------- the report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def report(results: dict, n: int, header: list[str]) -> str:
    lines = ["# Retriever: top-3 alias hit rate of four BM25 settings", "",
             "Written by bench/bench_retriever.py itself (never edited by hand); the design is the module's docstring.",
             "", *header, ""]
    lines += ["## Hit rates", "",
              f"n = {n} questions, the same for every setting; 95% Wilson intervals.", "",
              "| setting | k1 | b | stemmer | top-3 hit | 95% CI | top-1 hit | 95% CI |",
              "|---|---|---|---|---|---|---|---|"]
    for name, (what, s) in SETTINGS.items():
        r = results[name]
        h3, h1 = sum(r["top3"]), sum(r["top1"])
        lo3, hi3 = wilson(h3, n)
        lo1, hi1 = wilson(h1, n)
        lines.append(f"| {name} ({what}) | {s['k1']} | {s['b']} | {s['stemmer']} | {pct(h3 / n)} ({h3}) | "
                     f"{pct(lo3)} to {pct(hi3)} | {pct(h1 / n)} ({h1}) | {pct(lo1)} to {pct(hi1)} |")
    for measure_name, key in (("top-3", "top3"), ("top-1", "top1")):
        lines += ["", f"## Paired differences, {measure_name} hit", "",
                  ("Percentage points over the same questions. b: questions X hits and Y misses; c: Y hits and X "
                   "misses. 95% CI: normal approximation (Wald) for paired proportions; p: exact McNemar."), "",
                  "| X - Y | what changes | b (X only) | c (Y only) | difference | 95% CI | McNemar p |",
                  "|---|---|---|---|---|---|---|"]
        for x, y, what in PAIRS:
            d = paired_difference(results[x][key], results[y][key])
            lines.append(f"| {x} - {y} | {what} | {d['b']} | {d['c']} | {pp(d['d'])} pp | "
                         f"{pp(d['lo'])} to {pp(d['hi'])} pp | {d['p']:.2g} |")
    lines += ["", "## Index and query cost (informational: 2 shared cores)", "",
              "| setting | index | load_index time | mean query time | same top-3 ids as A |", "|---|---|---|---|---|"]
    for name in SETTINGS:
        r = results[name]
        same = sum(x == y for x, y in zip(r["ids"], results["A"]["ids"])) / n
        how = "loaded from the cache" if r["cached"] else "built"
        lines.append(f"| {name} | {how} | {r['load_s']:.1f} s | {r['ms_per_query']:.2f} ms | {pct(same)} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{model}, nproc {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()}), niceness {os.nice(0)}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"bm25s {version('bm25s')}, PyStemmer {version('PyStemmer')}, rank-bm25 {version('rank-bm25')}")


def subset_corpus(corpus: Path, n: int, folder: Path) -> Path:
    """The first ``n`` passages of ``corpus`` as a JSONL file in ``folder`` (for --quick; never in the repo)."""
    out = folder / f"passages-first{n}.jsonl"
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= n:
                break
            dst.write(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=Path, default=data.SHARED_DATA / "triviaqa" / "questions.jsonl")
    ap.add_argument("--corpus", type=Path, default=data.SHARED_DATA / "wiki" / "passages.jsonl.gz")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mt-grpo-bench-retriever",
                    help="where load_index caches the indexes (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {QUICK_QUESTIONS} questions, the first {QUICK_PASSAGES} passages, in a temp dir")
    ap.add_argument("--out", type=Path, help="result file (default: bench/results/retriever.md; with --quick, "
                                             "none: the result is only printed)")
    args = ap.parse_args(argv)
    import bm25s  # noqa: F401  (imported here so that the next line outlasts the DEBUG level it sets on its logger)

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # else: a debug line per index built
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "bench/bench_retriever.py", *argv])
    for path in (args.questions, args.corpus):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: the real data lives beside the repository (../shared/data)")
    wall = time.perf_counter()
    questions = data.load_questions(args.questions)
    corpus, cache_dir, out = args.corpus, args.cache_dir, args.out or ROOT / "bench" / "results" / "retriever.md"
    tmp = tempfile.TemporaryDirectory(prefix="bench-retriever-") if args.quick else None
    if tmp is not None:  # a corpus subset and its indexes, all removed at the end
        corpus, cache_dir, out = subset_corpus(args.corpus, QUICK_PASSAGES, Path(tmp.name)), Path(tmp.name), args.out
    limit = args.limit or (QUICK_QUESTIONS if args.quick else 0)
    questions = questions[:limit] if limit else questions
    results = {}
    for name, (what, settings) in SETTINGS.items():
        print(f"{name} ({what}, {settings}) ...", file=sys.stderr, flush=True)
        results[name] = measure(corpus, questions, cache_dir, settings)
        r = results[name]
        print(f"  top-3 {pct(sum(r['top3']) / len(questions))}, top-1 {pct(sum(r['top1']) / len(questions))}, "
              f"load_index {r['load_s']:.1f} s ({'cached' if r['cached'] else 'built'}), "
              f"{r['ms_per_query']:.2f} ms/query", file=sys.stderr, flush=True)
    header = [f"- command: `{command}`",
              f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
              f"- wall time: {time.perf_counter() - wall:.0f} s",
              f"- machine: {machine()}",
              f"- questions: {args.questions} ({'the first ' if limit else ''}{len(questions)})",
              f"- corpus: {args.corpus} ({'the first ' if args.quick else ''}{results['A']['n_passages']} passages)",
              f"- index cache: {cache_dir} (search.load_index's cache_dir; a temp dir, not the project's cache)"]
    text = report(results, len(questions), header)
    write_result(out, text) if out else print(text, end="")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
