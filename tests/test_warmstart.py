"""warmstart.py: demonstrations are real episodes of the environment (same ids, same turn split as
RL trains on), never teach a guess, and a few supervised steps lower their loss."""
import pytest
import torch

import env
import rewards
import warmstart
from data import DataError

QUESTIONS = [{"question": "Who wrote Dracula?", "answer": "Bram Stoker", "aliases": ["Bram Stoker"]},
             {"question": "Which river flows through Paris?", "answer": "Seine", "aliases": ["Seine", "the Seine"]},
             {"question": "Who painted the Mona Lisa?", "answer": "Leonardo", "aliases": ["Leonardo"]}]
CFG = env.EnvConfig(max_turn_tokens=80, max_completion_tokens=400, few_shot=False)


def test_demonstrations_follow_the_protocol_and_never_guess(tok, searcher):
    demos = warmstart.demonstrations(tok, searcher, QUESTIONS, CFG)
    # The fake corpus has nothing on the Mona Lisa: that demonstration would teach a guess, so it is dropped.
    assert len(demos) == 2
    for t, q in zip(demos, QUESTIONS[:2]):
        scores = rewards.compute([t.messages], [q["aliases"]])
        assert {k: v[0] for k, v in scores.items()} == pytest.approx(rewards.REWARD_MAX)  # a perfect episode
        assert t.has_result and set(t.turn_idx) == {0, 1, 2}  # turn 1 searches, turn 2 answers


def test_a_few_steps_lower_the_loss(tok, tiny_model, searcher):
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    torch.manual_seed(0)
    out = warmstart.run(model, tok, searcher, QUESTIONS, CFG, steps=5, lr=1e-3, batch=2, micro_batch=1, bf16=False)
    assert out["demonstrations"] == 2 and out["last_loss"] < out["first_loss"] - 0.5


def test_no_usable_demonstration_is_a_clear_error(tok, searcher):
    with pytest.raises(DataError, match="warmstart-steps 0"):
        warmstart.run(None, tok, searcher, QUESTIONS[2:], CFG, steps=1)


def test_the_shared_system_prompt_is_computed_once_with_the_same_loss_and_gradients(tok, searcher, monkeypatch):
    """token_loss forwards the system prompt all rows share once (policy.common_head): in fp32 its loss
    and every gradient equal the plain per-row forward's; a head a few ids too long (into the question) does not."""
    import policy
    from helpers import tiny_llama

    demos = warmstart.demonstrations(tok, searcher, QUESTIONS, CFG)
    ids, attn, turn = policy.pack(demos, tok.pad_token_id)
    head = policy.common_head(ids, turn)
    prompt = len(demos[0].prompt_ids)
    assert 20 < head < prompt and ids[0, head] != ids[1, head]  # the system prompt, not the question

    def loss_and_grads(shared: bool):
        model = tiny_llama(tok, kv_heads=2)
        if not shared:
            monkeypatch.setattr(warmstart, "common_head", lambda ids, turn: 0)
        loss = warmstart.token_loss(model, ids, attn, turn, bf16=False)
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (plain, g_plain), (shared, g_shared) = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_shared, g_plain))
    # a few ids too long, and the rows still made to share them: the second row reads the first's question ids
    monkeypatch.setattr(warmstart, "common_head", lambda ids, turn: head + 4)
    monkeypatch.setattr(policy, "prompt_groups", lambda ids, lens: torch.zeros(len(ids), dtype=torch.long))
    wrong = warmstart.token_loss(tiny_llama(tok, kv_heads=2), ids, attn, turn, bf16=False)
    assert (wrong - plain).abs() > 1e-4
