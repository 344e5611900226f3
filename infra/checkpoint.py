"""What a run leaves on disk: checkpoints that --resume continues bit for bit.

A checkpoint folder holds the model in ``save_pretrained`` format (loadable by transformers, eval.py and
vLLM) and ``state.pt``: step, optimizer, scheduler and each process's random states. It is written to a
temporary folder and renamed, so a kill mid-save leaves the last good one. A LoRA run (lora.py) saves the
merged model there (so every loader still sees one plain model) and adds what --resume needs: the
adapter (peft's save_pretrained, in ``adapter/``) and ``lora.json`` (the start model and the LoRA flags). On resume
the rows of ``metrics.jsonl`` (infra/tracking.py) after the checkpoint are dropped, since those steps are redone.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.serialization import config as serialization_config

from config import Config, ConfigError
from infra import lora
from infra.launch import is_deepspeed, is_zero3


class CheckpointError(ValueError):
    """A checkpoint that this run cannot continue; the message names the fix."""


def save_checkpoint(accelerator, out: Path, logprobs, model, tokenizer, optimizer, scheduler, step: int, sampler,
                    peft_model=None, cfg: Config | None = None, critic=None) -> None:
    """Model (save_pretrained: loadable by transformers and vLLM) + everything --resume needs,
    written to a temporary folder and renamed, so a kill mid-save leaves the last good checkpoint.
    Every process calls it (the RNG states are gathered; DeepSpeed saves collectively, each process writing
    its own files into the temporary folder); the main process writes the rest and renames the folder once
    every process has finished writing. ``logprobs`` is the prepared LogProbs, ``model`` the plain policy model, ``sampler`` the
    run's (its call count seeds its draws). Under LoRA,
    ``peft_model`` is the PeftModel around ``model``, and lora.json records ``cfg``'s start model and LoRA flags. ``critic``: an estimator's
    own model (MT-PPO's, extensions/estimators.py), saved in state.pt."""
    tmp, main = out / ".checkpoint-tmp", accelerator.is_main_process
    rng = gather_object([{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                          "sampler_calls": None if sampler is None else sampler.calls}])  # one dict per process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = None
    if is_zero3(accelerator):
        # every process holds a shard of each weight: all take part in gathering them, and DeepSpeed hands
        # the consolidated dict to the main process only (None elsewhere, where nothing is written)
        gathered = accelerator.get_state_dict(logprobs)
        if main:
            weights = {k.removeprefix("model."): v for k, v in gathered.items()}
    if is_deepspeed(accelerator):  # DeepSpeed partitions the optimizer state: each process saves its part
        accelerator.save_state(str(tmp / "deepspeed"))
    # Inside save_state every process writes files of its own (its optimizer shard, random_states_<rank>.pkl)
    # and returns when *its* files are written: the folder may move only once every process's have been.
    accelerator.wait_for_everyone()
    if main:
        if peft_model is not None:  # the merged copy W + scale * B@A under plain names; the adapter beside it
            weights = dict(lora.merged_weights(model))
            peft_model.save_pretrained(tmp / "adapter")
            record = {"start_model": cfg.model, "lora": lora.describe(cfg)}
            (tmp / "lora.json").write_text(json.dumps(record, indent=1))
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        # no CRC-32 over the optimizer state (1 GB for SmolLM2): it was half of a CPU checkpoint's time, and
        # a torn write is already excluded by writing to tmp and renaming
        with serialization_config.patch("save.compute_crc32", False):
            torch.save({"step": step, "optimizer": None if is_deepspeed(accelerator) else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rng,
                        "critic": None if critic is None else critic.state_dict()}, tmp / "state.pt")
        old = out / ".checkpoint-old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / "checkpoint").exists():
            os.replace(out / "checkpoint", old)
        os.replace(tmp, out / "checkpoint")
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # nobody goes on (or reads the folder) while the main process renames


def check_resume(cfg: Config) -> None:
    """--resume needs a checkpoint made with the same LoRA flags (before any model is loaded)."""
    if not cfg.resume:
        return
    out = Path(cfg.output_dir)
    if not (out / "checkpoint" / "state.pt").is_file():
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoint (start without --resume)")
    record = lora.read_record(out / "checkpoint")
    if bool(record) != bool(cfg.lora_r):
        raise ConfigError(f"--resume: {out}/checkpoint is a {'LoRA' if record else 'full fine-tuning'} run; "
                          f"pass the flags it was started with ({'--lora-r ' + str(record['lora']['r']) if record else '--lora-r 0'})")
    if record and (record["lora"] != lora.describe(cfg) or record["start_model"] != cfg.model):
        raise ConfigError(f"--resume: {out}/checkpoint was started with --model {record['start_model']} and LoRA "
                          f"{record['lora']}; pass the same flags")


def load_checkpoint(accelerator, out: Path, optimizer, scheduler, sampler, critic=None) -> int:
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older checkpoints: 1 process
    if len(rngs) != accelerator.num_processes:
        raise CheckpointError(f"--resume: {out}/checkpoint was written by {len(rngs)} process(es), this run has "
                          f"{accelerator.num_processes}; launch it as it was launched")
    if is_deepspeed(accelerator):
        accelerator.load_state(str(out / "checkpoint" / "deepspeed"))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        critic.load_state_dict(state["critic"])
    rng = rngs[accelerator.process_index]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if sampler is not None:
        sampler.calls = rng["sampler_calls"]  # a sampler seeds each generate call from (seed, calls)
    return state["step"]


def truncate_metrics(path: Path, done: int) -> None:
    """Keep the lines of the ``done`` steps the checkpoint holds (rows count steps from 1): the steps
    after it are redone and logged again, so each step appears exactly once."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= done]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)  # atomic: a kill here leaves the old file or the new one
