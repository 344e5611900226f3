"""estimators.py and turn_rewards.py as worked examples: the group of tests/test_mt_grpo.py, by hand.

    rollout  story                                          R_T   R_O   its search returned
    1        search found the answer, answered correctly    0.7   1.9   passage A
    2        search found the answer, answered wrongly      0.7   0.4   passage A
    3        search missed, but the answer was right anyway 0.2   1.9   passage B
    4        tool call failed (Error: ...), wrong answer    0.0   0.2   an error text

GiGPO (omega 1, gamma 0.95). A^E = norm(R_T + R_O) = A_MR = 1.0301, -0.3746, 0.5619, -1.2174 (test_mt_grpo.py).
  Step 1 return R_T + 0.95 R_O = 2.505, 1.080, 2.005, 0.190: mean 1.445, deviations 1.060, -0.365, 0.560, -1.255,
        std = sqrt((1.1236 + 0.133225 + 0.3136 + 1.575025) / 3) = sqrt(1.048483) = 1.023955; +1e-4 = 1.024055
        A^S_1 = 1.0351, -0.3564, 0.5468, -1.2255.  Its anchor, the prompt, is shared by all four.
  Step 2 return R_O, grouped by the result seen: {1, 2} (passage A), {3}, {4}.
        {1, 2}: R_O 1.9, 0.4: mean 1.15, deviations +-0.75, std sqrt(2 x 0.5625 / 1) = 1.060660; +1e-4 = 1.060760
        A^S_2 = 0.7070, -0.7070, 0 (alone), 0 (alone)
  turn 1 = A^E + A^S_1 = 2.0652, -0.7310, 1.1087, -2.4430;  turn 2 = A^E + A^S_2 = 1.7372, -1.0816, 0.5619, -1.2174
Rollout 2's good search still gets -0.73 at turn 1: GiGPO's step return carries the discounted outcome, and
its turn 2, compared only with rollout 1 (same passage, right answer), gets the blame: -1.08.

MT-PPO's GAE over turns, one row by hand: r = (0.7, 0.4), V = (1.0, 0.5), gamma 1, lam 0.5:
  delta_2 = 0.4 - 0.5 = -0.1 -> A_2 = -0.1;  delta_1 = 0.7 + 0.5 - 1.0 = 0.2 -> A_1 = 0.2 + 0.5 x -0.1 = 0.15;
  returns = A + V = (1.15, 0.4). gamma 0.9, lam 1: delta_1 = 0.7 + 0.45 - 1.0 = 0.15, A_1 = 0.15 - 0.09 = 0.06.
"""
from __future__ import annotations

import pytest
import torch

import env
import estimators
import mt_grpo
import turn_rewards
from estimators import anchor_groups, gigpo_advantages, normalise_within, turn_gae, turn_starts, whiten
from helpers import FakeSearcher, tiny_llama
from policy import pack

DT = torch.float64
R_T = torch.tensor([0.7, 0.7, 0.2, 0.0], dtype=DT)
R_O = torch.tensor([1.9, 0.4, 1.9, 0.2], dtype=DT)


# ----------------------------------------------------------------------------- GiGPO
def test_anchor_groups_join_equal_observations_within_a_question_only():
    keys = ["A", "A", "B", None, "A", "B", None, "B"]
    g = anchor_groups(keys, G=4).tolist()
    assert g[0] == g[1] and len({g[0], g[2], g[3]}) == 3  # question 1: {1, 2}, {3}, {4 alone}
    assert g[4] not in g[:4] and g[5] == g[7] and g[6] not in g[:6] + g[7:]  # "A" of question 2 is not question 1's


def test_similar_observations_join_below_a_similarity_of_1():
    keys = ["Bram Stoker wrote Dracula.", "Bram Stoker wrote Dracula!", "The Seine runs through Paris.", None]
    assert anchor_groups(keys, G=4).unique().numel() == 4  # identical only: four groups
    g = anchor_groups(keys, G=4, similarity=0.9).tolist()
    assert g[0] == g[1] and len({g[0], g[2], g[3]}) == 3


def test_normalise_within_by_hand():
    A = normalise_within(R_O, anchor_groups(["A", "A", "B", "C"], 4))
    torch.testing.assert_close(A, torch.tensor([0.75, -0.75, 0, 0], dtype=DT) / (2 ** 0.5 * 0.75 + 1e-4))
    assert normalise_within(torch.tensor([1.0, 1.0]), torch.tensor([0, 0])).eq(0).all()  # flat group: 0


def test_gigpo_by_hand():
    A = gigpo_advantages(R_T, R_O, 4, anchor_groups(["A", "A", "B", "C"], 4))
    torch.testing.assert_close(A, torch.tensor([[2.0652, 1.7372], [-0.7310, -1.0816], [1.1087, 0.5619],
                                                [-2.4430, -1.2174]], dtype=DT), atol=1e-4, rtol=0)


def test_gigpo_reduces_to_its_parts():
    A_MR = mt_grpo.turn_advantages(R_T, R_O, 4, "grpo_mr")
    alone = anchor_groups(["A", "B", "C", "D"], 4)
    # omega 0: the episode advantage, GRPO-MR; every result distinct: turn 2 is GRPO-MR's
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone, omega=0.0), A_MR)
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone)[:, 1], A_MR[:, 1])
    # gamma 0: step 1's return is R_T alone, MT-GRPO's turn reward
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone, gamma=0.0)[:, 0],
                               A_MR[:, 0] + mt_grpo.group_normalise(R_T, 4))
    with pytest.raises(ValueError, match="one shape"):
        gigpo_advantages(R_T, R_O, 4, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- MT-PPO
def test_turn_gae_by_hand():
    A, ret = turn_gae(torch.tensor([[0.7, 0.4], [0.9, 0.0]]), torch.tensor([[1.0, 0.5], [0.3, 7.0]]),
                      torch.tensor([2, 1]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(A, torch.tensor([[0.15, -0.1], [0.6, 0.0]]))  # one turn: V(s_2) is not read
    torch.testing.assert_close(ret, torch.tensor([[1.15, 0.4], [0.9, 0.0]]))
    A, _ = turn_gae(torch.tensor([[0.7, 0.4]]), torch.tensor([[1.0, 0.5]]), torch.tensor([2]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(A, torch.tensor([[0.06, -0.1]]))


def test_mt_ppo_with_a_zero_critic_whitens_the_monte_carlo_returns():
    """V = 0 (the critic's start), gamma 1, lam 1: A_1 = R_T + R_O, A_2 = R_O, whitened over the batch's turns;
    a rollout without a result has one turn, and both rewards come after it."""
    has = torch.tensor([True, True, True, False])
    A, ret = estimators.mt_ppo_advantages(R_T, R_O, torch.zeros(4, 2, dtype=DT), has, gamma=1.0, lam=1.0)
    raw = torch.stack([R_T + R_O, torch.where(has, R_O, torch.zeros_like(R_O))], 1)
    present = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]]).bool()
    torch.testing.assert_close(ret, raw * present)
    vals = raw[present]
    torch.testing.assert_close(A[present], (vals - vals.mean()) / (vals.std() + 1e-4))
    assert A[3, 1] == 0
    assert whiten(torch.tensor([[1.0]]), torch.tensor([[True]])).eq(0).all()  # one entry: nothing to whiten


def test_the_critic_reads_each_turns_start_and_fits_its_targets(tok):
    """turn_starts finds the id before each turn (the prompt's last id; the result's last id), the value head
    reads the decoder's hidden state there, and its fit lowers the squared error to given targets."""
    trajs = env.rollout(env.ScriptedPolicy(tok, [["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Dracula")
                                                  + "</tool>", "<answer>Bram Stoker</answer>"],
                                                 ["<answer>no idea</answer>"]]),
                        tok, ["Who wrote Dracula?"], 2, FakeSearcher(), env.EnvConfig(few_shot=False))
    ids, attn, turn = pack(trajs, tok.pad_token_id)
    starts = turn_starts(turn)
    P = len(trajs[0].prompt_ids)
    assert starts[0, 0] == P - 1 and starts[1, 0] == P - 1 and starts[1, 1] == -1
    assert turn[0, starts[0, 1]] == 0 and turn[0, starts[0, 1] + 1] == 2 and turn[0, starts[0, 1] - 1] == 0
    model = tiny_llama(tok)
    head = estimators.ValueHead(model.config.hidden_size, ridge=0.5)
    feats = head.features(model, ids, attn, starts)
    h = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
    torch.testing.assert_close(feats[0, 1], h[0, starts[0, 1]].detach())
    assert feats[1, 1].eq(0).all() and head(feats).eq(0).all()  # w starts at 0
    present = starts >= 0
    targets = torch.tensor([[1.0, -0.5], [1.0, 0.0]])  # one state (the prompt), one value
    assert head.fit(feats, targets, present) == pytest.approx(((1 + 0.25 + 1) / 3) / 2)  # the loss of w = 0
    # the refit is the ridge solution on [h, 1], written out
    X = torch.cat([feats[present], torch.ones(3, 1)], 1).double()
    w = torch.linalg.solve(X.T @ X + 0.5 * torch.eye(X.shape[1], dtype=torch.float64), X.T @ targets[present].double())
    torch.testing.assert_close(head(feats)[present], (X @ w).float())
    assert (((head(feats) - targets) ** 2)[present].mean() / 2) < 0.5 * 0.375  # fitted: below w = 0's loss


# ----------------------------------------------------------------------------- turn rewards
def episodes(tok):
    """Question 1: a search that finds the answer, a search that does not; a rollout that never searched."""
    scripts = [["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Dracula novel author") + "</tool>",
                "<answer>Bram Stoker</answer>"],
               ["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Everest") + "</tool>", "<answer>x</answer>"],
               ["<answer>Bram Stoker</answer>"]]
    return env.rollout(env.ScriptedPolicy(tok, scripts), tok, ["Who wrote Dracula?"], 3, FakeSearcher(),
                       env.EnvConfig(few_shot=False))


def test_info_gain_is_the_answers_log_prob_after_the_search_minus_before(tok):
    trajs = episodes(tok)
    model = tiny_llama(tok)
    gains = turn_rewards.info_gain(model, tok, trajs, ["Bram Stoker"] * 3, micro_batch=2)
    assert gains[2] == 0.0  # no search: no turn-1 gain

    def mean_logp(context):  # by hand: one forward of context + "<answer>" + answer
        head, ans = env._encode(tok, "<answer>"), env._encode(tok, "Bram Stoker")
        ids = torch.tensor([context + head + ans])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        return logp[-len(ans):].mean().item()

    for t, g in zip(trajs[:2], gains[:2]):
        after = t.prompt_ids + t.completion_ids[:t.turn_idx.index(2)]
        assert tok.decode(after).endswith("</result><|im_end|>\n<|im_start|>assistant\n")
        assert g == pytest.approx(mean_logp(after) - mean_logp(t.prompt_ids), abs=1e-4)
    assert gains[0] != gains[1]


def test_the_judge_scores_p_yes_whatever_the_padding(tok, tiny_model_dir):
    trajs = episodes(tok)
    judge = turn_rewards.Judge(str(tiny_model_dir))
    scores = judge(trajs, ["Who wrote Dracula?"] * 3, micro_batch=2)
    assert scores[2] == 0.0 and all(0 < s < 1 for s in scores[:2])
    # a row scored alone (no padding) gets what it got beside a longer one
    alone = judge.score(["Who wrote Dracula?"], [trajs[1].tool_calls[0]], [trajs[1].results[0]])
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)
    # a judge whose hidden state is 0 has uniform logits: P(yes) / (P(yes) + P(no)) counts their ids
    torch.nn.init.zeros_(judge.model.model.norm.weight)
    flat = judge(trajs, ["Who wrote Dracula?"] * 3)
    assert flat[0] == pytest.approx(len(judge.yes) / (len(judge.yes) + len(judge.no)), abs=1e-6)


def bpe_judge_folder(folder, tok, chat_template=True, pad=True):
    """A judge checkpoint with a tokenizer of its own: a byte-level BPE trained on a few sentences, so small that
    "Yes" and " Yes" are not one token ("Y" + "es") while yes, no, No and their spaced forms are; a tiny random
    Llama over its vocabulary. ``chat_template``: SmolLM2's, or none; ``pad``: a pad token, or none (EOS only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["yes no No yes no", "the search says no", "yes it does", "No it does not", "yes"] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>" if pad else None,
                                   chat_template=tok.chat_template if chat_template else None)
    folder.mkdir()
    fast.save_pretrained(folder)
    tiny_llama(fast, kv_heads=2, max_position_embeddings=1024).save_pretrained(folder)
    return folder


def test_the_judge_counts_only_the_verdicts_its_tokenizer_writes_as_one_token(tok, tmp_path):
    """A "Yes" that its tokenizer splits into pieces is left out of P(yes): its first piece, "Y", would count
    every word that starts with it. With uniform logits the score is then 2 yes ids against 4 no ids."""
    folder = bpe_judge_folder(tmp_path / "judge", tok)
    judge = turn_rewards.Judge(str(folder))
    pieces = {w: judge.tokenizer(w, add_special_tokens=False)["input_ids"] for w in turn_rewards.YES + turn_rewards.NO}
    assert len(pieces["Yes"]) > 1 and len(pieces[" Yes"]) > 1 and all(len(pieces[w]) == 1 for w in turn_rewards.NO)
    assert judge.yes == sorted({pieces["yes"][0], pieces[" yes"][0]}) and pieces["Yes"][0] not in judge.yes
    torch.nn.init.zeros_(judge.model.model.norm.weight)
    assert judge.score(["Who wrote Dracula?"], ["Dracula"], ["Bram Stoker"]) == [pytest.approx(2 / 6, abs=1e-6)]


def test_a_judge_without_a_pad_token_pads_with_eos(tok, tmp_path):
    folder = bpe_judge_folder(tmp_path / "judge", tok, pad=False)
    judge = turn_rewards.Judge(str(folder))
    assert judge.pad == judge.tokenizer.eos_token_id
    batch = judge.score(["Who wrote Dracula?", "Which river runs through Paris, the capital of France?"],
                        ["Dracula", "Paris river"], ["Bram Stoker", "The Seine runs through Paris."])
    alone = judge.score(["Who wrote Dracula?"], ["Dracula"], ["Bram Stoker"])
    assert alone[0] == pytest.approx(batch[0], abs=1e-5)  # the shorter prompt, left-padded, scores as alone


def test_a_judge_without_a_chat_template_is_one_clear_error(tok, tmp_path):
    from data import DataError

    folder = bpe_judge_folder(tmp_path / "judge", tok, chat_template=False)
    with pytest.raises(DataError, match="no chat template.*--judge-model"):
        turn_rewards.Judge(str(folder))


# ----------------------------------------------------------------------------- through train.py
ROOM = ["--max-turn-tokens", "40", "--max-completion-tokens", "300", "--result-max-tokens", "40"]  # for a search


class SearchThenAnswer(env.Sampler):
    """A scripted agent for train.py: every other row searches "Dracula", the rest "Paris river"; after a result
    it answers. Rows of one question then see two different results: GiGPO's turn-2 groups have two members."""

    def __init__(self, tok):
        self.tok, self.calls, self.last_logprobs = tok, 0, None

    def generate(self, batch, max_new_tokens, sampling, stop):
        self.calls += 1
        out = []
        for i, row in enumerate(batch):
            searched = self.tok.decode(row).rsplit("<|im_start|>user\n", 1)[-1].startswith("<result>")
            text = ("<answer>Bram Stoker</answer>" if searched else
                    "<tool>" + env.tool_command("Dracula" if i % 2 else "Paris river") + "</tool>")
            out.append(self.tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"])
        return out


@pytest.mark.parametrize("flags, logged", [
    (["--method", "gigpo"], "adv_mean/turn2"),
    (["--method", "mt_ppo"], "critic_loss"),
    (["--turn-reward", "info_gain"], "reward_turn"),
    (["--turn-reward", "judge"], "reward_turn"),
])
def test_each_estimator_and_turn_reward_trains_through_train_py(tmp_path, tiny_model_dir, tok, monkeypatch, flags,
                                                                logged):
    import json

    import train
    from helpers import tiny_args

    monkeypatch.setattr(train, "make_sampler", lambda *a, **k: SearchThenAnswer(tok))
    extra = ["--judge-model", str(tiny_model_dir)] if "judge" in flags else []
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", *ROOM, *flags, *extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(logged in r and r["tool_call_rate"] == 1 for r in rows)
    if "judge" in flags:  # P(yes), every rollout searched
        assert all(0 < r["reward_turn"] < 1 for r in rows)
    if "info_gain" in flags:
        assert all(r["reward_turn"] != 0 for r in rows)


def test_mt_ppo_resumes_with_its_critic(tmp_path, tiny_model_dir, tok, monkeypatch):
    """The critic is part of the checkpoint: 1 step, then --resume to 3, equals 3 steps straight (one thread)."""
    import json

    from safetensors.torch import load_file

    import train
    from helpers import tiny_args

    monkeypatch.setattr(train, "make_sampler", lambda *a, **k: SearchThenAnswer(tok))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(tiny_args(tiny_model_dir, full, "--method", "mt_ppo", "--max-steps", "3", *ROOM)) == 0
    assert train.main(tiny_args(tiny_model_dir, cut, "--method", "mt_ppo", "--max-steps", "1", *ROOM)) == 0
    assert train.main(tiny_args(tiny_model_dir, cut, "--method", "mt_ppo", "--max-steps", "3", *ROOM, "--resume")) == 0
    a, b = load_file(full / "checkpoint" / "model.safetensors"), load_file(cut / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x)["critic_loss"] for x in (f / "metrics.jsonl").read_text().splitlines()] for f in (full, cut)]
    assert rows[0] == rows[1] and rows[0][0] > 0


@pytest.mark.parametrize("flags, message", [
    (["--method", "gigpo", "--k-turn"], "two-turn only"),
    (["--judge-model", "/x"], "--judge-model is the judge of --turn-reward judge"),
    (["--turn-reward", "judge", "--judge-model", "/no/such/judge"], "no such folder"),
    (["--method", "mt_ppo", "--gamma", "1.5"], "each in [0, 1]"),
    (["--turn-reward", "oracle"], "choose one of verifiable, info_gain, judge"),
])
def test_bad_estimator_flags_are_one_clear_error(tmp_path, capsys, flags, message):
    import train

    assert train.main(["--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
