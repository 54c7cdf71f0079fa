"""The native tests need the library: build it (CPU part) when it is missing, so a fresh clone's `make test`
works; a failed build fails these tests with CMake's output, it never skips them."""

import pytest

from duca_fast import native


@pytest.fixture(scope="session", autouse=True)
def native_library():
    if not native.available():
        native.build_library()
    assert native.available(), (
        f"the native library was built but cannot be loaded from {native.library_path()}"
    )
    return native.library_path()
