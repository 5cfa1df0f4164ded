import pytest

from tests.docker import images


@pytest.fixture(scope="session")
def image() -> str:
    """The image of docker/Dockerfile, built here from a local base and local wheels (once a session;
    Docker's layer cache keeps a rebuild short when only the code changed)."""
    reason = images.missing()
    if reason:
        pytest.skip(reason)
    return images.build()
