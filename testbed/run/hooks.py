"""What a layer above may add to a run without reaching into it: hooks at the run's milestones.

The Experiment calls every hook in `exp.hooks` at fixed points on its main thread: `validate`
before anything is built, `before_round` / `after_round` around each round, `round_started`
as a round's command goes out, `check` whenever it checks the nodes (to raise, on the main
thread, what failed on another thread), `finish` after the last round, and `stop` while
tearing down (also after a failure). The scenario engine is one (testbed.scenario); a hook
changes the run only through the Experiment's public attributes and its control channel
(testbed.run.control).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.run.experiment import Experiment


class RunHook:
    def validate(self, exp: Experiment) -> None:
        """Before the network is built: raise BadInput/RunFailed for what cannot run."""

    def before_round(self, exp: Experiment, rnd: int) -> None:
        pass

    def round_started(self, exp: Experiment, rnd: int) -> None:
        """Round rnd's command is about to go out (after the counters that frame it)."""

    def after_round(self, exp: Experiment, rnd: int) -> None:
        pass

    def check(self, exp: Experiment) -> None:
        pass

    def finish(self, exp: Experiment) -> None:
        pass

    def stop(self, exp: Experiment) -> None:
        pass
