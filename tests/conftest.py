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
