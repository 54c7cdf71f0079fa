"""The native tests need the library: build it (CPU part) when it is missing, so a fresh clone's `make test`
works; a failed build fails these tests with CMake's output, it never skips them."""

import pytest

from tests.native import ensure_native_library


@pytest.fixture(scope="session", autouse=True)
def native_library():
    return ensure_native_library()
