"""Fixtures of the real-VM tests (see testbed.py).

* ``testbed``: the cache made by ``tools/setup-testbed``; a missing test bed
  is an error (never a skip), with the set-up hint.
* ``kernel``: parametrized over the kernels, "6.1" (Debian 12) and "6.12"
  (Debian 13).
* ``initramfs``: the base initramfs for ``kernel``, built once per kernel and
  input hash (the project's wheel included), reused across sessions.
* ``make_vm``: a factory of :class:`testbed.VM` objects for ``kernel``.
* ``nix_initramfs`` / ``make_nix_vm``: the same with the Nix variant of the
  initramfs (real Nix 2.8 and Python's sqlite3 in the guest; see
  nixstores.py), for the Nix tests only.

Base images are kept in ``$GA_TESTBED_CACHE/initramfs`` (three per kernel at
most); with ``GA_TESTBED_INITRAMFS_TMP=1`` they are built in pytest's tmp
directory instead. A summary of boot times closes the test run.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import testbed as tb


@pytest.fixture(scope="session")
def testbed() -> tb.Testbed:
    bed = tb.Testbed.from_env()
    missing = bed.missing()
    if missing:
        pytest.fail(
            f"VM test bed not ready in {bed.cache} (missing: {', '.join(missing)}).\n"
            f"Hint: {tb.SETUP_HINT}",
            pytrace=False,
        )
    return bed


@pytest.fixture(scope="session")
def wheels(testbed: tb.Testbed, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The project's wheel and its dependencies' wheels."""
    return tb.build_wheels(tmp_path_factory.mktemp("wheels"))


def _initramfs_getter(
    testbed: tb.Testbed,
    wheels: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    *,
    nix: bool,
) -> Callable[[str], Path]:
    """kernel -> an initramfs (the base one, or its Nix variant), built at most once."""
    built: dict[str, Path] = {}
    out_dir = None
    if os.environ.get("GA_TESTBED_INITRAMFS_TMP"):
        out_dir = tmp_path_factory.mktemp("initramfs-nix" if nix else "initramfs")

    def get(kernel: str) -> Path:
        if kernel not in built:
            built[kernel] = tb.base_initramfs(testbed, kernel, wheels, out_dir, nix=nix)
        return built[kernel]

    return get


@pytest.fixture(scope="session")
def initramfs_for(
    testbed: tb.Testbed, wheels: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """kernel -> base initramfs path (built at most once per session)."""
    return _initramfs_getter(testbed, wheels, tmp_path_factory, nix=False)


@pytest.fixture(scope="session")
def nix_initramfs_for(
    testbed: tb.Testbed, wheels: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """kernel -> the Nix variant of the initramfs (built at most once per session)."""
    return _initramfs_getter(testbed, wheels, tmp_path_factory, nix=True)


@pytest.fixture(params=tb.KERNELS, ids=[f"linux-{k}" for k in tb.KERNELS])
def kernel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def initramfs(initramfs_for: Callable[[str], Path], kernel: str) -> Path:
    return initramfs_for(kernel)


@pytest.fixture
def make_vm(
    testbed: tb.Testbed,
    kernel: str,
    initramfs: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., tb.VM]]:
    """make_vm(**VM fields) -> VM for this test's kernel, working in tmp_path."""
    count = 0

    def make(**kw: Any) -> tb.VM:
        nonlocal count
        count += 1
        kw.setdefault("label", request.node.name)
        return tb.VM(
            testbed=testbed,
            kernel=kernel,
            initramfs=initramfs,
            workdir=tmp_path / f"vm{count}",
            **kw,
        )

    yield make


@pytest.fixture
def nix_initramfs(nix_initramfs_for: Callable[[str], Path], kernel: str) -> Path:
    return nix_initramfs_for(kernel)


@pytest.fixture
def make_nix_vm(
    testbed: tb.Testbed,
    kernel: str,
    nix_initramfs: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., tb.VM]]:
    """make_nix_vm(**VM fields) -> VM booting the Nix variant of the initramfs.

    1 GiB of guest memory by default: the initramfs is larger and Nix's evaluator
    wants room.
    """
    count = 0

    def make(**kw: Any) -> tb.VM:
        nonlocal count
        count += 1
        kw.setdefault("label", request.node.name)
        kw.setdefault("memory_mb", 1024)
        kw.setdefault("timeout", 240.0)
        return tb.VM(
            testbed=testbed,
            kernel=kernel,
            initramfs=nix_initramfs,
            workdir=tmp_path / f"nixvm{count}",
            **kw,
        )

    yield make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not tb.BOOT_LOG:
        return
    tr = terminalreporter
    tr.section("VM boots")
    for k in tb.KERNELS:
        times = [d for _, kern, d in tb.BOOT_LOG if kern == k]
        if times:
            tr.write_line(
                f"linux {k}: {len(times)} boots, mean {statistics.mean(times):.1f}s, "
                f"min {min(times):.1f}s, max {max(times):.1f}s"
            )
    total = sum(d for *_, d in tb.BOOT_LOG)
    tr.write_line(f"total time in VMs: {total:.0f}s")
