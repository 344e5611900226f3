"""extensions/estimators.py and extensions/turn_rewards.py as worked examples: the group of tests/test_mt_grpo.py,
by hand.

    rollout  story                                          R_T   R_O   its search returned
    1        search found the answer, answered correctly    0.7   1.9   passage A
    2        search found the answer, answered wrongly      0.7   0.4   passage A
    3        search missed, but the answer was right anyway 0.2   1.9   passage B
    4        tool call failed (Error: ...), wrong answer    0.0   0.2   an error text

GiGPO (omega 1, gamma 0.95, verl-agent's cross-step episode normalisation). Every rollout searched: two steps
each. A^E: R_T + R_O = 2.6, 1.1, 2.1, 0.2, mean 1.5, deviations 1.1, -0.4, 0.6, -1.3 (sum of squares 3.42); over
  the steps each value counts twice: std = sqrt(2 x 3.42 / 7) = 0.988505; +1e-4 = 0.988605
  A^E = 1.1127, -0.4046, 0.6069, -1.3150.
  Step 1 return R_T + 0.95 R_O = 2.505, 1.080, 2.005, 0.190: mean 1.445, deviations 1.060, -0.365, 0.560, -1.255,
        std = sqrt((1.1236 + 0.133225 + 0.3136 + 1.575025) / 3) = sqrt(1.048483) = 1.023955; +1e-4 = 1.024055
        A^S_1 = 1.0351, -0.3564, 0.5468, -1.2255.  Its anchor, the prompt, is shared by all four.
  Step 2 return R_O, grouped by the result seen: {1, 2} (passage A), {3}, {4}.
        {1, 2}: R_O 1.9, 0.4: mean 1.15, deviations +-0.75, std sqrt(2 x 0.5625 / 1) = 1.060660; +1e-4 = 1.060760
        A^S_2 = 0.7070, -0.7070, 0 (alone), 0 (alone)
  turn 1 = A^E + A^S_1 = 2.1478, -0.7610, 1.1538, -2.5405;  turn 2 = A^E + A^S_2 = 1.8197, -1.1117, 0.6069, -1.3150
Rollout 2's good search still gets -0.76 at turn 1: GiGPO's step return carries the discounted outcome, and
its turn 2, compared only with rollout 1 (same passage, right answer), gets the blame: -1.11.
If rollout 4 had never searched (one step): its step-1 return is R_T + R_O = 0.2, undiscounted (not 0.19), and
  the episode term counts it once: over 2.6, 2.6, 1.1, 1.1, 2.1, 2.1, 0.2 the mean is 11.8 / 7 = 1.685714, the std
  0.904486; A^E = 1.0107, -0.6475, 0.4580, -1.6424.

MT-PPO's token-level GAE, one row by hand (gamma 1, lam 0.5). Ids 0-7: the prompt's last id (0), turn 1 (1, 2),
the environment's result (3, 4), turn 2 (5, 6), padding (7). R_T = 0.7 at id 2 (turn 1's last), R_O = 0.4 at id
6 (the episode's last model id). Values V_1 = 0.5, V_2 = 0.6, V_5 = 0.9, V_6 = 0.3.
  id 6: delta = 0.4 + 1 x 0 - 0.3 = 0.1,                   A_6 = 0.1
  id 5: delta = 0 + 0.3 - 0.9 = -0.6,                      A_5 = -0.6 + 0.5 x 0.1 = -0.55
  ids 4, 3: the environment's: skipped, V_next = 0.9 and A_next = -0.55 carried through
  id 2: delta = 0.7 + 0.9 - 0.6 = 1.0,                     A_2 = 1.0 + 0.5 x -0.55 = 0.725
  id 1: delta = 0 + 0.6 - 0.5 = 0.1,                       A_1 = 0.1 + 0.5 x 0.725 = 0.4625
  returns = A + V: 0.9625, 1.325 (ids 1, 2), 0.35, 0.4 (ids 5, 6).
PPO's clipped value loss (clip 0.5), per id: v = 1.5, v_old = 0.5, return 1.5: the plain term is 0, the clipped
value 0.5 + 0.5 = 1.0 is 0.5 away, so the loss is 0.5 x 0.25 = 0.125 and the clip held; v = 1.0, v_old = 0.4,
return 0: plain 1, clipped 0.9 -> 0.81: the loss is 0.5 x 1 = 0.5, the clip did not hold.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import env
import mt_grpo
from config import Config, EnvConfig
from extensions import estimators, turn_rewards
from extensions.estimators import (anchor_groups, gigpo_advantages, normalise_over_steps, normalise_within,
                                   token_gae, token_rewards, value_loss, whiten)
from helpers import FAKE_PASSAGES, FakeSearcher, tiny_llama
from policy import Sampler, ScriptedPolicy, pack_batch

DT = torch.float64
R_T = torch.tensor([0.7, 0.7, 0.2, 0.0], dtype=DT)
R_O = torch.tensor([1.9, 0.4, 1.9, 0.2], dtype=DT)
SEARCHED = torch.tensor([True, True, True, True])
ROOT = Path(__file__).resolve().parents[1]


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
    A = gigpo_advantages(R_T, R_O, 4, anchor_groups(["A", "A", "B", "C"], 4), SEARCHED)
    torch.testing.assert_close(A, torch.tensor([[2.1478, 1.8197], [-0.7610, -1.1117], [1.1538, 0.6069],
                                                [-2.5405, -1.3150]], dtype=DT), atol=1e-4, rtol=0)


def test_gigpo_gives_a_one_turn_episode_its_undiscounted_return_and_counts_its_one_step():
    """Rollout 4 never searched: one step, which earned both levels; verl-agent's return for it is R_T + R_O
    (0.2, not 0.19), and its episode term counts it once among the group's seven steps."""
    one = torch.tensor([True, True, True, False])
    A = gigpo_advantages(R_T, R_O, 4, anchor_groups(["A", "A", "B", None], 4), one)
    A_E = torch.tensor([1.0107, -0.6475, 0.4580, -1.6424], dtype=DT)
    torch.testing.assert_close(normalise_over_steps(R_T + R_O, 1 + one.long(), 4), A_E, atol=1e-4, rtol=0)
    A_S1 = mt_grpo.group_normalise(torch.tensor([2.505, 1.080, 2.005, 0.2], dtype=DT), 4)
    torch.testing.assert_close(A[:, 0], A_E + A_S1, atol=1e-4, rtol=0)
    discounted = mt_grpo.group_normalise(R_T + 0.95 * R_O, 4)
    assert (A_S1 - discounted).abs().max() > 1e-3  # the old, discounted step-1 return is a different number


def test_gigpo_reduces_to_its_parts():
    A_MR = mt_grpo.turn_advantages(R_T, R_O, 4, "grpo_mr")
    alone = anchor_groups(["A", "B", "C", "D"], 4)
    # over the rollouts (not the steps), omega 0: the episode advantage, GRPO-MR; every result distinct: turn 2 is it
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone, SEARCHED, omega=0.0, episode_norm="trajectories"),
                               A_MR)
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone, SEARCHED, episode_norm="trajectories")[:, 1],
                               A_MR[:, 1])
    # gamma 0: step 1's return is R_T alone, MT-GRPO's turn reward
    torch.testing.assert_close(gigpo_advantages(R_T, R_O, 4, alone, SEARCHED, gamma=0.0, episode_norm="trajectories")[:, 0],
                               A_MR[:, 0] + mt_grpo.group_normalise(R_T, 4))
    with pytest.raises(ValueError, match="one shape"):
        gigpo_advantages(R_T, R_O, 4, torch.tensor([0, 1]), SEARCHED)


# ----------------------------------------------------------------------------- MT-PPO
TURN = torch.tensor([[0, 1, 1, 0, 0, 2, 2, 0],    # turn 1, the result, turn 2, padding
                     [0, 1, 1, 1, 0, 0, 0, 0]])   # one turn: answered at once


def test_the_turn_level_rewards_sit_on_each_turns_last_id():
    r = token_rewards(TURN, torch.tensor([0.7, 0.2]), torch.tensor([0.4, 1.9]))
    torch.testing.assert_close(r, torch.tensor([[0, 0, 0.7, 0, 0, 0, 0.4, 0], [0, 0, 0, 2.1, 0, 0, 0, 0]]))


def test_token_gae_with_turn_rewards_by_hand():
    r = token_rewards(TURN[:1], torch.tensor([0.7]), torch.tensor([0.4]))
    V = torch.tensor([[9.0, 0.5, 0.6, 9.0, 9.0, 0.9, 0.3, 9.0]])  # 9: values no model id reads
    A, ret = token_gae(r, V, TURN[:1] > 0, gamma=1.0, lam=0.5)
    torch.testing.assert_close(A, torch.tensor([[0, 0.4625, 0.725, 0, 0, -0.55, 0.1, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0.9625, 1.325, 0, 0, 0.35, 0.4, 0]]))
    # with a zero critic, gamma 1 and lam 1 every id's advantage is the reward still to come: the Monte-Carlo return
    A, _ = token_gae(r, torch.zeros_like(V), TURN[:1] > 0, gamma=1.0, lam=1.0)
    torch.testing.assert_close(A, torch.tensor([[0, 1.1, 1.1, 0, 0, 0.4, 0.4, 0]]))


def test_the_clipped_value_loss_by_hand():
    v, v_old, ret = torch.tensor([[1.5, 1.0]]), torch.tensor([[0.5, 0.4]]), torch.tensor([[1.5, 0.0]])
    loss, held = value_loss(v, v_old, ret, torch.ones(1, 2, dtype=torch.bool), clip=0.5)
    torch.testing.assert_close(loss, torch.tensor([[0.125, 0.5]]))
    assert held.tolist() == [[True, False]]
    loss, _ = value_loss(v, v_old, ret, torch.tensor([[False, True]]), clip=0.5)
    assert loss[0, 0] == 0  # not a model id: no loss


def test_whitening_over_the_model_ids_by_hand():
    A, mask = torch.tensor([[1.0, 2.0, 3.0, 7.0]]), torch.tensor([[True, True, True, False]])
    # sums 6 and 14 over 3 ids: mean 2, variance (14/3 - 4) x 3/2 = 1 (Bessel's)
    torch.testing.assert_close(whiten(A, mask, 6.0, 14.0, 3.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def searching_batch(tok):
    trajs = env.rollout(ScriptedPolicy(tok, [["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Dracula")
                                                  + "</tool>", "<answer>Bram Stoker</answer>"],
                                                 ["<answer>no idea</answer>"]] * 2),
                        tok, ["Who wrote Dracula?"], 4, FakeSearcher(), EnvConfig(few_shot=False))
    return trajs, pack_batch(trajs, tok.pad_token_id)


def test_the_critic_values_each_id_places_the_rewards_and_learns_its_returns(tok, tiny_model_dir):
    """The critic's values are those of its value head on the decoder at the id before each one; its advantages are
    token_gae's, whitened; and a few of its own updates toward one batch's returns lower the value loss and
    raise the explained variance (1 - Var(return - V) / Var(return)) of the values it predicts."""
    from accelerate import Accelerator

    trajs, batch = searching_batch(tok)
    cfg = Config(G=4, batch_size=4, micro_batch=2, mu=1, critic_lr=1e-2, bf16=False)
    critic = estimators.Critic(cfg, Accelerator(cpu=True), str(tiny_model_dir), bf16=False)
    levels = mt_grpo.Levels(R_T=torch.tensor([0.7, 0.0, 0.7, 0.0]), R_O=torch.tensor([1.9, 0.2, 1.9, 0.2]),
                            has_result=torch.tensor([True, False, True, False]))
    A = critic.token_advantages(levels, trajs, batch, slice(None))
    mask = batch.turn[:, 1:] > 0
    r = token_rewards(batch.turn[:, 1:], levels.R_T, levels.R_O)
    raw, ret = token_gae(r, torch.zeros_like(r), mask)  # the head starts at 0: V = 0, the returns are the rewards to come
    torch.testing.assert_close(critic.pending[2], ret)
    torch.testing.assert_close(A, whiten(raw, mask, raw[mask].sum().item(), (raw[mask] ** 2).sum().item(),
                                         mask.sum().item()))
    first = critic.learn()
    assert first["critic/explained_variance"] == pytest.approx(0.0, abs=1e-6)  # V = 0 explains nothing
    for _ in range(40):
        critic.token_advantages(levels, trajs, batch, slice(None))
        last = critic.learn()
    assert last["critic/value_loss"] < 0.2 * first["critic/value_loss"] and last["critic/explained_variance"] > 0.5
    V = critic.values(batch)
    head = critic.net.head
    h = critic.net.trunk(input_ids=batch.ids, attention_mask=batch.attn).last_hidden_state[:, :-1]
    torch.testing.assert_close(V, head(h).squeeze(-1).detach(), atol=1e-5, rtol=0)


def test_mt_ppo_resumes_exactly_after_a_kill(tmp_path, tiny_model_dir):
    """The critic's weights and AdamW state are in the checkpoint: a 3-step MT-PPO run killed (SIGKILL) after its
    step-2 checkpoint and resumed ends bit for bit where the uninterrupted run does: the policy, the critic and
    every logged number (one thread; the rollouts scripted, tests/distributed_worker.py)."""
    import os
    import signal
    import time

    from distributed_worker import QUESTIONS
    from safetensors.torch import load_file

    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(p) + "\n" for p in FAKE_PASSAGES))
    flags = ["--model", str(tiny_model_dir), "--questions", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "c.jsonl"),
             "--method", "mt_ppo", "--G", "4", "--batch-size", "8", "--micro-batch", "2", "--max-steps", "3",
             "--save-every", "1", "--lr", "1e-3", "--critic-lr", "1e-3", "--max-turn-tokens", "64",
             "--max-completion-tokens", "256", "--warmstart-steps", "0", "--sample-every", "0", "--threads", "1"]
    worker = [sys.executable, str(ROOT / "tests" / "distributed_worker.py")]
    env_ = {**os.environ, "MT_GRPO_CACHE": str(tmp_path / "cache")}
    whole = subprocess.run([*worker, *flags, "--output-dir", str(tmp_path / "whole")], cwd=ROOT, env=env_,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    p = subprocess.Popen([*worker, *flags, "--output-dir", str(tmp_path / "cut")], cwd=ROOT, start_new_session=True,
                         env={**env_, "HANG_AFTER_STEP": "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (tmp_path / "cut" / "hanging").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:] if p.poll() is not None else "hung"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    resumed = subprocess.run([*worker, *flags, "--output-dir", str(tmp_path / "cut"), "--resume"], cwd=ROOT, env=env_,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    timing = ("seconds", "per_second", "peak_rss_gb")
    rows = [[{k: v for k, v in json.loads(x).items() if not k.endswith(timing)}
             for x in (tmp_path / f / "metrics.jsonl").read_text().splitlines()] for f in ("whole", "cut")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3] and rows[0] == rows[1]
    assert all("critic/explained_variance" in r for r in rows[0])
    a, b = (load_file(tmp_path / f / "checkpoint" / "model.safetensors") for f in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(tmp_path / f / "checkpoint" / "state.pt", weights_only=False)["critic"] for f in ("whole", "cut"))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(v, start["model." + k.removeprefix("trunk.")])
               for k, v in ca["model"].items() if k.startswith("trunk."))  # the critic's trunk learned


# ----------------------------------------------------------------------------- turn rewards
def episodes(tok):
    """Question 1: a search that finds the answer, a search that does not; a rollout that never searched."""
    scripts = [["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Dracula novel author") + "</tool>",
                "<answer>Bram Stoker</answer>"],
               ["<reasoning>r</reasoning>\n<tool>" + env.tool_command("Everest") + "</tool>", "<answer>x</answer>"],
               ["<answer>Bram Stoker</answer>"]]
    return env.rollout(ScriptedPolicy(tok, scripts), tok, ["Who wrote Dracula?"], 3, FakeSearcher(),
                       EnvConfig(few_shot=False))


def test_info_gain_is_igpos_rise_in_the_answers_probability_and_the_log_form_its_log_prob(tok):
    """IGPO's turn reward: pi(answer | context) = exp(mean per-token log-prob), the geometric mean of the answer's
    token probabilities; the gain is pi after turn 1 and its result minus pi before it, so it lies in [-1, 1]. The
    log-space option is the difference of the mean log-probs, unbounded."""
    trajs = episodes(tok)
    model = tiny_llama(tok)
    gains = turn_rewards.info_gain(model, tok, trajs, ["Bram Stoker"] * 3, micro_batch=2)
    logs = turn_rewards.info_gain(model, tok, trajs, ["Bram Stoker"] * 3, micro_batch=2, space="log")
    assert gains[2] == 0.0 and logs[2] == 0.0  # no search: no turn-1 gain

    def mean_logp(context):  # by hand: one forward of context + "<answer>" + answer
        head, ans = env._encode(tok, "<answer>"), env._encode(tok, "Bram Stoker")
        ids = torch.tensor([context + head + ans])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        return logp[-len(ans):].mean().item()

    import math
    for t, g, lg in zip(trajs[:2], gains[:2], logs[:2]):
        after = t.prompt_ids + t.completion_ids[:t.turn_idx.index(2)]
        assert tok.decode(after).endswith("</result><|im_end|>\n<|im_start|>assistant\n")
        assert lg == pytest.approx(mean_logp(after) - mean_logp(t.prompt_ids), abs=1e-4)
        assert g == pytest.approx(math.exp(mean_logp(after)) - math.exp(mean_logp(t.prompt_ids)), abs=1e-6)
        assert -1 <= g <= 1
    assert gains[0] != gains[1]
    with pytest.raises(ValueError, match="probability or log"):
        turn_rewards.info_gain(model, tok, trajs, ["Bram Stoker"] * 3, space="odds")


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


class SearchThenAnswer(Sampler):
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
    (["--method", "mt_ppo"], "critic/explained_variance"),
    (["--turn-reward", "info_gain"], "reward_turn"),
    (["--turn-reward", "info_gain_log"], "reward_turn"),
    (["--turn-reward", "judge"], "reward_turn"),
])
def test_each_estimator_and_turn_reward_trains_through_train_py(tmp_path, tiny_model_dir, tok, monkeypatch, flags,
                                                                logged):
    import json

    import train
    from helpers import tiny_args
    from infra import assemble

    monkeypatch.setattr(assemble, "make_sampler", lambda *a, **k: SearchThenAnswer(tok))
    extra = ["--judge-model", str(tiny_model_dir)] if "judge" in flags else []
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", *ROOM, *flags, *extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(logged in r and r["tool_call_rate"] == 1 for r in rows)
    if "judge" in flags:  # P(yes), every rollout searched
        assert all(0 < r["reward_turn"] < 1 for r in rows)
    if "info_gain" in flags:
        assert all(r["reward_turn"] != 0 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--method", "gigpo", "--k-turn"], "two-turn only"),
    (["--judge-model", "/x"], "--judge-model is the judge of --turn-reward judge"),
    (["--turn-reward", "judge", "--judge-model", "/no/such/judge"], "no such folder"),
    (["--method", "mt_ppo", "--gamma", "1.5"], "each in [0, 1]"),
    (["--turn-reward", "oracle"], "choose one of verifiable, info_gain, info_gain_log, judge"),
])
def test_bad_estimator_flags_are_one_clear_error(tmp_path, capsys, flags, message):
    import train

    assert train.main(["--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
