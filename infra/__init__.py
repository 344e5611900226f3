"""What a run stands on, beside the algorithm: skip on a first reading.

    assemble.py      building a run (the data, the policy, its sampler, the optimizer, a resumed checkpoint);
                     the one place that chooses the speed path (fast/)
    launch.py        one process or several through accelerate (DDP, DeepSpeed ZeRO-3), and what that changes
    checkpoint.py    checkpoints that --resume continues bit for bit
    tracking.py      metrics.jsonl, TensorBoard or W&B
    lora.py          LoRA through peft
    vllm_backend.py  rollouts with vLLM, and the weight sync after each update
"""
