"""What the benchmark scripts share. Importing it puts the repository root on ``sys.path``, so that
``python bench/<script>.py`` can import the project's modules (env, train, ...) like the tests do.
It imports nothing heavy itself (torch, transformers: inside the functions), so that a benchmark
measuring a process's memory, like bench_search's workers, measures only what it uses."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def fresh_process(script: str, mode: str, argv: list[str], env: dict | None = None) -> dict:
    """``script --worker mode argv`` in a fresh Python process (so its peak memory is its own) and the JSON object
    its last line prints; a failed worker ends the benchmark with its error."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(script), "--worker", mode, *argv], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class NullSearcher:
    """The search tool for a random model, which never writes a valid call: no side pays for a search."""

    def search(self, query, k=1):
        return []


def write_result(path, text: str) -> None:
    """Print a benchmark's result and write it to ``path`` (bench/results/...), the script's own output."""
    print(text, end="")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def as_flags(settings: dict) -> list[str]:
    """{"max_tool_calls": 1, ...} as train.py's command-line flags: ["--max-tool-calls", "1", ...]."""
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def model_tokens(trajs) -> int:
    """Tokens the *model* wrote (turn_idx >= 1) over a list of trajectories."""
    return sum(t.model_tokens for t in trajs)


def set_threads(threads: int) -> None:
    """torch threads for everything in this process (0: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tokenizer():
    """The embedded SmolLM2 tokenizer (converted once from the GGUF, then cached)."""
    from transformers import AutoTokenizer

    import data

    return AutoTokenizer.from_pretrained(data.embedded_model_dir())


def demo_questions(n: int, split: str = "eval") -> list[dict]:
    """The first ``n`` rows of a demo-world split: every benchmark runs on the same questions."""
    import data

    rows = data.read_jsonl(data.demo_world()[split])
    if n > len(rows):
        raise SystemExit(f"only {len(rows)} demo-world {split} questions, {n} asked for")
    return rows[:n]


def random_llama(tok, hidden: int, layers: int, seed: int = 0):
    """A random Llama shaped like SmolLM2 in small: head_dim 64, 3 query heads per KV head where the
    head count allows, tied embeddings, MLP 8/3 x hidden, the tokenizer's vocabulary and special ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % 64:
        raise SystemExit(f"hidden size {hidden} is not a multiple of 64 (the head size)")
    heads = hidden // 64
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 3 if heads % 3 == 0 else heads, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def save_random_llama(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """random_llama saved with the SmolLM2 tokenizer, a folder any loader (ours, TRL, vLLM) takes."""
    tok = tokenizer()
    random_llama(tok, hidden, layers, seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synthetic_batch(tok, rows: int, seed: int = 0):
    """Packed tensors shaped like the CPU default's rollouts: a real prompt, then 150-256 completion
    tokens: turn 1 (64), the environment's reply (~45), turn 2 (the rest), the close (2). The ids are
    random, which does not change the work of an update."""
    import torch

    import env
    from config import EnvConfig
    from policy import pack

    g = torch.Generator().manual_seed(seed)
    trajs = []
    for q in demo_questions(rows):
        prompt = env.build_prompt(tok, q["question"], EnvConfig(few_shot=False))
        n = int(torch.randint(150, 257, (1,), generator=g))
        turn_idx = [1] * 64 + [0] * 45 + [2] * (n - 64 - 45 - 2) + [0] * 2
        ids = torch.randint(3, len(tok), (n,), generator=g).tolist()
        trajs.append(env.Trajectory(prompt, ids, turn_idx, [], [], []))
    return pack(trajs, tok.pad_token_id)


def allocator() -> str:
    """The memory allocator this process runs with: the Makefile's ``make train`` preloads tcmalloc where
    it is installed, and a CPU step's time depends on it (the README's section on the CPU step)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if name in maps), "the C library's malloc")


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)
