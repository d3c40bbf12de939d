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
