"""Test setup: kernels run through Triton's interpreter on CPU; fresh random inputs per test."""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton.jit decoration
# attnopt's capture cache would serve a graph that an earlier test traced and rewrote, skipping
# passes a test monkeypatches; tests/test_capture_cache.py turns it on for its own tests
os.environ.setdefault("ATTNOPT_CAPTURE_CACHE", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

# with CI set, a skip for a missing test dependency is a failure (tests/strict_skips.py)
from strict_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
    elif os.environ["TRITON_INTERPRET"] == "1":  # GPU tests are about the compiled kernels
        skip = pytest.mark.skip(reason="GPU tests run compiled kernels: run them with TRITON_INTERPRET=0")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test (never a shared constant input)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
