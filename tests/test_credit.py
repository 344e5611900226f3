"""The credit-assignment benchmark: its task (bench/credit/world.py), its demonstrator (bench/credit/demonstrator.py),
its statistics, and the script end to end at a tiny size (bench/bench_credit.py)."""
import json
import math
import random

import bench_credit
import pytest

import config
import credit.world as world_module
import data
import env
import rewards
from credit.demonstrator import varied_demonstrations
from tools import plot


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return world_module.credit_world(0, cache_dir=tmp_path_factory.mktemp("credit"))


@pytest.fixture(scope="module")
def index(world):
    return bench_credit.world_index(world)


def test_the_world_is_a_function_of_its_seed_and_its_names_are_one_token(tok):
    names = world_module.one_token_names(tok)
    assert world_module.generate_credit_world(3, names) == world_module.generate_credit_world(3, names)
    assert world_module.generate_credit_world(3, names) != world_module.generate_credit_world(4, names)
    for w in random.Random(0).sample(names, 50):  # one token with its leading space, as passages write it
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1


def test_held_out_people_are_never_a_training_subject(world):
    train = data.read_jsonl(world["train"]) + data.read_jsonl(world["hops_train"])
    held = {q["person"] for q in data.read_jsonl(world["eval"]) + data.read_jsonl(world["hops_eval"])}
    assert held and not held & {q["person"] for q in train}
    hops_eval = data.read_jsonl(world["hops_eval"])
    assert [q["hops"] for q in hops_eval[:4]] == [1, 2, 1, 2]  # the first n hold both kinds equally
    ev = data.read_jsonl(world["eval"])
    assert len(ev) == 3 * len(held) and len({q["pair"] for q in ev}) == len(ev)  # one question per pair


def test_a_passage_names_three_towns_and_the_answer_is_one_of_them(world):
    passages = {p["id"]: p for p in data.read_jsonl(world["corpus"])}
    for q in data.read_jsonl(world["train"])[:200]:
        facts = world_module.credit_facts(passages[f"person-{q['person']}"]["text"])
        assert set(facts) == set(world_module.CREDIT_RELATIONS) and len(set(facts.values())) == 3
        assert facts[q["relation"]] == q["answer"]  # (a): the right passage alone does not give the answer
    town = next(p for p in passages.values() if p["id"].startswith("town-"))
    assert set(world_module.credit_facts(town["text"])) == {"river", "province"}


def test_the_question_as_query_fails_where_a_decoy_is_named_and_the_right_query_never_does(world, index):
    rows = data.read_jsonl(world["train"])[:300]

    def hit(q, query):
        return index.search(query, 1)[0]["id"] == f"person-{q['person']}"

    assert all(hit(q, q["query"]) for q in rows)
    with_decoy = [q for q in rows if q["decoy"]]
    assert 0.5 < len(with_decoy) / len(rows) < 0.9
    assert sum(hit(q, q["question"]) for q in with_decoy) / len(with_decoy) < 0.05  # (b)
    for q in data.read_jsonl(world["hops_train"])[:50]:  # the second hop: "the town X" finds X's passage
        if q["hops"] == 2:
            assert index.search(f"the town {q['town']}", 1)[0]["id"] == f"town-{q['town']}"


def test_a_variant_keeps_the_world_and_changes_only_its_passages_and_questions(tok, tmp_path):
    """ordered: the three towns in one order; one_town: the town of birth alone, and only its questions.
    Both keep the base world's people, decoys, held-out people and K-turn task."""
    names = world_module.one_token_names(tok)
    base = world_module.generate_credit_world(2, names)
    ordered = world_module.generate_credit_world(2, names, variant="ordered")
    one = world_module.generate_credit_world(2, names, variant="one_town")
    assert ordered["credit"] == base["credit"] and ordered["hops"] == base["hops"] == one["hops"]
    assert one["credit"] == [q for q in base["credit"] if q["relation"] == "born"]
    people = {p["id"]: p["text"] for p in base["corpus"]}
    assert {p["id"] for p in ordered["corpus"]} == set(people) == {p["id"] for p in one["corpus"]}
    clauses = [clause for clause, _ in world_module.CREDIT_RELATIONS.values()]
    for w in (ordered, one):
        passages = {p["id"]: p["text"] for p in w["corpus"]}
        assert sum(passages[k] != people[k] for k in people) > 0.6 * 300  # most shuffled orders were not this one
        for q in w["credit"][:200]:
            text = passages[f"person-{q['person']}"]
            facts = world_module.credit_facts(text)
            assert facts[q["relation"]] == q["answer"] == world_module.credit_facts(people[f"person-{q['person']}"])[q["relation"]]
            if w is ordered:
                assert [text.index(c) for c in clauses] == sorted(text.index(c) for c in clauses)
            else:
                assert set(facts) == {"born"}  # the only town the right result offers is the answer
    held = {q["person"] for q in data.read_jsonl(world_module.credit_world(0, cache_dir=tmp_path)["eval"])}
    ev = data.read_jsonl(world_module.credit_world(0, cache_dir=tmp_path, variant="one_town")["eval"])
    assert {q["person"] for q in ev} == held and len(ev) == 4 * len(held)  # every decoy variant, people first
    assert len({q["person"] for q in ev[:len(held)]}) == len(held)
    assert len({q["question"] for q in ev}) > 3 * len(held)
    with pytest.raises(data.DataError, match="unknown credit-world variant"):
        world_module.generate_credit_world(2, names, variant="shuffled")


@pytest.fixture(scope="module")
def world_tok(world):
    return bench_credit.world_tokenizer(world, 0)


def test_the_world_tokenizer_keeps_names_whole_and_renders_prompts_as_smollm2(tok, world, world_tok):
    assert len(world_tok) < 5000  # the point of it: a small output layer
    names = {w.strip(".,") for p in data.read_jsonl(world["corpus"]) for w in p["text"].split() if w[:1].isupper()}
    assert all(len(world_tok(" " + n, add_special_tokens=False)["input_ids"]) == 1 for n in names)
    messages = [{"role": "system", "content": env.SYSTEM_PROMPT}, {"role": "user", "content": "Where? Ünïcode 🙂"}]
    render = dict(tokenize=False, add_generation_prompt=True)
    assert world_tok.apply_chat_template(messages, **render) == tok.apply_chat_template(messages, **render)
    text = 'Any text at all: {"query": "Zürich ☃"}\n<|im_end|>'
    assert world_tok.decode(world_tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert (world_tok.eos_token_id, world_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert bench_credit.world_tokenizer(world, 0).get_vocab() == world_tok.get_vocab()  # cached, the same


def test_the_copy_drill_trains_the_repeat_and_the_lookups_value(world_tok):
    ids, attn, turn = bench_credit.copy_drill(world_tok, 0, rows=64, gaps=(0, 20), lookup=0.5)(0)
    kinds = {"repeat": 0, "lookup": 0}
    for row, a, t in zip(ids.tolist(), attn.tolist(), turn.tolist()):
        n = sum(a)
        trained = [p for p in range(n) if t[p]]
        assert trained and trained[-1] == n - 1 and not any(t[n:])
        if trained == list(range(trained[0], n)):  # a repeat: the row ends with its first tokens again
            span = n - trained[0] + 1
            assert row[n - span:n] == row[:span]
            kinds["repeat"] += 1
        else:  # a lookup: each value follows the key and link it followed the first time they were written
            for p in trained:
                first = next(q for q in range(2, n) if row[q - 2:q] == row[p - 2:p])
                assert first < p and row[first] == row[p]
            kinds["lookup"] += 1
    assert min(kinds.values()) > 16, kinds


def test_the_varied_demonstrator_does_every_thing_some_of_the_time(tok, world, index):
    cfg = config.episode(config.Config(**bench_credit.K3_ENV))
    rows = random.Random(0).choices(data.read_jsonl(world["train"]), k=120)
    demos = varied_demonstrations(tok, index, rows, cfg, seed=0)
    assert len(demos) == len(rows)  # every episode kept (none cut by the budget)
    scores = rewards.compute([t.messages for t in demos], [q["aliases"] for q in rows])
    searched = sum(t.has_result for t in demos) / len(demos)
    found = sum(s > 0 for s in scores["search_answer"]) / len(demos)
    em = sum(scores["exact_match"]) / len(demos)
    assert 0.35 < searched < 0.65 and 0.15 < found < searched and 0.05 < em < found  # guesses, bad queries, bad picks
    hops = random.Random(1).choices(data.read_jsonl(world["hops_train"]), k=120)
    demos = varied_demonstrations(tok, index, hops, cfg, seed=0)
    calls = [len(t.results) for t in demos]
    assert {0, 1, 2} <= set(calls)  # no search, one, two
    assert any(c == 2 and q["hops"] == 1 for c, q in zip(calls, hops))  # a search it did not need
    assert any(c == 1 and q["hops"] == 2 for c, q in zip(calls, hops))  # a stop before the second hop
    assert varied_demonstrations(tok, index, hops[:5], cfg, seed=3) == \
        varied_demonstrations(tok, index, hops[:5], cfg, seed=3)


def test_statistics():
    assert plot.t975(1) == 12.706 and plot.t975(7) == 2.365 and abs(plot.t975(100) - 1.984) < 0.002
    mean, half = plot.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert bench_credit.bootstrap_ci([0.1] * 8) == pytest.approx((0.1, 0.1))
    assert bench_credit.wilson(5, 128) == pytest.approx((0.0168, 0.0882), abs=1e-4)  # 5/128, by hand
    assert bench_credit.wilson(0, 10)[0] == 0.0 and bench_credit.wilson(10, 10)[1] == 1.0
    lo, hi = bench_credit.bootstrap_ci([0.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.0, 0.3])
    assert 0.0 < lo < 0.15 < hi < 0.3 and bench_credit.bootstrap_ci([0.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.0, 0.3]) == (lo, hi)
    d = [0.0, 0.1, 0.2, 0.3]
    assert bench_credit.mde(d) == pytest.approx(2.8 * 0.12909944 / 2, rel=1e-6)
    runs = [[{"step": 1, "x": 1.0}], [{"step": 1, "x": 3.0}]]
    steps, m, lo, hi = plot.over_seeds(runs, "x", band="ci95")
    assert (m[0], lo[0], hi[0]) == pytest.approx((2.0, 2.0 - 12.706, 2.0 + 12.706))
    args = bench_credit.parse_args(["--steps", "20", "--eval-every", "5"])
    assert bench_credit.eval_points(args) == [5, 10, 15, 20]


TINY = ["--seeds", "0", "--steps", "2", "--eval-every", "1", "--eval-n", "4", "--G", "2", "--batch-size", "4",
        "--hidden", "64", "--layers", "1", "--drill-steps", "2", "--instrument-steps", "2", "--warmstart-steps", "1",
        "--jobs", "1", "--threads", "1", "--regime", "off"]


def test_the_script_runs_end_to_end_and_writes_its_results(tmp_path, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--out", str(out), "--results", str(results), "--methods", "grpo_or", "mt_grpo", "mt_grpo_naive"]
    assert bench_credit.main(argv) == 0
    md = (results / "credit.md").read_text()
    for text in ("| start (seed's warm start) |", "| GRPO-OR |", "| MT-GRPO |", "| MT-GRPO - GRPO-OR |",
                 "R^O) are identical across the methods in 1 of 1 seeds"):
        assert text in md, text
    assert "| MT-GRPO naive - MT-GRPO (K-turn) |" in (results / "credit_k3.md").read_text()
    for name in ("credit_curves", "credit_training", "credit_k3_curves", "credit_k3_training"):
        assert (results / f"{name}.png").stat().st_size > 5000
    run = out / "credit" / "mt_grpo-seed0"
    assert [json.loads((run / f"eval-step{s}.json").read_text())["step"] for s in (1, 2)] == [1, 2]
    assert len(plot.load_run(str(run))) == 2  # two segments, one run: steps 1 and 2 once each
    assert "full design, estimated:" in capsys.readouterr().out
    assert bench_credit.main(argv) == 0  # everything cached: a second call redoes nothing


def test_properties_are_measured_and_written(tmp_path):
    results = tmp_path / "results"
    argv = [*TINY, "--out", str(tmp_path / "runs"), "--results", str(results), "--properties", "--property-n", "4",
            "--eval-n", "4"]
    assert bench_credit.main(argv) == 0
    text = (results / "credit_properties.txt").read_text()
    assert text.startswith("python bench/bench_credit.py ") and "--properties" in text.splitlines()[0]
    for label in ("(b) top-1 hit rate", "(a) every person's passage names 3-3 towns", "(a, measured)", "(c) at the start of RL",
                  "the instrument (build 0): Llama 64 x 1", "Regime (bench_credit.REGIME", "OUTSIDE it: ",
                  "the right query in 0.000 of the episodes, below 0.05"):
        assert label in text, label  # a 2-step instrument starts outside the regime, and the file says so
    assert float(text.split("the right query (\"the <kind> <work>\") ")[1].split(";")[0]) == 1.0  # (b) on this world


def test_the_realistic_check_trains_the_embedded_model_in_the_same_loop(tmp_path, tiny_model_dir, monkeypatch):
    """--policy smollm2 builds no instrument: each seed's warm start begins from the embedded model (here
    the tiny stand-in, which has SmolLM2's tokenizer) at train.py's learning rates, and its results files
    are the _smollm2 ones, beside the instrument's."""
    monkeypatch.setattr(data, "embedded_model_dir", lambda cache_dir=None: tiny_model_dir)
    args = bench_credit.parse_args(["--policy", "smollm2"])
    assert (args.lr, args.warmstart_lr) == (config.Config.lr, config.Config.warmstart_lr)
    assert bench_credit.parse_args([]).lr == 2e-4  # the instrument's own
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--policy", "smollm2", "--part", "credit", "--methods", "grpo_mr", "mt_grpo", "--out", str(out),
            "--results", str(results)]
    assert bench_credit.main(argv) == 0
    assert not (out / "instrument").exists() and not (results / "credit.md").exists()
    start = json.loads((out / "credit" / "warmstart-seed0" / "config.json").read_text())
    assert start["hidden_size"] == json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    md = (results / "credit_smollm2.md").read_text()
    for text in ("Policy: SmolLM2-135M-Instruct", "| MT-GRPO - GRPO-MR |", "identical across the methods in 1 of 1 seeds"):
        assert text in md, text
    with pytest.raises(SystemExit):
        bench_credit.parse_args(["--policy", "smollm2", "--properties"])


def test_the_workbench_runs_every_estimator_and_turn_reward(tmp_path, tiny_model_dir, monkeypatch):
    """--part workbench at a tiny size: every arm trains through train.py and is paired against MT-GRPO; the
    judge is the embedded model (here the tiny stand-in); each arm's collapses are counted."""
    monkeypatch.setattr(data, "embedded_model_dir", lambda cache_dir=None: tiny_model_dir)
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--part", "workbench", "--methods", "mt_grpo", "gigpo", "mt_ppo", "mt_grpo_ig", "mt_grpo_judge",
            "--out", str(out), "--results", str(results)]
    assert bench_credit.main(argv) == 0
    md = (results / "credit_workbench.md").read_text()
    for text in ("| GiGPO - MT-GRPO |", "| MT-PPO - MT-GRPO |", "| MT-GRPO, info-gain R^T - MT-GRPO |",
                 "| MT-GRPO, judge R^T - MT-GRPO |", "Collapsed (held-out EM below 0.01 at step 2): MT-GRPO ",
                 "R^O) are identical across the methods in 1 of 1 seeds"):  # paired, whatever R^T each arm uses
        assert text in md, text
    assert {"critic/value_loss", "critic/explained_variance"} <= set(plot.load_run(str(out / "workbench" / "mt_ppo-seed0"))[0])


def test_a_world_variant_runs_on_the_worlds_own_instrument_and_reports_apart(tmp_path):
    """--variant: the instrument is the base world's (built once, shared), the runs live in workbench-<variant>
    and the results are credit_workbench_<variant>, beside the base world's, which they never overwrite."""
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--part", "workbench", "--methods", "mt_grpo", "grpo_or", "--out", str(out), "--results", str(results)]
    assert bench_credit.main([*argv, "--variant", "one_town"]) == 0
    built = (out / "instrument" / "stage.json").stat().st_mtime_ns
    assert bench_credit.main([*argv, "--variant", "ordered"]) == 0
    assert (out / "instrument" / "stage.json").stat().st_mtime_ns == built  # shared, not rebuilt
    assert sorted(p.name for p in results.glob("*.md")) == ["credit_workbench_one_town.md", "credit_workbench_ordered.md"]
    md = (results / "credit_workbench_one_town.md").read_text()
    assert 'World seed 0, variant "one_town"' in md and "| GRPO-OR - MT-GRPO |" in md
    assert (out / "workbench-one_town" / "mt_grpo-seed0" / "eval-step2.json").is_file()
    one_town = data.read_jsonl(world_module.credit_world(0, variant="one_town")["train"])
    warm = json.loads((out / "workbench-one_town" / "mt_grpo-seed0" / "config.json").read_text())
    assert warm["questions"].endswith("one_town/train.jsonl") and {q["relation"] for q in one_town} == {"born"}
    for bad in (["--variant", "ordered", "--part", "k3"], ["--variant", "ordered", "--properties", "--part", "credit"]):
        with pytest.raises(SystemExit):
            bench_credit.parse_args(bad)


def in_regime(**changes) -> dict:
    """A start's properties inside bench_credit.REGIME, with ``changes``."""
    m = {"em": 0.10, "em_ci": (0.06, 0.16), "tool_call_rate": 0.45, "tool_call_ci": (0.37, 0.54), "right_query": 0.16,
         "found": 0.20, "right_given_found": 0.30}
    return {**m, **changes}


def test_the_regime_names_what_puts_a_start_outside_it():
    assert bench_credit.regime_problems(in_regime()) == []
    # a 95% interval that reaches the range is in it: 5 of 128 (0.039, 0.017-0.088), world 0's committed start
    assert bench_credit.regime_problems(in_regime(em=5 / 128, em_ci=bench_credit.wilson(5, 128))) == []
    for changes, word in [({"em": 0.01, "em_ci": (0.0, 0.04)}, "em 0.010"),
                          ({"em": 0.5, "em_ci": (0.41, 0.59)}, "em 0.500"),
                          ({"tool_call_rate": 0.95, "tool_call_ci": (0.9, 0.98)}, "tool call rate 0.950"),
                          ({"right_query": 0.016}, "the right query in 0.016"),  # world 1's first build
                          ({"right_given_found": 0.9}, "right after a search that found it: 0.900"),
                          ({"found": 0.0, "right_given_found": 0.0}, "none found")]:
        problems = bench_credit.regime_problems(in_regime(**changes))
        assert len(problems) == 1 and word in problems[0], (changes, problems)


def test_a_build_outside_the_regime_is_never_measured(tmp_path, capsys):
    """A deliberately broken build (2 drill and 2 demonstration steps: it never writes the right query) is
    checked before any run: it is recorded, the next build seed is built and checked, and with none inside the
    regime the run stops with one clear error, no RL run started and no results written."""
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [a for a in TINY if a not in ("--regime", "off")]
    argv += ["--part", "workbench", "--methods", "mt_grpo", "grpo_or", "--out", str(out), "--results", str(results),
             "--max-builds", "2", "--property-n", "4"]
    assert bench_credit.main(argv) == 2
    assert "fewer than 1 of the 2 instrument builds tried start inside the regime" in capsys.readouterr().err
    record = json.loads((out / "builds.json").read_text())
    assert [(r["build"], r["checked"], r["in_regime"]) for r in record] == [(0, True, False), (1, True, False)]
    assert all(r["problems"] for r in record)
    first, second = (json.loads((o / "instrument" / "stage.json").read_text()) for o in (out, out / "build1"))
    assert (first["build"], second["build"]) == (0, 1)  # the next build seed: other draws, another instrument
    assert not (out / "workbench").exists() and not (out / "build1" / "workbench").exists() and not results.exists()


def test_several_builds_are_reported_per_build_and_pooled(tmp_path):
    """--builds 2 (unchecked here: a tiny instrument is never in the regime): each build has its own runs and
    results file, and the pooled file pairs every arm with MT-GRPO per build and over builds, saying whether
    the difference holds on every build, and that the regime was not checked."""
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [*TINY, "--part", "workbench", "--methods", "mt_grpo", "grpo_or", "--builds", "2", "--out", str(out),
            "--results", str(results), "--temperature", "0.9", "--top-k", "50"]
    assert bench_credit.main(argv) == 0
    assert sorted(p.name for p in results.glob("*.md")) == ["credit_workbench_b0.md", "credit_workbench_b1.md",
                                                          "credit_workbench_builds.md"]
    pooled = (results / "credit_workbench_builds.md").read_text()
    for text in ("| a - MT-GRPO | build 0 | build 1 | pooled | on every build |", "| GRPO-OR | ",
                 "not checked (--regime off)", "n = 2"):
        assert text in pooled, text
    b1 = (results / "credit_workbench_b1.md").read_text()
    assert "Instrument (build 1)" in b1 and "NOT checked against the regime" in b1 and "--temperature 0.9" in b1
    run = json.loads((out / "build1" / "workbench" / "grpo_or-seed0" / "config.json").read_text())
    assert (run["temperature"], run["top_k"], run["stemmer"]) == (0.9, 50, "none")  # the seed's sampling, the world's search
