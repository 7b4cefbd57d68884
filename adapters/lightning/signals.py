"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM (what schedulers send before they kill a job).

The first SIGINT or SIGTERM a process receives is recorded (:class:`GracefulStop`); after each optimizer step the
ranks agree on it, finish that step, write the final checkpoint together, and every process exits with 128 + the
signal (130 for SIGINT, 143 for SIGTERM), never 0; rank 0 prints the message and the ``--resume`` hint once. A second
Ctrl-C stops at once (KeyboardInterrupt), leaving the last checkpoint.

Agreement, one tiny collective per step: :meth:`GracefulStop.agree` all-reduces (MAX, through the Lightning
strategy) the signal number each rank holds, 0 for none, in ``HFCheckpoint.on_train_batch_end`` after the step's
optimizer update. So a signal reaching any rank stops all of them after the same step, whichever ranks it reached:
SLURM signals every process of the job, Ctrl-C the whole foreground process group, ``kill PID`` perhaps rank 0 alone,
torchrun forwards SIGTERM/SIGINT to its workers (and kills them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds later,
default 30: the stop must fit in that). If the signals differ, SIGTERM (15) wins over SIGINT (2). The checkpoint of
the agreed step is written by every rank (FSDP gathers the weights and each rank writes its optimizer shard), then
``trainer.should_stop`` ends ``fit``.
The cost of the collective: ``benchmarks/stop_flag.py`` (docs/reliability.md).

What Lightning 2.6 does, and what pgzoo keeps of it (``lightning/pytorch/trainer/connectors/signal_connector.py``,
``loops/training_epoch_loop.py``): when ``fit`` starts it installs its SIGTERM handler, chaining the one found before
(ours). On SIGTERM that handler (1) on rank 0 of its own launcher (``train.devices=N``) forwards the signal to the
child ranks it started, (2) calls ``torch.distributed.broadcast`` from inside the signal handler, (3) sets
``trainer.received_sigterm``; the loop broadcasts rank 0's flag at the start of every batch and raises
``SIGTERMException`` (a ``SystemExit`` with status 0) there, or at the end of the step on a rank that received the
signal itself. No checkpoint is written, the status is 0, a rank other than 0 that alone got the signal leaves the
others waiting in their next collective (Lightning-AI/pytorch-lightning#20806, still open), and (2) adds a collective
at an arbitrary point of each signalled rank's program: unless every rank is signalled at the same point of its
sequence of collectives, the ranks' collectives no longer pair up. So once ``fit`` has installed its handler
(``on_train_start``) pgzoo puts its own SIGTERM handler back for the training loop (Lightning restores the previous
handlers in its teardown): (1) is not needed, since the flag reaches every rank through the per-step agreement; (3)
stays false, so Lightning's per-batch broadcast carries 0 and its loop ends through ``should_stop`` after pgzoo's
checkpoint. SIGINT is never Lightning's: our handler only records it (a second Ctrl-C raises KeyboardInterrupt, which
Lightning turns into ``sys.exit(1)`` after killing its child ranks; :func:`fit_until_stopped` reports that as status
130).

Lightning's launcher also watches its child ranks from rank 0 (its child-process observer, every 5 s) and kills all of
them with SIGKILL when one exits with a non-zero status. A child rank that stops on a signal therefore waits (up to
:data:`OUTLIVE_S` seconds) for rank 0, its parent, to exit first (:meth:`GracefulStop.finish_rank`), then exits with
the same status. A rank that dies (SIGKILL, out of memory) is not a signal to agree on: the survivors' next
collective fails and they stop with ``lost contact with another rank`` (:func:`pgzoo.adapters.lightning.distributed.with_resume_hint`).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from pgzoo.errors import PgzooError

OUTLIVE_S = 120.0  # a child rank waits at most this long for rank 0 (its parent, Lightning's launcher) to exit


class Interrupted(PgzooError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number. ``quiet``: the CLI prints nothing
    (a rank other than 0; rank 0 says it once)."""

    prefix = "stopped"

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.quiet = quiet


class GracefulStop:
    """Context manager: while active (main thread), SIGINT and SIGTERM set :attr:`signum`; rank 0 (``lead``) prints
    one line. After each step every rank calls :meth:`agree`. Handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, say=None, lead: bool = True):
        self.enabled, self.lead, self.signum, self.step = enabled, lead, None, None
        self.said = False
        self.lead_pid: int | None = None  # rank 0's process id (broadcast when training starts): see finish_rank
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._previous: dict = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def error(self, last_step: int, steps: int, run_dir, command: str | None) -> Interrupted:
        """The :class:`Interrupted` to raise once the run in ``run_dir`` stopped after ``last_step``; ``command`` is
        how the run was started (for the resume hint). Quiet on ranks other than 0."""
        from pgzoo.adapters.lightning.run_folder import checkpoint_step, latest_checkpoint

        final = latest_checkpoint(run_dir, intact=True)
        saved = final is not None and checkpoint_step(final) == last_step
        where = (f"checkpoint {final} holds it" if saved else
                 f"the last checkpoint is {final}" if final is not None else "no checkpoint was written")
        how = command or f"pgzoo train <recipe> output.dir={run_dir}"
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            how = f"the same torchrun command ({how} ...)"
        return Interrupted(f"{self.name} received: stopped after step {last_step} of {steps}; {where}; continue "
                           f"with: {how} --resume", self.signum, quiet=not self.lead)

    def agree(self, strategy=None) -> bool:
        """Every rank, after each optimizer step: the largest signal number any rank holds (one all-reduce MAX of
        one integer through the Lightning ``strategy``; nothing on one process). True when the run stops now."""
        from pgzoo.adapters.lightning.distributed import world

        local = int(self.signum or 0)
        if world()[0] > 1:
            import torch

            device = strategy.root_device if strategy is not None else torch.device("cpu")
            flag = torch.tensor([local], dtype=torch.int32, device=device)
            if strategy is not None:
                flag = strategy.reduce(flag, reduce_op="max")
            else:
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            agreed = int(flag.item())
        else:
            agreed = local
        if agreed and agreed != local:
            self.signum = agreed
            self._tell(f"pgzoo: {self.name} received by another rank; stopping after the current step with a final "
                       f"checkpoint")
        return bool(agreed)

    def reclaim(self, strategy=None) -> None:
        """When training starts (``on_train_start``, every rank): put our SIGTERM handler back after Lightning
        installed its own (the module docstring says why Lightning's is not kept inside the training loop), and
        learn rank 0's process id (one broadcast) for :meth:`finish_rank`."""
        from pgzoo.adapters.lightning.distributed import world

        if world()[0] > 1 and strategy is not None:
            self.lead_pid = int(strategy.broadcast(os.getpid(), src=0))
        if self.enabled and self._previous:
            try:
                signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # pragma: no cover - not the main thread
                pass

    def finish_rank(self) -> None:
        """A rank other than 0 that stops on a signal: when rank 0 is its parent (Lightning's launcher), wait until
        rank 0 has exited (at most :data:`OUTLIVE_S`), so rank 0's child observer does not SIGKILL rank 0 on seeing
        this rank's non-zero status. Under torchrun or SLURM the parent is not a rank: return at once."""
        if self.lead or self.lead_pid is None or os.getppid() != self.lead_pid:
            return  # rank 0, or a rank whose parent is not rank 0 (or rank 0 has exited already)
        deadline = time.monotonic() + OUTLIVE_S
        while os.getppid() == self.lead_pid and time.monotonic() < deadline:
            time.sleep(0.05)

    def _tell(self, msg: str) -> None:
        if self.lead and not self.said:
            self.said = True
            self.say(msg)

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            self._tell(f"pgzoo: {signal.Signals(signum).name} received; stopping after the current step with a "
                       f"final checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> "GracefulStop":
        if self.enabled:
            try:
                for s in self.SIGNALS:
                    self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def fit_until_stopped(trainer, module, loader, stop: GracefulStop, run_dir, world_size: int, steps: int,
                      command: str | None) -> None:
    """``trainer.fit(module, loader)`` under ``stop``; a failure becomes a pgzoo error with the resume hint
    (:func:`pgzoo.adapters.lightning.distributed.with_resume_hint`), a second Ctrl-C :class:`Interrupted`. A stop on a signal returns
    normally (the caller raises :meth:`GracefulStop.error` after writing the summary)."""
    from pgzoo.adapters.lightning.distributed import with_resume_hint

    try:
        trainer.fit(module, train_dataloaders=loader)
    except BaseException as exc:
        sigterm = type(exc).__name__ == "SIGTERMException"  # Lightning's own stop (a signal before on_train_start)
        if sigterm and stop.signum is not None:
            return  # ours to report, with the final checkpoint if the step reached it
        if isinstance(exc, Exception) or sigterm:
            raise with_resume_hint(exc, run_dir, world_size, module.last_step + 1, command) from exc
        if isinstance(exc, SystemExit) and stop.signum is not None:  # a second Ctrl-C: Lightning's exit(1)
            raise stop.error(module.last_step, steps, run_dir, command) from None
        raise


__all__ = ["GracefulStop", "Interrupted", "fit_until_stopped"]
