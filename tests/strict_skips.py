"""In CI a missing test dependency fails the run instead of skipping its tests.

`pytest.importorskip("transformers")` at module level skips a whole file (about 100 tests) when
the package is missing: fine on a laptop, wrong in CI, which installs the `test` extra and must
notice when that install did not give what the tests need. With `CI` set (CI services set
CI=true; .ci/run runs under it), a skip whose reason is a module that could not be imported, or
a missing Chromium (.ci/run installs it), is reported as a failure instead. Skips that stay
skips: the `gpu` marker, the optional extras in OPTIONAL, and skips with any other reason
(a test that does not apply, torch built without torch.distributed).
"""

import os
import re

import pytest

# documented optional extras: not in pyproject's `test` extra (timm: PyPI's torchvision does not
# import beside a CPU torch, see pyproject.toml)
OPTIONAL = frozenset({"timm"})

_MISSING_MODULE = re.compile(r"could not import '([\w.]+)'")
_MISSING_TOOL = ("chromium not installed",)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_dependency(reason: str) -> str | None:
    """What a skip reason says is missing (a required module or tool), or None."""
    m = _MISSING_MODULE.search(reason)
    if m and m.group(1).split(".")[0] not in OPTIONAL:
        return m.group(1)
    return next((t for t in _MISSING_TOOL if t in reason), None)


def _reason(longrepr) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_if_missing(report) -> None:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report.longrepr)
    what = missing_dependency(reason)
    if what is not None:
        report.outcome = "failed"
        report.longrepr = (f"CI is set and a test dependency is missing ({what}): this would have been "
                           f"skipped ({reason}). Install the test extra: pip install -e '.[test]'")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip skips the whole file at collection."""
    outcome = yield
    _fail_if_missing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_missing(outcome.get_result())
