"""Run a plan's steps in order (see the package docstring for the policies)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from surgery.front.plan import Plan
from surgery.front.plan_step import PlanStep

if TYPE_CHECKING:
    from surgery.executor.run import Run


def execute(plan: Plan, run: Run, phases: tuple[str, ...] | None = None) -> Plan:
    """Run the steps of `plan` (those of `phases`, default all) over `run`; returns the plan with
    what the steps resolved while running (expert groups, kept experts), also kept in `run.plan`.

    Each step's time is added to the report's timing it names.
    """
    selected = [step for step in plan.steps if phases is None or step.phase in phases]
    run.plan = plan
    run.stream = plan.streams(phases)
    if not run.stream and run.graph.weights is not None:
        run.progress("reading every weight into memory (a step needs the whole model)")
        run.graph.materialize_all()
    for step in selected:
        step.prepare(run)
    done: dict[int, PlanStep] = {}
    position = 0
    while position < len(selected):
        step = selected[position]
        kind = type(step)
        if kind.together:  # a run of steps of one kind (one phase: the plan orders by phase)
            end = position
            while end < len(selected) and type(selected[end]) is kind:
                end += 1
            group = selected[position:end]
            resolved = kind.run_all(run, group) or group
            position = end
        else:
            if step.phase == "export":
                for later in selected[position + 1 :]:
                    later.before_export(run)
            group, resolved = [step], [step.run(run) or step]
            position += 1
        for original, after in zip(group, resolved, strict=True):
            done[id(original)] = after
        run.plan = replace(plan, steps=tuple(done.get(id(s), s) for s in plan.steps))
        if kind.timing:
            run.clock.lap(kind.timing)
    return run.plan
