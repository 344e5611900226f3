"""Tests for rewards.py, written to be read: each trajectory has its rewards computed by hand.

Reminder of the scale (see rewards.py):
  turn level:    tool_execution 0..0.2, search_answer 0..0.5          -> R^T <= 0.7
  outcome level: answer_presence 0..0.5, exact_match 0..1.0,
                 format 0..0.2, xml 0..0.2                            -> R^O <= 1.9
format counts, per model message, points of 0.2 (5 points = 1.0; the reward is 0.2 x the mean):
  fields-present points (0, 1 or 2; only if some field parsed completely) + 1 (always, a seed
  quirk) + 1 if the message starts with <reasoning> + 1 if it ends with </tool> or </answer>.
xml, per model message: each tag used gives (1 - |#open - 1|) + (1 - |#close - 1|) over 2 checks.
"""
import math
import random

import pytest

import rewards

ALIASES = ["Bram Stoker", "Abraham Stoker"]
SEARCH = '{"name": "wiki_search", "args": {"query": "Dracula author"}}'


def model(text):
    return {"role": "assistant", "content": text}


def env(text):
    """The environment's reply to a tool call, as the seed formats it."""
    return {"role": "user", "content": f"<result>\n{text}\n</result>"}


def call(tool_json=SEARCH, reasoning="I should look it up."):
    return model(f"<reasoning>\n{reasoning}\n</reasoning>\n<tool>\n{tool_json}\n</tool>")


def answer(text, reasoning="The result says so."):
    return model(f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{text}\n</answer>")


def score(conversation, aliases=ALIASES):
    """All six rewards of one conversation, as a plain dict."""
    return {k: v[0] for k, v in rewards.compute([conversation], [aliases]).items()}


def assert_scores(got, **expected):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), (key, got[key], value)


# ----------------------------------------------------------------------------- parse
def test_parse_well_formed_and_missing():
    msg = "<reasoning>\n think \n</reasoning>\n<tool>\n{\"name\": \"x\"}\n</tool>"
    assert rewards.parse(msg) == {"reasoning": "think", "tool": '{"name": "x"}', "answer": None}
    assert rewards.parse("no tags") == {"reasoning": None, "tool": None, "answer": None}


def test_parse_edge_cases():
    assert rewards.parse("<answer>a</answer><answer>b</answer>")["answer"] == "a"  # first wins
    assert rewards.parse("<answer>unclosed")["answer"] is None
    assert rewards.parse("</answer>closed first<answer>")["answer"] is None
    assert rewards.parse("<answer></answer>")["answer"] == ""                       # empty, not None
    # Nested: from the first opening tag to the first closing tag, like the seed's lazy regex.
    assert rewards.parse("<answer><answer>x</answer></answer>")["answer"] == "<answer>x"
    both = rewards.parse("<tool>{}</tool><answer>y</answer>")                        # fields are
    assert both["tool"] == "{}" and both["answer"] == "y"                             # independent
    for junk in (None, 42, b"<answer>x</answer>", ["<answer>x</answer>"]):
        assert rewards.parse(junk) == {"reasoning": None, "tool": None, "answer": None}


def test_parse_handles_unclosed_whitespace():
    # The seed's regex r"<tool>\s*(.*?)\s*</tool>" takes ~13 s on 3,000 spaces after "<tool>"
    # (DEVIATIONS.md, item 7); find_tag answers 200,000. How fast: bench/bench_rewards.py.
    assert rewards.parse("<tool>" + " " * 200_000)["tool"] is None
    assert rewards.parse("<tool>" + " " * 200_000 + "x</tool>")["tool"] == "x"


def test_find_tag_agrees_with_the_seed_regex():
    # The seed parses with re.search(r"<tag>\s*(.*?)\s*</tag>", text, re.DOTALL) and strips.
    # find_tag gives the same answer (on short strings, where that regex is still fast).
    import re
    rng = random.Random(1)
    pieces = ["<answer>", "</answer>", "<answer", "answer>", " ", "\n", "\u3000", "a", "日", "<", "/"]
    for _ in range(3_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        m = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
        assert rewards.find_tag(text, "answer") == (m.group(1).strip() if m else None), text


# ----------------------------------------------------------------------------- trajectories
def test_well_formed():
    conv = [call(), env("Dracula is an 1897 novel by Irish author Bram Stoker."),
            answer("Bram Stoker")]
    got = score(conv)
    # 1 call, its result is no error: 0.2 x 1/1. "bram stoker" is in the result: 0.5.
    # Answer "Bram Stoker": contains an alias (0.5) and equals it (1.0).
    # format: both messages have both field sets (2) + 1 + starts (1) + ends (1) = 5 points = 1.0.
    # xml: both messages use reasoning and tool|answer once each: 4/4 = 1.0.
    assert_scores(got, tool_execution=0.2, search_answer=0.5, answer_presence=0.5,
                  exact_match=1.0, format=0.2, xml=0.2)
    r_t, r_o = rewards.level_sums(rewards.compute([conv], [ALIASES]))
    assert r_t == pytest.approx([rewards.MAX_TURN_REWARD])     # 0.7
    assert r_o == pytest.approx([rewards.MAX_OUTCOME_REWARD])  # 1.9


def test_no_tags_at_all():
    got = score([model("The author is Bram Stoker.")])
    # No tool call, no <answer>: the four content rewards are 0, even though the text is right.
    # format: 0 field points + 1 (always) + 0 + 0 = 1 point = 0.2 -> 0.2 x 0.2 = 0.04.
    # xml: no tag used -> the message scores 0.
    assert_scores(got, tool_execution=0, search_answer=0, answer_presence=0, exact_match=0,
                  format=0.04, xml=0)


def test_missing_answer_tag():
    got = score([model("<reasoning>Easy one.</reasoning> Bram Stoker")])
    # format: field sets present 1 (reasoning) + 1 + starts with <reasoning> 1 + ends 0
    #         = 3 points = 0.6 -> 0.12.   xml: reasoning opened 1, closed 1 -> 2/2 -> 0.2.
    assert_scores(got, answer_presence=0, exact_match=0, format=0.12, xml=0.2)


def test_unclosed_answer_tag():
    got = score([model("<reasoning>Easy one.</reasoning>\n<answer>Bram Stoker")])
    # The answer never closes, so there is no answer: presence and exact match are 0.
    # format: both field sets' tags appear (2) + 1 + starts (1) + ends (0) = 4 points -> 0.16.
    # xml: reasoning (1, 1) -> 1 + 1; answer (1 open, 0 close) -> 1 + 0; 3 / 4 checks -> 0.15.
    assert_scores(got, answer_presence=0, exact_match=0, format=0.16, xml=0.15)


def test_duplicate_tags():
    msg = model("<reasoning>a</reasoning><reasoning>b</reasoning>"
                "<answer>Oscar Wilde</answer><answer>Bram Stoker</answer>")
    got = score([msg])
    # Within one message the FIRST <answer> counts (seed's re.search): "Oscar Wilde" -> 0, 0.
    # format does not see duplicates: 2 + 1 + 1 + 1 = 5 points -> 0.2.
    # xml does: reasoning (2, 2) -> (1-1) + (1-1) = 0; answer (2, 2) -> 0; 0/4 -> 0.
    assert_scores(got, answer_presence=0, exact_match=0, format=0.2, xml=0)


def test_xml_floor_is_on_the_mean():
    clean = answer("x")                                            # xml score 1
    triple = model("<answer>x</answer>" * 3)                       # (1-2) + (1-2) = -2 over 2 = -1
    # Seed surprise: per-message scores may be negative; only the mean is floored at 0.
    assert score([clean, triple])["xml"] == pytest.approx(0.0)             # 0.2 x (1 - 1)/2
    assert score([clean, clean, triple])["xml"] == pytest.approx(0.2 / 3)  # 0.2 x (1+1-1)/3
    assert score([triple])["xml"] == 0.0                                   # max(0, 0.2 x -1)


def test_last_answer_wins_across_messages():
    got = score([answer("Oscar Wilde"), answer("bram stoker")])
    assert_scores(got, answer_presence=0.5, exact_match=1.0)


def test_bad_json_tool_call():
    conv = [call('{"name": "wiki_search", "args": {"query": "Dracula}'),
            env("Error: Invalid JSON format"), answer("Bram Stoker")]
    got = score(conv)
    # 1 call, its result starts with "Error:": 0.2 x 0/1 = 0. The first result is an error: 0.
    # The answer is still right: 0.5 + 1.0; the messages are well formed: 0.2 + 0.2.
    assert_scores(got, tool_execution=0, search_answer=0, answer_presence=0.5, exact_match=1.0,
                  format=0.2, xml=0.2)


def test_error_then_success():
    conv = [call("{bad json"), env("Error: Invalid JSON format"),
            call(), env("Bram Stoker wrote Dracula."), answer("Bram Stoker")]
    got = score(conv)
    # 2 calls, 1 succeeded: 0.2 x 1/2 = 0.1. Only the FIRST result counts for search_answer,
    # and it is the error, so 0 although the second result holds the answer.
    assert_scores(got, tool_execution=0.1, search_answer=0)


def test_unknown_tool_echoing_the_answer():
    # The seed's environment replies "Error: Unknown tool '<name>'", echoing the model's text.
    # The seed would pay search_answer 0.5 here (the alias is in the "result"); we pay 0.
    conv = [call('{"name": "Bram Stoker", "args": {}}'),
            env("Error: Unknown tool 'Bram Stoker'"), answer("Bram Stoker")]
    assert_scores(score(conv), tool_execution=0, search_answer=0, exact_match=1.0)


def test_no_answer():
    conv = [call(), env("Bram Stoker wrote Dracula."), call(), env("Stoker was born in Dublin.")]
    got = score(conv)
    # The episode hit max_steps = 2 without an <answer>: turn rewards are earned (0.2 + 0.5),
    # the outcome rewards on the answer are 0, format and xml are still paid (0.2 + 0.2).
    assert_scores(got, tool_execution=0.2, search_answer=0.5, answer_presence=0, exact_match=0,
                  format=0.2, xml=0.2)
    r_t, r_o = rewards.level_sums(rewards.compute([conv], [ALIASES]))
    assert r_t == pytest.approx([0.7]) and r_o == pytest.approx([0.4])


def test_answer_equal_up_to_case_and_whitespace():
    got = score([model("<answer>\n  bram STOKER \t\n</answer>")], [" Bram Stoker "])
    # lower + strip on both sides: "bram stoker" == "bram stoker" -> 1.0; contained -> 0.5.
    assert_scores(got, answer_presence=0.5, exact_match=1.0)
    assert score([answer("Bram Stoker.")])["exact_match"] == 0.0  # punctuation is not stripped


def test_alias_only_in_search_result():
    conv = [call(), env("Dracula is a novel by Bram Stoker."), answer("Oscar Wilde")]
    got = score(conv)
    # The search found it (turn 1 is rewarded), the final answer is wrong (outcome is not).
    assert_scores(got, tool_execution=0.2, search_answer=0.5, answer_presence=0, exact_match=0,
                  format=0.2, xml=0.2)


# ----------------------------------------------------------------------------- reward hacking
def test_model_written_result_earns_no_search_reward():
    own = "<reasoning>r</reasoning>\n<result>\nBram Stoker\n</result>\n<answer>x</answer>"
    assert score([model(own)])["search_answer"] == 0.0                    # no tool call at all
    call_and_fake = model(f"<tool>{SEARCH}</tool>\n<result>\nBram Stoker\n</result>")
    assert score([call_and_fake])["search_answer"] == 0.0                 # no environment reply
    conv = [call_and_fake, env("Dracula is a novel.")]                    # real reply lacks alias
    assert score(conv)["search_answer"] == 0.0
    # A "user" message not answering a tool call is not a tool result either.
    assert score([answer("x"), env("Bram Stoker")])["search_answer"] == 0.0


def test_many_candidates_no_exact_match_but_presence():
    got = score([answer("Oscar Wilde, Bram Stoker, Mary Shelley")])
    # Exact match is equality, so listing candidates earns nothing there. Presence is a substring
    # test: the paper's definition rewards this hedge with 0.5, and we keep it.
    assert_scores(got, exact_match=0.0, answer_presence=0.5)


def test_blank_and_string_aliases():
    empty = [model("<answer></answer>")]
    assert_scores(score(empty, [""]), answer_presence=0, exact_match=0)   # "" is not an alias
    # A bare string is one alias, not a list of letters ("a" would match most answers).
    assert_scores(score([answer("a cat")], "Bram Stoker"), answer_presence=0, exact_match=0)
    assert score([answer("bram stoker")], "Bram Stoker")["exact_match"] == 1.0


# ----------------------------------------------------------------------------- batch API
def test_batch_api():
    convs = [[call(), env("Bram Stoker"), answer("Bram Stoker")], [], [model("hi")]]
    scores = rewards.compute(convs, [ALIASES, ALIASES, ALIASES])
    assert tuple(scores) == (*rewards.TURN_REWARDS, *rewards.OUTCOME_REWARDS)
    assert set(scores) == set(rewards.REWARD_MAX)
    assert all(len(v) == 3 for v in scores.values())
    assert sum(rewards.REWARD_MAX[k] for k in rewards.TURN_REWARDS) == pytest.approx(0.7)
    assert sum(rewards.REWARD_MAX[k] for k in rewards.OUTCOME_REWARDS) == pytest.approx(1.9)
    r_t, r_o = rewards.level_sums(scores)
    assert r_t == pytest.approx([0.7, 0.0, 0.0])
    assert r_o == pytest.approx([1.9, 0.0, 0.04])           # "hi": format 1 point -> 0.04
    m = rewards.means(scores)
    assert m["exact_match"] == pytest.approx(1 / 3) and m["format"] == pytest.approx(0.08)
    assert rewards.means(rewards.compute([], [])) == {k: 0.0 for k in rewards.REWARD_MAX}
    with pytest.raises(ValueError):
        rewards.compute(convs, [ALIASES])                   # a caller bug, not model output


# ----------------------------------------------------------------------------- fuzz
TAGS = [f"<{t}>" for t in ("reasoning", "tool", "answer", "result")]
TAGS += [f"</{t[1:]}" for t in TAGS] + ["<", ">", "</", "<tool", "answer>", "<<tool>>"]
WORDS = ["Bram Stoker", "bram", "STOKER", "Error:", "Error: Unknown tool 'Bram Stoker'", "\n",
         " ", "\t", SEARCH, '{"name": "wiki_search", "args": {"query": ', "}}", "null",
         "Dracula", "日本語", "é", "\u200b", "\x00", "🧛", "\ufeff", "İ", "ß", "\r\n"]


def random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.10:   # huge tool argument
        return f'<tool>{{"name": "wiki_search", "args": {{"query": "{"x" * 50_000}"}}}}</tool>'
    if kind < 0.13:   # the input that makes the seed's regex backtrack for seconds
        return rng.choice(TAGS) + " " * 5_000
    if kind < 0.35:   # a nearly well-formed message, then mutated
        field = rng.choice(["tool", "answer", "result"])
        body = rng.choice(["Bram Stoker", " bram stoker ", "Oscar Wilde, Bram Stoker", SEARCH, ""])
        text = f"<reasoning>{rng.choice(WORDS)}</reasoning>\n<{field}>{body}</{field}>"
        for _ in range(rng.randrange(3)):
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + rng.choice(TAGS + WORDS + [""]) + text[cut + rng.randrange(3):]
        return text
    if kind < 0.42:   # random code points, surrogates excluded
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                       rng.randrange(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randrange(60)))
    pieces = TAGS * 2 + WORDS
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 25)))


def random_message(rng: random.Random):
    kind = rng.random()
    if kind < 0.03:
        return None                                                    # not even a dict
    if kind < 0.06:
        return {"content": random_text(rng)}                           # no role
    content = rng.choice([None, "", 0, ["<answer>x</answer>"]]) if kind < 0.12 else random_text(rng)
    role = rng.choice(["assistant"] * 5 + ["user"] * 3 + ["system", None])
    if role == "user" and rng.random() < 0.7:
        content = f"<result>\n{content}\n</result>"
    return {"role": role, "content": content}


def random_aliases(rng: random.Random):
    kind = rng.random()
    if kind < 0.05:
        return None
    if kind < 0.10:
        return "Bram Stoker"                                           # bare string
    return rng.sample(["Bram Stoker", "bram", "", " ", "日本語", "x", "Error", "🧛", "a"],
                      rng.randrange(0, 4))


def test_fuzz_never_raises_and_stays_in_range():
    rng = random.Random(0)
    convs = [[random_message(rng) for _ in range(rng.randrange(0, 6))] for _ in range(1_200)]
    aliases = [random_aliases(rng) for _ in convs]
    scores = rewards.compute(convs, aliases)
    for msg in (m for conv in convs for m in conv):
        parsed = rewards.parse(msg.get("content") if isinstance(msg, dict) else msg)
        assert set(parsed) == set(rewards.FIELDS)
        assert all(v is None or isinstance(v, str) for v in parsed.values())
    for key, values in scores.items():
        assert len(values) == len(convs)
        for v in values:
            assert isinstance(v, float) and math.isfinite(v), (key, v)
            assert 0.0 <= v <= rewards.REWARD_MAX[key], (key, v)
    r_t, r_o = rewards.level_sums(scores)
    assert max(r_t) <= rewards.MAX_TURN_REWARD and max(r_o) <= rewards.MAX_OUTCOME_REWARD
    # exact match implies presence (both compare lower-cased, stripped aliases)
    assert all(p == 0.5 for e, p in zip(scores["exact_match"], scores["answer_presence"]) if e)
    # the fuzz must reach the interesting branches, not only return zeros
    for key in rewards.REWARD_MAX:
        assert any(v > 0 for v in scores[key]), key
    assert 0 < sum(v == rewards.REWARD_MAX["xml"] for v in scores["xml"]) < len(convs)


# ----------------------------------------------------------------------------- K turns
def _episode(*results, answer="Lyon"):
    """An episode with one tool call per result, then an answer."""
    conv = []
    for r in results:
        conv += [{"role": "assistant", "content": '<reasoning>x</reasoning><tool>{"name": "wiki_search", "args": {"query": "q"}}</tool>'},
                 {"role": "user", "content": f"<result>\n{r}\n</result>"}]
    return conv + [{"role": "assistant", "content": f"<reasoning>x</reasoning><answer>{answer}</answer>"}]


TOWN = [["Gortete", "the town of Gortete"]]
RIVER = ["Quinsil", "river Quinsil"]


def test_call_rewards_pay_each_call_for_new_evidence():
    conv = _episode("Xa Yb is a poet from the town of Gortete.", "Gortete lies on the river Quinsil.")
    assert rewards.call_rewards(conv, RIVER, TOWN) == [pytest.approx(0.7), pytest.approx(0.7)]


def test_call_rewards_repeating_a_search_earns_the_evidence_once():
    conv = _episode("... the town of Gortete.", "... the town of Gortete.")
    assert rewards.call_rewards(conv, RIVER, TOWN) == [pytest.approx(0.7), pytest.approx(0.2)]


def test_call_rewards_error_and_missing_calls():
    conv = _episode("Error: the tool command is not valid JSON.", "Gortete lies on the river Quinsil.")
    assert rewards.call_rewards(conv, RIVER, TOWN) == [0.0, pytest.approx(0.7)]  # the river: new evidence
    assert rewards.call_rewards(_episode(), RIVER, TOWN, max_calls=2) == [0.0, 0.0]


@pytest.mark.parametrize("results", [(), ("Paris is the capital.",), ("Nothing here.",), ("Error: bad",)])
def test_one_call_without_support_is_the_two_turn_turn_reward(results):
    conv = _episode(*results)
    two_turn = rewards.tool_execution(conv) + rewards.search_answer(conv, ["Paris"])
    assert sum(rewards.call_rewards(conv, ["Paris"])) == pytest.approx(two_turn)


def test_k_turn_levels_count_turns_from_results():
    convs = [_episode(answer="x"), _episode("a"), _episode("a", "b")]
    R_T, turns = rewards.k_turn_levels(convs, [RIVER] * 3, [TOWN] * 3, max_calls=2)
    assert turns == [1, 2, 3] and all(len(r) == 2 for r in R_T)
