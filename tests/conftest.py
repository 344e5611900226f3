"""Shared test fixtures: the real SmolLM2 tokenizer, a tiny random Llama and a fake search tool."""
import re

import pytest
import torch

FAKE_PASSAGES = [
    {"id": "p0", "title": "Dracula", "text": "Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker."},
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine."},
    {"id": "p2", "title": "Mount Everest", "text": "Mount Everest is Earth's highest mountain above sea level."},
    {"id": "p3", "title": "Bram Stoker", "text": "Abraham Stoker was an Irish novelist, best known for Dracula."},
]


class FakeSearcher:
    """Word-overlap search with search.load_index's interface: ``search(query, k)`` ->
    ``[{"id", "title", "text", "score"}]`` best first (ties: the earlier passage). Records queries."""

    def __init__(self, passages=None):
        self.passages, self.queries = passages if passages is not None else FAKE_PASSAGES, []

    def search(self, query, k=1):
        self.queries.append(query)
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", (p["title"] + " " + p["text"]).lower()))), -i)
                  for i, p in enumerate(self.passages)]
        return [dict(self.passages[-i], score=float(s)) for s, i in sorted(scored, reverse=True)[:k] if s > 0]


@pytest.fixture(scope="session")
def tok():
    """The real SmolLM2-135M-Instruct tokenizer (converted once from the embedded GGUF, then cached)."""
    from transformers import AutoTokenizer
    import data
    return AutoTokenizer.from_pretrained(data.embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model(tok):
    """A random 2-layer Llama (hidden 64) with the real vocabulary: samples junk in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """The same tiny Llama saved like any checkpoint, so train.py and eval.py load it through --model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def passages():
    return [dict(p) for p in FAKE_PASSAGES]


@pytest.fixture()
def fake_searcher():
    """The FakeSearcher class, to build one over other passages: ``fake_searcher([...])``."""
    return FakeSearcher


@pytest.fixture()
def searcher():
    return FakeSearcher()
