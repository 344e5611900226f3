"""Beyond the paper: what the field does besides MT-GRPO, and MT-GRPO where users already train.

    estimators.py    GiGPO and MT-PPO, the field's other turn-level estimators (--method gigpo | mt_ppo)
    turn_rewards.py  turn rewards from a model: information gain, an LM judge (--turn-reward)
    warmstart.py     the cold start: a few supervised steps on protocol demonstrations before RL (not the seed's)
    trl_mt_grpo.py   MT-GRPO inside TRL's GRPOTrainer

Each plugs in behind advantages.py or infra/assemble.py; none is on the paper's path through train.py.
"""
