"""Per-token advantage viewer: the picture that explains MT-GRPO.

    python tools/viewer.py --scripted                       # the walkthrough's hand-written group (no model)
    python tools/viewer.py --model runs/final --G 6         # a group sampled from a checkpoint (demo world)
    python tools/viewer.py --scripted --html viewer.html    # also write an HTML page

For one group of G rollouts of one question, every completion token is coloured by the advantage
each method gives it (green > 0, red < 0, stronger = larger |A|; one scale for all methods), and
environment tokens (the <result> the search tool wrote) are grey: no method trains on them.
GRPO-OR and GRPO-MR paint a whole trajectory one colour; MT-GRPO can paint turn 1 (the search)
and turn 2 (the answer) differently: a good search followed by a wrong answer is still a good search.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules

import advantages  # noqa: E402
import data  # noqa: E402
import env  # noqa: E402
import eval as evaluation  # noqa: E402
import rewards  # noqa: E402
import search  # noqa: E402
from config import Config, EnvConfig, episode  # noqa: E402
from policy import HFPolicy, ScriptedPolicy  # noqa: E402

LABELS = {"grpo_or": "GRPO-OR", "grpo_mr": "GRPO-MR", "mt_grpo": "MT-GRPO"}


def method_advantages(trajectories, scores: dict, G: int, lam: float | None = None, cfg: Config | None = None,
                      episodes: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """{method: (N, K) per-turn advantages} for one batch of whole groups: advantages.turn_advantages itself, under
    ``cfg`` (a run's settings: lam, convention, k_turn; default Config) with each method in turn.
    ``episodes``: the question of each rollout, which --k-turn runs need."""
    cfg = dataclasses.replace(cfg or Config(), G=G, **({} if lam is None else {"lam": lam}))
    levels = advantages.reward_levels(cfg, scores, trajectories, episodes)
    return {m: advantages.turn_advantages(dataclasses.replace(cfg, method=m), levels) for m in LABELS}


def token_pieces(tokenizer, traj, A_row) -> list[tuple[str, float | None]]:
    """(text of each completion token, its advantage), None for environment tokens."""
    pieces = []
    for tid, k in zip(traj.completion_ids, traj.turn_idx):
        text = tokenizer.decode([tid])
        pieces.append((text, None if k == 0 else float(A_row[min(k, A_row.shape[0]) - 1])))
    return pieces


def segments(tokenizer, traj, A_row) -> list[tuple[int, str, float | None]]:
    """Consecutive tokens of one turn merged: (turn k or 0 for the environment, text, advantage)."""
    out = []
    for (text, a), k in zip(token_pieces(tokenizer, traj, A_row), traj.turn_idx):
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + text, a)
        else:
            out.append((k, text, a))
    return out


def render_compact(tokenizer, trajectories, advs: dict, width: int = 38) -> str:
    """One line per method and rollout, each turn elided to ``width`` characters (for documents)."""
    def short(text):
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width // 2 - 2] + " .. " + text[-(width // 2 - 2):]

    lines = []
    for m, A in advs.items():
        lines.append(f"{LABELS[m]}:")
        for i, traj in enumerate(trajectories):
            parts = [f"[env {len(t)} chars]" if k == 0 else f"[turn {k} A={a:+.2f}] {short(t)}"
                     for k, t, a in segments(tokenizer, traj, A[i])]
            lines.append(f"  {i}: " + " ".join(parts))
    return "\n".join(lines)


def turn_values(A_row, sep: str = ", ") -> str:
    """One rollout's advantage per turn: two for the paper's MT-GRPO, K = max_tool_calls + 1 with --k-turn."""
    return sep.join(f"{a:+.2f}" for a in A_row.tolist())


def _scale(advs: dict) -> float:
    return max(1e-6, max(float(a.abs().max()) for a in advs.values()))


def _rgb(a: float | None, scale: float) -> tuple[int, int, int]:
    if a is None:
        return (200, 200, 200)
    t = min(1.0, abs(a) / scale)
    base = (40, 170, 60) if a > 0 else (210, 50, 50)
    return tuple(round(255 + (c - 255) * t) for c in base)  # white -> green/red


def render_terminal(tokenizer, question: str, trajectories, scores: dict, advs: dict) -> str:
    """ANSI 24-bit background colours; one block per method, one line per rollout."""
    scale, out = _scale(advs), [f"Question: {question}"]
    R_T, R_O = rewards.level_sums(scores)
    for m, A in advs.items():
        out.append(f"\n== {LABELS[m]} ==")
        for i, traj in enumerate(trajectories):
            head = f"[{i}] R_T={R_T[i]:.2f} R_O={R_O[i]:.2f} A=({turn_values(A[i], ',')}) "
            body = "".join(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{t.replace(chr(10), ' ')}\x1b[0m"
                           for t, a in token_pieces(tokenizer, traj, A[i]) for r, g, b in [_rgb(a, scale)])
            out.append(head + body)
    return "\n".join(out)


def render_html(tokenizer, question: str, trajectories, scores: dict, advs: dict) -> str:
    scale = _scale(advs)
    R_T, R_O = rewards.level_sums(scores)
    parts = ["<!doctype html><meta charset='utf-8'><title>MT-GRPO per-token advantages</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}"
             ".t{font-family:monospace;white-space:pre-wrap;font-size:12px;line-height:1.6}"
             "td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}</style>",
             f"<h2>{html.escape(question)}</h2><p>Green: positive advantage, red: negative (scale "
             f"|A| = {scale:.2f}); grey: environment tokens (not trained on). Hover a token for its value.</p>",
             "<table><tr><th>#</th><th>rewards</th>" + "".join(f"<th>{LABELS[m]}</th>" for m in advs) + "</tr>"]
    for i, traj in enumerate(trajectories):
        cells = []
        for m, A in advs.items():
            spans = "".join(f"<span style='background:rgb{_rgb(a, scale)}' title='{'env' if a is None else f'{a:+.3f}'}'>"
                            f"{html.escape(t)}</span>" for t, a in token_pieces(tokenizer, traj, A[i]))
            cells.append(f"<td><b>A = ({turn_values(A[i])})</b><div class=t>{spans}</div></td>")
        parts.append(f"<tr><td>{i}</td><td>R_T {R_T[i]:.2f}<br>R_O {R_O[i]:.2f}</td>{''.join(cells)}</tr>")
    return "\n".join(parts + ["</table>"])


# ------------------------------------------------------------------------------ groups to look at


def scripted_group(tokenizer, index, cfg: EnvConfig | None = None):
    """The walkthrough's group: the demo world's first eval question, four hand-written rollouts
    (good search + right answer, good search + wrong answer, bad search + wrong answer, no search +
    right answer)."""
    q = data.load_questions(data.demo_world()["eval"])[0]
    answer, wrong = q["answer"], "Unknown"

    def call(query):
        return f"<reasoning>\nI will search for it.\n</reasoning>\n<tool>{env.tool_command(query)}</tool>"

    def reply(text, thought="The result says it."):
        return f"<reasoning>\n{thought}\n</reasoning>\n<answer>{text}</answer>"

    turns = [[call(q["question"]), reply(answer)],
             [call(q["question"]), reply(wrong, "I am not sure.")],
             [call("famous old river"), reply(wrong, "I am not sure.")],
             [reply(answer, "I think I know this.")]]
    cfg = cfg or episode(Config())  # the default training run's episodes
    trajs = env.rollout(ScriptedPolicy(tokenizer, turns), tokenizer, [q["question"]], len(turns), index, cfg)
    return q, trajs


def sampled_group(model_dir: str, G: int, seed: int, question_index: int, index, cfg: EnvConfig | None = None):
    """G episodes of one demo-world eval question sampled from ``model_dir``, under ``cfg`` (the run's
    episode settings; default: Config's, as the default training run samples them)."""
    from policy import load_policy

    model, tokenizer = load_policy(model_dir)
    q = data.load_questions(data.demo_world()["eval"])[question_index]
    cfg = cfg or episode(Config())
    trajs = env.rollout(HFPolicy(model.eval(), tokenizer, seed=seed), tokenizer, [q["question"]], G, index, cfg)
    return tokenizer, q, trajs


def check_args(args) -> tuple[Config, str | None]:
    """The settings to roll out under and the model path, or one EvalError naming the fix (before any work)."""
    overrides = {k: getattr(args, k) for k in evaluation.EPISODE_FIELDS}
    cfg = evaluation.run_config("base" if args.scripted else args.model, overrides)
    path = None if args.scripted else evaluation.resolve_model(args.model)
    if not args.scripted and args.G < 2:
        raise evaluation.EvalError(f"--G {args.G}: a group needs at least 2 rollouts to compare")
    n = len(data.load_questions(data.demo_world()["eval"]))
    if not 0 <= args.question_index < n:
        raise evaluation.EvalError(f"--question-index {args.question_index}: the demo world has {n} eval "
                                   f"questions, 0..{n - 1}")
    if args.html and not Path(args.html).resolve().parent.is_dir():
        raise evaluation.EvalError(f"--html {args.html}: no folder {Path(args.html).parent} (create it first)")
    return cfg, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--scripted", action="store_true", help="the walkthrough's hand-written group")
    src.add_argument("--model", help="a run folder or model folder to sample a group from")
    ap.add_argument("--G", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--question-index", type=int, default=0, help="which demo-world eval question")
    ap.add_argument("--html", help="write the HTML page here")
    # with --model: the run's episode settings (its config.json), else Config's; a flag overrides
    evaluation.add_episode_flags(ap)
    args = ap.parse_args(argv)
    try:
        cfg, path = check_args(args)
    except evaluation.EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = search.load_index(data.demo_world()["corpus"])
    if args.scripted:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data.embedded_model_dir())
        q, trajs = scripted_group(tokenizer, index, episode(cfg))
    else:
        tokenizer, q, trajs = sampled_group(path, args.G, args.seed, args.question_index, index, episode(cfg))
    scores = rewards.compute([t.messages for t in trajs], [q["aliases"]] * len(trajs))
    # the run's lam, convention and k_turn: the advantages its training would have given this group
    advs = method_advantages(trajs, scores, len(trajs), cfg=cfg, episodes=[q] * len(trajs))
    print(render_terminal(tokenizer, q["question"], trajs, scores, advs))
    if args.html:
        tmp = Path(args.html).with_suffix(".tmp")
        tmp.write_text(render_html(tokenizer, q["question"], trajs, scores, advs))
        os.replace(tmp, args.html)
        print(f"\nwrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
