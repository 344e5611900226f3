"""train.main with scripted rollouts: the program tests/test_distributed.py runs, once as one plain
process and once under ``accelerate launch --config_file configs/cpu_2proc.yaml`` (2 processes).

    python tests/distributed_worker.py TRAIN_FLAGS...

Why scripted: two processes sample with two random streams, so a 2-process run could never sample
the rollouts a 1-process run samples. Here each episode's turns are a seeded choice from a few
texts, keyed by (step, global row, question): the same episode gets the same turns whichever
process runs it, and the rollouts of the two runs are identical by construction. Everything after
sampling (gathering, rewards, advantages, the update, logging, checkpoints) is train.py's own.

Each process also writes ``<output-dir>/record-<process index>.json``: per step, the advantages its
update received, and how accelerate set the process up.
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import env  # noqa: E402
import train  # noqa: E402
from data import read_jsonl  # noqa: E402

ANSWERS: dict[str, str] = {}   # question -> answer, from --questions
RECORD: list[dict] = []
calls = {"rollout": 0}
real_rollout, real_update = env.rollout, train.update


def tool(query: str) -> str:
    return "<reasoning>\nI will search.\n</reasoning>\n<tool>" + json.dumps(
        {"name": "wiki_search", "args": {"query": query}}) + "</tool>"


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
    """Stands in for env.rollout inside train.rollout: ``questions`` are this process's rows."""
    from accelerate import PartialState

    state = PartialState()
    first_row = train.process_rows(len(questions) * state.num_processes, state.num_processes, state.process_index).start
    script = [turns(calls["rollout"], first_row + i, q) for i, q in enumerate(questions)]
    calls["rollout"] += 1
    return real_rollout(env.ScriptedPolicy(tokenizer, script), tokenizer, questions, G, searcher, cfg)


def recording_update(cfg, model, ref_model, optimizer, scheduler, ids, attn, turn, A, accelerator=None):
    from accelerate import PartialState

    RECORD.append({"A": A.tolist(), "rows": ids.shape[0], "num_processes": accelerator.num_processes,
                   "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                   "backend": PartialState().backend})
    return real_update(cfg, model, ref_model, optimizer, scheduler, ids, attn, turn, A, accelerator)


if __name__ == "__main__":
    argv = sys.argv[1:]
    ANSWERS.update({q["question"]: q["answer"] for q in read_jsonl(argv[argv.index("--questions") + 1])})
    env.rollout, train.update = scripted_rollout, recording_update
    code = train.main(argv)
    if code == 0:
        from accelerate import PartialState

        out = Path(argv[argv.index("--output-dir") + 1])
        (out / f"record-{PartialState().process_index}.json").write_text(json.dumps(RECORD))
    sys.exit(code)
