"""Shared fixtures: tiny models built in memory, never downloaded."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                max_context=64, tie_embeddings=False)
    return ModelConfig(**(base | overrides))


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(tiny_config(**overrides))
    # A large init std gives peaked, position-sensitive attention: a stronger equality test.
    model.init_weights(seed=seed, std=0.3)
    return model.eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The real server with the shipped calculator checkpoint, on an ephemeral port, shared by the
    session's tests (start your own with tests.serving.running_server for other settings)."""
    from tests.serving import running_server
    with running_server(tmp_path_factory.mktemp("server"), "--max-batch", "8") as srv:
        yield srv
