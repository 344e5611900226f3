"""SPEED PATH. Nothing in this package is part of the algorithm: skip it on a first reading.

The reference path of a training step is policy.HFPolicy (transformers' generate) for the rollouts and
policy.token_logprobs for the update. On a CPU both redo work a rollout makes avoidable, and this package
does the same computations without it:

  fast.sampler.CachedPolicy           the rollouts: a decode loop that computes each prompt's KV cache once for
                                      its G rollouts and carries each row's cache from one message to the next,
                                      on a bf16 copy of the weights, every forward written out for a CPU
                                      (oneDNN's weight layout and fused operations: fast.sampler.CpuForward)
  fast.shared_prefix.shared_prefix_logprobs
                                      the update: one packed forward that computes each distinct prompt once
                                      and no padding, with the same log-probs and gradients

They compute the same numbers as the reference path, up to floating-point rounding: tests/test_fast.py pins
the samplers' log-probs and greedy ids, the fused forward's logits and the update's log-probs and gradients
to the reference ones. train.py chooses them in one marked place (`speed_path`, switched by --fast, on by
default); with --no-fast, or without this package, every step runs on the reference path. TRY NOT TO
MODIFY this package while changing the algorithm: the algorithm lives in the top-level modules.
"""
from fast.sampler import CachedPolicy, CpuForward
from fast.shared_prefix import common_head, common_head_logprobs, prompt_groups, shared_prefix_logprobs

__all__ = ["CachedPolicy", "CpuForward", "common_head", "common_head_logprobs", "prompt_groups", "shared_prefix_logprobs"]
