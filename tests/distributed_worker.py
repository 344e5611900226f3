"""train.main with scripted rollouts: the program tests/test_distributed.py runs, once as one plain
process and once under ``accelerate launch --config_file configs/cpu_2proc.yaml`` (2 processes).

    python tests/distributed_worker.py TRAIN_FLAGS...

Why scripted: two processes sample with two random streams, so a 2-process run could never sample
the rollouts a 1-process run samples. Here each episode's turns are a seeded choice from a few
texts, keyed by (step, global row, question): the same episode gets the same turns whichever
process runs it, and the rollouts of the two runs are identical by construction. Everything after
sampling (gathering, rewards, advantages, the update, logging, checkpoints) is train.py's own.

Each process also writes ``<output-dir>/record-<process index>.json``: per step, the advantages its
update received (each row's, over its model tokens), and how accelerate set the process up.
"""
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import env  # noqa: E402
import train  # noqa: E402
from data import read_jsonl  # noqa: E402
from infra import launch  # noqa: E402
from policy import ScriptedPolicy  # noqa: E402

# The questions both distributed tests train on (written to --questions by the tests)
QUESTIONS = [
    {"question": "Who wrote the novel Dracula?", "answer": "Bram Stoker", "aliases": ["Bram Stoker", "Abraham Stoker"]},
    {"question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris"]},
    {"question": "What is Earth's highest mountain?", "answer": "Mount Everest", "aliases": ["Mount Everest", "Everest"]},
    {"question": "Which river runs through Paris?", "answer": "Seine", "aliases": ["Seine", "the Seine"]},
]
ANSWERS: dict[str, str] = {}   # question -> answer, from --questions
RECORD: list[dict] = []
real_rollout, real_update = env.rollout, train.update


def tool(query: str) -> str:
    return f"<reasoning>\nI will search.\n</reasoning>\n<tool>{env.tool_command(query)}</tool>"


def turns(step: int, row: int, question: str) -> list[str]:
    """A mix that gives the G rollouts of a question different turn and outcome rewards."""
    rng = random.Random(f"{step}/{row}/{question}")
    answer = ANSWERS[question]
    first = rng.choice([tool(question), tool(question), tool("weather tomorrow"), "<tool>{not json</tool>",
                        f"<answer>{answer}</answer>"])
    second = rng.choice([f"<reasoning>\nFound it.\n</reasoning>\n<answer>{answer}</answer>",
                         f"<answer>{answer} or maybe not</answer>", "<answer>I do not know</answer>", "no idea"])
    return [first, second]


def scripted_rollout(policy, tokenizer, questions, G, searcher, cfg):
    """Stands in for env.rollout inside train.sample_batch: ``questions`` are this process's rows, or with
    --rollout-backend vllm the whole batch, sampled by the main process's engine (infra.vllm_backend.sample_on_main)."""
    from accelerate import PartialState

    state = PartialState()
    first_row = (0 if isinstance(policy, StubEngine) else
                 launch.process_rows(len(questions) * state.num_processes, state.num_processes, state.process_index).start)
    # the policy's call counter numbers the rollouts: checkpoints keep it, so a resumed run goes on with
    # the turns the uninterrupted run has at the same step
    script = [turns(policy.calls, first_row + i, q) for i, q in enumerate(questions)]
    policy.calls += 1
    return real_rollout(ScriptedPolicy(tokenizer, script), tokenizer, questions, G, searcher, cfg)


def collective_timeout():
    """How long this process's collectives wait, read off its default process group (None: one process)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def recording_update(cfg, logprobs, optimizer, scheduler, accelerator, batch, *rest):
    from accelerate import PartialState

    params = list(logprobs.parameters())
    # each row's advantages over its own model tokens (the rows' padding differs between processes)
    A = [[a for a, k in zip(row, turn) if k > 0] for row, turn in zip(batch.A.tolist(), batch.turn[:, 1:].tolist())]
    RECORD.append({"A": A, "rows": batch.ids.shape[0], "num_processes": accelerator.num_processes,
                   # ZeRO-3: every parameter is a DeepSpeed-partitioned one, and (2+ processes) this
                   # process holds only its shards
                   "zero3_params": all(hasattr(p, "ds_id") for p in params),
                   "zero3_partitioned": all(hasattr(p, "ds_id") for p in params)
                   and sum(p.ds_tensor.numel() for p in params) < sum(p.ds_numel for p in params),
                   "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                   "backend": PartialState().backend, "timeout_s": collective_timeout()})
    return real_update(cfg, logprobs, optimizer, scheduler, accelerator, batch, *rest)


class StubEngine:
    """Stands in for vllm_backend.VLLMPolicy where vLLM cannot run (ZeRO-3 on CPU in the main venv): the
    real vllm_backend.sync_weights gathers the sharded weights and hands them to ``load_weights``, which
    saves what arrived as ``<output-dir>/synced-<call>.safetensors``, the weights the engine would sample
    the next step with. Sampling itself is scripted (above)."""

    def __init__(self, model_path, tokenizer, seed=None, **engine_kwargs):
        self.calls, self.syncs = 0, 0
        (OUT / "engine.json").write_text(json.dumps({"model_path": model_path, **engine_kwargs}))

    def load_weights(self, named_tensors):
        from safetensors.torch import save_file

        self.syncs += 1
        weights = {name: t.detach().clone().contiguous() for name, t in named_tensors}
        save_file(weights, str(OUT / f"synced-{self.syncs}.safetensors"))

    def sleep(self):
        pass


# save_checkpoint(accelerator, out, logprobs, model, tokenizer, optimizer, scheduler, step, ...): after out
STEP_ARG = 5


def hang_after(step: int):
    """Every process stops for good after checkpointing ``step``, so the test can SIGKILL the job in a known
    state: the checkpoint of ``step`` written, nothing of the next step done."""
    real_save = train.save_checkpoint

    def save(accelerator, out, *args):
        real_save(accelerator, out, *args)
        if args[STEP_ARG] == step:
            if accelerator.is_main_process:
                (out / "hanging").write_text(str(step))
            parent = os.getppid()
            while os.getppid() == parent:  # until the job is killed; then go too, never living on as an orphan
                time.sleep(0.5)
            os._exit(1)
    train.save_checkpoint = save


def copy_each_checkpoint():
    """Keep a copy of every checkpoint (``checkpoint-<step>``): each step's model, for the comparisons."""
    real_save = train.save_checkpoint

    def save(accelerator, out, *args):
        real_save(accelerator, out, *args)
        if accelerator.is_main_process:
            shutil.copytree(out / "checkpoint", out / f"checkpoint-{args[STEP_ARG]}", dirs_exist_ok=True)
    train.save_checkpoint = save


def slow_rank_in_save_state(out: Path):
    """Make the checkpoint race deterministic (no sleeps, no timing). Under DeepSpeed every process writes
    files of its own inside ``accelerator.save_state`` (its ``random_states_<rank>.pkl`` last, after the
    collective DeepSpeed save). Here a non-main process holds that last write back until the main process,
    back from its own ``save_state``, has either moved the checkpoint folder away (the race: the write then
    fails, "Parent directory ... does not exist") or is waiting for the others at a barrier (the fix: the
    write lands in the folder before it moves). Each process logs what it saw in ``race/rank<r>.jsonl``.

    Markers, in ``<out>/race``: ``saved-<n>`` holds how many barriers the main process had entered when its
    n-th save_state returned; ``barriers`` how many it has entered so far."""
    import accelerate.accelerator as accelerate_module
    from accelerate import Accelerator

    race = out / "race"
    race.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))  # set by the launcher; accelerate's state is not built yet
    real_save_state, real_wait, real_write = (Accelerator.save_state, Accelerator.wait_for_everyone,
                                              accelerate_module.save_accelerator_state)
    counts = {"barriers": 0, "saves": 0}

    def write(name: str, text: str):
        tmp = race / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, race / name)

    if rank == 0:
        def wait_for_everyone(self):
            counts["barriers"] += 1
            write("barriers", str(counts["barriers"]))
            return real_wait(self)

        def save_state(self, output_dir=None, **kwargs):
            result = real_save_state(self, output_dir, **kwargs)
            counts["saves"] += 1
            write(f"saved-{counts['saves']}", str(counts["barriers"]))
            return result

        Accelerator.wait_for_everyone, Accelerator.save_state = wait_for_everyone, save_state
        return

    def held_back_write(output_dir, *args, **kwargs):
        counts["saves"] += 1
        folder, saved = Path(output_dir), race / f"saved-{counts['saves']}"
        deadline = time.time() + 600  # only a hang in the run itself gets here
        while not saved.exists():
            assert time.time() < deadline, "the main process never returned from save_state"
            time.sleep(0.02)
        barriers_then = int(saved.read_text())
        while folder.exists() and int((race / "barriers").read_text()) <= barriers_then:
            assert time.time() < deadline, "the main process neither moved the folder nor waited at a barrier"
            time.sleep(0.02)
        with open(race / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"save": counts["saves"], "folder_still_there": folder.exists()}) + "\n")
        return real_write(output_dir, *args, **kwargs)

    accelerate_module.save_accelerator_state = held_back_write


def count_index_builds():
    import search

    real_build = search._build_bm25s

    def build(*args, **kwargs):
        from accelerate import PartialState

        with open(OUT / f"index-built-{PartialState().process_index}", "a") as f:
            f.write("1\n")
        return real_build(*args, **kwargs)
    search._build_bm25s = build


if __name__ == "__main__":
    argv = sys.argv[1:]
    OUT = Path(argv[argv.index("--output-dir") + 1])
    OUT.mkdir(parents=True, exist_ok=True)
    if "vllm" in argv:  # --rollout-backend vllm: the stub engine, the real sync
        import config
        from infra import vllm_backend

        vllm_backend.VLLMPolicy, config.vllm_installed = StubEngine, lambda: True
    copy_each_checkpoint()
    if os.environ.get("SLOW_RANK_SAVE"):
        slow_rank_in_save_state(OUT)
    if os.environ.get("HANG_AFTER_STEP"):
        hang_after(int(os.environ["HANG_AFTER_STEP"]))
    count_index_builds()
    ANSWERS.update({q["question"]: q["answer"] for q in read_jsonl(argv[argv.index("--questions") + 1])})
    env.rollout, train.update = scripted_rollout, recording_update
    code = train.main(argv)
    if code == 0:
        from accelerate import PartialState

        out = Path(argv[argv.index("--output-dir") + 1])
        (out / f"record-{PartialState().process_index}.json").write_text(json.dumps(RECORD))
    sys.exit(code)
