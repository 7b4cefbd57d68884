"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM (what schedulers send before they kill a job).

One process: the first signal is recorded and the run stops after the current global step, with a final checkpoint
(:class:`pgzoo.adapters.checkpoint.HFCheckpoint` saves when :attr:`GracefulStop.signum` is set), then raises
:class:`Interrupted`, which the CLI turns into exit status 128 + signal (130 for SIGINT, 143 for SIGTERM), never 0.
A second Ctrl-C stops at once (KeyboardInterrupt), leaving the last checkpoint.

Composed with Lightning, not against it: Lightning installs its own SIGTERM handler when ``fit`` starts and keeps
the handler found before it (ours) in its chain; it then stops the loop after the step (``SIGTERMException``, a
``SystemExit``), which :func:`pgzoo.train.train` turns into :class:`Interrupted`. SIGINT never reaches Lightning
as a KeyboardInterrupt (which it would turn into ``sys.exit(1)``): our handler only records it and asks the trainer
to stop (``trainer.should_stop``).

Several ranks: SIGTERM is :func:`pgzoo.distributed.stop_on_sigterm`'s (the rank stops at once with the resume hint,
the last checkpoint intact; a final checkpoint would need every rank to agree on the step first), with exit 143.
"""

from __future__ import annotations

import signal
import sys

from pgzoo.errors import PgzooError


class Interrupted(PgzooError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number."""

    prefix = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


class GracefulStop:
    """Context manager: while active (main thread, one process), SIGINT and SIGTERM set :attr:`signum` and print one
    line; the loop polls :attr:`signum` after each step. Handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, say=None):
        self.enabled, self.signum, self.step = enabled, None, None
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._previous: dict = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def error(self, last_step: int, steps: int, run_dir, command: str | None) -> Interrupted:
        """The :class:`Interrupted` to raise once the run in ``run_dir`` stopped after ``last_step``; ``command`` is
        how the run was started (for the resume hint)."""
        from pgzoo.run_folder import checkpoint_step, latest_checkpoint

        final = latest_checkpoint(run_dir)
        saved = final is not None and checkpoint_step(final) == last_step
        where = (f"checkpoint {final} holds it" if saved else
                 f"the last checkpoint is {final}" if final is not None else "no checkpoint was written")
        how = command or f"pgzoo train <recipe> output.dir={run_dir}"
        return Interrupted(f"{self.name} received: stopped after step {last_step} of {steps}; {where}; continue "
                           f"with: {how} --resume", self.signum)

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            self.say(f"pgzoo: {signal.Signals(signum).name} received; stopping after the current step with a final "
                     f"checkpoint (Ctrl-C again to stop at once)")

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


__all__ = ["GracefulStop", "Interrupted"]
