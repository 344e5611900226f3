"""LoRA through peft (Hu et al. 2021): the policy trains a low-rank update B @ A beside each frozen
target projection W, and the rest of the code sees one plain transformers model.

    python train.py --lora-r 16 --lora-alpha 32 --lr 2e-4     # config.Config: lora_r, lora_alpha, ...

Two objects, one set of weights. ``peft.get_peft_model`` injects LoRA layers into the transformers model
in place and wraps it in a PeftModel. Training, sampling, the warm start and the weight sync use the
injected transformers model (``PeftModel.get_base_model()``): policy.token_logprobs calls its
``base_model`` (the decoder, as for any causal LM; a PeftModel's own ``base_model`` would be peft's
LoraModel, whose forward returns logits) and its output embeddings. The PeftModel is kept only to save
and load the adapter.

What leaves the process is merged: ``merged_weights`` computes W + scale * B @ A per target as a new
tensor, under the plain transformers names (``...q_proj.weight``), for the vLLM sync and the checkpoint's
``save_pretrained`` model. It never calls peft's merge_adapter/unmerge_adapter, which add the update into
W in place and subtract it later: that rounds the frozen W a little every step (it drifts), and a forward
between the two would apply the adapter twice. Why merged weights rather than vLLM's LoRA serving:
DEVIATIONS.md, item 19.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ADAPTER = "default"  # peft's name for the one adapter


def target_list(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def unmatched_targets(model, targets: str) -> list[str]:
    """The target names that name no nn.Linear of ``model`` (matched like peft matches a plain name: the
    last part of a module's dotted name). A meta-device model, built from the config, is enough."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [t for t in target_list(targets) if t not in names]


def check_targets(model_path, targets: str) -> str | None:
    """What is wrong with ``targets`` for the model at ``model_path``, as one message, or None: an empty list,
    or names that match no linear layer (checked on the model built from its config on the meta device, no
    weights read), since peft skips a target that matches nothing as long as another one matches."""
    if not target_list(targets):
        return "--lora-target-modules is empty: name the projections to adapt, e.g. q_proj,v_proj"
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except OSError:
        return None  # a hub name this machine cannot reach: peft's own check runs at load time
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model_config)
    missing = unmatched_targets(meta, targets)
    if not missing:
        return None
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)})
    return (f"--lora-target-modules: {', '.join(missing)} match no linear layer of the model "
            f"(its linear layers: {', '.join(linear)})")


def wrap(model, r: int, alpha: float, targets: str, dropout: float = 0.0):
    """(injected transformers model, PeftModel): fresh LoRA layers (A random, B zero: the model's output
    is unchanged at first); only the adapter's parameters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_list(targets), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    return peft_model.get_base_model(), peft_model


def load(model, adapter_dir: Path):
    """(injected transformers model, PeftModel) with the saved adapter on the *start* model, trainable:
    what --resume continues (never the merged checkpoint model, which already holds the update)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return peft_model.get_base_model(), peft_model


def is_lora(model) -> bool:
    if "peft" not in sys.modules:  # no LoRA layer can exist without peft loaded; a full run never imports it
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters an optimizer gets: all of them, or under LoRA only the adapter's."""
    return [p for p in model.parameters() if p.requires_grad]


def merged_weights(model):
    """(transformers name, tensor) of the merged model, one tensor at a time: W + scale * B @ A for each
    LoRA target (peft's get_delta_weight computes scale * B @ A as a new tensor), the frozen tensors
    as they are; the adapter's own tensors are not sent. A tied lm_head appears once, as the embedding
    (named_parameters drops the repeat), like vllm_backend._named_weights does."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                continue
            if ".base_layer." in name:
                owner, part = name.split(".base_layer.")
                if part == "weight":
                    yield f"{owner}.weight", p.detach() + layers[owner].get_delta_weight(ADAPTER).to(p.dtype)
                else:
                    yield f"{owner}.{part}", p.detach()
            else:
                yield name, p.detach()


def describe(cfg) -> dict:
    """What a checkpoint records of the LoRA run, and --resume checks: config.Config's LoRA fields."""
    return {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": target_list(cfg.lora_target_modules),
            "dropout": cfg.lora_dropout}


def read_record(checkpoint_dir: Path) -> dict | None:
    """checkpoint/lora.json (start model and LoRA settings), None for a full fine-tuning checkpoint."""
    path = Path(checkpoint_dir) / "lora.json"
    return json.loads(path.read_text()) if path.is_file() else None
