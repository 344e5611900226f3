"""MTGRPOTrainer on one process or several: the program tests/test_trl_distributed.py runs, as one plain
process and under ``accelerate launch`` (configs/cpu_2proc.yaml: 2 processes over gloo).

    python tests/trl_worker.py MODE OUTPUT_DIR MODEL_DIR

MODE
  scripted  one TRL step on 3 questions x G = 4 rollouts. Each episode's turns are chosen by its *global* row
            (process index x rows per process + its row), so one process and two sample the same episodes;
            with two, the second question's group is split between them. Records, per process, the
            questions it got and the per-token advantages it trained on; the main process saves the weights.
  engine    TRLvLLMSampler over FakeServerEngine, which behaves as TRL's vLLM generation in server mode
            (the prompts of all processes gathered, generated on the main process, each process handed its
            slice by position) and *enforces* its contract: a call where the processes send different
            numbers of prompts fails the run. The first question's episodes answer at once and the second's
            search first, so after the first round one process has no live episode while the other has.
  sharded   (launched with configs/zero3_cpu_2proc.yaml) builds the trainer with the HF sampler under
            DeepSpeed ZeRO-3; records the refusal's message.
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

import env  # noqa: E402
from helpers import TRL_QUESTIONS, TRL_SCRIPTS, FakeSearcher  # noqa: E402
from helpers import answer_turn as answer  # noqa: E402
from helpers import search_turn as call  # noqa: E402
from policy import ScriptedPolicy  # noqa: E402

G = 4
QUESTIONS = TRL_QUESTIONS + [{"prompt": "What is Earth's highest mountain?", "aliases": ["Mount Everest", "Everest"]}]
# One script per global row, question-major (rows 4-7 are the second question's group): R^T and R^O vary
# within every group, so normalising half a group would give other advantages than the whole one
SCRIPTS = TRL_SCRIPTS + [[call("Mount Everest highest"), answer("Everest")], [call("weather"), answer("K2")],
                         [call("Mount Everest"), answer("no idea")], ["I will not use the tool", answer("Everest")]]


def trl_args(out: Path, per_device: int, **overrides):
    from trl import GRPOConfig

    base = dict(output_dir=str(out / "trl"), use_cpu=True, bf16=False, seed=0, max_steps=1, report_to="none",
                save_strategy="no", logging_steps=1, disable_tqdm=True, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=1, num_generations=G, max_completion_length=200, temperature=0.9,
                top_k=50, top_p=1.0, shuffle_dataset=False, learning_rate=1e-3, beta=0.0, loss_type="dapo",
                optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1e9,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    return GRPOConfig(**{**base, **overrides})


class FakeServerEngine:
    """TRL 1.16's vLLM generation in server mode, to the contract (trl/generation/vllm_generation.py): gather every
    process's prompts, generate on the main process, broadcast, hand process p the rows [p*n, (p+1)*n). The
    completions are scripted by the question in the prompt: the first question answers at once; the others
    search for the question itself, then answer with the first alias. One log-prob per answer is None, as TRL
    returns where vLLM's was NaN. Every call's counts are logged; unequal counts fail the run."""

    mode, tensor_parallel_size = "server", 1

    def __init__(self, trainer, log: list):
        self.trainer, self.log = trainer, log

    def complete(self, prompt_ids: list[int]) -> list[int]:
        tok = self.trainer.processing_class
        text = tok.decode(prompt_ids)
        q = next(q for q in QUESTIONS if q["prompt"] in text)
        searched = "<result>" in text.split(q["prompt"], 1)[1]  # (the system prompt names the tag too)
        reply = answer(q["aliases"][0]) if q is QUESTIONS[0] or searched else call(q["prompt"])
        return env._encode(tok, reply) + [env.end_ids(tok).pop()]

    def generate(self, prompts, images, num_generations):
        from accelerate.utils import broadcast_object_list, gather_object

        accelerator = self.trainer.accelerator
        counts = gather_object([len(prompts)])
        self.log.append(counts)
        if len(set(counts)) != 1:
            raise RuntimeError(f"TRL's contract broken: the processes sent {counts} prompts to one call")
        everyone = gather_object(prompts)
        payload = [None]
        if accelerator.is_main_process:
            completions = [self.complete(p) for p in everyone]
            logprobs = [[[None if i == 1 else -0.5] for i in range(len(c))] for c in completions]
            payload = [(everyone, completions, logprobs)]
        all_prompts, all_completions, all_logprobs = broadcast_object_list(payload, from_process=0)[0]
        mine = slice(accelerator.process_index * len(prompts), (accelerator.process_index + 1) * len(prompts))
        return all_prompts[mine], all_completions[mine], all_logprobs[mine], None


def main(mode: str, out: Path, model_dir: str) -> int:
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extensions import trl_mt_grpo
    from extensions.trl_mt_grpo import MTGRPOTrainer, TRLvLLMSampler

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    processes = int(os.environ.get("WORLD_SIZE", 1))
    record = {}
    if mode == "sharded":
        real_check = trl_mt_grpo.shards_weights

        def check(trainer):  # what the launch gave the trainer, then the real check
            state = trainer.accelerator.state
            record.update(distributed_type=str(state.distributed_type).split(".")[-1],
                          num_processes=state.num_processes,
                          zero_stage=getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None))
            return real_check(trainer)
        trl_mt_grpo.shards_weights = check
        try:
            MTGRPOTrainer(model, trl_args(out, G, use_cpu=False, ddp_backend="gloo"), Dataset.from_list(QUESTIONS[:1]), FakeSearcher(),
                          processing_class=tok)
            record["refused"] = None
        except ValueError as e:
            record["refused"] = str(e)
        (out / f"record-{os.environ.get('RANK', 0)}.json").write_text(json.dumps(record))
        return 0
    if mode == "scripted":
        per_device = len(QUESTIONS) * G // processes

        def sampler(trainer):
            first = trainer.accelerator.process_index * per_device  # this process's first global row
            return ScriptedPolicy(tok, SCRIPTS[first:first + per_device])
        questions = QUESTIONS
    else:
        per_device, questions, log = G, QUESTIONS[:processes], []
        sampler = TRLvLLMSampler
    trainer = MTGRPOTrainer(model, trl_args(out, per_device), Dataset.from_list(questions), FakeSearcher(),
                            processing_class=tok, sampler=sampler)
    if mode == "engine":
        trainer.vllm_generation = FakeServerEngine(trainer, log)
    real = trainer._generate_and_score_completions

    def recording(inputs):
        output = real(inputs)
        record.update(questions=[x["prompt"] for x in inputs], advantages=output["advantages"].tolist(),
                      turn=[t.turn_idx for t in trainer.trajectories],
                      tool_calls=[[c for c in t.tool_calls if c is not None] for t in trainer.trajectories],
                      answers=[t.messages[-1]["content"] for t in trainer.trajectories],
                      sampler_logprobs=[t.sampler_logprobs for t in trainer.trajectories])
        return output
    trainer._generate_and_score_completions = recording
    trainer.train()
    if mode == "engine":
        record["engine_calls"] = log
    state = PartialState()
    (out / f"record-{state.process_index}.json").write_text(json.dumps(record, allow_nan=True))
    if state.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()},
                   out / "weights.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
