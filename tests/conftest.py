"""Shared test fixtures: the tiny models and dataset are made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfp_finetune.drivers.fixtures import make_fixtures


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def tiny(fixtures_root: Path) -> dict[str, Path]:
    """{"llama3_2": model dir, "qwen2_5": model dir, "alpaca": dataset dir (data/ inside)}."""
    return make_fixtures(fixtures_root)
