"""Fixtures of the server tests: one tiny synthetic model for the session, one live server per module."""
import pytest

from kt_core.models.synthetic import synthesize
from tests.server.live import SHAPE, Live


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=64)
    return path


@pytest.fixture(scope="module")
def live(model_path, tmp_path_factory):
    srv = Live(model_path, tmp_path_factory.mktemp("prefix"))
    yield srv
    srv.stop()
