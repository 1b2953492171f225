"""A pytest plugin: crash loops as fixtures.

Enable it in a conftest.py with `pytest_plugins = ["logwrites.pytest_plugin"]`, then:

    def test_my_fs_survives_crashes(crash_loop):
        result = crash_loop("my-workload.sh", fs="ext4", checks=["fsck", "guest:check.sh"])
        result.assert_ok()   # fails with every failing state's id, blamed records and repro

`crash_loop` is `logwrites.api.crash_loop` with its scratch files under the test's tmp_path;
the result it returns has `assert_ok()`. `--logwrites-out DIR` keeps an HTML report per test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logwrites.api import assert_no_failures
from logwrites.api import crash_loop as api_crash_loop
from logwrites.loop import LoopResult


class CrashLoopResult:
    """A LoopResult with `assert_ok()`; other attributes pass through."""

    def __init__(self, result: LoopResult) -> None:
        self.result = result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.result, name)

    def assert_ok(self) -> None:
        __tracebackhide__ = True
        assert_no_failures(self.result)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--logwrites-out", default=None,
                     help="keep each crash_loop's HTML report under DIR/<test name>")


@pytest.fixture
def crash_loop(request: pytest.FixtureRequest,
               tmp_path: Path) -> Callable[..., CrashLoopResult]:
    """`crash_loop(workload, **options)` -> result with `assert_ok()` (see logwrites.api)."""
    keep = request.config.getoption("--logwrites-out")

    def run(*args: Any, **kwargs: Any) -> CrashLoopResult:
        kwargs.setdefault("workdir", tmp_path)
        if keep and "out" not in kwargs:
            kwargs["out"] = Path(keep) / re.sub(r"[^\w.-]+", "_", request.node.name)
        return CrashLoopResult(api_crash_loop(*args, **kwargs))

    return run
