"""Shared, session-scoped fixtures: built once per test run, read-only to every test that uses them.

Only things no test writes into live here (a test that needs to change a base or a data folder builds its own with
the helpers in train_fixtures.py / gen_fixtures.py). The builders stay in those helper modules.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """File hashes (stylelora.generate.base_identity) are cached under this run's temp folder, not ~/.cache; set in
    the environment, so the CLI subprocesses the tests start use it too."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """With the suite spread over processes (pytest-xdist, one per core), each runs torch on one thread: two threads
    per worker on a 2-core machine make every small op wait on the other workers'."""
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """train_fixtures.build_tiny_base: the toy base's layout at a fraction of its width (32 px, 8x8 latents)."""
    from train_fixtures import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def stripes_dataset(tmp_path_factory) -> Path:
    """train_fixtures.write_kohya_dataset with its defaults: 8 striped 32 px images in 2_stripestyle/."""
    from train_fixtures import write_kohya_dataset

    return write_kohya_dataset(tmp_path_factory.mktemp("data") / "stripes")


@pytest.fixture(scope="session")
def tiny_sd_base(tmp_path_factory) -> Path:
    """gen_fixtures.save_tiny_base: the tiny random SD1.x pipeline (16 px images) saved as a folder named `base`."""
    from gen_fixtures import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny_sd") / "base")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests (use with pytest.mark.usefixtures): on a shared 2-core machine
    a second thread makes each small op wait on the other, many times slower; subprocess tests run one thread too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
