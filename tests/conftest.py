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


class TinyJob:
    """A `pgzoo train RECIPE` process started in the background, its output in files (a full pipe would block it)."""

    def __init__(self, recipe: str, run_dir, env: dict, timeout: float):
        import subprocess
        import sys
        import time
        from pathlib import Path

        repo = Path(__file__).resolve().parents[1]
        self.run_dir, self.timeout, self.started = run_dir, timeout, time.perf_counter()
        self.out, self.err = run_dir.parent / "stdout.txt", run_dir.parent / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pgzoo", "train", str(repo / recipe),
                                          f"output.dir={run_dir}", "--quiet"], cwd=repo, env=env, stdout=out,
                                         stderr=err, text=True)

    def wait(self) -> tuple[int, str, float]:
        """Exit status, the tail of its output, and its wall time from its start."""
        import time

        self.proc.wait(timeout=max(1.0, self.timeout - (time.perf_counter() - self.started)))
        tail = self.out.read_text()[-3000:] + self.err.read_text()[-3000:]
        return self.proc.returncode, tail, time.perf_counter() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# test file -> (shipped recipe, extra environment, timeout in seconds) of the tiny jobs it checks end to end
TINY_JOBS = {
    "test_main_job.py": ("recipes/tiny/minirl.yaml", {}, 1500),
    "test_lora_job.py": ("recipes/tiny/minirl-lora.yaml", {"OMP_NUM_THREADS": "1"}, 1800),
}


@pytest.fixture(scope="session")
def tiny_jobs(request, tmp_path_factory):
    """The main job and the LoRA job (`pgzoo train recipes/tiny/minirl*.yaml`), started together when the first of
    their tests needs one: each process trains with one thread (train.threads and the vLLM engine's generate_threads
    default to 1) and the test process only waits on them, so on two cores the second job runs on the otherwise idle
    core instead of after the first one. Only the jobs whose tests were selected start. Keyed by test file name.

    Both read the cold start from the session's cache (tests/test_cold_start.py trains it; if it is not there yet,
    one job trains it and the other waits on the entry's lock, as concurrent ranks do)."""
    import importlib.util

    from _train_helpers import subprocess_env

    selected = {item.path.name for item in request.session.items}
    cache = tmp_path_factory.getbasetemp() / "pgzoo-cache"
    jobs = {}
    for test_file, (recipe, extra, timeout) in TINY_JOBS.items():
        if test_file not in selected or (test_file == "test_lora_job.py" and importlib.util.find_spec("peft") is None):
            continue  # not run in this session, or skipped there
        run_dir = tmp_path_factory.mktemp(test_file[len("test_"):-len(".py")].replace("_", "-")) / "run"
        jobs[test_file] = TinyJob(recipe, run_dir, {**subprocess_env(), "PGZOO_CACHE": str(cache), **extra}, timeout)
    yield jobs
    for job in jobs.values():
        job.stop()
