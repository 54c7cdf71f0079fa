from duca_fast import native


def ensure_native_library():
    """Build the CPU part of the library when it is missing; a failed build fails the caller, never skips."""
    if not native.available():
        native.build_library()
    assert native.available(), (
        f"the native library was built but cannot be loaded from {native.library_path()}"
    )
    return native.library_path()
