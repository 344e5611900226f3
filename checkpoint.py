"""What a run leaves on disk: checkpoints that --resume continues bit for bit, and the metrics log.

A checkpoint folder holds the model in ``save_pretrained`` format (loadable by transformers, eval.py and
vLLM) and ``state.pt``: step, optimizer, scheduler and each process's random states. It is written to a
temporary folder and renamed, so a kill mid-save leaves the last good one. A LoRA run (lora.py) saves the
merged model there (so every loader still sees one plain model) and adds what --resume needs: the
adapter (peft's save_pretrained, in ``adapter/``) and ``lora.json`` (the start model and the LoRA flags). ``metrics.jsonl`` gets one
JSON object per step, flushed and fsynced; on resume the rows after the checkpoint are dropped, since
those steps are redone.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType, gather_object
from torch.utils.serialization import config as serialization_config

import lora


class CheckpointError(ValueError):
    """A checkpoint that this run cannot continue; the message names the fix."""


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def save_checkpoint(accelerator, out: Path, trainer, model, tokenizer, optimizer, scheduler, step: int, policy,
                    peft_model=None, lora_record: dict | None = None) -> None:
    """Model (save_pretrained: loadable by transformers and vLLM) + everything --resume needs,
    written to a temporary folder and renamed, so a kill mid-save leaves the last good checkpoint.
    Every process calls it (the RNG states are gathered; DeepSpeed saves collectively); the main
    process writes. ``trainer`` is the prepared LogProbs, ``model`` the plain policy model. Under LoRA,
    ``peft_model`` is the PeftModel around ``model`` and ``lora_record`` goes to lora.json."""
    tmp, main = out / ".checkpoint-tmp", accelerator.is_main_process
    rng = gather_object([{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                          "policy_calls": None if policy is None else policy.calls}])  # one dict per process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = None
    if is_zero3(accelerator):
        # every process holds a shard of each weight: all take part in gathering them, and DeepSpeed hands
        # the consolidated dict to the main process only (None elsewhere, where nothing is written)
        gathered = accelerator.get_state_dict(trainer)
        if main:
            weights = {k.removeprefix("model."): v for k, v in gathered.items()}
    if is_deepspeed(accelerator):  # DeepSpeed partitions the optimizer state: each process saves its part
        accelerator.save_state(str(tmp / "deepspeed"))
    if main:
        if peft_model is not None:  # the merged copy W + scale * B@A under plain names; the adapter beside it
            weights = dict(lora.merged_weights(model))
            peft_model.save_pretrained(tmp / "adapter")
            (tmp / "lora.json").write_text(json.dumps(lora_record, indent=1))
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        # no CRC-32 over the optimizer state (1 GB for SmolLM2): it was half of a CPU checkpoint's time, and
        # a torn write is already excluded by writing to tmp and renaming
        with serialization_config.patch("save.compute_crc32", False):
            torch.save({"step": step, "optimizer": None if is_deepspeed(accelerator) else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
        old = out / ".checkpoint-old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / "checkpoint").exists():
            os.replace(out / "checkpoint", old)
        os.replace(tmp, out / "checkpoint")
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # nobody goes on (or reads the folder) while the main process renames


def load_checkpoint(accelerator, out: Path, optimizer, scheduler, policy) -> int:
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
    rng = rngs[accelerator.process_index]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if policy is not None:
        policy.calls = rng["policy_calls"]  # HFPolicy seeds each generate call from (seed, calls)
    return state["step"]


def truncate_metrics(path: Path, done: int) -> None:
    """Keep the lines of the ``done`` steps the checkpoint holds (rows count steps from 1): the steps
    after it are redone and logged again, so each step appears exactly once."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= done]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)  # atomic: a kill here leaves the old file or the new one


REPORT_TO = ("none", "wandb", "tensorboard")
# the package each --report-to value needs (requirements-extra.txt pins both)
REPORT_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


class ReportError(CheckpointError):
    """A --report-to this run cannot serve. A CheckpointError, so train.main reports it as one line."""


def check_report_to(name: str) -> None:
    """Fail before any heavy work on a --report-to value that is unknown or whose package is missing."""
    if name not in REPORT_TO:
        raise ReportError(f"--report-to {name!r}: choose none, wandb or tensorboard")
    package = REPORT_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ReportError(f"--report-to {name} needs the {package} package: run `make setup` (or pip install -r "
                          f"requirements-extra.txt), or pass --report-to none")


class Logger:
    """metrics.jsonl, and the same rows to TensorBoard (``<out>/tensorboard``) or W&B (``<out>/wandb``).

    W&B runs offline unless the user has set WANDB_MODE: nothing leaves the machine by default, and
    ``wandb sync <out>/wandb/offline-run-*`` uploads a run later. Every step is flushed (a killed run
    keeps its rows), and the backend is closed after the row of the last step, so its files are
    complete when train() returns; ``close()`` does it earlier for a run that stops before that.
    """

    def __init__(self, cfg, out: Path):
        """``cfg``: train.Config (its report_to and max_steps, and for wandb all its fields)."""
        check_report_to(cfg.report_to)
        self.path, self.backend, self.kind, self.last_step = out / "metrics.jsonl", None, cfg.report_to, cfg.max_steps
        if cfg.report_to == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            # a resumed run starts a new W&B run (offline runs cannot be resumed): its first step is the
            # step after the checkpoint, so together the runs hold every step once
            self.backend = wandb.init(project="mt-grpo", name=out.name, config=dataclasses.asdict(cfg), dir=str(out))
        elif cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # on --resume, purge_step drops what an earlier writer logged for the steps about to be redone
            done = len(self.path.read_text().splitlines()) if self.path.exists() else 0
            self.backend = SummaryWriter(str(out / "tensorboard"), purge_step=done + 1 if done else None)

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in row.items() if k != "step"}  # the step is the x axis, not a curve
        if self.kind == "wandb" and self.backend is not None:
            self.backend.log(scalars, step=row["step"])
        elif self.kind == "tensorboard" and self.backend is not None:
            for k, v in scalars.items():
                self.backend.add_scalar(k, v, row["step"])
            self.backend.flush()
        if row["step"] >= self.last_step:
            self.close()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.finish() if self.kind == "wandb" else self.backend.close()
            self.backend = None


def format_line(row: dict) -> str:
    keys = ["tool_execution", "search_answer", "exact_match", "answer_presence", "format", "xml",
            "reward_turn", "reward_outcome", "tool_call_rate", "zero_var_share/outcome", "clip_frac",
            "mismatch/abs_logp", "step_seconds"]
    short = {"tool_execution": "tool", "search_answer": "srch", "exact_match": "em", "answer_presence": "pres",
             "reward_turn": "R_T", "reward_outcome": "R_O", "tool_call_rate": "calls",
             "zero_var_share/outcome": "flat_O", "clip_frac": "clip", "mismatch/abs_logp": "mm", "step_seconds": "s"}
    return f"step {row['step']:>3} " + " ".join(f"{short.get(k, k)}={row[k]:.3f}" for k in keys if k in row)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB); the main process's
    when there are several."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


