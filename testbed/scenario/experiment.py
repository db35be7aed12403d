"""An experiment with a timeline: testbed.run's Experiment plus the scenario engine as a hook.

`Experiment` (exported as testbed.Experiment) accepts `scenario=` (or cfg.run.scenario, a YAML
path) and runs it with `ScenarioHook`: round-triggered events on the main thread at the round
boundaries, time-triggered ones on the engine's timer thread from round 1, everything under
the experiment's event lock; a failure on the timer thread is raised on the main thread as a
RunFailed naming the scenario. Without a scenario it runs exactly as testbed.run's Experiment.
"""

from __future__ import annotations

from typing import Any

from testbed.emu.linkops import link_ops
from testbed.errors import BadInput, RunFailed
from testbed.run.experiment import Experiment as BaseExperiment
from testbed.run.hooks import RunHook
from testbed.scenario.engine import ScenarioRunner
from testbed.scenario.reactions import reactions_for
from testbed.scenario.timeline import Scenario, ScenarioError


class ScenarioHook(RunHook):
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    def _fail(self, e: Exception, where: str = "") -> RunFailed:
        return RunFailed(f"scenario {self.scenario.name}{where}: {e}")

    def validate(self, exp: Any) -> None:
        """Before anything is built: the timeline's hosts, links, rounds and reactions."""
        try:
            self.scenario.check(exp.topo, exp.reactions, exp.cfg.run.rounds)
        except ScenarioError as e:
            raise self._fail(e) from None

    def _runner(self, exp: Any) -> ScenarioRunner:
        if exp.scenario_runner is None:
            exp.scenario_runner = ScenarioRunner(
                self.scenario, exp.topo, link_ops(exp.network, exp.topo, exp.controller),
                seed=exp.cfg.run.seed, reactions=exp.reactions,
                exp=exp, log=exp.log_event, lock=exp.event_lock,
                cells=lambda h: exp.attachment.get(h, exp.topo.nodeInfo(h).get("cell")))
        return exp.scenario_runner

    def _step(self, exp: Any, phase: str, rnd: int) -> None:
        """The events of a round boundary; the timer (`at` triggers) starts as the first
        round's command goes out."""
        try:
            runner = self._runner(exp)
            if phase == "before_round":
                runner.before_round(rnd)
            elif phase == "round_started":
                if not runner.started:
                    runner.start_timer()
                runner.round_started(rnd)
            else:
                runner.after_round(rnd)
        except RunFailed:
            raise
        except Exception as e:
            raise self._fail(e, f", {phase} {rnd}") from e

    def before_round(self, exp: Any, rnd: int) -> None:
        self._step(exp, "before_round", rnd)

    def round_started(self, exp: Any, rnd: int) -> None:
        self._step(exp, "round_started", rnd)

    def after_round(self, exp: Any, rnd: int) -> None:
        self._step(exp, "after_round", rnd)

    def check(self, exp: Any) -> None:
        """Raise here, on the main thread, what failed on the scenario's timer thread."""
        if exp.scenario_runner is not None:
            try:
                exp.scenario_runner.check()
            except RunFailed:
                raise
            except Exception as e:
                raise self._fail(e) from e

    def finish(self, exp: Any) -> None:
        if exp.scenario_runner is not None:
            exp.scenario_runner.finish()
            self.check(exp)

    def stop(self, exp: Any) -> None:
        if exp.scenario_runner is not None:  # no link change while the network goes
            exp.scenario_runner.stop(log=False)


class Experiment(BaseExperiment):
    runs_scenarios = True

    def __init__(self, cfg: Any, topo: Any, *, scenario: Scenario | None = None,
                 **kwargs: Any) -> None:
        """As testbed.run.experiment.Experiment; `scenario`: a timeline to run (else
        cfg.run.scenario's YAML file, if set). `reactions` (kind -> fn) starts as the reactions
        table (testbed.scenario.reactions) and may be changed for this run."""
        super().__init__(cfg, topo, **kwargs)
        self.reactions = reactions_for()
        self.scenario_runner: ScenarioRunner | None = None
        # host -> cell after handovers (testbed.scenario.migration)
        self.attachment: dict[str, int | None] = {}
        try:
            self.scenario = scenario or (Scenario.load(cfg.run.scenario) if cfg.run.scenario
                                         else None)
        except ScenarioError as e:
            raise BadInput(str(e)) from None
        if self.scenario is not None:
            self.hooks.append(ScenarioHook(self.scenario))

    def spec(self) -> dict[str, Any] | None:
        """As the run's, with the timeline inline (the file it came from may change)."""
        spec = super().spec()
        if spec is not None and self.scenario is not None:
            spec["run"] = {**spec["run"], "scenario": None}
            spec["scenario"] = self.scenario.to_dict()
        return spec
