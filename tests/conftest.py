# Without a GPU, Triton kernels run on CPU tensors in the interpreter; with one, they are compiled and run on
# CUDA tensors (tests/_helpers.py backend_devices), so the interpreter is switched on only when there is no GPU.
# The variable must be set before any Triton kernel is defined (imported), so it is set here, before pytest
# imports the test modules. FORGETKERN_TEST_INTERPRET=1 forces the interpreter even with a GPU.
import os

import torch

if not torch.cuda.is_available() or os.environ.get("FORGETKERN_TEST_INTERPRET", "0") not in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes on a 2-core CPU; still runs in CI (the default run)")


# Hypothesis profiles of the property suites (tests/test_properties_*.py): "ci" (the default) runs few examples,
# derandomized so that every CI run sees the same ones, without a deadline (Triton-interpreter examples are
# slow); "nightly" runs many more, randomized. Chosen by FORGETKERN_HYPOTHESIS_PROFILE.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # hypothesis is a dev dependency; the other suites run without it
    _hyp_settings = None
if _hyp_settings is not None:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    _hyp_settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                                   print_blob=True,
                                   suppress_health_check=_slow_ok)
    _hyp_settings.register_profile("nightly", max_examples=250, deadline=None, print_blob=True,
                                   suppress_health_check=_slow_ok)
    _hyp_settings.load_profile(os.environ.get("FORGETKERN_HYPOTHESIS_PROFILE", "ci"))
