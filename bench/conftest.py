"""Shared set-up for ``pytest bench/`` (pytest-benchmark suites, one ``bench_<area>.py`` per area).

Bench files are named ``bench_*.py`` so that the unit-test run never collects them; this hook
collects them when pytest is pointed at ``bench/``. The header records the device, so numbers
copied into bench/RESULTS.md always say where they were measured.
"""

from __future__ import annotations

import platform

import pytest
import torch


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; don't collect them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def pytest_report_header(config):
    return f"mrt-fast bench device: {device_name()}; torch {torch.__version__}"


@pytest.fixture(scope="session")
def bench_device() -> str:
    """Human-readable device name, for ``benchmark.extra_info``."""
    return device_name()
