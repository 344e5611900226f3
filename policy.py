"""The policy model as the training loop sees it: loading, packing trajectories into tensors, and
per-token log-probabilities of the tokens the model wrote."""
from __future__ import annotations

import importlib.util

import torch

import data


def load_policy(model_path: str | None, gradient_checkpointing: bool = False, flash_attention: bool = False):
    """(model, tokenizer) in float32 (bf16 comes from autocast); None = the embedded SmolLM2-135M.

    flash_attention: use flash-attn 2 where it can run (the flash_attn package is installed and CUDA is
    there), else transformers' default attention. Pass it only when every forward runs under 16-bit
    autocast: flash-attn has no float32 kernel, and our weights stay float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path or data.embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    attention = {}
    if flash_attention and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        attention["attn_implementation"] = "flash_attention_2"  # find_spec: checked without importing it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attention)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def pack(trajectories, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, turn_idx), each (N, L): prompt + completion ids.
    turn_idx is 0 on prompt, environment and padding tokens and k on the model's k-th turn."""
    L = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    ids = torch.full((len(trajectories), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajectories), L), dtype=torch.long)
    turn = torch.zeros((len(trajectories), L), dtype=torch.long)
    for i, t in enumerate(trajectories):
        seq = list(t.prompt_ids) + list(t.completion_ids)
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        turn[i, len(t.prompt_ids):len(seq)] = torch.tensor(t.turn_idx, dtype=torch.long)
    return ids, attn, turn


class LogProbs(torch.nn.Module):
    """token_logprobs as a module's forward. DDP and DeepSpeed hook their work into the forward of the
    module they wrap (DDP readies its gradient all-reduce, ZeRO-3 gathers each layer's shards), and
    token_logprobs calls the model's parts (base_model, output embeddings) rather than its forward: so
    the training loop hands accelerate this module, whose forward is the whole computation."""

    def __init__(self, model, bf16: bool = True):
        super().__init__()
        self.model, self.bf16 = model, bf16
        self.config = model.config  # accelerate's DeepSpeed set-up reads hidden_size from it ("auto" buckets)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.model, ids, attn, turn, self.bf16)


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, turn: torch.Tensor, bf16: bool = True) -> torch.Tensor:
    """log pi(x_t | x_<t) at every position t >= 1, shape (N, L-1); 0 where turn_idx is 0.

    Only the model's own tokens need a log-prob, so the vocabulary projection (the largest
    matmul: 49k x 576 for SmolLM2) runs on those positions alone, not on the prompt and padding.
    """
    device = ids.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        sel = turn[:, 1:] > 0
        logits = model.get_output_embeddings()(hidden[sel]).float()
    logp_sel = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:][sel][:, None]).squeeze(-1)
    return torch.zeros(sel.shape, dtype=logp_sel.dtype, device=ids.device).masked_scatter(sel, logp_sel)
