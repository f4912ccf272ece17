"""Shared fixtures: an isolated cache dir per test session and the tiny base model."""

from __future__ import annotations

import os

import pytest

from loramint.training.config import ExpertTrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TRAIN = ExpertTrainConfig(
    rank=4,
    alpha=8.0,
    steps=30,
    lr=3e-3,
    batch_size=8,
    max_length=64,
    n_metric_eval=16,
    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
)
"""Expert training on tiny-llama that measurably learns a synthetic task in a few seconds."""


@pytest.fixture(scope="session")
def tiny():
    from loramint.models import load_base_model

    return load_base_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from loramint.models import load_base_model

    return load_base_model("smollm2-135m")
