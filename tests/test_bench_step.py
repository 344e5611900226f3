"""bench/bench_step.py: the FLOP formula agrees with torch's own FLOP counter, and the episode
config really gives two model turns of the requested length (what the TRL comparison relies on)."""
from __future__ import annotations

import bench_step  # bench/ is on the path (pytest.ini)
from torch.utils.flop_counter import FlopCounterMode

import env
import train
from common import save_random_llama, synthetic_batch
from policy import HFPolicy, load_policy, pack, token_logprobs


def test_update_flops_matches_torch_flop_counter(tmp_path, tok):
    """One forward+backward of token_logprobs per micro-batch, cut as train.update cuts them, counted
    by FlopCounterMode, equals the analytic count within 1%. Eager attention, because the counter
    does not see CPU SDPA kernels; eager runs the same L x L products as plain matmuls."""
    model, _ = load_policy(str(save_random_llama(tmp_path / "m", hidden=128, layers=2)))
    model.set_attn_implementation("eager")
    ids, attn, turn = synthetic_batch(tok, rows=5)
    chunks = train.micro_batches(attn, 2)
    assert len({L for _, L in chunks}) == 3  # three micro-batches of different lengths
    with FlopCounterMode(display=False) as counter:
        for rows, L in chunks:
            token_logprobs(model, ids[rows, :L], attn[rows, :L], turn[rows, :L], bf16=False).sum().backward()
    counted, formula = counter.get_total_flops(), bench_step.update_flops(model, attn, turn, 2)["total"]
    assert abs(counted - formula) / counted < 0.01, (counted, formula)


def test_episode_config_gives_two_full_turns(tiny_model, tok, searcher):
    """A random model never answers nor calls the tool: each episode is turn 1 (T tokens), the
    format reminder, turn 2 (T tokens), then the close."""
    cfg = bench_step.episode_config(tok, turn_tokens=6)
    trajs = env.rollout(HFPolicy(tiny_model, tok, seed=0), tok, ["Who wrote Dracula?"], 2, searcher, cfg)
    for t in trajs:
        assert [m["role"] for m in t.messages] == ["assistant", "user", "assistant"]
        assert t.messages[1]["content"] == env.NO_TOOL_REPLY and t.truncated
        assert t.model_tokens == 12
        assert len(t.completion_ids) == cfg.max_completion_tokens
    _, _, turn = pack(trajs, tok.pad_token_id)
    assert int((turn > 0).sum()) == 24
