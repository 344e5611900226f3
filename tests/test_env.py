"""Tests for env.py: the multi-turn search environment and its token-exact trajectories.

Every rollout here must keep the invariants of ``helpers.check_trajectory`` (ids and turn indices
line up with the messages; the ids decode to exactly the chat template's rendering, so nothing was
re-tokenised; the completion fits its budget). Scripted policies make the model turns known in
advance; a tiny random Llama makes them sampled.
"""
import dataclasses
import math
import random

import pytest
import torch

import config
import env
import rewards
import search
from config import GREEDY, EnvConfig, Sampling
from env import rollout
from helpers import Recorder, check_trajectory, enc, make_bigram, prompt_messages, tiny_llama
from policy import HFPolicy, ScriptedPolicy

# ----------------------------------------------------------------------------- fixtures
# tok (real SmolLM2 tokenizer), tiny_model (random 2-layer Llama), passages, searcher (a FakeSearcher
# over those passages, recording its queries) and fake_searcher (the class) come from conftest.py;
# the shared checks and models from helpers.py.

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two torch threads
    fighting other processes made generation ~9x slower. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tool(query):
    return '{"name": "wiki_search", "args": {"query": "%s"}}' % query


def call(query, reasoning="Let me search."):
    return f"<reasoning>{reasoning}</reasoning>\n<tool>{tool(query)}</tool>"


def answer(text):
    return f"<reasoning>Found it.</reasoning>\n<answer>{text}</answer>"


# ----------------------------------------------------------------------------- prompt and protocol
def test_prompt_is_the_chat_template_with_few_shot(tok, passages, fake_searcher):
    for few_shot in (True, False):
        cfg = EnvConfig(few_shot=few_shot)
        ids = env.build_prompt(tok, "Who painted the Mona Lisa?", cfg)
        msgs = prompt_messages("Who painted the Mona Lisa?", cfg)
        assert env._decode(tok, ids) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert env._decode(tok, ids).endswith("<|im_start|>assistant\n")
        assert ("Dracula" in env._decode(tok, ids)) == few_shot
    # The system prompt carries the seed's instructions: one tool with its description and argument, the
    # five steps with their tags, one call only; and, like the seed's, no worked JSON example.
    for needle in ("wiki_search: Searches Wikipedia", "query", '"name"', '"args"', "<reasoning>", "<tool>", "<result>",
                   "<answer>", "exactly once", "Never call it again", "answer from what you know", "5. "):
        assert needle in env.SYSTEM_PROMPT
    assert "{" not in env.SYSTEM_PROMPT and "6. " not in env.SYSTEM_PROMPT
    assert env.user_turn("Who?") == "Question: Who?\n"
    # The worked example follows the protocol it teaches: the env's own result layout, full format score.
    assert env.FEW_SHOT[2]["content"] == "<result>\n" + env.call_tool(tool("Dracula novel author"), fake_searcher(
        passages[:1]), EnvConfig(), tok) + "\n</result>"
    assert rewards.format_reward(env.FEW_SHOT[1:]) == pytest.approx(0.2)


def test_scripted_episode_gives_exactly_the_expected_ids(tok, searcher, passages):
    """Two tool calls and an answer: the ids are the scripted tokens plus the environment's text,
    each tokenised on its own, with the template's role markers; turn_idx as specified."""
    turns = [call("Dracula author"), call("Bram Stoker novelist", "Check his name."), answer("Bram Stoker")]
    cfg = EnvConfig(passages=1, max_tool_calls=2)
    (t,) = rollout(ScriptedPolicy(tok, [turns]), tok, ["Who wrote Dracula?"], 1, searcher, cfg)
    r1 = "Dracula\n" + passages[0]["text"]
    r2 = "Bram Stoker\n" + passages[3]["text"]
    reply = "<|im_end|>\n<|im_start|>user\n<result>\n{}\n</result><|im_end|>\n<|im_start|>assistant\n"
    pieces = [(enc(tok, turns[0]), 1), (enc(tok, reply.format(r1)), 0), (enc(tok, turns[1]), 2),
              (enc(tok, reply.format(r2)), 0), (enc(tok, turns[2]), 3), (enc(tok, "<|im_end|>\n"), 0)]
    assert t.prompt_ids == enc(tok, tok.apply_chat_template(prompt_messages("Who wrote Dracula?", cfg),
                                                            tokenize=False, add_generation_prompt=True))
    assert t.completion_ids == [i for ids, _ in pieces for i in ids]
    assert t.turn_idx == [k for ids, k in pieces for _ in ids]
    assert t.messages == [{"role": "assistant", "content": turns[0]}, {"role": "user", "content": f"<result>\n{r1}\n</result>"},
                          {"role": "assistant", "content": turns[1]}, {"role": "user", "content": f"<result>\n{r2}\n</result>"},
                          {"role": "assistant", "content": turns[2]}]
    assert t.tool_calls == [tool("Dracula author"), tool("Bram Stoker novelist"), None]
    assert t.results == [r1, r2] and t.has_result and not t.truncated
    assert searcher.queries == ["Dracula author", "Bram Stoker novelist"]
    check_trajectory(t, tok, "Who wrote Dracula?", cfg)
    scores = rewards.compute([t.messages], [["Bram Stoker"]])
    assert scores["exact_match"] == [1.0] and scores["search_answer"] == [0.5] and scores["tool_execution"] == [0.2]


def test_model_eos_is_a_model_token_and_env_adds_only_the_rest(tok, searcher):
    """A turn that ends on <|im_end|> (SmolLM2's EOS) keeps that id as turn k; the env continues with "\\n"."""
    turns = ["I am not sure.<|im_end|>", answer("Paris") + "<|im_end|>"]
    (t,) = rollout(ScriptedPolicy(tok, [turns]), tok, ["Capital of France?"], 1, searcher, EnvConfig())
    first = enc(tok, "I am not sure.<|im_end|>")
    assert first[-1] == tok.eos_token_id == 2
    assert t.completion_ids[:len(first)] == first and t.turn_idx[:len(first)] == [1] * len(first)
    assert t.completion_ids[len(first)] == enc(tok, "\n")[0] and t.turn_idx[len(first)] == 0
    assert t.messages[0]["content"] == "I am not sure."
    # The answer turn stopped on "</answer>", so the closing "<|im_end|>\n" is the environment's ...
    assert t.completion_ids[-2:] == [tok.eos_token_id, enc(tok, "\n")[0]] and t.turn_idx[-2:] == [0, 0]
    check_trajectory(t, tok, "Capital of France?", EnvConfig())


# ----------------------------------------------------------------------------- end conditions
def test_stop_strings_cut_the_turn(tok, searcher):
    """A turn ends right after the token that completes </tool> or </answer>, even when that token
    overhangs (">." is one token); the rest of the scripted text is never seen. The message's text ends at the
    stop string, as the seed's does (its format reward reads it ending with the closing tag); the ids keep the
    overhanging token, which the model did write."""
    turns = [call("Paris") + "\n<answer>Paris</answer> trailing", answer("Paris") + "." + "junk " * 50]
    (t,) = rollout(ScriptedPolicy(tok, [turns]), tok, ["Capital of France?"], 1, searcher, EnvConfig())
    assert t.messages[0]["content"] == call("Paris")
    assert enc(tok, ">.") == [19369]  # the overhanging token
    assert t.messages[2]["content"] == answer("Paris")
    answer_ids = [i for i, k in zip(t.completion_ids, t.turn_idx) if k == 2]
    assert env._decode(tok, answer_ids) == answer("Paris") + "." and answer_ids[-1] == 19369
    assert rewards.format_reward(t.messages) == rewards.format_reward(
        [m if m["role"] == "user" else {**m, "content": env.message_text(m["content"] + ".")} for m in t.messages])
    ids = env.cut_turn(enc(tok, "<answer>x</answer>. more"), tok, env.STOP, 100)
    assert env._decode(tok, ids) == "<answer>x</answer>."
    assert env.cut_turn(enc(tok, "a b c d e f"), tok, env.STOP, 3) == enc(tok, "a b c d e f")[:3]
    assert env.cut_turn(enc(tok, "a<|im_end|>b</tool>"), tok, env.STOP, 100) == enc(tok, "a<|im_end|>")
    assert env.cut_turn([], tok, env.STOP, 10) == []
    check_trajectory(t, tok, "Capital of France?", EnvConfig())


def test_max_turn_tokens_cuts_a_turn_and_the_episode_goes_on(tok, searcher):
    cfg = EnvConfig(max_turn_tokens=8)
    (t,) = rollout(ScriptedPolicy(tok, [["one two three four five six seven eight nine", "<answer>x</answer>"]]),
                   tok, ["Q?"], 1, searcher, cfg)
    assert t.turn_idx[:8] == [1] * 8 and t.turn_idx[8] == 0
    assert t.messages[0]["content"] == "one two three four five six seven eight"
    assert t.messages[1]["content"] == env.NO_TOOL_REPLY and t.messages[2]["content"] == "<answer>x</answer>"
    # no <result> came between the two messages, so the answer is still turn 1 (the seed's split)
    assert set(t.turn_idx) == {0, 1}
    assert not t.truncated
    check_trajectory(t, tok, "Q?", cfg)


def test_the_seeds_protocol_one_search_then_the_answer(tok, searcher):
    """The seed's ToolEnv(max_steps=2), the default: the first call runs and its result comes back, the
    answer ends the episode; MT-GRPO's turn 1 is what comes before the result, turn 2 what comes after."""
    (t,) = rollout(ScriptedPolicy(tok, [[call("Paris"), answer("Paris")]]), tok, ["Capital of France?"], 1, searcher,
                   EnvConfig())
    assert [m["role"] for m in t.messages] == ["assistant", "user", "assistant"] and len(t.results) == 1
    assert set(t.turn_idx) == {0, 1, 2} and searcher.queries == ["Paris"] and not t.truncated
    check_trajectory(t, tok, "Capital of France?", EnvConfig())


def test_a_second_call_ends_the_episode_unexecuted(tok, searcher):
    """The seed counts the calls *before* it replies (is_completed runs before env_response): the call that
    would be the second search ends the episode, never run, and the rollout never reaches its answer."""
    script = [call("Paris"), call("France"), answer("Paris")]
    (t,) = rollout(ScriptedPolicy(tok, [script]), tok, ["Capital of France?"], 1, searcher, EnvConfig())
    assert [m["content"] for m in t.messages[::2]] == script[:2] and len(t.messages) == 3
    assert searcher.queries == ["Paris"] and len(t.results) == 1 and not t.truncated
    assert max(t.turn_idx) == 2  # never more turns than one search allows
    assert rewards.tool_execution(t.messages) == pytest.approx(0.2)  # the unexecuted call has no reply: not a call
    check_trajectory(t, tok, "Capital of France?", EnvConfig())
    # max_tool_calls N runs N searches; the next call ends the episode (N = 1 is the seed's max_steps 2)
    for n in (0, 2, 3):
        searcher.queries.clear()
        cfg = EnvConfig(max_tool_calls=n)
        (t,) = rollout(ScriptedPolicy(tok, [[call(f"q{i}") for i in range(5)] + [answer("x")]]), tok, ["Q?"], 1,
                       searcher, cfg)
        assert searcher.queries == [f"q{i}" for i in range(n)] and len(t.messages) == 2 * n + 1
        assert max(t.turn_idx) == n + 1 and t.tool_calls[-1] == tool(f"q{n}")
        check_trajectory(t, tok, "Q?", cfg)
    # An answer ends the episode at once, calls left or not.
    (t,) = rollout(ScriptedPolicy(tok, [[answer("Paris"), call("x")]]), tok, ["Q?"], 1, searcher, EnvConfig())
    assert len(t.messages) == 1


def test_a_message_with_neither_gets_the_error_reply_and_the_episode_goes_on(tok, searcher):
    """Before and after the search, a message with neither a call nor an answer gets the format reminder
    (no <result>), and the episode continues until an answer, a second call or the budget."""
    script = ["<reasoning>Let me think.</reasoning>", call("Paris"), "<reasoning>The result says Paris.</reasoning>",
              "still thinking", answer("Paris")]
    (t,) = rollout(ScriptedPolicy(tok, [script]), tok, ["Capital of France?"], 1, searcher, EnvConfig())
    assert [m["content"] for m in t.messages[::2]] == script
    replies = [m["content"] for m in t.messages[1::2]]
    assert replies[0] == replies[2] == replies[3] == env.NO_TOOL_REPLY and replies[1].startswith("<result>\nParis")
    # turn 1: the two messages before the result; turn 2: the three after it
    runs = [k for i, k in enumerate(t.turn_idx) if k and (i == 0 or t.turn_idx[i - 1] != k)]
    assert runs == [1, 1, 2, 2, 2] and rewards.exact_match(t.messages, ["Paris"]) == 1.0
    check_trajectory(t, tok, "Capital of France?", EnvConfig())


def test_the_1024_token_cut(tok, searcher):
    """The paper preset's sizes under the "cut" budget (the CPU default's): 1,024 new tokens a message and 1,024 for
    the whole completion, model and environment tokens together. Messages that never answer run on, reminder after
    reminder, until the budget ends the episode: never a token past it, closed by the template."""
    cfg = dataclasses.replace(config.episode(config.Config(**config.PRESETS["paper"])), budget="cut")
    assert (cfg.max_turn_tokens, cfg.max_completion_tokens, cfg.max_tool_calls) == (1024, 1024, 1)
    (t,) = rollout(ScriptedPolicy(tok, [["word " * 150] * 20]), tok, ["Q?"], 1, searcher, cfg)
    assert t.truncated and 1024 - 160 < len(t.completion_ids) <= 1024
    assert len([m for m in t.messages if m["role"] == "assistant"]) >= 6
    assert env._decode(tok, t.completion_ids).endswith("<|im_end|>\n")
    check_trajectory(t, tok, "Q?", cfg)
    # one message may take the whole budget
    (t,) = rollout(ScriptedPolicy(tok, [["word " * 2000]]), tok, ["Q?"], 1, searcher, cfg)
    assert t.truncated and len(t.messages) == 1 and len(t.completion_ids) == 1024
    check_trajectory(t, tok, "Q?", cfg)


def test_turn_with_neither_tool_nor_answer_follows_the_seed(tok, searcher):
    """Seed (ToolEnv.env_response): a plain 'Error: ...' user message, no <result> wrapper, the
    episode goes on and the turn is not a tool call (max_steps counts parsed tool calls only)."""
    cfg = EnvConfig(max_tool_calls=1)
    script = ["<reasoning>Hmm.</reasoning>", "<tool>unclosed", call("Paris"), answer("Paris")]
    (t,) = rollout(ScriptedPolicy(tok, [script]), tok, ["Capital of France?"], 1, searcher, cfg)
    assert [m["content"] for m in t.messages[1:4:2]] == [env.NO_TOOL_REPLY] * 2
    assert env.NO_TOOL_REPLY.startswith("Error:") and not t.messages[1]["content"].startswith("<result>")
    assert t.messages[5]["content"].startswith("<result>\nParis") and t.messages[6]["content"] == answer("Paris")
    assert t.tool_calls == [None, None, tool("Paris"), None] and t.has_result
    assert rewards.tool_execution(t.messages) == pytest.approx(0.2)  # the format errors are not tool calls
    check_trajectory(t, tok, "Capital of France?", cfg)
    (t2,) = rollout(ScriptedPolicy(tok, [["no tags", answer("x")]]), tok, ["Q?"], 1, searcher, cfg)
    assert not t2.has_result  # MT-GRPO's fallback case: no <result> ever came back


def test_truncation_keeps_the_budget_and_the_invariants(tok, searcher):
    long_turn = "word " * 300
    for budget in (4, 5, 17, 40, 41, 64, 100, 300):
        cfg = EnvConfig(max_completion_tokens=budget, max_turn_tokens=64)
        (t,) = rollout(ScriptedPolicy(tok, [[long_turn] * 10]), tok, ["Q?"], 1, searcher, cfg)
        assert t.truncated and len(t.completion_ids) <= budget
        assert env._decode(tok, t.completion_ids).endswith("<|im_end|>\n")  # closed even when truncated
        check_trajectory(t, tok, "Q?", cfg)
    # The tool reply does not fit: the episode stops after the call, without the reply.
    turn = call("Paris")
    cfg = EnvConfig(max_completion_tokens=len(enc(tok, turn)) + 10)
    (t,) = rollout(ScriptedPolicy(tok, [[turn, answer("Paris")]]), tok, ["Q?"], 1, searcher, cfg)
    assert t.truncated and len(t.messages) == 1 and t.results == [] and not t.has_result
    check_trajectory(t, tok, "Q?", cfg)
    # An answer that just fits (with the final "<|im_end|>\n") is not truncated.
    turn = answer("Paris")
    cfg = EnvConfig(max_completion_tokens=len(enc(tok, turn)) + 2)
    (t,) = rollout(ScriptedPolicy(tok, [[turn]]), tok, ["Q?"], 1, searcher, cfg)
    assert not t.truncated and t.messages[0]["content"] == turn and len(t.completion_ids) == cfg.max_completion_tokens
    with pytest.raises(ValueError):
        rollout(ScriptedPolicy(tok, [[turn]]), tok, ["Q?"], 1, searcher, EnvConfig(max_completion_tokens=3))


# ----------------------------------------------------------------------------- the tool
@pytest.mark.parametrize("tool_text, expected", [
    ("{not json", "Error: the tool command is not valid JSON"),
    ('["wiki_search"]', "Error: the tool command must be a JSON object"),
    ('{"args": {"query": "Paris"}}', "Error: the tool command must give"),
    ('{"name": "google", "args": {"query": "Paris"}}', "Error: unknown tool 'google'"),
    ('{"name": "wiki_search"}', "Error: wiki_search needs"),
    ('{"name": "wiki_search", "args": "Paris"}', "Error: wiki_search needs"),
    ('{"name": "wiki_search", "args": {"q": "Paris"}}', "Error: wiki_search needs"),
    # the seed's: a query that is not text reaches its search, whose failure reply its reward counts as a call
    # that ran (it does not start with "Error:"); an empty one is searched and finds nothing
    ('{"name": "wiki_search", "args": {"query": 42}}', "Error during search: the query is not text."),
    ('{"name": "wiki_search", "args": {"query": "  "}}', "No relevant passage found."),
    ('{"name": "wiki_search", "args": {"query": "Paris", "k": 5}}', "Error: wiki_search takes only"),
    ("[" * 100_000, "Error: the tool command is not valid JSON"),
    ('{"name": "wiki_search", "args": {"query": "zzz qqq"}}', "No relevant passage found."),
    (None, "Error: no tool command"),
])
def test_call_tool_failures_are_error_texts(tok, searcher, tool_text, expected):
    assert env.call_tool(tool_text, searcher, EnvConfig(), tok).startswith(expected)


def test_tool_failures_keep_the_episode_going(tok, searcher):
    bad = ["<tool>{oops</tool>", '<tool>{"name": "google", "args": {"query": "x"}}</tool>',
           '<tool>{"name": "wiki_search"}</tool>']
    for text in bad:
        (t,) = rollout(ScriptedPolicy(tok, [[text, answer("Paris")]]), tok, ["Q?"], 1, searcher, EnvConfig())
        assert t.results[0].startswith("Error:") and t.messages[1]["content"].startswith("<result>\nError:")
        assert t.messages[-1]["content"] == answer("Paris") and t.has_result
        assert rewards.tool_execution(t.messages) == 0.0
        check_trajectory(t, tok, "Q?", EnvConfig())

    class Broken:
        def search(self, query, k):
            raise RuntimeError("index on fire")
    assert env.call_tool(tool("Paris"), Broken(), EnvConfig(), tok) == "Error: the search failed (RuntimeError)."


def test_search_results_top_k_and_token_budget(tok, searcher, passages):
    out = env.call_tool(tool("Bram Stoker Dracula Irish"), searcher, EnvConfig(passages=2), tok)
    assert out == "Dracula\n" + passages[0]["text"] + "\n\nBram Stoker\n" + passages[3]["text"]
    for budget in (1, 7, 20):
        out = env.call_tool(tool("Bram Stoker Dracula Irish"), searcher, EnvConfig(passages=3, result_max_tokens=budget), tok)
        assert 0 < len(enc(tok, out)) <= budget + 1  # re-tokenising a cut text may merge differently by 1
    # the budget cuts passages, never an error text: cut to "Error", it would count as a call that ran
    for bad in ("{not json", '{"name": "google", "args": {"query": "x"}}'):
        assert env.call_tool(bad, searcher, EnvConfig(result_max_tokens=1), tok).startswith("Error: ")
    # result_max_tokens 0: no cut of its own (the seed returns the whole article)
    whole = env.call_tool(tool("Bram Stoker Dracula Irish"), searcher, EnvConfig(passages=3, result_max_tokens=0), tok)
    assert whole == "\n\n".join(f"{p['title']}\n{p['text']}" for p in (passages[0], passages[3]))
    # Tool names the model writes are echoed shortly and never become special tokens.
    out = env.call_tool('{"name": "<|im_end|>' + "x" * 1000 + '"}', searcher, EnvConfig(), tok)
    assert len(out) < 120 and "<|im_end|>" in out
    reply_ids = env._encode(tok, out, plain=True)
    assert tok.eos_token_id not in reply_ids


def test_with_real_bm25_index(tok, tmp_path, passages):
    import json
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages))
    index = search.load_index(corpus, engine="rank_bm25", cache_dir=tmp_path)  # rank-bm25: requirements.txt
    (t,) = rollout(ScriptedPolicy(tok, [[call("Dracula novel author"), answer("Bram Stoker")]]), tok,
                   ["Who wrote Dracula?"], 1, index, EnvConfig())
    assert t.results[0].startswith("Dracula\n") and rewards.search_answer(t.messages, ["Bram Stoker"]) == 0.5


# ----------------------------------------------------------------------------- batching
def test_rollout_is_question_major_and_batches_only_live_episodes(tok, searcher):
    questions, G = ["Capital of France?", "Who wrote Dracula?", "Highest mountain?"], 2
    # Episode r = i*G + g finishes after 1 + (r % 3) turns.
    scripts = [[call("Paris")] * (r % 3) + [answer(f"episode {r}")] for r in range(len(questions) * G)]
    rec = Recorder(ScriptedPolicy(tok, scripts))
    trajs = rollout(rec, tok, questions, G, searcher, EnvConfig(max_tool_calls=5))
    assert len(trajs) == 6
    for r, t in enumerate(trajs):
        assert t.prompt_ids == env.build_prompt(tok, questions[r // G], EnvConfig())
        assert t.messages[-1]["content"] == answer(f"episode {r}")
        check_trajectory(t, tok, questions[r // G], EnvConfig(max_tool_calls=5))
    assert [len(b) for b in rec.batches] == [6, 4, 2]  # finished episodes are not sent again
    live_last = [r for r in range(6) if r % 3 == 2]
    assert rec.batches[2] == [trajs[r].prompt_ids + trajs[r].completion_ids[:-len(enc(tok, answer(f"episode {r}") + "<|im_end|>\n"))]
                              for r in live_last]


# ----------------------------------------------------------------------------- sampled (tiny model)
def test_sampled_rollouts_keep_the_invariants(tok, tiny_model, searcher):
    questions = ["Who wrote Dracula?", "What is the capital of France?"]
    for cfg in (EnvConfig(max_turn_tokens=16, max_completion_tokens=120),
                EnvConfig(max_turn_tokens=4, max_completion_tokens=60, few_shot=False, temperature=0.0)):
        rec = Recorder(HFPolicy(tiny_model, tok, seed=1))
        trajs = rollout(rec, tok, questions, 3, searcher, cfg)
        assert len(trajs) == 6
        for i, t in enumerate(trajs):
            check_trajectory(t, tok, questions[i // 3], cfg)
        assert rec.batches[0] == [t.prompt_ids for t in trajs]
        assert all(len(b) <= 6 for b in rec.batches)
    # Same seed, same rollouts; another seed, other rollouts.
    cfg = EnvConfig(max_turn_tokens=8, max_completion_tokens=50)
    a = rollout(HFPolicy(tiny_model, tok, seed=7), tok, questions, 2, searcher, cfg)
    b = rollout(HFPolicy(tiny_model, tok, seed=7), tok, questions, 2, searcher, cfg)
    c = rollout(HFPolicy(tiny_model, tok, seed=8), tok, questions, 2, searcher, cfg)
    assert [t.completion_ids for t in a] == [t.completion_ids for t in b] != [t.completion_ids for t in c]


def bigram_model(tok, chain):
    """A Llama that deterministically writes chain[token] after token (see helpers.make_bigram)."""
    return make_bigram(tiny_llama(tok, layers=1, intermediate_size=64), chain)


def test_hf_policy_cuts_rows_at_stop_strings_eos_and_length(tok):
    nl, a, b, c = enc(tok, "\n")[0], enc(tok, "a")[0], enc(tok, "b")[0], enc(tok, "c")[0]
    slash, word, gt = enc(tok, "</tool>.")  # "</", "tool", ">."
    chain = {nl: slash, slash: word, word: gt, gt: a, a: b, b: tok.eos_token_id, c: c}
    policy = HFPolicy(bigram_model(tok, chain), tok, seed=0)
    batch = [[5, 6, 7, nl], [a], [9, c]]  # different lengths: left padding
    for sampling in (Sampling(), GREEDY):
        out = policy.generate(batch, 6, sampling, env.STOP)
        assert out == [[slash, word, gt], [b, tok.eos_token_id], [c] * 6]
    assert len(policy.stopping) == 1  # the stop-string criteria were built once, reused by both calls
    # Without stop strings the first row runs on until EOS; never a pad token after it.
    assert policy.generate(batch[:1], 10, Sampling(), []) == [[slash, word, gt, a, b, tok.eos_token_id]]


def test_hf_policy_left_padding_matches_unpadded_generation(tok, tiny_model):
    policy = HFPolicy(tiny_model, tok)
    short, long = enc(tok, "Hello there"), enc(tok, "A much longer prompt than the other one, by far.")
    together = policy.generate([short, long], 12, GREEDY, env.STOP)
    assert together == [policy.generate([short], 12, GREEDY, env.STOP)[0],
                        policy.generate([long], 12, GREEDY, env.STOP)[0]]


# ----------------------------------------------------------------------------- fuzz
PIECES = ["<reasoning>", "</reasoning>", "<tool>", "</tool>", "<answer>", "</answer>", "<result>", "</result>",
          "<tool><tool>", "<answer><answer>Paris</answer>", "<reasoning><tool>", "</answer></tool>",
          "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|im_start|>user\n", "Paris", "Bram Stoker", "Error:",
          tool("Paris"), tool("Dracula"), '{"name": "wiki_search", "args": {"query": ', '{"name": "x"}', "{",
          '"}}', "[[[[[[[[", "\n", " ", "  \n\n", "\t", "\r\n", "\x00", "\u200b", "\u202e", "é", "e\u0301",
          "😀", "👩‍👩‍👧", "日本語", "\ufffd", "\\", "'", '"', "null", "</", "<", ">"]


def random_text(rng):
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.6:
            parts.append(rng.choice(PIECES))
        elif kind < 0.8:  # random code points, surrogates excluded
            parts.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0xD7FF),
                                                 rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 20))))
        elif kind < 0.9:  # a tool call with a huge argument
            parts.append("<tool>" + tool(rng.choice(["a ", "Paris ", "é", "["]) * rng.randint(100, 3000)) + "</tool>")
        else:  # the model writes its own result block
            parts.append("<result>\nParis Bram Stoker\n</result>")
    return "".join(parts)


def random_turn(rng):
    """A model turn: pure junk, or junk shaped like the protocol (so tools and answers do happen)."""
    kind = rng.random()
    if kind < 0.35:
        return random_text(rng)
    if kind < 0.75:
        command = rng.choice([tool(rng.choice(["Paris", "Dracula", "Everest", "Bram Stoker novelist"])),
                              tool(rng.choice(["a ", "Paris ", "日本", "\\u00e9"]) * rng.randint(1, 150)),
                              '{"name": "wiki_search", "args": {"query": "Paris"', '{"name": "google"}',
                              '{"name": "wiki_search", "args": {"q": "x"}}', "[" * rng.randint(1, 200), random_text(rng)])
        return f"<reasoning>{rng.choice(['Search.', random_text(rng)])}</reasoning>\n<tool>{command}</tool>{random_text(rng)}"
    if kind < 0.9:
        return f"<reasoning>{rng.choice(['So.', random_text(rng)])}</reasoning>\n<answer>{rng.choice(['Paris', ' paris ', random_text(rng)])}</answer>"
    return "<result>\nParis\n</result>\n<answer>Paris</answer>"


def test_fuzz_rollouts_never_raise_and_rewards_stay_in_range(tok, searcher):
    rng, n = random.Random(1234), 0
    aliases = ["Paris", "Bram Stoker"]
    while n < 1000:
        cfg = EnvConfig(max_tool_calls=rng.randint(0, 3), max_turn_tokens=rng.choice([1, 8, 64, 256, 256, 256]),
                        max_completion_tokens=rng.choice([8, 60, 300, 1024, 1024]), passages=rng.randint(1, 3),
                        result_max_tokens=rng.choice([1, 20, 200]), few_shot=rng.random() < 0.5)
        # Questions are data, not model output: ASCII pieces only (this vocabulary cannot encode
        # code points past U+3FFFF, so such a prompt would not decode back to its text).
        questions, G = ["".join(rng.choices(PIECES[:30], k=rng.randint(1, 8))) for _ in range(5)], 5
        scripts = [[random_turn(rng) for _ in range(rng.randint(0, 5))] + [answer("Paris")] * rng.randint(0, 1)
                   for _ in range(len(questions) * G)]
        trajs = rollout(ScriptedPolicy(tok, scripts), tok, questions, G, searcher, cfg)
        scores = rewards.compute([t.messages for t in trajs], [aliases] * len(trajs))
        for name, values in scores.items():
            assert all(math.isfinite(v) and -1e-9 <= v <= rewards.REWARD_MAX[name] + 1e-9 for v in values), name
        for i, t in enumerate(trajs):
            check_trajectory(t, tok, questions[i // G], cfg)
        for script in scripts:  # the tool itself, without the token limits of a turn
            for text in script:
                out = env.call_tool(rewards.parse(text)["tool"], searcher, cfg, tok)
                assert isinstance(out, str) and out
        n += len(trajs)


def test_the_seeds_budget_appends_the_reply_whole_and_rewards_the_answer_past_the_cut(tok, fake_searcher):
    """The seed's budget (--budget seed, the paper preset's; verifiers/envs/multiturn_env.py, step): the search
    result is appended whatever its length, still earns tool_execution and search_answer, the answer is still
    generated and rewarded, and only the ids the loss trains on are cut at the budget. The "cut" budget drops the
    reply that does not fit: no result, no answer."""
    long = [{"id": "p", "title": "Paris", "text": "Paris is the capital of France. " + "It has many bridges. " * 60}]
    script = [[call("Paris capital"), answer("Paris")]]
    seed_cfg = EnvConfig(max_turn_tokens=64, max_completion_tokens=120, result_max_tokens=0, budget="seed")
    (t,) = rollout(ScriptedPolicy(tok, script), tok, ["Capital of France?"], 1, fake_searcher(long), seed_cfg)
    assert [m["role"] for m in t.messages] == ["assistant", "user", "assistant"] and t.has_result
    assert t.messages[-1]["content"] == answer("Paris") and t.truncated
    assert len(t.completion_ids) == len(t.turn_idx) == len(t.sampler_logprobs) == 120  # trained on: the first 120
    assert 2 not in t.turn_idx  # the answer's ids lie past the cut ...
    scores = rewards.compute([t.messages], [["Paris"]])
    assert (scores["tool_execution"], scores["search_answer"], scores["exact_match"]) == ([0.2], [0.5], [1.0])  # ... rewarded
    full = env._decode(tok, t.prompt_ids + t.completion_ids)
    assert full.endswith(env._decode(tok, t.completion_ids)) and "It has many bridges." in full
    cut_cfg = dataclasses.replace(seed_cfg, budget="cut")
    (c,) = rollout(ScriptedPolicy(tok, script), tok, ["Capital of France?"], 1, fake_searcher(long), cut_cfg)
    assert len(c.messages) == 1 and not c.has_result and c.truncated
    assert rewards.compute([c.messages], [["Paris"]])["exact_match"] == [0.0]


def test_the_seeds_reward_counts_its_own_search_failure_as_a_call_that_ran(tok, searcher):
    """A query that is not text: the seed's search fails inside pyserini and replies "Error during search: ...",
    which its tool_execution (like ours: the reply must not start with "Error:") counts as executed. So do we,
    with the seed's text; search_answer finds no alias in it."""
    (t,) = rollout(ScriptedPolicy(tok, [['<tool>{"name": "wiki_search", "args": {"query": 42}}</tool>',
                                        answer("Paris")]]), tok, ["Q?"], 1, searcher, EnvConfig())
    assert t.results == ["Error during search: the query is not text."]
    scores = rewards.compute([t.messages], [["Paris"]])
    assert (scores["tool_execution"], scores["search_answer"]) == ([0.2], [0.0])
