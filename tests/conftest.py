"""Suite-wide test hygiene."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # Several tests pin torch to one thread (the tiny models run faster that way on a loaded 2-core machine).
    # Restore the count afterwards so no test depends on which tests ran before it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a loaded 2-core machine OpenMP spin-waiting makes two
    threads many times slower, and the models are far too small to gain from intra-op parallelism.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
