"""Shared test fixtures: the real SmolLM2 tokenizer, tiny random Llamas and a fake search tool
(built from tests/helpers.py, which also holds the checks several test modules share)."""
import pytest

from helpers import FAKE_PASSAGES, FakeSearcher, tiny_llama


@pytest.fixture(scope="session")
def tok():
    """The real SmolLM2-135M-Instruct tokenizer (converted once from the embedded GGUF, then cached)."""
    from transformers import AutoTokenizer
    import data
    return AutoTokenizer.from_pretrained(data.embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model(tok):
    """A random 2-layer Llama (hidden 64) with the real vocabulary: samples junk in milliseconds."""
    return tiny_llama(tok)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """A tiny random Llama saved like any checkpoint, so train.py and eval.py load it through --model:
    tiny_model's size, with grouped-query attention (2 KV heads, as SmolLM2 has), 1,024 positions
    and the tokenizer's special ids in its config."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tok, kv_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (its mixed precision among it): an Accelerator a test builds must
    not inherit the one an earlier test built (a bf16 state makes a later ``Accelerator(cpu=True)`` autocast)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
