"""trl_mt_grpo.py: MT-GRPO inside TRL's GRPOTrainer (TRL 1.16, requirements-extra.txt).

On one scripted group the per-token advantages TRL trains on are mt_grpo.token_advantages of the project's own
rewards; one optimizer step from the same weights and episodes moves the weights as train.update does (loss
type "dapo" is train.py's --aggregation token); a short GRPOTrainer.train() run on a sampled model completes and
logs each turn's mean advantage. These tests are also what fails first when TRL changes the hooks the file uses
(rollout_func and its env_mask, _generate_and_score_completions's dict, (B, T) advantages in the loss).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16: we know

import config  # noqa: E402
import mt_grpo  # noqa: E402
import rewards  # noqa: E402
import train  # noqa: E402
from config import EnvConfig  # noqa: E402
from helpers import TRL_QUESTIONS, TRL_SCRIPTS, FakeSearcher, tiny_llama  # noqa: E402
from infra import assemble  # noqa: E402
from policy import Batch, ScriptedPolicy, pack  # noqa: E402

trl = pytest.importorskip("trl")  # an extra: `make test` installs it
from extensions.trl_mt_grpo import MTGRPOTrainer  # noqa: E402

G = 4
QUESTIONS, SCRIPTS = TRL_QUESTIONS, TRL_SCRIPTS  # per episode, in the order TRL asks for them (question-major)


def trl_args(tmp_path, **overrides):
    """A one-step TRL run on CPU in fp32, its optimizer and loss those of train.py's defaults."""
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, seed=0, max_steps=1, report_to="none",
                save_strategy="no", logging_steps=1, disable_tqdm=True, per_device_train_batch_size=2 * G,
                gradient_accumulation_steps=1, num_generations=G, max_completion_length=200, temperature=0.9,
                top_k=50, top_p=1.0, shuffle_dataset=False, learning_rate=1e-3, beta=0.0, loss_type="dapo",
                optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1e9,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    return GRPOConfig(**{**base, **overrides})


def scripted_trainer(tok, tmp_path, model, **kwargs):
    from datasets import Dataset

    return MTGRPOTrainer(model, trl_args(tmp_path), Dataset.from_list(QUESTIONS), FakeSearcher(), processing_class=tok,
                         sampler=lambda trainer: ScriptedPolicy(tok, SCRIPTS), **kwargs)


def expected_advantages(trajectories, method="mt_grpo"):
    scores = rewards.compute([t.messages for t in trajectories], [q["aliases"] for q in QUESTIONS for _ in range(G)])
    R_T, R_O = (torch.tensor(r) for r in rewards.level_sums(scores))
    return mt_grpo.turn_advantages(R_T, R_O, G, method, has_result=torch.tensor([t.has_result for t in trajectories]))


@pytest.mark.parametrize("method", ["mt_grpo", "grpo_or"])
def test_the_advantages_trl_trains_on_are_mt_grpo_token_advantages(tok, tmp_path, method):
    trainer = scripted_trainer(tok, tmp_path, tiny_llama(tok, kv_heads=2), method=method)
    trainer.model.train()
    out = trainer._generate_and_score_completions([q for q in QUESTIONS for _ in range(G)])
    trajs = trainer.trajectories
    assert [t.messages[0]["content"] for t in trajs] == [s[0] for s in SCRIPTS]
    width = out["completion_ids"].shape[1]
    turn = torch.tensor([t.turn_idx + [0] * (width - len(t.turn_idx)) for t in trajs])
    want, model_tokens = mt_grpo.token_advantages(expected_advantages(trajs, method), turn)
    assert torch.equal(out["advantages"], want)
    assert torch.equal(out["tool_mask"].bool() & out["completion_mask"].bool(), model_tokens)  # the environment's: no loss
    assert torch.equal(out["completion_ids"][model_tokens], torch.tensor([i for t in trajs for i, k in
                                                                          zip(t.completion_ids, t.turn_idx) if k]))
    two_turned = [(r[turn[i] == 1].unique(), r[turn[i] == 2].unique()) for i, r in enumerate(out["advantages"])
                  if trajs[i].has_result]
    differ = [not torch.equal(a, b) for a, b in two_turned]
    assert all(differ) if method == "mt_grpo" else not any(differ)  # turn-level credit, or one number per row


def recorded_gradients(model) -> dict:
    """The gradient each parameter of ``model`` receives from now on, summed over backward passes."""
    seen = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: seen.__setitem__(name, seen.get(name, 0) + g))
    return seen


def test_one_trl_step_moves_the_weights_as_train_update_does(tok, tmp_path):
    """The same weights, episodes and advantages: TRL's step (loss_type "dapo", AdamW, fp32) and train.update
    (aggregation "token", its AdamW) compute the same gradient (to 1e-4 relative: the two pad the batch
    differently, so their sums differ in the last bits) and land on the same weights. AdamW's first step moves
    every coordinate by about lr whatever its gradient's size, so a coordinate whose gradient is ~0 can land a
    little differently: the moves agree to 1e-3 of their norm."""
    from accelerate import Accelerator

    start = tiny_llama(tok, kv_heads=2)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    ours = copy.deepcopy(start)
    trainer = scripted_trainer(tok, tmp_path, start)
    g_theirs = recorded_gradients(trainer.model)
    trainer.train()
    trajs = trainer.trajectories
    ids, attn, turn = pack(trajs, tok.pad_token_id)
    cfg = config.Config(G=G, batch_size=2 * G, micro_batch=2 * G, bf16=False, mu=1, lr=1e-3, max_grad_norm=1e9,
                        temperature=0.9, aggregation="token")
    accelerator = Accelerator(cpu=True)
    logprobs, optimizer, scheduler = assemble.prepare(cfg, accelerator, ours, 2 * G)
    g_ours = recorded_gradients(ours)
    A_tok = mt_grpo.token_advantages(expected_advantages(trajs), turn[:, 1:])[0]
    train.update(cfg, logprobs, optimizer, scheduler, accelerator, Batch(ids, attn, turn, A_tok))
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(grads)])  # noqa: E731
    assert flat(g_ours).abs().max() > 1e-3
    torch.testing.assert_close(flat(g_theirs), flat(g_ours), rtol=1e-4, atol=1e-7)
    theirs = dict(trainer.model.named_parameters())
    move_ours = torch.cat([(p.detach() - before[n]).flatten() for n, p in sorted(ours.named_parameters())])
    move_theirs = torch.cat([(theirs[n].detach() - before[n]).flatten() for n, _ in sorted(ours.named_parameters())])
    assert move_ours.abs().max() > 5e-4
    assert (move_ours - move_theirs).norm() / move_ours.norm() < 1e-3


def test_a_short_trl_run_samples_trains_and_logs_each_turns_advantage(tok, tmp_path, tiny_model_dir):
    """GRPOTrainer.train() with the default sampler (HFPolicy on the model TRL trains): two steps on the
    project's demo-world-shaped episodes complete, and every step logs the six rewards and adv_mean/turn1."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = MTGRPOTrainer(model, trl_args(tmp_path, max_steps=2, max_completion_length=60),
                            Dataset.from_list(QUESTIONS), FakeSearcher(), processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for row in logged:
        assert "adv_mean/turn1" in row and all(f"rewards/{k}/mean" in row for k in rewards.REWARD_FUNCS)
    assert all(len(t.completion_ids) <= 60 for t in trainer.trajectories)


def test_the_episode_must_sample_as_trl_trains(tok, tmp_path):
    """TRL's loss divides the logits by its temperature: an episode sampled at another one is refused, and so is
    mask_truncated_completions (every episode ends with the template's close, not an end-of-turn id)."""
    from datasets import Dataset

    with pytest.raises(ValueError, match="temperature"):
        MTGRPOTrainer(tiny_llama(tok), trl_args(tmp_path), Dataset.from_list(QUESTIONS), FakeSearcher(),
                      processing_class=tok, env_cfg=EnvConfig(temperature=1.0))
    with pytest.raises(ValueError, match="mask_truncated_completions"):
        MTGRPOTrainer(tiny_llama(tok), trl_args(tmp_path, mask_truncated_completions=True), Dataset.from_list(QUESTIONS),
                      FakeSearcher(), processing_class=tok)


def test_the_example_runs(tmp_path, tiny_model_dir):
    """examples/trl_demo.py at a tiny size: a warm start, then one TRL step on the demo world."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("trl_demo", Path(__file__).resolve().parents[1] / "examples" / "trl_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--model", str(tiny_model_dir), "--max-steps", "1", "--warmstart-steps", "1",
                      "--output-dir", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("setting, value", [("scale_rewards", "batch"), ("scale_rewards", "none"),
                                            ("multi_objective_aggregation", "normalize_then_sum"),
                                            ("num_generations_eval", 1)])
def test_a_trl_setting_the_advantage_would_ignore_is_refused(tok, tmp_path, setting, value):
    """MTGRPOTrainer replaces the advantage TRL derives from the rewards: a setting that only changes that
    advantage is refused, naming itself, rather than ignored."""
    from datasets import Dataset

    with pytest.raises(ValueError, match=setting):
        MTGRPOTrainer(tiny_llama(tok), trl_args(tmp_path, **{setting: value}), Dataset.from_list(QUESTIONS),
                      FakeSearcher(), processing_class=tok)


def test_reward_weights_weigh_each_reward_inside_its_level(tok, tmp_path):
    """TRL's reward_weights (one per reward function, in rewards.REWARD_FUNCS's order) are honoured: R^T and R^O
    are the weighted sums of their rewards."""
    from datasets import Dataset

    weights = [2.0, 0.5, 1.0, 3.0, 1.0, 0.0]
    trainer = MTGRPOTrainer(tiny_llama(tok, kv_heads=2), trl_args(tmp_path, reward_weights=weights),
                            Dataset.from_list(QUESTIONS), FakeSearcher(), processing_class=tok,
                            sampler=lambda trainer: ScriptedPolicy(tok, SCRIPTS))
    trainer.model.train()
    trainer._generate_and_score_completions([q for q in QUESTIONS for _ in range(G)])
    trajs = trainer.trajectories
    scores = rewards.compute([t.messages for t in trajs], [q["aliases"] for q in QUESTIONS for _ in range(G)])
    w = dict(zip(rewards.REWARD_FUNCS, weights))
    R_T, R_O = (torch.tensor(r) for r in rewards.level_sums({k: [w[k] * x for x in v] for k, v in scores.items()}))
    want = mt_grpo.turn_advantages(R_T, R_O, G, has_result=torch.tensor([t.has_result for t in trajs]))
    got = trainer.turn_advantages(trajs, [q["aliases"] for q in QUESTIONS for _ in range(G)], [None] * len(trajs))
    assert torch.equal(got, want) and not torch.equal(got, expected_advantages(trajs))


def test_evaluation_groups_are_num_generations_eval(tok, tmp_path):
    """TRL evaluates with groups of num_generations_eval: so does the MT-GRPO advantage, in eval mode."""
    from datasets import Dataset

    trainer = MTGRPOTrainer(tiny_llama(tok, kv_heads=2), trl_args(tmp_path, num_generations_eval=2),
                            Dataset.from_list(QUESTIONS), FakeSearcher(), processing_class=tok,
                            sampler=lambda trainer: ScriptedPolicy(tok, SCRIPTS))
    trainer.model.train()
    trainer._generate_and_score_completions([q for q in QUESTIONS for _ in range(G)])
    trajs, aliases = trainer.trajectories, [q["aliases"] for q in QUESTIONS for _ in range(G)]
    trainer.model.eval()
    got = trainer.turn_advantages(trajs, aliases, [None] * len(trajs))
    R_T, R_O = (torch.tensor(r) for r in rewards.level_sums(rewards.compute([t.messages for t in trajs], aliases)))
    has_result = torch.tensor([t.has_result for t in trajs])
    assert torch.equal(got, mt_grpo.turn_advantages(R_T, R_O, 2, has_result=has_result))
    trainer.model.train()
    assert torch.equal(trainer.turn_advantages(trajs, aliases, [None] * len(trajs)), expected_advantages(trajs))
