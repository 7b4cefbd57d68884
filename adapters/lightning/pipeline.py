"""Asynchronous rollouts (``rollout.max_staleness`` = k >= 1): the engine samples later steps' rollouts in a
background thread while the trainer updates the policy, with at most k policy versions between the weights that
sampled a row and the weights it trains.

Versions. Version v is the policy after v global steps (v = 0: the starting weights); step s trains version s into
version s + 1 and the engine is synced to version s + 1 at the end of step s. During step s the engine holds version
s and samples, in the background, every step j <= s + k that nothing has sampled yet (:meth:`RolloutPipeline.launch`);
a step whose rollouts are not queued when it starts is sampled in the foreground, with version s. So a run from the
start trains step s on rollouts of version max(0, s - k): steps 1..k on version 0 (sampled while step 0 trains),
every later step exactly k versions old. The schedule is a function of the step only, never of timing, so two runs
with the same seed take the same updates, whatever the machine.

Boundaries. Before the engine's weights change (:meth:`RolloutPipeline.wait`, called before every sync) every
generation in flight finishes, so a generation never sees two versions and a sync never writes under a running
forward; ``verify_sync`` therefore holds after every sync as in the synchronous loop.

Background sync. The sync itself may run in the same background thread (:meth:`RolloutPipeline.sync_in_background`),
queued ahead of the generation that needs it: it streams the parameters as they are while the trainer starts the
next step (its rollouts are already queued; its forward and backward change no parameter), and the trainer waits
for it (:meth:`RolloutPipeline.wait_sync`) before its first optimizer step. The engine therefore receives exactly
the weights a sync in the trainer's thread would have sent, and the next generation starts after them: the same
updates, bit for bit. The trainer's module decides when (an unsharded policy and no ``verify_sync``): a sharded
policy's gather is a collective and stays in the trainer's thread. The background thread runs the engine, the
task's reward and such an unsharded sync only: no collective, so with several ranks each rank overlaps its own
share and the ranks' collectives stay in the main thread, in step.

Old policy. With ``train.old_policy: sampling`` the trainer adds to each queued step, while it still holds the
version that sampled it, the training engine's logprobs of its rows under that version (:meth:`sampled_by` lists
them; :class:`Queued` carries them, and R2's routes recorded with them).

Checkpoints. At a step boundary nothing is in flight and the queue holds the rollouts of the next k steps (those
within ``train.steps``); each rank saves its own share in the checkpoint (``rollouts/rank-XXXXX.pt``, with their
π_θold when scored), and ``--resume`` puts them back, so a resumed run trains on the rollouts the uninterrupted run
trained on and takes the same updates. A checkpoint without them (world size changed) resumes with the queue empty:
step c is then sampled in the foreground with version c and steps c+1..c+k with version c, as at the start of a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pgzoo.adapters.lightning.sampling import Sampled
from pgzoo.errors import ConfigError
from pgzoo.rollout.base import Rollouts

ROLLOUTS_DIR = "rollouts"  # inside a checkpoint: one file of queued rollouts per rank


def generation_version(step: int, max_staleness: int) -> int:
    """The policy version that samples step ``step``'s rollouts in a run from the start (see the module doc)."""
    return max(0, step - max_staleness)


def staleness_metrics(step: int, versions: torch.Tensor) -> dict[str, float]:
    """``staleness/mean`` and ``staleness/max``: policy versions between the weights that sampled the step's rows
    (``versions``, this rank's) and the weights the step trains (version ``step``). Every rank's rows of a step come
    from one version (the schedule is a function of the step), so this rank's rows speak for the step."""
    stale = (step - versions).float()
    return {"staleness/mean": float(stale.mean()), "staleness/max": float(stale.max())}


@dataclasses.dataclass
class Queued:
    """One step's rollouts, sampled on this rank, and the policy version that sampled them.

    With ``train.old_policy: sampling`` the trainer adds, before that version's weights change, the training engine's
    logprobs of the rows under them (``old_logprobs`` ``[n, T]``, CPU) and, with R2, the routes recorded in that
    pass (``old_routes`` int16 ``[n, S, L, k]``)."""

    sampled: Sampled
    version: int
    old_logprobs: torch.Tensor | None = None
    old_routes: torch.Tensor | None = None


class RolloutPipeline:
    """The queue of steps sampled ahead and the one background thread that samples them.

    ``sample(step)`` samples this rank's share of ``step`` (engine + rewards, no collective) and returns a
    :class:`~pgzoo.adapters.lightning.sampling.Sampled`; ``engine`` is asked to ``cancel()`` a generation in flight
    when the pipeline closes early (an engine without ``cancel`` finishes it).
    """

    def __init__(self, sample: Callable[[int], Sampled], max_staleness: int, steps: int, engine=None):
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 1:
            raise ConfigError(f"rollout.max_staleness={max_staleness!r}: the pipeline runs with k >= 1 "
                              "(0 is the synchronous loop)")
        self.sample, self.k, self.steps, self.engine = sample, max_staleness, steps, engine
        self.queue: dict[int, Queued] = {}
        self.running: dict[int, concurrent.futures.Future] = {}
        self.syncing: concurrent.futures.Future | None = None  # a weight sync queued or running in the background
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def take(self, step: int) -> Queued:
        """Step ``step``'s rollouts: the queued ones, or sampled now with version ``step`` (nothing queued)."""
        self.wait_for(step)
        got = self.queue.pop(step, None)
        if got is None:
            self.wait_sync()  # the engine holds version ``step`` once the last sync is done
            got = Queued(self.sample(step), step)
        if step - got.version > self.k:  # only a queue restored under another schedule could hold such rows
            raise ConfigError(f"step {step}: its queued rollouts were sampled with version {got.version}, more than "
                              f"rollout.max_staleness={self.k} versions ago")
        return got

    def launch(self, step: int) -> None:
        """During step ``step`` (the engine holds version ``step``): sample every step ``step + 1 .. step + k``
        within the run that is neither queued nor running, in order, in the background."""
        for j in range(step + 1, min(step + self.k, self.steps - 1) + 1):
            if j in self.queue or j in self.running:
                continue
            self.running[j] = self._thread().submit(self._sample_version, j, step)

    def _thread(self) -> concurrent.futures.ThreadPoolExecutor:
        # one worker: a sync and the generations queued after it run in the order they were submitted
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgzoo-rollout")
        return self._pool

    def sync_in_background(self, stream: Callable[[], object]) -> None:
        """Queue the weight sync ``stream`` (the callable of :func:`pgzoo.rollout.sync.prepare_sync`) in the
        background thread, after every generation in flight and before any generation launched later. The caller
        must not change a parameter before :meth:`wait_sync` returns."""
        self.wait()
        self.syncing = self._thread().submit(stream)

    def wait_sync(self) -> float:
        """The background sync (if any) finished; returns the seconds waited. Its error is raised here."""
        future, self.syncing = self.syncing, None
        if future is None:
            return 0.0
        start = time.perf_counter()
        future.result()
        return time.perf_counter() - start

    def sampled_by(self, version: int) -> list[Queued]:
        """Every queued step sampled by ``version``, in step order, once every generation in flight finished (call
        it while the policy still holds that version's weights to score them: ``train.old_policy: sampling``)."""
        self.wait()
        return [self.queue[j] for j in sorted(self.queue) if self.queue[j].version == version]

    def _sample_version(self, step: int, version: int) -> Queued:
        return Queued(self.sample(step), version)

    def wait_for(self, step: int) -> None:
        future = self.running.pop(step, None)
        if future is not None:
            self.queue[step] = future.result()  # an engine or reward error is raised here, in the trainer's thread

    def wait(self) -> None:
        """Every generation in flight finished and queued, and the background sync done (call before the engine's
        weights change)."""
        self.wait_sync()
        for step in sorted(self.running):
            self.wait_for(step)

    def close(self) -> None:
        """Stop: queued work that has not started is dropped, a generation in flight is cancelled (or finished),
        the thread ends. Errors of the stopped work are not raised (the run is already ending)."""
        for future in self.running.values():
            future.cancel()
        cancel = getattr(self.engine, "cancel", None)
        if cancel is not None and any(f.running() for f in self.running.values()):
            cancel()
        if self._pool is not None:  # a sync already streaming finishes (the engine never holds half a version)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.running.clear()
        self.syncing = None

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path, rank: int, world_size: int) -> None:
        """This rank's queue into ``folder/rollouts/rank-XXXXX.pt`` (call at a step boundary: nothing in flight)."""
        self.wait()
        entries = {j: {"rollouts": {f.name: getattr(q.sampled.rollouts, f.name)
                                    for f in dataclasses.fields(Rollouts)},
                       "rewards": q.sampled.rewards, "metrics": q.sampled.metrics, "version": q.version,
                       "old_logprobs": q.old_logprobs, "old_routes": q.old_routes}
                   for j, q in self.queue.items()}
        path = Path(folder) / ROLLOUTS_DIR / f"rank-{rank:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": world_size, "max_staleness": self.k, "steps": entries}, path)

    def restore(self, folder: Path, rank: int, world_size: int, start: int, scored: bool = False) -> str | None:
        """Put back this rank's queue saved in checkpoint ``folder`` for a run resuming at step ``start``; returns
        why nothing was restored (None when restored). ``scored``: the run needs each queued step's π_θold under its
        sampling weights (``train.old_policy: sampling``), which a checkpoint of a run without it does not hold."""
        path = Path(folder) / ROLLOUTS_DIR / f"rank-{rank:05d}.pt"
        if not path.is_file():
            return "the checkpoint holds no queued rollouts (written by a synchronous run)"
        saved = torch.load(path, weights_only=False, map_location="cpu")
        if saved["world_size"] != world_size:
            return (f"its queued rollouts were sampled by {saved['world_size']} ranks, this run has {world_size}; "
                    f"the next steps are sampled again")
        kept = {j: e for j, e in saved["steps"].items() if j >= start and j - e["version"] <= self.k}
        if scored and any(e.get("old_logprobs") is None for e in kept.values()):
            return ("its queued rollouts carry no π_θold under the weights that sampled them (saved by a run with "
                    "train.old_policy=current); the next steps are sampled again")
        for j, e in kept.items():
            self.queue[j] = Queued(Sampled(Rollouts(**e["rollouts"]), [], e["rewards"], e["metrics"]),
                                   e["version"], e.get("old_logprobs"), e.get("old_routes"))
        return None


__all__ = ["RolloutPipeline", "Queued", "generation_version", "staleness_metrics", "ROLLOUTS_DIR"]
