"""What a run reports as it goes: metrics.jsonl (one JSON object a step), optionally TensorBoard or W&B,
the line each step prints, and the process's peak memory."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
from pathlib import Path

from config import check_report_to


class Logger:
    """metrics.jsonl, and the same rows to TensorBoard (``<out>/tensorboard``) or W&B (``<out>/wandb``).

    W&B runs offline unless the user has set WANDB_MODE: nothing leaves the machine by default, and
    ``wandb sync <out>/wandb/offline-run-*`` uploads a run later. Every step is flushed (a killed run
    keeps its rows), and the backend is closed after the row of the last step, so its files are
    complete when train() returns; ``close()`` does it earlier for a run that stops before that.
    """

    def __init__(self, cfg, out: Path):
        """``cfg``: config.Config (its report_to and max_steps, and for wandb all its fields)."""
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


def peak_rss_gb() -> float:  # this process's peak resident memory so far (Linux reports ru_maxrss in KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


