"""warmstart.py: demonstrations are real episodes of the environment (same ids, same turn split as
RL trains on), never teach a guess, and a few supervised steps lower their loss."""
import pytest
import torch

import rewards
from data import DataError
from extensions import warmstart
from helpers import WARMSTART_CFG as CFG
from helpers import WARMSTART_QUESTIONS as QUESTIONS


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
