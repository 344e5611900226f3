"""Tests for search.py, the agent's one tool: BM25 over a passage corpus.

Most tests use a ten-passage corpus written to a temporary folder, so that what each query should
return can be checked by eye. They document the contract the agent relies on:
  - hits come best first, each ``{"id", "title", "text", "score"}`` with a positive score;
  - a query is model output, so nothing it contains (empty, only stop words, 100k characters,
    any unicode) is an error: at worst it finds nothing;
  - the bm25s index is built once, saved, and loaded again; a changed corpus gets a new index, and
    a damaged one is rebuilt, so search never answers from a stale or broken index;
  - BM25's k1 and b and the stemmer are settings of an index: the defaults rank as they always did,
    other settings really change the scores, and each setting has its own cached index.
The last part runs on the real Wikipedia passages beside the repo (skipped, with the reason
printed, where that data is absent).
"""
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import data
import search
from data import DataError
from helpers import TRIVIAQA, WIKI, need_shared_data

ROOT = Path(__file__).resolve().parents[1]

PASSAGES = [
    {"id": "dracula", "title": "Dracula",
     "text": "Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker. Count Dracula moves "
             "from Transylvania to England."},
    {"id": "stoker", "title": "Bram Stoker",
     "text": "Abraham Stoker was an Irish author, best known for his Gothic novel. He was born in Dublin."},
    {"id": "frankenstein", "title": "Frankenstein",
     "text": "Frankenstein; or, The Modern Prometheus is an 1818 novel written by the English author Mary Shelley."},
    {"id": "paris", "title": "Paris",
     "text": "Paris is the capital and most populous city of France, on the river Seine."},
    {"id": "seine", "title": "Seine",
     "text": "The Seine is a river in northern France. It flows through Paris into the English Channel."},
    {"id": "zurich", "title": "Zürich",
     "text": "Zürich is the largest city in Switzerland, at the northern tip of Lake Zürich."},
    {"id": "tokyo", "title": "東京", "text": "東京 (Tokyo) is the capital of Japan and its most populous city."},
    {"id": "olympics", "title": "1948 Winter Olympics",
     "text": "The 1948 Winter Olympics were held in St. Moritz, Switzerland, the first after the war."},
    {"id": "femur", "title": "Femur",
     "text": "The femur, or thigh bone, is the longest bone in the human body."},
    {"id": "everest", "title": "Mount Everest",
     "text": "Mount Everest is the highest mountain on Earth above sea level, in the Himalayas."},
]


def write_corpus(path: Path, passages=PASSAGES) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages), encoding="utf-8")
    return path


def index_folder(corpus: Path, cache: Path, **settings) -> Path:
    """Where load_index keeps the bm25s index of ``corpus``: named after the file's sha256 and the settings."""
    return search.index_folder(corpus, cache, **settings)


def ids(hits):
    return [h["id"] for h in hits]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    return search.load_index(corpus, cache_dir=tmp_path_factory.mktemp("cache"))


# --------------------------------------------------------------------------- what a search returns


def test_hits_come_best_first_with_positive_scores(index):
    hits = index.search("Which Irish author wrote Dracula?", k=3)
    assert ids(hits)[0] == "dracula"  # "dracula" twice, "irish", "author" in one short passage
    assert all(set(h) == {"id", "title", "text", "score"} for h in hits)
    assert all(isinstance(h["score"], float) and h["score"] > 0 for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert hits[0]["title"] == "Dracula" and hits[0]["text"].startswith("Dracula is an 1897")


def test_k_caps_the_hits_and_only_matching_passages_are_hits(index):
    assert ids(index.search("river", k=10)) in (["seine", "paris"], ["paris", "seine"])  # 2 mention it
    assert len(index.search("river", k=1)) == 1
    assert len(index.search("author novel", k=2)) == 2
    assert len(index.search("author novel", k=1000)) == 3  # k beyond the corpus size is fine
    assert index.search("river", k=0) == [] and index.search("river", k=-3) == []


@pytest.mark.parametrize("query", ["", "   \n\t", "?!...", "the of and is in", "xylophonequartz"])
def test_queries_with_no_searchable_word_find_nothing(index, query):
    assert index.search(query, k=3) == []


def test_a_huge_query_is_cut_not_an_error(index):
    huge = ("Everest " + "lorem ipsum " * 10_000)[:100_000]  # how fast: bench/bench_long_inputs.py
    assert ids(index.search(huge, k=1)) == ["everest"]
    # Only the first MAX_QUERY_TOKENS words count: a word after them is ignored.
    filler = " ".join(f"filler{i}" for i in range(search.MAX_QUERY_TOKENS))
    assert index.search(filler + " Everest", k=1) == []
    assert ids(index.search(filler[: -len(" filler63")] + " Everest", k=1)) == ["everest"]


def test_unicode_queries(index):
    assert ids(index.search("Zürich", k=1)) == ["zurich"]
    assert ids(index.search("東京", k=1)) == ["tokyo"]
    assert ids(index.search("naïve café 🚀 zürich", k=1)) == ["zurich"]  # case-folded, emoji ignored
    assert ids(index.search("\ud83d Everest", k=1)) == ["everest"]    # a lone surrogate is no crash
    assert ids(index.search(1948, k=1)) == ["olympics"]               # a non-string query is str()-ed


def test_top_k_breaks_ties_by_row():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.array([0, 0, 0, 1.5, 2.0, 2.5], dtype=np.float32), size=5000)
    expected = sorted(np.flatnonzero(scores > 0), key=lambda i: (-scores[i], i))
    before = scores.copy()
    for k in (1, 3, 16, 17, 100, 10_000):
        assert search.top_k(scores, k).tolist() == expected[:k]
    assert np.array_equal(scores, before)  # the caller's array is left alone
    assert search.top_k(np.zeros(10, np.float32), 3).tolist() == []


def test_rank_bm25_agrees_with_bm25s_on_the_top_hit(corpus, index):
    reference = search.load_index(corpus, engine="rank_bm25")
    assert len(reference) == len(index) == len(PASSAGES)
    for query, expected in [("Who wrote the novel Dracula?", "dracula"), ("river through Paris", "seine"),
                            ("largest city in Switzerland", "zurich"), ("longest bone", "femur"),
                            ("Where were the 1948 Winter Olympics held?", "olympics"),
                            ("Mary Shelley", "frankenstein")]:
        assert ids(index.search(query, 1)) == ids(reference.search(query, 1)) == [expected], query


def test_unknown_engine_and_missing_corpus_are_data_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="unknown search engine 'elastic'.*bm25s, rank_bm25"):
        search.load_index(corpus, engine="elastic")
    for engine in search.ENGINES:
        with pytest.raises(DataError, match="corpus not found.*passages.jsonl.gz"):
            search.load_index(tmp_path / "missing.jsonl", engine=engine, cache_dir=tmp_path)


def test_the_demo_world_is_answerable_by_search(tmp_path):
    """The embedded default task is solvable: the top hit of an eval question holds its answer."""
    paths = data.demo_world(seed=0, cache_dir=tmp_path)
    demo = search.load_index(paths["corpus"], cache_dir=tmp_path)
    questions = data.load_questions(paths["eval"])
    found = sum(any(re.search(rf"\b{q['answer']}\b", h["text"]) for h in demo.search(q["question"], 1))
                for q in questions)
    assert found / len(questions) >= 0.95


# --------------------------------------------------------------------------- the saved index


def test_index_is_saved_and_loaded_again_without_rebuilding(tmp_path, monkeypatch):
    corpus, cache = write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    first = search.load_index(corpus, cache_dir=cache)
    folder = index_folder(corpus, cache)
    assert json.loads((folder / "manifest.json").read_text())["n_passages"] == len(PASSAGES)
    built_at = folder.stat().st_mtime_ns

    def build(*args):
        raise AssertionError("the saved index was built again")

    monkeypatch.setattr(search, "_build_bm25s", build)
    second = search.load_index(corpus, cache_dir=cache)
    assert folder.stat().st_mtime_ns == built_at
    for query in ("Dracula", "river Seine", "Zürich"):
        assert second.search(query, 3) == first.search(query, 3)


def test_a_changed_corpus_gets_a_new_index(tmp_path):
    corpus, cache = write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    assert ids(search.load_index(corpus, cache_dir=cache).search("Everest", 1)) == ["everest"]
    old_folder = index_folder(corpus, cache)
    changed = [dict(p, title="K2", text="K2 is the second-highest mountain on Earth, in the Karakoram.")
               if p["id"] == "everest" else p for p in PASSAGES]
    write_corpus(corpus, changed)  # same file name, new bytes
    new_folder = index_folder(corpus, cache)
    assert new_folder != old_folder
    index = search.load_index(corpus, cache_dir=cache)
    assert new_folder.is_dir() and old_folder.is_dir()
    assert index.search("Everest", 1) == []  # the old text is gone ...
    hit, = index.search("Karakoram", 1)      # ... and the new one is found
    assert (hit["id"], hit["title"]) == ("everest", "K2") and "K2 is" in hit["text"]


@pytest.mark.parametrize("name, damage", [
    ("data.csc.index.npy", "truncate"),
    ("indices.csc.index.npy", "delete"),
    ("indptr.csc.index.npy", "empty"),
    ("vocab.index.json", "truncate"),
    ("params.index.json", "empty"),
    ("corpus.jsonl", "truncate"),         # the passages themselves
    ("corpus.mmindex.json", "truncate"),  # line offsets into corpus.jsonl
    ("manifest.json", "delete"),
])
def test_a_damaged_index_is_rebuilt_never_used(tmp_path, caplog, name, damage):
    corpus, cache = write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    queries = ["Dracula author", "river Seine", "Zürich", "東京", "highest mountain"]
    expected = [search.load_index(corpus, cache_dir=cache).search(q, 3) for q in queries]
    path = index_folder(corpus, cache) / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        index = search.load_index(corpus, cache_dir=cache)
    assert "rebuilding" in caplog.text
    assert [index.search(q, 3) for q in queries] == expected
    assert path.is_file() and path.stat().st_size > 0


def test_a_deleted_line_offset_file_is_recreated_by_bm25s(tmp_path):
    """bm25s rewrites corpus.mmindex.json from corpus.jsonl itself: no rebuild needed, same answers."""
    corpus, cache = write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    expected = search.load_index(corpus, cache_dir=cache).search("Seine", 2)
    (index_folder(corpus, cache) / "corpus.mmindex.json").unlink()
    assert search.load_index(corpus, cache_dir=cache).search("Seine", 2) == expected
    assert (index_folder(corpus, cache) / "corpus.mmindex.json").is_file()


# --------------------------------------------------------------------------- BM25 settings: k1, b, stemmer

# What the ten-passage corpus returned before k1, b and the stemmer became settings (recorded with the
# code of INDEX_VERSION v1, which had no settings): the defaults must keep returning exactly this.
BEFORE_SETTINGS = {  # query -> engine -> [(passage id, score), ...]
    "Irish author novel": {
        "bm25s": [("stoker", 1.350028157234192), ("dracula", 1.2587071657180786), ("frankenstein", 0.9198349118232727)],
        "rank_bm25": [("stoker", 2.4589614225269316), ("dracula", 2.2926280681282662), ("frankenstein", 1.5304847720887473)],
    },
    "capital city": {
        "bm25s": [("paris", 1.1484699249267578), ("tokyo", 1.1484699249267578), ("zurich", 0.5006782412528992)],
        "rank_bm25": [("paris", 2.1707200264624356), ("tokyo", 2.1707200264624356), ("zurich", 0.8330629815579076)],
    },
    "river Seine Paris": {
        "bm25s": [("paris", 2.1970324516296387), ("seine", 2.1150946617126465)],
        "rank_bm25": [("paris", 4.536760789501482), ("seine", 4.367563310562302)],
    },
    "Switzerland": {
        "bm25s": [("zurich", 0.6477916836738586), ("olympics", 0.5302962064743042)],
        "rank_bm25": [("zurich", 1.337657044904528), ("olympics", 1.0950348481261978)],
    },
}


@pytest.mark.parametrize("engine", search.ENGINES)
def test_bm25s_own_settings_rank_exactly_as_before(corpus, tmp_path, engine):
    """bm25s's own settings (k1 1.5, b 0.75, no stemming: every index's before the retriever became a setting) rank
    exactly as before; the default now is the seed's, and ranks otherwise."""
    own = search.load_index(corpus, engine=engine, cache_dir=tmp_path, k1=1.5, b=0.75, stemmer="none")
    default = search.load_index(corpus, engine=engine, cache_dir=tmp_path)
    for query, expected in ((q, by_engine[engine]) for q, by_engine in BEFORE_SETTINGS.items()):
        hits = own.search(query, 10)
        assert [(h["id"], h["score"]) for h in hits] == expected, query  # same ids, same order, same floats
    assert (default.engine, default.stemmer) == (engine, "porter")
    assert any([h["score"] for h in default.search(q, 10)] != [s for _, s in expected]
               for q, expected in ((q, by_engine[engine]) for q, by_engine in BEFORE_SETTINGS.items()))


# Six passages: "mango" is in two (df 2 of N 6), so both engines give it a positive idf.
MANGO = [
    {"id": "m2", "title": "apple", "text": "mango mango"},  # 3 tokens with the title, tf 2
    {"id": "m1", "title": "pear", "text": "mango peach peach peach peach peach peach"},  # 8 tokens, tf 1
    {"id": "x1", "title": "plum", "text": "cherry"},
    {"id": "x2", "title": "fig", "text": "grape"},
    {"id": "x3", "title": "lime", "text": "lemon"},
    {"id": "x4", "title": "kiwi", "text": "melon"},
]


def hand_bm25(engine: str, k1: float, b: float, tf: int, length: int) -> float:
    """The score of "mango" in a MANGO passage, by the textbook formulas (N 6, df 2, mean length 19/6)."""
    n, df, avg = 6, 2, 19 / 6
    norm = k1 * (1 - b + b * length / avg)
    if engine == "bm25s":  # method "lucene": idf log(1 + (N - df + .5) / (df + .5)), no (k1 + 1) factor
        return math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + norm)
    return math.log((n - df + 0.5) / (df + 0.5)) * tf * (k1 + 1) / (tf + norm)  # rank_bm25's BM25Okapi


@pytest.mark.parametrize("engine", search.ENGINES)
@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (0.9, 0.4), (1.2, 0.0), (3.0, 1.0)])
def test_k1_and_b_reach_the_scores(tmp_path, engine, k1, b):
    corpus = write_corpus(tmp_path / "mango.jsonl", MANGO)
    index = search.load_index(corpus, engine=engine, cache_dir=tmp_path, k1=k1, b=b)
    scores = {h["id"]: h["score"] for h in index.search("mango", 10)}
    assert scores == {"m2": pytest.approx(hand_bm25(engine, k1, b, tf=2, length=3), rel=1e-6),
                      "m1": pytest.approx(hand_bm25(engine, k1, b, tf=1, length=8), rel=1e-6)}


@pytest.mark.parametrize("engine", search.ENGINES)
def test_b_decides_whether_a_long_passage_with_more_mentions_wins(tmp_path, engine):
    """b is length normalisation: b 0 ranks by mentions alone (the long passage says "mango" 3 times),
    b 1 divides them by the length (the short passage says it once, in 2 words)."""
    filler = " ".join(f"filler{i}" for i in range(26))
    passages = [{"id": "short", "title": "apple", "text": "mango"},
                {"id": "long", "title": "pear", "text": f"mango mango mango {filler}"}, *MANGO[2:]]
    corpus = write_corpus(tmp_path / "lengths.jsonl", passages)

    def ranking(b):
        return ids(search.load_index(corpus, engine=engine, cache_dir=tmp_path, k1=1.2, b=b).search("mango", 2))

    assert ranking(0.0) == ["long", "short"]
    assert ranking(1.0) == ["short", "long"]


RUNNERS = [
    {"id": "bolt", "title": "Usain Bolt", "text": "Bolt runs the 100 metres; he won the run of his life in Beijing."},
    {"id": "swim", "title": "Michael Phelps", "text": "Phelps swims butterfly and won 23 Olympic gold medals."},
    {"id": "chess", "title": "Chess", "text": "Chess is a board game for two players."},
]


@pytest.mark.parametrize("engine", search.ENGINES)
def test_porter_stemming_matches_other_forms_of_a_word(tmp_path, engine):
    corpus = write_corpus(tmp_path / "runners.jsonl", RUNNERS)
    plain = search.load_index(corpus, engine=engine, cache_dir=tmp_path, k1=1.5, b=0.75, stemmer="none")
    stemmed = search.load_index(corpus, engine=engine, cache_dir=tmp_path, k1=1.5, b=0.75, stemmer="porter")
    assert plain.search("running", 3) == []  # "running" is not a word of the corpus ...
    assert ids(stemmed.search("running", 3)) == ["bolt"]  # ... but its stem "run" is ("runs", "run")
    assert ids(stemmed.search("Who SWIMMING?", 3)) == ["swim"]  # queries are lower-cased, then stemmed
    assert ids(stemmed.search("board games", 3)) == ["chess"]
    assert search.tokenize("running runs run", "porter") == ["run", "run", "run"]
    assert search.tokenize("running runs run") == ["running", "runs", "run"]  # tokenize's default: no stemming
    # Porter's original algorithm, like Lucene's PorterStemFilter (Snowball's "english": general generous fair sky)
    assert search.tokenize("generalization generously fairly skies", "porter") == ["gener", "gener", "fairli", "ski"]


def test_each_setting_has_its_own_cached_index(tmp_path, monkeypatch):
    corpus, cache = write_corpus(tmp_path / "mango.jsonl", MANGO), tmp_path / "cache"
    own = {"k1": 1.5, "b": 0.75, "stemmer": "none"}  # bm25s's own; the default is the seed's (the last)
    settings = [own, {**own, "k1": 0.9, "b": 0.4}, {**own, "stemmer": "porter"}, {}]
    query = "mangoes mango"  # one word only a stemmed index matches
    first = [search.load_index(corpus, cache_dir=cache, **s).search(query, 2) for s in settings]
    folders = [index_folder(corpus, cache, **s) for s in settings]
    assert len(set(folders)) == len(settings) and all(f.is_dir() for f in folders)
    assert folders[3].name.endswith(f"-{search.INDEX_VERSION}-k1_0.9-b_0.4-porter")
    assert folders[0].name.endswith(f"-{search.INDEX_VERSION}-k1_1.5-b_0.75-none")
    assert len({str(hits) for hits in first}) == len(settings)  # other scores: a shared folder would answer wrongly

    def build(*args):
        raise AssertionError("an index was built again")

    monkeypatch.setattr(search, "_build_bm25s", build)  # now every setting must load its own folder
    assert [search.load_index(corpus, cache_dir=cache, **s).search(query, 2) for s in settings] == first
    assert index_folder(corpus, cache, k1=0.9) == index_folder(corpus, cache, k1=0.90, b=0.4)  # same floats
    with pytest.raises(AssertionError, match="built again"):  # and an unseen setting is built, not borrowed
        search.load_index(corpus, cache_dir=cache, k1=2.0)


@pytest.mark.parametrize("manifest", [
    {"version": "v1"},  # what an index cached before the settings existed says of itself
    {"version": search.INDEX_VERSION, "k1": 0.9, "b": 0.4, "stemmer": "porter"},
])
def test_an_index_built_with_other_settings_is_rebuilt_never_used(tmp_path, caplog, manifest):
    """Defence in depth beside the folder name: the manifest records the settings, and a load checks them."""
    corpus, cache = write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    search.load_index(corpus, cache_dir=cache, k1=0.9, b=0.4, stemmer="porter")
    folder = index_folder(corpus, cache, k1=1.5, b=0.75, stemmer="none")  # bm25s's own settings' folder, filled with the seed-settings index
    shutil.copytree(index_folder(corpus, cache, k1=0.9, b=0.4, stemmer="porter"), folder)
    (folder / "manifest.json").write_text(json.dumps({"n_passages": len(PASSAGES), **manifest}))
    with caplog.at_level(logging.WARNING):
        index = search.load_index(corpus, cache_dir=cache, k1=1.5, b=0.75, stemmer="none")
    assert "rebuilding" in caplog.text
    for query, expected in ((q, by_engine["bm25s"]) for q, by_engine in BEFORE_SETTINGS.items()):
        assert [(h["id"], h["score"]) for h in index.search(query, 10)] == expected, query


@pytest.mark.parametrize("engine", search.ENGINES)
@pytest.mark.parametrize("settings, message", [
    ({"stemmer": "snowball"}, "unknown stemmer 'snowball': choose one of none, porter"),
    ({"stemmer": "Porter"}, "unknown stemmer 'Porter'"),
    ({"k1": -1.0}, "k1 must be a number >= 0"),
    ({"k1": float("nan")}, "k1 must be a number >= 0"),
    ({"b": 1.5}, "b must be a number from 0 to 1"),
    ({"b": "0.4"}, "b must be a number from 0 to 1"),
])
def test_bad_settings_are_one_clear_data_error(corpus, tmp_path, engine, settings, message):
    with pytest.raises(DataError, match=re.escape(message)):
        search.load_index(corpus, engine=engine, cache_dir=tmp_path, **settings)
    assert not (tmp_path / "index").exists()  # refused before any work


def test_missing_pystemmer_is_one_clear_error_naming_the_fix(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # import Stemmer now raises ImportError
    monkeypatch.setattr(search, "_local", threading.local())  # forget the stemmers made so far
    with pytest.raises(DataError, match=re.escape("stemmer 'porter' needs PyStemmer: pip install PyStemmer==2.2.0.3")):
        search.load_index(corpus, cache_dir=tmp_path, stemmer="porter")
    assert ids(search.load_index(corpus, cache_dir=tmp_path, k1=1.5, b=0.75, stemmer="none").search("Everest", 1)) == ["everest"]  # not needed


# --------------------------------------------------------------------------- the command line


def test_cli_prints_readable_hits(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "CACHE_DIR", tmp_path)  # keep the test's index out of ~/.cache
    assert search.main(["--corpus", str(corpus), "--k", "2", "Irish", "author", "Dracula"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: Irish author Dracula"
    assert re.match(r"  1\. \[\d+\.\d\d\] Dracula \(dracula\): Dracula is an 1897", lines[1])
    assert lines[2].startswith("  2. [") and len(lines) == 3
    assert search.main(["--corpus", str(corpus), "the of and"]) == 0
    assert capsys.readouterr().out.splitlines() == ["query: the of and", "  (no results)"]


def test_cli_json_reads_queries_from_stdin(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Zürich\nthe of and\nriver Seine\n"))
    assert search.main(["--corpus", str(corpus), "--k", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one object a line
    assert [r["query"] for r in rows] == ["Zürich", "the of and", "river Seine"]
    assert ids(rows[0]["hits"]) == ["zurich"] and rows[1]["hits"] == [] and ids(rows[2]["hits"]) == ["seine"]
    assert set(rows[0]["hits"][0]) == {"id", "title", "text", "score"}


def run_cli(args, tmp_path, stdin=""):
    env = dict(os.environ, MT_GRPO_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, str(ROOT / "search.py"), *args], input=stdin, text=True,
                          capture_output=True, env=env, cwd=tmp_path, timeout=120)


def test_cli_as_a_process_with_stdin_and_rank_bm25(corpus, tmp_path):
    done = run_cli(["--corpus", str(corpus), "--k", "1", "--json", "--engine", "rank_bm25"], tmp_path,
                   stdin="longest bone\nMary Shelley\n")
    assert done.returncode == 0, done.stderr
    assert [ids(json.loads(line)["hits"]) for line in done.stdout.splitlines()] == [["femur"], ["frankenstein"]]


def test_cli_missing_corpus_is_one_clear_line_and_exit_code_2(tmp_path):
    done = run_cli(["--corpus", str(tmp_path / "nope.jsonl"), "Dracula"], tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'nope.jsonl'}: corpus not found")
    assert "Traceback" not in done.stderr


def test_cli_takes_the_bm25_settings(tmp_path):
    corpus = write_corpus(tmp_path / "runners.jsonl", RUNNERS)
    seed = run_cli(["--corpus", str(corpus), "--json", "--k1", "0.9", "--b", "0.4", "--stemmer", "porter"], tmp_path,
                   stdin="running\n")
    assert seed.returncode == 0, seed.stderr
    assert ids(json.loads(seed.stdout)["hits"]) == ["bolt"]
    assert (tmp_path / "cache" / "index" / index_folder(corpus, tmp_path, k1=0.9, b=0.4, stemmer="porter").name).is_dir()
    plain = run_cli(["--corpus", str(corpus), "--json", "--k1", "1.5", "--b", "0.75", "--stemmer", "none"], tmp_path,
                    stdin="running\n")
    assert plain.returncode == 0 and json.loads(plain.stdout)["hits"] == []
    bad = run_cli(["--corpus", str(corpus), "--b", "2", "running"], tmp_path)
    assert (bad.returncode, bad.stderr) == (2, "error: BM25 b must be a number from 0 to 1, not 2.0\n")
    assert run_cli(["--corpus", str(corpus), "--stemmer", "lancaster", "x"], tmp_path).returncode == 2  # argparse


# --------------------------------------------------------------------------- the real corpus


@pytest.fixture(scope="module")
def wiki_index():
    """The 286k-passage Wikipedia index, in the default cache dir: built once (~40 s), then loaded (<1 s)."""
    need_shared_data()
    return search.load_index(WIKI)


@pytest.fixture(scope="module")
def trivia_questions():
    return {q["question"]: q for q in data.load_questions(TRIVIAQA)} if TRIVIAQA.is_file() else {}


# Real TriviaQA questions and the passage(s) that answer them, each read and checked by hand.
HAND_CHECKED = [
    ("In which country were the 1948 Winter Olympics held?", {"42195_0"}),
    # 1948 Winter Olympics: "... celebrated in 1948 in St. Moritz, Switzerland."
    ("Anosmia is the lack of which of the senses in humans?", {"37149_9"}),
    # Cranial nerves: "Damage to the olfactory nerve (I) can cause an inability to smell (anosmia)"
    ("More commonly known as the thigh bone, what is the medical name for the longest bone in the human body?",
     {"4099_2", "27609_10"}),
    # Bone: "The largest bone in the body is the thigh-bone (femur)"; Skeleton: "The biggest bone ... is the femur"
    ("Which city is the ‘de facto capital’ of the European Union?", {"3708_0", "42370_4"}),
    # Brussels: '... and the "de facto" capital of the European Union (EU)'
    ("What shape are honeycomb cells?", {"58258_3"}),
    # Honeycomb: "... why honeycomb is composed of hexagons, rather than any other shape."
    ("Which long distance footpath links Frodsham and Whitchurch?", {"7406_14"}),
    # Cheshire: "A 55 km footpath, the Sandstone Trail, follows this ridge from Frodsham to Whitchurch"
    ("Pompey the Great and Crassus were two of the 'First Triumverate' in 60 BC. Who was the third?",
     {"19960_11", "46996_1", "23867_1"}),
    # Crassus: "Crassus joined Caesar and Pompey in the unofficial political alliance known as the First Triumvirate"
    ("Who betrayed Jesus for 30 pieces of silver?", {"59172_5"}),
    # Judas Iscariot: 'He betrayed Jesus for a bribe of "thirty pieces of silver"'
]


@pytest.mark.parametrize("question, answer_passages", HAND_CHECKED, ids=[q[:40] for q, _ in HAND_CHECKED])
def test_real_questions_find_their_answer_passage_in_the_top_3(wiki_index, trivia_questions, question,
                                                               answer_passages):
    assert question in trivia_questions  # a real question from the shared file, verbatim
    hits = wiki_index.search(question, k=3)
    assert answer_passages & set(ids(hits)), [(h["id"], h["title"]) for h in hits]
    answer_hit = next(h for h in hits if h["id"] in answer_passages)
    aliases = [a.lower() for a in trivia_questions[question]["aliases"] if len(a) > 3]
    assert any(a in answer_hit["text"].lower() for a in aliases)  # and it names the answer


def test_fast_top_k_matches_bm25s_retrieve_on_real_questions(wiki_index, trivia_questions):
    """Index.search scores with bm25s and selects with top_k; bm25s's own retrieve() is the reference.

    Scores must be identical. Ids too, except that equal scores (duplicate passages) may come in
    another order: bm25s leaves ties in np.argpartition's order, top_k puts the lower row first.
    """
    model, exact = wiki_index.model, 0
    questions = list(trivia_questions)[:100]
    for question in questions:
        terms = wiki_index.terms(question)
        rows, scores = model.retrieve([terms], k=5, show_progress=False, n_threads=0)
        reference = [(wiki_index.passages[int(i)]["id"], float(s)) for i, s in zip(rows[0], scores[0]) if s > 0]
        hits = wiki_index.search(question, k=5)
        assert [h["score"] for h in hits] == [s for _, s in reference], question
        last = reference[-1][1]
        assert ({h["id"] for h in hits if h["score"] > last} == {i for i, s in reference if s > last}), question
        exact += ids(hits) == [i for i, _ in reference]
    assert exact >= 0.9 * len(questions)
