"""Shared fixtures: an isolated cache dir per test session and the tiny base model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    from loramint.models import load_base_model

    return load_base_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    from loramint.models import load_base_model

    return load_base_model("smollm2-135m")
