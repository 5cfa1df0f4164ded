"""The generated code in peer/_proto must be exactly what proto/peer.proto generates."""

import pytest

from peer import protogen


@pytest.mark.timeout(60)
def test_generated_code_matches_proto():
    for name, text in protogen.generate().items():
        committed = (protogen.OUT / name).read_text()
        assert committed == text, f"peer/_proto/{name} is stale: run `make proto` and commit the result"
