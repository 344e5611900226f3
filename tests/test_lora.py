"""LoRA (lora.py, train.py --lora-r): only the adapter trains, the merged export is the LoRA model, bad
flags fail early, and --resume after a kill -9 continues a LoRA run bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import config
import train
from helpers import REWARD_KEYS, kill_after_first_checkpoint, run_train, tiny_args
from infra import assemble, lora
from infra.launch import validate_launch
from policy import LogProbs, token_logprobs

LORA = ["--lora-r", "4", "--lora-alpha", "8"]


def lora_model(tiny_model_dir, r=4, alpha=8.0):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model, peft_model = lora.wrap(base, r, alpha, config.LORA_TARGETS)
    with torch.no_grad():  # B starts at zero (the update is 0): give it a value, so the merge has work to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, peft_model


def test_only_the_adapter_trains(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every linear projection of every block got an adapter; lm_head (tied to the embedding) did not
    adapted = {n.split(".base_layer")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".base_layer." in n}
    assert adapted == set(config.LORA_TARGETS.split(","))
    opt = assemble.prepare(config.Config(lora_r=4), __import__("accelerate").Accelerator(cpu=True), model, 4)[1]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if p.requires_grad}


def test_token_logprobs_of_the_injected_model_are_the_lora_models(tiny_model_dir, tok):
    """policy.token_logprobs goes through the injected model's decoder (base_model) and lm_head: the same
    numbers as the PeftModel's own forward, and different from the base model's (the adapter is used)."""
    from transformers import AutoModelForCausalLM

    model, peft_model = lora_model(tiny_model_dir)
    ids = torch.randint(3, 1000, (2, 12))
    attn, turn = torch.ones_like(ids), torch.ones_like(ids)
    ours = LogProbs(model, bf16=False)(ids, attn, turn)
    logits = peft_model(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    torch.testing.assert_close(ours, logits.gather(-1, ids[:, 1:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.allclose(ours, token_logprobs(base, ids, attn, turn, bf16=False), atol=1e-3)


def test_merged_export_loads_with_from_pretrained_and_gives_the_lora_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = lora_model(tiny_model_dir)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".base_layer." in n}
    merged = dict(lora.merged_weights(model))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # W untouched
    model.save_pretrained(tmp_path, state_dict=merged)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the export carries the update


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "-1"], "LoRA rank is >= 1"),
    (["--lora-r", "8", "--lora-target-modules", "q_proj,qkv"], "qkv match no linear layer"),
    (["--lora-r", "8", "--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-r", "8", "--lora-dropout", "1"], "--lora-dropout"),
])
def test_bad_lora_flags_are_one_clear_error(tmp_path, capsys, tiny_model_dir, flags, message):
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_model_dir), "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_lora_is_refused_under_zero3():
    class ZeRO3:  # what validate_processes reads of an accelerator
        num_processes = 2
        distributed_type = __import__("accelerate").utils.DistributedType.DEEPSPEED

        class state:
            class deepspeed_plugin:
                zero_stage = 3

    cfg = config.Config(lora_r=8, rollout_backend="vllm", warmstart_steps=0)
    with pytest.raises(config.ConfigError, match="--lora-r is not supported"):
        validate_launch(cfg, ZeRO3())


def test_lora_resume_after_kill_is_bit_identical(tmp_path, tiny_model_dir, capsys):
    """kill -9 a LoRA run after its first checkpoint, resume it: the final adapter and merged model equal
    an uninterrupted run's bit for bit, the metrics too; the checkpoint holds the merged model, the adapter
    and lora.json, and the frozen weights never moved."""
    # a random tiny model earns no reward that varies (zero advantages, no gradient): a one-step warm start
    # moves the adapter off the start model, and --beta's KL to that start model then gives every RL step a
    # gradient, so the resumed steps really train. The warm start needs whole demonstrations: longer turns.
    # float32: the resume is what is tested, and bf16 runs this test 2x slower on a CPU without bf16 units.
    steps = [*LORA, "--max-steps", "6", "--save-every", "2", "--warmstart-steps", "1", "--warmstart-lr", "1e-2",
             "--max-turn-tokens", "64", "--max-completion-tokens", "300", "--beta", "0.1", "--no-bf16"]
    full = tmp_path / "full"
    p = run_train(tiny_args(tiny_model_dir, full, *steps))
    assert p.wait(timeout=300) == 0, p.stderr.read()

    cut = tmp_path / "cut"
    p = run_train(tiny_args(tiny_model_dir, cut, *steps))
    kill_after_first_checkpoint(p, cut)
    assert len((cut / "metrics.jsonl").read_text().splitlines()) < 6
    p = run_train(tiny_args(tiny_model_dir, cut, *steps, "--resume"))
    assert p.wait(timeout=300) == 0, p.stderr.read()

    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(full / "checkpoint" / name), load_file(cut / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    adapter = load_file(full / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # it trained
    record = json.loads((full / "checkpoint" / "lora.json").read_text())
    assert record == {"start_model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8.0, "target_modules":
                      config.LORA_TARGETS.split(","), "dropout": 0.0}}
    merged, start = load_file(full / "checkpoint" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert merged.keys() == start.keys()  # a plain model under plain names
    assert torch.equal(merged["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    rows_full = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_cut] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 for r in rows_full)
    for key in REWARD_KEYS + ("reward_turn", "reward_outcome", "tool_call_rate", "loss", "grad_norm", "kl"):
        assert [r[key] for r in rows_cut] == [r[key] for r in rows_full], key
    # resuming with other LoRA flags, or without them, is refused before any work
    assert train.main(tiny_args(tiny_model_dir, cut, *steps[2:], "--max-steps", "7", "--resume")) == 2
    assert "is a LoRA run" in capsys.readouterr().err
    assert train.main(tiny_args(tiny_model_dir, cut, *steps, "--lora-r", "8", "--max-steps", "7", "--resume")) == 2
    assert "pass the same flags" in capsys.readouterr().err
