"""Regenerates the numbers in WALKTHROUGH.md by running the code on one question.

    python tools/walkthrough.py            # rewrite the generated blocks of WALKTHROUGH.md
    python tools/walkthrough.py --check    # exit 1 if WALKTHROUGH.md no longer matches the code

Every number in WALKTHROUGH.md between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` comes from
``blocks()`` below: the demo world's first eval question, searched with bm25s, four scripted rollouts
through env.py (viewer.scripted_group), scored by rewards.py, turned into advantages by mt_grpo.py
and into a loss and per-token gradients by mt_grpo.policy_loss.
tests/test_viewer.py::test_walkthrough_numbers_are_the_codes fails when a code change moves any of them.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules

import data  # noqa: E402
import mt_grpo  # noqa: E402
import rewards  # noqa: E402
import search  # noqa: E402
from tools import viewer  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "WALKTHROUGH.md"
BLOCK = re.compile(r"(<!-- BEGIN (\w+) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def _fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> str:
    return "\n".join([_fmt_row(header), "|" + "---|" * len(header), *(_fmt_row(r) for r in rows)])


def blocks() -> dict[str, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data.embedded_model_dir())
    index = search.load_index(data.demo_world()["corpus"])
    q, trajs = viewer.scripted_group(tok, index)
    G = len(trajs)
    out = {}

    # 1. search: the question as the query, what bm25s returns
    hits = index.search(q["question"], 3)
    out["search"] = "\n".join([f"Question: **{q['question']}** (answer: `{q['answer']}`)", "",
                               _table(["rank", "passage", "BM25 score", "holds the answer"],
                                      [[i + 1, h["title"], f"{h['score']:.2f}",
                                        "yes" if q["answer"].lower() in h["text"].lower() else "no"]
                                       for i, h in enumerate(hits)])])

    # 2. env: how rollout 0's tokens are split into turns
    t0 = trajs[0]
    counts = {k: sum(1 for x in t0.turn_idx if x == k) for k in sorted(set(t0.turn_idx))}
    out["env"] = "\n".join([
        f"Prompt: {len(t0.prompt_ids)} tokens (system prompt + question). Completion: {len(t0.completion_ids)} tokens, "
        f"of which turn 1 (the model's search call) {counts.get(1, 0)}, environment (the <result> and role "
        f"markers) {counts.get(0, 0)}, turn 2 (the answer) {counts.get(2, 0)}.", "", "```text",
        tok.decode(t0.completion_ids).strip(), "```"])

    # 3. rewards for the four rollouts
    scores = rewards.compute([t.messages for t in trajs], [q["aliases"]] * G)
    R_T, R_O = rewards.level_sums(scores)
    what = ["good search, right answer", "good search, wrong answer", "bad search, wrong answer",
            "no search, right answer"]
    keys = list(rewards.REWARD_MAX)
    out["rewards"] = _table(["rollout", *keys, "R_T", "R_O"],
                            [[f"{i}: {what[i]}", *(f"{scores[k][i]:.2f}" for k in keys), f"{R_T[i]:.2f}", f"{R_O[i]:.2f}"]
                             for i in range(G)])

    # 4. advantages per method
    advs = viewer.method_advantages(trajs, scores, G)
    rt, ro = torch.tensor(R_T), torch.tensor(R_O)
    norm = {"A_T = norm(R_T)": mt_grpo.group_normalise(rt, G), "A_O = norm(R_O)": mt_grpo.group_normalise(ro, G),
            "A_MR = norm(R_T+R_O)": mt_grpo.group_normalise(rt + ro, G)}
    out["normalised"] = _table(["rollout", *norm], [[i, *(f"{v[i]:+.3f}" for v in norm.values())] for i in range(G)])
    out["advantages"] = _table(["rollout", *(f"{viewer.LABELS[m]} turn {k}" for m in advs for k in (1, 2))],
                               [[i, *(f"{advs[m][i, k]:+.3f}" for m in advs for k in (0, 1))] for i in range(G)])

    # 5. the loss: on-policy (mu = 1) the ratio is 1, so the loss is -sum(A_tok)/n and d loss / d log p = -A/n
    from policy import pack

    _, _, turn = pack(trajs, tok.pad_token_id)
    turn_t = turn[:, 1:]
    rows = []
    for m, A in advs.items():
        A_tok, mask = mt_grpo.token_advantages(A, turn_t)
        logp = torch.zeros(turn_t.shape, requires_grad=True)
        loss, _ = mt_grpo.policy_loss(logp, logp.detach(), None, A_tok, turn_t, eps=0.2, beta=0.0, aggregation="token")
        loss.backward()
        first = lambda k: (turn_t[1] == k).nonzero()[0, 0]  # noqa: E731  first token of turn k in rollout 1
        rows.append([viewer.LABELS[m], f"{loss.item():+.4f}", int(mask.sum()),
                     f"{logp.grad[1, first(1)].item():+.5f}", f"{logp.grad[1, first(2)].item():+.5f}"])
    out["loss"] = _table(["method", "loss", "model tokens n", "dL/dlogp, rollout 1 turn 1", "dL/dlogp, rollout 1 turn 2"], rows)

    # 6. the viewer's picture, as text: each turn's advantage per method
    out["viewer"] = "```text\n" + viewer.render_compact(tok, trajs, advs) + "\n```"
    return out


def render(doc: str, new: dict[str, str]) -> str:
    missing = set(new) - {m.group(2) for m in BLOCK.finditer(doc)}
    if missing:
        raise KeyError(f"WALKTHROUGH.md lacks blocks: {sorted(missing)}")
    return BLOCK.sub(lambda m: m.group(1) + new[m.group(2)].rstrip() + "\n" + m.group(4), doc)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = DOC.read_text()
    updated = render(doc, blocks())
    if "--check" in argv:
        if updated != doc:
            print("WALKTHROUGH.md is stale: run python walkthrough.py", file=sys.stderr)
            return 1
        print("WALKTHROUGH.md matches the code")
        return 0
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(updated)
    os.replace(tmp, DOC)
    print(f"updated {DOC.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
