"""Break-even acceptance: how often the exit head must agree with the full model for a point to match AR.

`eesd simulate SCENARIO --break-even [TARGET]` asks it of every EESD and PPSD point (and, with matplotlib, plots each
point's speedup against α: `break_even.png`): the point's plan (its hardware,
latencies, exit layer, head, policy, workload) is simulated again with i.i.d. acceptance α (`BernoulliAcceptance`)
and the least α at which the point's speedup over AR on the same plan reaches TARGET (default 1.0: as fast as AR) is
found: the speedup is simulated at α = 0, 1/20, ..., 1 (`CURVE`), and bisected between the first of those that reaches
the target and the one before. Under one seed a larger α accepts a superset of positions (common random numbers,
`sim.acceptance`), so with a fixed draft length the speedup rises with α; an adaptive policy's need not (beta-ts at a
batch or context where longer drafts cost more than they save can fall as α grows), and the grid finds the least
crossing either way. What is reported per point:

- `alpha_needed`: the least α at which it reaches the target (empty where no α does: `best` < target);
- `ceiling`: the speedup at α = 1 (every draft right);
- `best`, `best_alpha`: the highest speedup over the grid and its α (the ceiling where the speedup rises with α);
- `rises`: whether the speedup rises with α over the grid (a fall of over 0.5% between grid points: False);
- `speedup`: the point's speedup as the scenario states it;
- `acceptance`: what the scenario's acceptance gives (a trace's agreement at the point's exit layer, or its α);
- `alpha_now`: the i.i.d. α that gives the point's own speedup, found by the same bisection: the scenario's
  acceptance, a replayed trace's included, on the scale of `alpha_needed`. Real acceptance is front-loaded (the
  first draft of a round is right more often than the later ones), so a trace's `alpha_now` can sit above its mean
  agreement; `alpha_needed - alpha_now` is how much better the head must get. An i.i.d. scenario's is its own α. On a
  short run the speedup moves in steps (a few drafts decide it), and a trace's `alpha_now` is the least α of its
  step.

A policy that reads draft confidences draws them calibrated (`confidence_sharpness`: the scenario's, else
`DEFAULT_SHARPNESS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.acceptance import BernoulliAcceptance, TraceAcceptance
from sim.engine import Simulation
from sim.formats import save_figure_atomic
from sim.plan import SimPlan, build_plan
from sim.policy import make_policy
from sim.runner import workload_key
from sim.scenario import Point
from sim.tables import text_table

BISECTIONS = 8  # between grid points 1/20 apart: α to within 1 / 5120
DEFAULT_SHARPNESS = 8.0
CURVE = tuple(i / 20 for i in range(21))  # the α the speedup is simulated at (the plotted curve)
FALL = 0.005  # a speedup this much below an earlier grid point's: the curve does not rise


@dataclass(frozen=True)
class BreakEven:
    point: Point
    method: str
    exit_layer: int | None
    policy: str | None
    speedup: float
    acceptance: float | None
    alpha_now: float
    alpha_needed: float | None
    ceiling: float
    sharpness: float | None  # the calibrated confidences drawn, where the policy reads them
    curve: tuple[tuple[float, float], ...]  # (α, speedup) at every α of `CURVE`
    ar_tokens_per_s: float = 0.0  # AR on the point's own hardware (what its speedups are over)

    @property
    def best(self) -> tuple[float, float]:
        """(α, speedup) of the grid's highest speedup (the least such α)."""
        return max(self.curve, key=lambda item: (item[1], -item[0]))

    @property
    def rises(self) -> bool:
        """Whether the speedup rises with α over the grid (no point more than `FALL` below an earlier one)."""
        top = 0.0
        for _, value in self.curve:
            if value < top * (1 - FALL):
                return False
            top = max(top, value)
        return True


def break_even(point: Point, target: float = 1.0) -> BreakEven | None:
    """The point's break-even acceptance (module docstring), with its speedup at every α of `CURVE`; None for an AR
    point."""
    plan = build_plan(point)
    if plan.method == "ar":
        return None
    at, ar = _speedup_at(plan, point)
    speedup = Simulation(plan).run().tokens_per_s / ar
    curve = tuple((alpha, at(alpha)) for alpha in CURVE)
    needed = _solve(at, target, curve)
    iid = isinstance(plan.acceptance, BernoulliAcceptance)
    iid = iid and plan.acceptance.confidence_sharpness == _sharpness(plan, point)  # the draws `at` makes
    now = plan.acceptance.alpha if iid else _solve(at, speedup, curve)
    policy = point.scenario.policy if plan.method == "eesd" else None
    return BreakEven(
        point, plan.method, plan.exit_layer, policy, speedup, _acceptance(plan), 1.0 if now is None else now, needed,
        curve[-1][1], _sharpness(plan, point), curve, ar,
    )  # fmt: skip


def speedups_at(point: Point, alphas: Sequence[float]) -> list[float]:
    """The point's speedup over AR on its plan at each i.i.d. acceptance in `alphas` (as `break_even` bisects it)."""
    at, _ = _speedup_at(build_plan(point), point)
    return [at(alpha) for alpha in alphas]


def _speedup_at(plan: SimPlan, point: Point) -> tuple[Callable[[float], float], float]:
    """(the plan's speedup over AR at an i.i.d. acceptance α, AR's tokens/s on the same plan)."""
    ar = Simulation(build_plan(point, method="ar")).run().tokens_per_s
    sharpness = _sharpness(plan, point)

    def at(alpha: float) -> float:
        acceptance = BernoulliAcceptance(alpha, sharpness)
        return Simulation(dataclasses.replace(plan, acceptance=acceptance)).run().tokens_per_s / ar

    return at, ar


def _solve(at: Callable[[float], float], target: float, curve: Sequence[tuple[float, float]]) -> float | None:
    """The least α whose speedup `at(α)` reaches `target`: the first grid point of `curve` that reaches it, bisected
    (`BISECTIONS` times) against the grid point before; None where no grid point does."""
    for index, (alpha, value) in enumerate(curve):
        if value < target:
            continue
        if index == 0:
            return alpha
        low, high = curve[index - 1][0], alpha
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            low, high = (low, middle) if at(middle) >= target else (middle, high)
        return high
    return None


def _sharpness(plan: SimPlan, point: Point) -> float | None:
    if plan.method != "eesd" or not make_policy(plan.policy).needs_confidence:
        return None
    return point.scenario.acceptance.confidence_sharpness or DEFAULT_SHARPNESS


def _acceptance(plan: SimPlan) -> float | None:
    """What the scenario's acceptance gives: a trace's mean agreement at the exit layer, or its α."""
    acceptance = plan.acceptance
    if isinstance(acceptance, TraceAcceptance):
        return acceptance.mean_match
    return acceptance.alpha if isinstance(acceptance, BernoulliAcceptance) else None


def fastest_ar(results: Sequence[BreakEven]) -> dict[int, float]:
    """Each point's fastest AR among the points of its workload (the sweep's `workload.*` values), where those ARs
    differ (a sweep over hardware): a speedup over the point's own AR can hide another layout whose plain AR beats
    it. Empty where every point of a workload has the same AR."""
    groups: dict[tuple, list[BreakEven]] = {}
    for item in results:
        groups.setdefault(workload_key(item.point), []).append(item)
    out = {}
    for items in groups.values():
        if len({round(item.ar_tokens_per_s, 6) for item in items}) > 1:
            top = max(item.ar_tokens_per_s for item in items)
            out.update({item.point.index: top for item in items})
    return out


def rows(results: Sequence[BreakEven], target: float) -> list[dict[str, Any]]:
    """One row per point; its exit head where the points' heads differ (a scenario comparing heads); where the
    sweep's hardware gives ARs of different speeds, the best speedup as a multiple of the fastest AR of the point's
    workload (`best_vs_fastest_ar`: below 1, no acceptance makes this layout beat plain AR on the best one)."""
    heads = len({item.point.scenario.exit_head for item in results}) > 1
    top = fastest_ar(results)
    out = []
    for item in results:
        swept = {k: v for k, v in item.point.values.items() if k not in ("method", "exit_layer", "policy")}
        head = {"exit_head": item.point.scenario.exit_head} if heads else {}
        out.append({
            "point": item.point.index, **swept, "method": item.method, **head,
            "exit_layer": item.exit_layer if item.exit_layer is not None else "", "policy": item.policy or "",
            "speedup": round(item.speedup, 4),
            "acceptance": round(item.acceptance, 4) if item.acceptance is not None else "",
            "alpha_now": round(item.alpha_now, 3),
            f"alpha_needed_{target:g}x": round(item.alpha_needed, 3) if item.alpha_needed is not None else "",
            "ceiling": round(item.ceiling, 4),
            "best": round(item.best[1], 4),
            "best_alpha": item.best[0],
            "rises": int(item.rises),
            "confidence_sharpness": item.sharpness if item.sharpness is not None else "",
            **({"best_vs_fastest_ar": round(item.best[1] * item.ar_tokens_per_s / top[item.point.index], 4)
                if item.point.index in top else ""} if top else {}),
        })  # fmt: skip
    return out


def table(results: Sequence[BreakEven], target: float) -> str:
    """One line per point: the acceptance it needs to reach `target`x AR, against what the scenario's gives."""
    data = rows(results, target)
    needed = f"alpha_needed_{target:g}x"
    for row in data:
        row[needed] = row[needed] if row[needed] != "" else f"never (best {row['best']:.2f}x)"
    hidden = ("confidence_sharpness", "best", "best_alpha", "rises", "config", "acceptance.trace")  # in the CSV
    shown = [c for c in data[0] if c not in hidden] if data else []
    heads = {"acceptance": "acceptance", "alpha_now": "as iid alpha", needed: f"iid alpha for {target:g}x AR",
             "ceiling": "at alpha=1", "best_vs_fastest_ar": "best/fastest AR"}  # fmt: skip
    return text_table(data, shown, heads)


def falling_notes(results: Sequence[BreakEven]) -> list[str]:
    """A note per point whose speedup does not rise with α: its α columns are least crossings, its best is not at
    α = 1; or whose speedup does not move with α at all (a policy that never drafts)."""
    notes = []
    for item in results:
        values, what = [value for _, value in item.curve], item.method + (f" {item.policy}" if item.policy else "")
        if max(values) - min(values) <= 1e-9 * max(values):  # the same speed at every acceptance: it never drafts
            notes.append(
                f"note: --break-even: point {item.point.index} ({what}) runs at {values[0]:.2f}x AR whatever the "
                "acceptance: it never drafts (its policy finds a round of drafts dearer than the tokens it can "
                "expect), so its alpha columns say nothing"
            )
            continue
        if item.rises:
            continue
        low, (best_a, best) = item.curve[0][1], item.best
        worst_a, worst = min(item.curve, key=lambda entry: entry[1])
        notes.append(
            f"note: --break-even: point {item.point.index} ({item.method}{' ' + item.policy if item.policy else ''}) "
            f"does not speed up as acceptance rises: {low:.2f}x at alpha 0, {best:.2f}x at best (alpha {best_a:g}), "
            f"{worst:.2f}x at alpha {worst_a:g}, {item.ceiling:.2f}x at 1 (its drafts cost more than they save where "
            f"it drafts longer); its alpha columns are the least alpha reaching each speedup"
        )
    return notes


def plot(results: Sequence[BreakEven], target: float, path: Path) -> Path:
    """Each point's speedup against i.i.d. α (its `curve`), the target as a line, and where the scenario's own
    acceptance puts it (`alpha_now`, its speedup) as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn: dict[tuple, Any] = {}  # a curve once (points that differ only in their acceptance share it), a dot each
    for item in results:
        label = " ".join(str(x) for x in (item.method, f"E={item.exit_layer}", item.policy or "") if x).strip()
        line = drawn.get(item.curve)
        if line is None:
            line = drawn[item.curve] = ax.plot(
                [a for a, _ in item.curve], [v for _, v in item.curve], linewidth=1.2, label=label
            )[0]
        ax.plot([item.alpha_now], [item.speedup], marker="o", color=line.get_color())
    ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("acceptance (i.i.d. alpha); dots: the scenario's own, as an i.i.d. alpha")
    ax.set_ylabel("speedup vs AR (same hardware)")
    ax.set_xlim(0, 1)
    if len(drawn) > 1:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
