"""How fast is the search tool? bm25s vs rank-bm25 on the real corpus, and bm25s at 1M+ passages.

    python bench/bench_search.py                      # real corpus + a 4x scale-up (~7 min on 2 cores)
    python bench/bench_search.py --scale 0            # real corpus only

Reports, per engine, on the same corpus: ms/query (single-threaded, after a warm-up; bm25s over
--queries real TriviaQA questions, rank-bm25 over --rank-sample of them, it is 924x slower on the
286k-passage corpus),
index build time, saved-index load time and peak memory. Each measurement runs in its own fresh
process, so peak RSS (ru_maxrss) is that engine's alone and the load really reads from disk, and
in a temporary cache dir, so the build is really measured (not loaded from ~/.cache).

Then the scale-up: --scale shuffled copies of every passage (words shuffled within the passage,
new ids) in a temporary file: same vocabulary, posting lists --scale times longer, which is what
a bigger Wikipedia does to a query's work. ms/query is fitted as a straight line in the number of
passages N through the measured points (a query reads N scores and posting lists that grow with N)
and projected to 21M passages, the size of the DPR Wikipedia dump.

Targets, so that search never holds up a rollout: <= 3 ms/query at 286k single-threaded, >= 300x
faster than rank-bm25, a saved index loads in <= 5 s.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_process  # first: puts the repo root on sys.path
import data
WIKIPEDIA_PASSAGES = 21_000_000
TARGET_MS, TARGET_RATIO, TARGET_LOAD_S = 3.0, 300.0, 5.0
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "NUMBA_NUM_THREADS": "1"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# --------------------------------------------------------------------------- workers (one per process)


def time_queries(index, questions: list[str], k: int, warmup: int) -> float:
    """Mean ms per query over ``questions``, after ``warmup`` untimed ones (page in the mmapped index)."""
    for q in questions[:warmup]:
        index.search(q, k)
    start = time.perf_counter()
    for q in questions:
        index.search(q, k)
    return (time.perf_counter() - start) / len(questions) * 1000


def profile_bm25s(index, questions: list[str], k: int) -> dict:
    """Where a bm25s query's time goes, stage by stage (ms/query), and what bm25s.retrieve() costs."""
    import numpy as np

    import search

    model, stages = index.model, dict.fromkeys(("tokenise", "score", "top_k", "fetch"), 0.0)
    for q in questions:
        t0 = time.perf_counter()
        terms = index.terms(q)
        t1 = time.perf_counter()
        scores = model.get_scores_from_ids(model.get_tokens_ids(terms)) if terms else np.zeros(1)
        t2 = time.perf_counter()
        rows = search.top_k(scores, k)
        t3 = time.perf_counter()
        [index.passages[int(i)] for i in rows]
        t4 = time.perf_counter()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[name] += dt
    stages = {name: s / len(questions) * 1000 for name, s in stages.items()}
    sample = questions[:50]  # the old path: bm25s's own retrieve(), top-k by np.argpartition
    start = time.perf_counter()
    for q in sample:
        terms = index.terms(q)
        if terms:
            model.retrieve([terms], k=k, show_progress=False, n_threads=1)
    stages["bm25s_retrieve"] = (time.perf_counter() - start) / len(sample) * 1000
    return stages


def worker(args) -> dict:
    import search
    from data import load_questions

    questions = [q["question"] for q in load_questions(args.questions)]
    cache = Path(args.cache_dir)
    if args.worker == "bm25s-build":
        start = time.perf_counter()
        index = search.load_index(args.corpus, "bm25s", cache_dir=cache)
        build_s = time.perf_counter() - start
        return {"passages": len(index), "build_s": build_s, "peak_rss_mb": peak_rss_mb(),
                "index_mb": folder_mb(cache / "index")}
    if args.worker == "bm25s-query":
        start = time.perf_counter()
        index = search.load_index(args.corpus, "bm25s", cache_dir=cache)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        index.search(questions[0], args.k)
        first_ms = (time.perf_counter() - start) * 1000
        ms = time_queries(index, questions[: args.queries], args.k, warmup=20)
        return {"passages": len(index), "load_s": load_s, "first_query_ms": first_ms, "ms_per_query": ms,
                "profile": profile_bm25s(index, questions[:200], args.k), "peak_rss_mb": peak_rss_mb()}
    if args.worker == "rank_bm25":
        start = time.perf_counter()
        index = search.load_index(args.corpus, "rank_bm25", cache_dir=cache)
        build_s = time.perf_counter() - start
        ms = time_queries(index, questions[: args.rank_sample], args.k, warmup=1)
        return {"passages": len(index), "build_s": build_s, "ms_per_query": ms, "peak_rss_mb": peak_rss_mb()}
    raise SystemExit(f"unknown worker {args.worker}")


def run_worker(mode: str, corpus: Path, cache: Path, args) -> dict:
    argv = ["--corpus", str(corpus), "--questions", str(args.questions), "--cache-dir", str(cache),
            "--queries", str(args.queries), "--rank-sample", str(args.rank_sample), "--k", str(args.k)]
    return fresh_process(__file__, mode, argv, env={**os.environ, **SINGLE_THREAD})


# --------------------------------------------------------------------------- the scale-up corpus


def write_scaled_corpus(corpus: Path, scale: int, out: Path) -> int:
    """``scale`` copies of every passage, words shuffled within the passage, ids ``<id>~<copy>``."""
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as f:
        passages = [json.loads(line) for line in f if line.strip()]
    rng, n = random.Random(0), 0
    with open(out, "w", encoding="utf-8") as f:
        for copy in range(scale):
            for p in passages:
                words = p["text"].split()
                rng.shuffle(words)
                f.write(json.dumps({"id": f"{p['id']}~{copy}", "title": p["title"], "text": " ".join(words)},
                                   ensure_ascii=False) + "\n")
                n += 1
    return n


# --------------------------------------------------------------------------- report


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=data.SHARED_DATA / "wiki" / "passages.jsonl.gz")
    ap.add_argument("--questions", type=Path, default=data.SHARED_DATA / "triviaqa" / "questions.jsonl")
    ap.add_argument("--scale", type=int, default=4, help="copies of the corpus for the scale-up (0: skip it)")
    ap.add_argument("--rank-sample", type=int, default=20, help="queries timed on rank-bm25")
    ap.add_argument("--queries", type=int, default=500, help="queries timed on bm25s")
    ap.add_argument("--k", type=int, default=3, help="passages per query")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    for path in (args.corpus, args.questions):
        if not path.is_file():
            print(f"error: {path} not found (the real data beside the repository; or pass --corpus/--questions)",
                  file=sys.stderr)
            return 2

    print(f"corpus {args.corpus}, questions {args.questions}, k={args.k}, "
          f"{os.cpu_count()} CPUs, workers single-threaded, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        tmp = Path(tmp)
        build = run_worker("bm25s-build", args.corpus, tmp / "cache-real", args)
        query = run_worker("bm25s-query", args.corpus, tmp / "cache-real", args)
        rank = run_worker("rank_bm25", args.corpus, tmp / "cache-real", args)
        n = build["passages"]
        print(f"\n== {n:,} passages ({args.corpus.name}) ==")
        print(f"{'engine':10} {'ms/query':>9} {'queries':>8} {'build s':>8} {'load s':>7} "
              f"{'peak RSS MB (build / serve)':>28}")
        print(f"{'bm25s':10} {query['ms_per_query']:9.2f} {args.queries:8d} {build['build_s']:8.1f} "
              f"{query['load_s']:7.2f} {build['peak_rss_mb']:13.0f} / {query['peak_rss_mb']:.0f}")
        print(f"{'rank_bm25':10} {rank['ms_per_query']:9.1f} {args.rank_sample:8d} {rank['build_s']:8.1f} "
              f"{'-':>7} {rank['peak_rss_mb']:13.0f} (in memory, rebuilt each run)")
        ratio = rank["ms_per_query"] / query["ms_per_query"]
        p = query["profile"]
        print(f"bm25s index on disk: {build['index_mb']:.0f} MB; first query after load: "
              f"{query['first_query_ms']:.1f} ms")
        print(f"bm25s ms/query by stage (200 queries): tokenise {p['tokenise']:.3f}, score {p['score']:.3f}, "
              f"top-k {p['top_k']:.3f}, fetch passages {p['fetch']:.3f}; "
              f"bm25s.retrieve() instead (argpartition top-k): {p['bm25s_retrieve']:.2f}")
        print(f"speed-up bm25s over rank_bm25: {ratio:,.0f}x")
        print(f"targets: <= {TARGET_MS} ms/query: {verdict(query['ms_per_query'] <= TARGET_MS)}; "
              f">= {TARGET_RATIO:.0f}x rank_bm25: {verdict(ratio >= TARGET_RATIO)}; "
              f"load <= {TARGET_LOAD_S} s: {verdict(query['load_s'] <= TARGET_LOAD_S)}")
        points = [(n, query["ms_per_query"])]

        if args.scale > 0:
            scaled = tmp / f"scaled-x{args.scale}.jsonl"
            start = time.perf_counter()
            n_scaled = write_scaled_corpus(args.corpus, args.scale, scaled)
            print(f"\n== scale-up: {n_scaled:,} passages ({args.scale} word-shuffled copies, "
                  f"{scaled.stat().st_size / 2**20:.0f} MB, written in {time.perf_counter() - start:.0f} s), "
                  f"bm25s only ==")
            build_s = run_worker("bm25s-build", scaled, tmp / "cache-scaled", args)
            query_s = run_worker("bm25s-query", scaled, tmp / "cache-scaled", args)
            p = query_s["profile"]
            print(f"bm25s: {query_s['ms_per_query']:.2f} ms/query ({args.queries} queries), build "
                  f"{build_s['build_s']:.1f} s, load {query_s['load_s']:.2f} s, peak RSS "
                  f"{build_s['peak_rss_mb']:.0f} MB build / {query_s['peak_rss_mb']:.0f} MB serve, index "
                  f"{build_s['index_mb']:.0f} MB on disk")
            print(f"by stage: tokenise {p['tokenise']:.3f}, score {p['score']:.3f}, top-k {p['top_k']:.3f}, "
                  f"fetch {p['fetch']:.3f} ms")
            points.append((n_scaled, query_s["ms_per_query"]))
            a, b = fit_line([x for x, _ in points], [y for _, y in points])
            print(f"\nfit (least squares over {len(points)} points): ms/query = {a:.3f} + "
                  f"{b * 1e6:.3f} x (passages / 1M)")
            print(f"projected at {WIKIPEDIA_PASSAGES / 1e6:.0f}M passages (Wikipedia): "
                  f"{a + b * WIKIPEDIA_PASSAGES:.0f} ms/query single-threaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
