"""train.py: bad configs fail early and cleanly, micro-batching is exact, and --resume after a
kill -9 continues bit for bit.

The runs here use a tiny random-initialised Llama with SmolLM2's tokenizer on the demo world, so a
training step takes well under a second; the learning itself is shown by the README's main command.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import advantages
import config
import env
import mt_grpo
import rewards
import train
from config import EnvConfig, Sampling
from helpers import REWARD_KEYS, kill_after_first_checkpoint, run_train, tiny_args
from infra import assemble
from policy import Batch, HFPolicy, ScriptedPolicy, pack

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("flags, message", [
    (["--G", "1"], "at least 2 rollouts"),
    (["--G", "4", "--batch-size", "6"], "multiple of --G"),
    (["--method", "ppo"], "choose one of mt_grpo, grpo_or, grpo_mr"),
    (["--model", "/no/such/model"], "no such folder"),
    (["--corpus", "/no/such/corpus.jsonl"], "file not found"),
    (["--questions", "/no/such/questions.jsonl"], "file not found"),
    (["--resume"], "no checkpoint"),
    (["--report-to", "mlflow"], "none, wandb or tensorboard"),
    (["--preset", "paper"], "TriviaQA needs a Wikipedia corpus"),
    (["--save-every", "0"], "--save-every 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan: must be > 0"),
    (["--vllm-gpu-memory", "1.5"], "a share of the GPU"),
])
def test_bad_config_is_one_clear_error_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert train.main(["--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()  # checked before any heavy work: nothing written


def test_resume_needs_the_run_folder(capsys):
    assert train.main(["--resume"]) == 2
    assert "--resume needs --output-dir" in capsys.readouterr().err


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert train.main(["--output-dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_bad_config_from_the_command_line_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--G", "1", "--output-dir", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "error: " in p.stderr


# What `make train` installs: requirements.txt alone. The child hides requirements-extra.txt's packages
# from every importer, then imports the run's modules and asks each tool that needs an extra for it.
WITHOUT_EXTRAS = r"""
import sys, os
hidden = set(sys.argv[1].split(","))
class Hide:
    def __init__(self, finder): self.finder = finder
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] in hidden else self.finder.find_spec(name, path, target)
    def __getattr__(self, attr): return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import train, eval, data
from tools import viewer, walkthrough
assert not hidden & set(sys.modules), hidden & set(sys.modules)
print("report-to:", train.main(["--report-to", "wandb"]))
try:
    data.load_triviaqa()
except data.DataError as e:
    print("triviaqa:", e)
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
print("deepspeed:", train.main(["--warmstart-steps", "0", "--output-dir", sys.argv[2]]))
from tools import plot
"""


def test_the_run_needs_requirements_txt_alone(tmp_path):
    extras = [line.split("==")[0] for line in (ROOT / "requirements-extra.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert {"deepspeed", "matplotlib", "pytest", "trl"} <= set(extras)
    p = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, ",".join(extras), str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    fix = "run `make setup` (or"
    assert "report-to: 2" in p.stdout and "needs the wandb package: " + fix in p.stderr
    assert "triviaqa: TriviaQA from the hub needs the datasets package: " + fix in p.stdout
    assert "deepspeed: 2" in p.stdout and "uses DeepSpeed, which is not installed: " + fix in p.stderr
    assert p.returncode == 1 and p.stderr.endswith("plot.py needs matplotlib: " + fix + " pip install -r "
                                                    "requirements-extra.txt)\n")
    assert not (tmp_path / "run").exists()  # refused before writing anything


# ----------------------------------------------------------------------------- the update
def ragged_batch(tok, tiny_model_dir, searcher, sampling=Sampling()):
    """8 sampled rollouts of 2 questions, cut by hand to 8 different lengths (the random model always writes to
    the budget), and the model that sampled them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg_env = EnvConfig(max_turn_tokens=10, max_completion_tokens=80, few_shot=False, temperature=sampling.temperature,
                            top_k=sampling.top_k)
    trajs = env.rollout(HFPolicy(model, tok, seed=0), tok, ["Who wrote Dracula?", "Where is Paris?"], 4, searcher,
                        cfg_env)
    ids, attn, turn = pack(trajs, tok.pad_token_id)
    for r in range(8):
        end = int(attn[r].sum()) - 7 * ((r * 3) % 8)
        ids[r, end:], attn[r, end:], turn[r, end:] = tok.pad_token_id, 0, 0
    return model, trajs, ids, attn, turn


def gradient(cfg, tiny_model_dir, ids, attn, turn, A) -> tuple[torch.Tensor, dict]:
    """The gradient train.update sums (lr 0: the weights stay), flattened, and its stats; ``A`` per turn."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    accelerator = Accelerator(cpu=True)
    trainer, opt, sched = assemble.prepare(dataclasses.replace(cfg, lr=0.0), accelerator, m, ids.shape[0])
    seen = {}
    for name, p in m.named_parameters():
        p.register_hook(lambda g, name=name: seen.__setitem__(name, seen.get(name, 0) + g))
    A_tok = mt_grpo.token_advantages(A, turn[:, 1:])[0]
    stats = train.update(cfg, trainer, opt, sched, accelerator, Batch(ids, attn, turn, A_tok))
    return torch.cat([seen[n].flatten() for n in sorted(seen)]), stats


def test_micro_batches_add_up_to_the_full_batch_gradient(tok, tiny_model_dir, searcher):
    """Gradient accumulation is exact: each micro-batch's loss is weighted by its share of the
    batch's model tokens, so micro_batch 1, 3 and 8 take the same step (to float error), although
    update() groups rows by length and cuts each micro-batch to its own longest row."""
    _, _, ids, attn, turn = ragged_batch(tok, tiny_model_dir, searcher)
    assert len(set(attn.sum(1).tolist())) == 8 and (turn > 0).sum(1).min() > 0
    A = torch.randn(8, 2)
    grads = []
    for micro in (1, 3, 8):
        cfg = config.Config(micro_batch=micro, G=4, batch_size=8, bf16=False, max_grad_norm=1e9, mu=1)
        g, stats = gradient(cfg, tiny_model_dir, ids, attn, turn, A)
        grads.append(g)
        assert stats["clip_frac"] == 0.0  # one pass: ratio is exactly 1
    assert grads[0].abs().sum() > 0
    for g in grads[:2]:
        torch.testing.assert_close(g, grads[2], rtol=1e-4, atol=1e-6)


def test_micro_batch_aggregation_is_the_seeds_mean_of_micro_batch_token_means(tok, tiny_model_dir, searcher):
    """--aggregation micro_batch (the seed's): consecutive rows of micro_batch rollouts, each a token mean, then
    the mean over micro-batches. By hand: with mu 1 the loss of a token is -A_t * exp(logp - logp.detach()),
    whose gradient is -A_t * grad logp; micro-batches of 3, 3 and 2 rows."""
    from transformers import AutoModelForCausalLM

    from policy import token_logprobs

    _, _, ids, attn, turn = ragged_batch(tok, tiny_model_dir, searcher)
    A = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    cfg = config.Config(micro_batch=3, G=4, batch_size=8, bf16=False, max_grad_norm=1e9, mu=1, aggregation="micro_batch",
                       temperature=0.9)
    got, _ = gradient(cfg, tiny_model_dir, ids, attn, turn, A)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    logp = token_logprobs(ref_model, ids, attn, turn, bf16=False, temperature=0.9)
    t = turn[:, 1:]
    A_tok = torch.where(t > 0, A.gather(1, (t.clamp(1, 2) - 1)), torch.zeros(()))
    means = [(-(A_tok[r] * logp[r]).sum() / (t[r] > 0).sum()) for r in (slice(0, 3), slice(3, 6), slice(6, 8))]
    (sum(means) / 3).backward()
    want = torch.cat([p.grad.flatten() for _, p in sorted(ref_model.named_parameters())])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # which rows share a micro-batch matters here (not under "token"): the global token mean is another gradient
    token, _ = gradient(dataclasses.replace(cfg, aggregation="token"), tiny_model_dir, ids, attn, turn, A)
    assert (token - got).abs().max() > 1e-3 * got.abs().max()
    one, _ = gradient(dataclasses.replace(cfg, micro_batch=8), tiny_model_dir, ids, attn, turn, A)
    torch.testing.assert_close(one, token, rtol=1e-4, atol=1e-6)  # one micro-batch: the two are the same


def test_the_schedule_is_the_seeds_stepped_per_optimizer_step(tiny_model_dir, tok, searcher):
    """constant_with_warmup over optimizer steps (the seed's): with 4 warm-up steps and mu 2 the four optimizer
    steps of two batches use lr x 0, 1/4, 2/4, 3/4, then lr; the logged lr is the batch's last one."""
    from transformers import AutoModelForCausalLM

    _, _, ids, attn, turn = ragged_batch(tok, tiny_model_dir, searcher)
    cfg = config.Config(micro_batch=4, G=4, batch_size=8, bf16=False, mu=2, lr=1.0, warmup_steps=4)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    accelerator = Accelerator(cpu=True)
    trainer, opt, sched = assemble.prepare(cfg, accelerator, m, 8)
    used = []
    step = opt.step
    opt.step = lambda *a, **k: used.append(opt.param_groups[0]["lr"]) or step(*a, **k)
    logged = [train.update(cfg, trainer, opt, sched, accelerator, Batch(ids, attn, turn, torch.zeros(8, ids.shape[1] - 1)))["lr"]
              for _ in range(3)]
    assert used == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and logged == [0.25, 0.75, 1.0]


def test_the_mismatch_meter_reads_the_samplers_temperature(tok, tiny_model_dir, searcher):
    """The meter compares like with like: sampler log-probs at the sampling temperature (ours) against the
    trainer's at it, ~0; log-probs at temperature 1 (vLLM's raw ones) against the trainer's at 1, through one
    more forward, ~0 too; and the wrong pairing shows."""
    from policy import pack_batch, token_logprobs

    model, trajs, *_ = ragged_batch(tok, tiny_model_dir, searcher)
    packed = pack_batch(trajs, tok.pad_token_id)
    ids, attn, turn, at_sampling = packed.ids, packed.attn, packed.turn, packed.sampler_logp
    with torch.no_grad():
        raw = token_logprobs(model, ids, attn, turn, bf16=False, temperature=1.0)
    raw = torch.where(at_sampling.isfinite(), raw, at_sampling)  # vLLM's: the same ids, at temperature 1
    cfg = config.Config(micro_batch=4, G=4, batch_size=8, bf16=False, lr=0.0, temperature=0.9)

    def meter(sampler_logp, sampler_temperature):
        m = type(model).from_pretrained(tiny_model_dir, dtype=torch.float32)
        accelerator = Accelerator(cpu=True)
        trainer, opt, sched = assemble.prepare(cfg, accelerator, m, 8)
        batch = Batch(ids, attn, turn, torch.zeros(8, ids.shape[1] - 1), sampler_logp=sampler_logp)
        return train.update(cfg, trainer, opt, sched, accelerator, batch,
                            sampler_temperature=sampler_temperature)["mismatch/abs_logp"]

    assert meter(at_sampling, None) < 1e-5 and meter(raw, 1.0) < 1e-5
    assert meter(raw, None) > 1e-2 and meter(at_sampling, 1.0) > 1e-2


# ----------------------------------------------------------------------------- resume
def test_resume_after_kill_is_bit_identical(tmp_path, tiny_model_dir):
    """kill -9 a run after its first checkpoint, resume it: the final parameters equal those of an
    uninterrupted run with the same seed, bit for bit, and metrics.jsonl has every step once."""
    steps = ["--max-steps", "6", "--save-every", "2"]
    full = tmp_path / "full"
    p = run_train(tiny_args(tiny_model_dir, full, *steps))
    assert p.wait(timeout=300) == 0, p.stderr.read()

    cut = tmp_path / "cut"
    p = run_train(tiny_args(tiny_model_dir, cut, *steps))
    kill_after_first_checkpoint(p, cut)
    killed_at = len((cut / "metrics.jsonl").read_text().splitlines())
    assert killed_at < 6

    p = run_train(tiny_args(tiny_model_dir, cut, *steps, "--resume"))
    assert p.wait(timeout=300) == 0, p.stderr.read()

    a = load_file(full / "checkpoint" / "model.safetensors")
    b = load_file(cut / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut] == [1, 2, 3, 4, 5, 6]
    for key in REWARD_KEYS + ("reward_turn", "reward_outcome", "tool_call_rate", "loss"):
        assert [r[key] for r in rows_cut] == [r[key] for r in rows_full], key
    for key in REWARD_KEYS + ("reward_turn", "reward_outcome", "tool_call_rate", "step_seconds", "adv_mean/turn1"):
        assert key in rows_cut[0]
    # the mismatch meter is logged every step: HF samples in fp32, the update runs under bf16 autocast, so
    # it reads bf16's rounding, small but not zero (tests/test_gpu_path.py compares it with fp32 and stale weights)
    assert all(0 < r["mismatch/abs_logp"] < 0.5 and r["mismatch/kl"] >= 0 for r in rows_cut)


# ----------------------------------------------------------------------------- K turns
def test_k_turn_with_one_call_gives_the_two_turn_advantages(tok, searcher):
    """--k-turn with max_tool_calls 1 (K = 2) is the paper's two-turn MT-GRPO on real trajectories."""
    script = [['<tool>{"name": "wiki_search", "args": {"query": "Dracula"}}</tool>', "<answer>Bram Stoker</answer>"],
              ['<tool>{"name": "wiki_search", "args": {"query": "Paris"}}</tool>', "<answer>Lyon</answer>"],
              ["<answer>Bram Stoker</answer>"], ['<tool>{"name": "nope"}</tool>', "<answer>x</answer>"]]
    cfg_env = EnvConfig(max_tool_calls=1, few_shot=False)
    trajs = env.rollout(ScriptedPolicy(tok, script), tok, ["Who wrote Dracula?"], 4, searcher, cfg_env)
    rows = [{"question": "Who wrote Dracula?", "aliases": ["Bram Stoker"]}] * 4
    scores = rewards.compute([t.messages for t in trajs], [r["aliases"] for r in rows])
    for method in ("mt_grpo", "grpo_mr", "grpo_or"):
        two, k = (advantages.turn_advantages(c, advantages.reward_levels(c, scores, trajs, rows)) for c in
                  (config.Config(G=4, method=method, max_tool_calls=1),
                   config.Config(G=4, method=method, max_tool_calls=1, k_turn=True)))
        assert torch.equal(two, k)
    c3 = config.Config(G=4, max_tool_calls=2, k_turn=True)
    three = advantages.turn_advantages(c3, advantages.reward_levels(c3, scores, trajs, rows))
    assert three.shape == (4, 3)  # K = max_tool_calls + 1 columns, one per possible turn


def test_k_turn_training_step_on_two_hop_questions(tmp_path, tiny_model_dir):
    """A real --k-turn run on the two-hop world trains and logs the tool-use metrics and turn 1's mean
    advantage (a tiny random model rarely gets a result back, so later turns may have no tokens)."""
    import data

    world = data.two_hop_world()
    out = tmp_path / "k"
    proc = run_train(tiny_args(tiny_model_dir, out, "--k-turn", "--max-tool-calls", "2", "--max-steps", "1",
                               "--questions", str(world["train"]), "--corpus", str(world["corpus"])))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"calls_per_episode", "answer_found", "tool_call_rate", "reward_turn", "adv_mean/turn1"} <= set(row)
