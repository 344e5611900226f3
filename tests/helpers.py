"""What several test modules share: where the real data is, a fake search tool over four passages, a tiny random Llama,
the trajectory invariants every rollout must keep (``check_trajectory``) and a deterministic
"bigram" model. Fixtures built on these are in conftest.py."""
import math
import re

import pytest
import torch

import data
import env
import rewards
from config import EnvConfig, Sampling
from policy import Sampler

SHARED = data.SHARED_DATA
TRIVIAQA = SHARED / "triviaqa" / "questions.jsonl"
WIKI = SHARED / "wiki" / "passages.jsonl.gz"


def need_shared_data():
    """Skip, with the reason printed, where the real data beside the repository is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (it lives beside the repo, never inside it)")

# TRL-style questions (a prompt and its aliases) and the episodes a ScriptedPolicy plays for them, question-major,
# G = 4 a question: good search and answer; good search, wrong answer; bad search, right answer; no search at
# all. R^T and R^O disagree within each group, so MT-GRPO's two turns get different advantages.
# (tests/test_trl.py and tests/trl_worker.py)
TRL_QUESTIONS = [{"prompt": "Who wrote Dracula?", "aliases": ["Bram Stoker"]},
                 {"prompt": "Which river runs through Paris?", "aliases": ["Seine", "the Seine"]}]


def search_turn(query: str) -> str:
    return f"<reasoning>I will search.</reasoning>\n<tool>{env.tool_command(query)}</tool>"


def answer_turn(text: str) -> str:
    return f"<reasoning>So.</reasoning>\n<answer>{text}</answer>"


TRL_SCRIPTS = [[search_turn("Dracula novel author"), answer_turn("Bram Stoker")],
               [search_turn("Dracula novel author"), answer_turn("Paris")],
               [search_turn("Everest"), answer_turn("Bram Stoker")], [answer_turn("I do not know")],
               [search_turn("Paris capital France Seine"), answer_turn("Seine")],
               [search_turn("Paris capital France Seine"), answer_turn("Rhine")],
               [search_turn("Dracula"), answer_turn("the Seine")], [answer_turn("Seine")]]

FAKE_PASSAGES = [
    {"id": "p0", "title": "Dracula", "text": "Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker."},
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine."},
    {"id": "p2", "title": "Mount Everest", "text": "Mount Everest is Earth's highest mountain above sea level."},
    {"id": "p3", "title": "Bram Stoker", "text": "Abraham Stoker was an Irish novelist, best known for Dracula."},
]


class FakeSearcher:
    """Word-overlap search with search.load_index's interface: ``search(query, k)`` ->
    ``[{"id", "title", "text", "score"}]`` best first (ties: the earlier passage). Records queries."""

    def __init__(self, passages=None):
        self.passages, self.queries = passages if passages is not None else FAKE_PASSAGES, []

    def search(self, query, k=1):
        self.queries.append(query)
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", (p["title"] + " " + p["text"]).lower()))), -i)
                  for i, p in enumerate(self.passages)]
        return [dict(self.passages[-i], score=float(s)) for s, i in sorted(scored, reverse=True)[:k] if s > 0]


# Three questions for the warm start over FAKE_PASSAGES: two answers a search finds, one (the Mona Lisa) it does not
WARMSTART_QUESTIONS = [{"question": "Who wrote Dracula?", "answer": "Bram Stoker", "aliases": ["Bram Stoker"]},
                       {"question": "Which river flows through Paris?", "answer": "Seine", "aliases": ["Seine", "the Seine"]},
                       {"question": "Who painted the Mona Lisa?", "answer": "Leonardo", "aliases": ["Leonardo"]}]
WARMSTART_CFG = EnvConfig(max_turn_tokens=80, max_completion_tokens=400, few_shot=False)


def tiny_llama(tok, hidden: int = 64, layers: int = 2, kv_heads: int = 4, seed: int = 0, **config):
    """A random Llama with the real vocabulary (4 heads; ``config`` adds or overrides LlamaConfig fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = {"vocab_size": len(tok), "intermediate_size": 2 * hidden, "max_position_embeddings": 4096, **config}
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=kv_heads, **config)).eval()


# ----------------------------------------------------------------------------- trajectories
def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_messages(question, cfg):
    """The seed's prompt: system prompt, then the user turn ``Question: {question}`` and a newline."""
    return ([{"role": "system", "content": env.SYSTEM_PROMPT}] + (env.FEW_SHOT if cfg.few_shot else [])
            + [{"role": "user", "content": f"Question: {question}\n"}])


def check_trajectory(t, tok, question, cfg):
    """The invariants every trajectory must satisfy, whatever policy wrote it:
      - ``completion_ids`` and ``turn_idx`` have the same length; environment ids are turn 0, the ids of
        the model's k-th turn are turn k and decode to the k-th assistant message;
      - ``decode(prompt_ids + completion_ids)`` is exactly the chat template's rendering of
        system + few-shot + question + ``messages`` (so the ids were never re-tokenised), each message as its ids
        say (a model message's text drops what its last id overhangs past a stop string: env.message_text);
      - the completion fits ``max_completion_tokens``."""
    assert len(t.completion_ids) == len(t.turn_idx)
    assert len(t.completion_ids) <= cfg.max_completion_tokens
    model_msgs = [m["content"] for m in t.messages if m["role"] == "assistant"]
    assert len(t.tool_calls) == len(model_msgs)
    assert t.tool_calls == [rewards.parse(c)["tool"] for c in model_msgs]
    assert [m["role"] for m in t.messages][::2] == ["assistant"] * len(model_msgs)  # they alternate
    assert len(t.results) == sum(m["role"] == "user" and m["content"].startswith("<result>") for m in t.messages)
    # Model turn k is what the model writes after k-1 tool results (the seed's split at the first
    # <result>): turns are non-decreasing, and each assistant message is one contiguous run of ids
    # that decodes to it, numbered 1 + the <result> replies before it.
    nonzero = [k for k in t.turn_idx if k]
    assert nonzero == sorted(nonzero)
    runs, p = [], 0
    while p < len(t.turn_idx):
        if t.turn_idx[p] == 0:
            p += 1
            continue
        q = p
        while q < len(t.turn_idx) and t.turn_idx[q] == t.turn_idx[p] and (q == p or t.turn_idx[q - 1] != 0):
            q += 1
        runs.append((t.turn_idx[p], t.completion_ids[p:q]))
        p = q
    n_results, as_ids = 0, []  # as_ids: the messages as their ids say (overhangs kept)
    for m in t.messages:
        if m["role"] == "user":
            n_results += m["content"].startswith("<result>")
            as_ids.append(m)
            continue
        k, ids = runs[0] if runs else (None, [])
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        if m["content"] == "" and (not runs or env._decode(tok, ids) != ""):
            as_ids.append(m)
            continue  # a turn of zero ids (its budget was used up) has no run of its own
        runs.pop(0)
        assert k == 1 + n_results
        assert env.message_text(env._decode(tok, ids)) == m["content"]
        as_ids.append({"role": "assistant", "content": env._decode(tok, ids)})
    assert not runs
    # The whole text is the chat template's rendering: nothing was re-tokenised.
    msgs = prompt_messages(question, cfg)
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(msgs + as_ids, tokenize=False)
    assert env._decode(tok, t.prompt_ids) == prompt_text
    assert env._decode(tok, t.completion_ids) == full_text[len(prompt_text):]


class Recorder(Sampler):
    """Wraps a sampler and records each generate call's batch."""

    def __init__(self, policy):
        self.policy, self.batches = policy, []

    def start_rollout(self):
        self.policy.start_rollout()

    def generate(self, batch, *args):
        self.batches.append([list(row) for row in batch])
        out = self.policy.generate(batch, *args)
        self.last_logprobs = self.policy.last_logprobs
        return out

    def end_rollout(self):
        self.policy.end_rollout()


def make_bigram(model, chain):
    """Turn an untied Llama into one that writes chain[token] after token: the layers are zeroed (the
    residual stream is the embedding), each source token gets its own basis vector and the lm-head
    row of its successor points at it. Lets generate() produce stop strings and EOS on demand."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for j, (src, dst) in enumerate(chain.items()):
            model.model.embed_tokens.weight[src, j] = 1.0
            model.lm_head.weight[dst, j] = 10.0
    return model


def mismatch(model, trajectories, bf16: bool, temperature: float = Sampling.temperature) -> tuple[float, float, int]:
    """The sampler-trainer mismatch meter as train.update computes it, for ``model`` as the trainer at the
    sampling ``temperature``: (mean |log p_trainer - log p_sampler|, KL estimate, tokens compared)."""
    from policy import mismatch_sums, pack_batch, token_logprobs

    packed = pack_batch(trajectories, 0)
    ids, attn, turn, sampler = packed.ids, packed.attn, packed.turn, packed.sampler_logp
    with torch.no_grad():
        trainer = token_logprobs(model, ids, attn, turn, bf16=bf16, temperature=temperature)
    abs_sum, k3, count = mismatch_sums(trainer, sampler, turn[:, 1:] > 0).tolist()
    return abs_sum / count, k3 / count, int(count)


REWARD_KEYS = tuple(rewards.REWARD_MAX)


def tiny_args(model_dir, out, *extra) -> list[str]:
    """train.py flags for a few-second run of a tiny model (``tiny_model_dir``) on the demo world."""
    return ["--model", str(model_dir), "--output-dir", str(out), "--G", "2", "--batch-size", "4",
            "--micro-batch", "2", "--max-turn-tokens", "12", "--max-completion-tokens", "90",
            "--warmstart-steps", "0", "--sample-every", "0", "--threads", "1", "--lr", "1e-3", *extra]


def run_train(args, **kw):
    """train.py in a child process (the resume tests kill it)."""
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.Popen([sys.executable, "train.py", *args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def kill_after_first_checkpoint(proc, out) -> None:
    """SIGKILL a training process once its first checkpoint is on disk, mid-run (the resume tests)."""
    import os
    import signal
    import time

    deadline = time.time() + 300
    while not (out / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-way"


# ----------------------------------------------------------------------------- a designed next-token distribution
# The sampling contract (Sampling) is tested on every sampler with a model whose next-token logits are known.
SEED_SAMPLING = Sampling(temperature=0.9, top_k=50, top_p=1.0)
VOCAB = 200  # ids the SmolLM2 tokenizer decodes, few enough to count every one
SOURCE = 7   # the prompt's last id; what comes before it does not matter (every layer is zeroed)
PROMPT = [5, SOURCE]


def designed_logits() -> torch.Tensor:
    """A next-token distribution wide enough that both the cut and the temperature matter: logits spread evenly
    over 16 nats in a shuffled order, the 50 kept ones over 4 (the EOS id and the end-of-turn id out of reach)."""
    logits = torch.linspace(8.0, -8.0, VOCAB)[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))]
    logits[[0, 1, 2]] = -30.0  # <|endoftext|>, <|im_start|>, <|im_end|>: never drawn, so every row is one id
    return logits


def designed_model(tok, logits: torch.Tensor, hidden: int = 64):
    """A one-layer Llama over the first VOCAB ids whose next-token logits after SOURCE are about ``logits``:
    every layer zeroed (the residual stream is the embedding), SOURCE's embedding a basis vector, the head
    reading ``logits`` off it (make_bigram's construction, with any logits)."""
    model = tiny_llama(tok, hidden=hidden, layers=1, vocab_size=VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[SOURCE, 0] = 1.0
        hidden = model.config.hidden_size
        # RMSNorm scales the basis vector e_0 to sqrt(hidden): divide it out of the head
        model.lm_head.weight[:, 0] = logits / math.sqrt(hidden)
    return model.eval()


def truncated(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution the contract asks for: tempered, top-k cut, renormalised."""
    p = torch.softmax(logits.double() / s.temperature, -1)
    if s.top_k:
        p = torch.where(p >= p.topk(s.top_k).values[-1], p, torch.zeros_like(p))
    return p / p.sum()


def chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's statistic over the ids of positive probability (any draw of an id of probability 0 is inf)."""
    n = counts.sum()
    if (counts[p == 0] > 0).any():
        return float("inf")
    kept = p > 0
    expected = n * p[kept]
    return float(((counts[kept] - expected) ** 2 / expected).sum())


def draw_counts(sampler, n: int, s: Sampling, rows_per_call: int = 1000) -> tuple[torch.Tensor, list[float]]:
    counts, logprobs = torch.zeros(VOCAB, dtype=torch.float64), []
    for _ in range(n // rows_per_call):
        if hasattr(sampler, "start_rollout"):
            sampler.start_rollout()  # as env.rollout does: a fresh cache store
        rows = sampler.generate([PROMPT] * rows_per_call, 1, s, [])
        for row, lp in zip(rows, sampler.last_logprobs):
            counts[row[0]] += 1
            logprobs.append(lp[0])
    return counts, logprobs


# ----------------------------------------------------------------------------- a run's metrics
def fake_run(folder, shift: float, steps: int = 4, mismatch: bool = False):
    """A metrics.jsonl as train.py writes it (the keys it logs), with made-up values."""
    import json

    folder.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, **{k: shift + 0.01 * s for k in ("tool_execution", "search_answer", "answer_presence",
                                                             "exact_match", "format", "xml", "reward_turn",
                                                             "reward_outcome", "tool_call_rate", "clip_frac")},
               "zero_var_share/turn": 0.5, "zero_var_share/outcome": shift, "loss": 0.1, "grad_norm": float("nan")}
        if mismatch:
            row.update({"mismatch/abs_logp": 0.01 * s, "mismatch/kl": 0.001 * s})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
