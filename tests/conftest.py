# Triton kernels run on CPU tensors in the interpreter. The variable must be set before any Triton kernel is
# defined (imported), so it is set here, before pytest imports the test modules.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes on a 2-core CPU; still runs in CI (the default run)")
