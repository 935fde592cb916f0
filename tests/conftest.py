import os

# The Triton kernels run on CPU tensors through the interpreter; it must be set before triton is
# imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

from _backends import require_backend  # noqa: E402  (after TRITON_INTERPRET)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_backend(name): the test needs that fusedloss backend; skipped where it is unavailable, "
        "a failure in CI (tests/_backends.py)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_backend"):
        require_backend(*mark.args)
