"""What several test modules share: where the real data is, a fake search tool over four passages, a tiny random Llama,
the trajectory invariants every rollout must keep (``check_trajectory``) and a deterministic
"bigram" model. Fixtures built on these are in conftest.py."""
import re

import pytest
import torch

import data
import env
import rewards

SHARED = data.SHARED_DATA
TRIVIAQA = SHARED / "triviaqa" / "questions.jsonl"
WIKI = SHARED / "wiki" / "passages.jsonl.gz"


def need_shared_data():
    """Skip, with the reason printed, where the real data beside the repository is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (it lives beside the repo, never inside it)")

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
        system + few-shot + question + ``messages`` (so the ids were never re-tokenised);
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
    n_results = 0
    for m in t.messages:
        if m["role"] == "user":
            n_results += m["content"].startswith("<result>")
            continue
        k, ids = runs[0] if runs else (None, [])
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        if m["content"] == "" and (not runs or env._decode(tok, ids) != ""):
            continue  # a turn of zero ids (its budget was used up) has no run of its own
        runs.pop(0)
        assert k == 1 + n_results
        assert env._decode(tok, ids) == m["content"]
    assert not runs
    # The whole text is the chat template's rendering: nothing was re-tokenised.
    msgs = prompt_messages(question, cfg)
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(msgs + t.messages, tokenize=False)
    assert env._decode(tok, t.prompt_ids) == prompt_text
    assert env._decode(tok, t.completion_ids) == full_text[len(prompt_text):]


class Recorder:
    """Wraps a policy and records each generate call's batch."""

    def __init__(self, policy):
        self.policy, self.batches = policy, []

    def generate(self, batch, *args):
        self.batches.append([list(row) for row in batch])
        out = self.policy.generate(batch, *args)
        self.last_logprobs = getattr(self.policy, "last_logprobs", None)
        return out


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


def mismatch(model, trajectories, bf16: bool, temperature: float = env.Sampling.temperature) -> tuple[float, float, int]:
    """The sampler-trainer mismatch meter as train.update computes it, for ``model`` as the trainer at the
    sampling ``temperature``: (mean |log p_trainer - log p_sampler|, KL estimate, tokens compared)."""
    from policy import mismatch_sums, pack, pack_sampler_logprobs, token_logprobs

    ids, attn, turn = pack(trajectories, 0)
    sampler = pack_sampler_logprobs(trajectories, ids.shape[1])
    with torch.no_grad():
        trainer = token_logprobs(model, ids, attn, turn, bf16=bf16, temperature=temperature)
    abs_sum, k3, count = mismatch_sums(trainer, sampler, turn[:, 1:] > 0).tolist()
    return abs_sum / count, k3 / count, int(count)


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
