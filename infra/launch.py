"""How a run is launched: one plain process, or several through accelerate (DDP, DeepSpeed), and what that changes.

The global batch stays ``batch_size`` rollouts, question-major; process p samples and trains on the contiguous
rows [p*n, (p+1)*n), n = batch_size / processes, so the G rollouts of one question may be split between
processes (train.py gathers the trajectories and normalises each group whole).
"""
from __future__ import annotations

import importlib.util
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from config import Config, ConfigError


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator of this launch: one plain process, DDP (MULTI_GPU / MULTI_CPU) or DeepSpeed."""
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    if deepspeed and importlib.util.find_spec("deepspeed") is None:  # `make train` installs requirements.txt alone
        raise ConfigError("this launch config uses DeepSpeed, which is not installed: run `make setup` (or "
                          "DS_BUILD_OPS=0 pip install -r requirements-extra.txt)")
    # Without CUDA the processes join over gloo: DeepSpeed's CPU accelerator would ask for oneCCL, which a
    # plain machine does not have. The timeout covers every collective of the run (see dist_timeout_minutes).
    init = InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    # cpu=True only for DDP on a machine without CUDA: accelerate marks processes as CPU ones only when it
    # starts them with mpirun, and configs/cpu_2proc.yaml uses torchrun. Under DeepSpeed it must stay False,
    # or accelerate silently drops DeepSpeed and runs plain MULTI_CPU.
    # A plain `python train.py` has no process group (a backend named here would make accelerate expect
    # one); accelerate launch and torchrun set LOCAL_RANK, even for a single DeepSpeed process.
    launched = "LOCAL_RANK" in os.environ
    return Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=[init] if launched else [])


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def validate_launch(cfg: Config, accelerator) -> int:
    """What depends on how the run was launched (number of processes, DeepSpeed); returns the rows each process
    samples and trains on."""
    P = accelerator.num_processes
    if cfg.batch_size % P:
        raise ConfigError(f"--batch-size {cfg.batch_size} must split evenly over the {P} processes: each samples "
                          f"and trains on batch_size / {P} rollouts (under ZeRO-3 they must run equal forwards)")
    if is_zero3(accelerator):
        # ZeRO-3 shards every weight over the processes. HF generate would all-gather each layer for every
        # sampled token, on every process in lock-step; the seed samples with vLLM on a GPU of its own.
        if cfg.rollout_backend != "vllm":
            raise ConfigError("DeepSpeed ZeRO-3 needs --rollout-backend vllm: HF generate cannot sample from "
                              "sharded weights at a usable speed (use configs/ddp_8gpu.yaml for HF sampling)")
        if cfg.warmstart_steps:
            raise ConfigError("DeepSpeed ZeRO-3: pass --warmstart-steps 0 (the warm start trains the unsharded "
                              "model; run it in a 1-process run and pass that checkpoint as --model)")
        if cfg.lora_r:
            raise ConfigError("DeepSpeed ZeRO-3: --lora-r is not supported (the LoRA merge for the vLLM sync and "
                              "the checkpoint reads whole weights, which ZeRO-3 shards); use DDP, or --lora-r 0")
        if cfg.method == "mt_ppo" or cfg.turn_reward == "info_gain":
            raise ConfigError(f"DeepSpeed ZeRO-3: --method {cfg.method} --turn-reward {cfg.turn_reward} reads the "
                              "policy's hidden states outside the update, which ZeRO-3 shards; use DDP")
        if cfg.beta > 0:
            raise ConfigError("DeepSpeed ZeRO-3: --beta > 0 needs a reference model, which this loop does not "
                              "shard; use --beta 0 (the seed's) or DDP")
    return cfg.batch_size // P


def process_rows(batch_size: int, num_processes: int, process_index: int) -> slice:
    """The rows of the global question-major batch that one process samples and trains on: a contiguous,
    equal share. It may start or end inside a group of G; groups are normalised on the whole batch."""
    n = batch_size // num_processes
    return slice(process_index * n, (process_index + 1) * n)


def sample_seed(seed: int, process_index: int) -> int:
    """Each process's sampling stream (a sampler seeds each call from it). Process 0 keeps ``seed``, so a
    1-process run samples exactly as before; the others are a large prime apart, far beyond any call count."""
    return seed + 1_000_003 * process_index
