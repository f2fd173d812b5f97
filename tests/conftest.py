"""Shared test set-up: deterministic, CPU-only, small thread pool (CI has 2 cores)."""

import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers share the cores: one thread pool per core in all, not per worker
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _loggers() -> list[logging.Logger]:
    manager = logging.Logger.manager
    return [
        logging.getLogger(),
        *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]


@pytest.fixture(autouse=True)
def _logging_handlers():
    """Drop logging handlers a test leaves behind: ``ldct-clip train`` applies the bundle's logging.conf, whose
    console handler holds the stdout pytest captured for that test and closes after it."""
    before = {id(logger): list(logger.handlers) for logger in _loggers()}
    yield
    for logger in _loggers():
        for handler in list(logger.handlers):
            if handler not in before.get(id(logger), []):
                logger.removeHandler(handler)
