import pytest

from tests.swarm.hf_helpers import make_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A JSONL corpus and a BPE tokenizer trained on it (the Hugging Face swarm tests)."""
    return make_files(tmp_path_factory.mktemp("hf-files"))
