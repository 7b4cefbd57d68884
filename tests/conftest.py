"""Suite-wide test hygiene."""

import gc

import pytest
import torch


def pytest_collection_finish(session):
    # Once every test module is imported, torch, transformers, TRL, Lightning and vLLM put ~800k objects in the
    # collector's care, and a full gc.collect() walks them all: ~0.6 s on a loaded 2-core machine. transformers'
    # Trainer.train() runs one per call (accelerate's free_memory), and the TRL tests train ~60 times. What exists
    # now (modules, classes, parametrize values) lives for the whole session anyway: freezing it takes it out of
    # every later collection, which then walks only the objects the tests create. The cost: a frozen object that
    # later ends up in an unreachable cycle is never reclaimed (reference counting still frees everything else).
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    # Hand the frozen objects back before the interpreter exits: its final collection skips frozen ones, and native
    # bindings (nanobind) then report them as leaked on stderr.
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # Several tests pin torch to one thread (the tiny models run faster that way on a loaded 2-core machine).
    # Restore the count afterwards so no test depends on which tests ran before it.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# What torch.distributed, Lightning, accelerate and vLLM read to find their process group. Code run in the test
# process (an in-process process group, Lightning's connection set-up, an engine) may set them; a `pgzoo train`
# subprocess started later would inherit them and think it is one rank of a group that never forms.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    import os

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a loaded 2-core machine OpenMP spin-waiting makes two
    threads many times slower, and the models are far too small to gain from intra-op parallelism.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
