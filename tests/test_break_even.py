"""`eesd simulate --break-even`: the i.i.d. acceptance at which a point matches AR, against closed forms."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import yaml

from executor.cli import main
from sim.acceptance import TraceAcceptance
from sim.break_even import CURVE, BreakEven, _solve, break_even, falling_notes, speedups_at
from sim.formats import read_acceptance_trace
from sim.runner import plots_available
from sim.scenario import load_points

ROOT = Path(__file__).resolve().parents[1]


def scenario(tmp_path: Path, **fields) -> Path:
    """SmolLM2's 30 layers at 10 µs each, nothing else costing: an AR step 300 µs; an EESD round of one draft at
    E = 15 a draft step (150) and a verify pass (layers [0, 15) for the draft, [15, 30) for both tokens: 300)."""
    data = {
        "name": "break-even", "model": "SmolLM2-135M", "method": "eesd", "exit_layer": 15, "policy": "fixed:1",
        "latency": {"constant_us": {"layer": 10.0}}, "acceptance": {"alpha": 0.3},
        "topology": {"stages": 1, "link": "ideal"},
        "workload": {"requests": 4, "batch_size": 1, "prompt_len": 16, "output_len": 2000},
        "limits": {"max_tokens": 10_000}, **fields,
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_fixed_one_breaks_even_where_the_closed_form_says(tmp_path: Path) -> None:
    """A round costs 450 µs and makes 1 + α tokens against AR's 300 µs a token: speedup (1 + α) · 300 / 450, so
    α* = 0.5 for 1.0x, α* = 0.8 for 1.2x, and at α = 1 the ceiling is 4/3."""
    (point,) = load_points(scenario(tmp_path))
    found = break_even(point)
    assert found is not None and found.method == "eesd" and found.acceptance == 0.3
    assert found.alpha_needed == pytest.approx(0.5, abs=0.02)
    assert found.ceiling == pytest.approx(4 / 3, rel=1e-3)
    assert found.speedup == pytest.approx(1.3 * 300 / 450, abs=0.02)
    assert found.alpha_now == 0.3  # an i.i.d. scenario is its own i.i.d. equivalent (not its step's least α)
    assert break_even(point, target=1.2).alpha_needed == pytest.approx(0.8, abs=0.02)
    assert break_even(point, target=1.4).alpha_needed is None  # above the ceiling
    assert speedups_at(point, [0.5, 1.0]) == pytest.approx([1.0, 4 / 3], abs=0.02)
    assert found.rises and found.best == found.curve[-1]  # rising: the best is at α = 1, the ceiling
    curve = found.curve
    assert [alpha for alpha, _ in curve] == [i / 20 for i in range(21)]
    assert [speedup for _, speedup in curve] == pytest.approx([(1 + i / 20) * 300 / 450 for i in range(21)], abs=0.02)


def test_ar_needs_no_acceptance_and_a_trace_says_its_agreement(tmp_path: Path) -> None:
    (ar,) = load_points(scenario(tmp_path, method="ar"))
    assert break_even(ar) is None
    trace = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"
    fields = {"acceptance": {"trace": str(trace)}, "workload": {"requests": 8, "prompt_len": 16, "output_len": 48}}
    (traced,) = load_points(scenario(tmp_path, **fields))
    found = break_even(traced)
    agreement = TraceAcceptance(read_acceptance_trace(trace), 15).mean_match  # the shared head's, about 0.09
    assert found is not None and found.acceptance == agreement
    assert found.alpha_needed == pytest.approx(0.5, abs=0.05)  # the costs decide it, not the trace


def test_the_command_line_prints_and_writes_the_break_even_table(tmp_path: Path, capsys) -> None:
    path = scenario(tmp_path, sweep={"policy": ["fixed:1", "fixed:2"]})
    assert main(["simulate", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--break-even"]) == 0
    out = capsys.readouterr().out
    assert "alpha for 1x AR" in out and "wrote" in out
    with open(tmp_path / "run" / "break_even.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["policy"] for row in table] == ["fixed:1", "fixed:2"]
    assert (tmp_path / "run" / "break_even.png").exists() == plots_available()
    # fixed:2: rounds of 2 drafts (300) + a verify over 3 tokens (300) make 1 + α + α² tokens: α* = 0.618 at 1.0x
    assert float(table[0]["alpha_needed_1x"]) == pytest.approx(0.5, abs=0.02)
    assert float(table[1]["alpha_needed_1x"]) == pytest.approx(0.618, abs=0.02)


def test_a_target_outside_reason_is_one_line(tmp_path: Path, capsys) -> None:
    path = scenario(tmp_path)
    assert main(["simulate", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--break-even", "0"]) == 2
    err = capsys.readouterr().err
    assert "--break-even: expected a target speedup over AR in (0, 100], got 0" in err and len(err.splitlines()) == 1


def test_a_speedup_that_does_not_rise_with_alpha_is_solved_on_the_grid_and_noted() -> None:
    """An adaptive policy's speedup can fall as α grows, or peak inside: the least α reaching a speedup is found on
    the grid and refined between grid points; a bisection over [0, 1] would miss a crossing inside a bump."""

    def bump(alpha: float) -> float:
        return 1.0 - 4 * (alpha - 0.5) ** 2

    curve = tuple((alpha, bump(alpha)) for alpha in CURVE)
    assert _solve(bump, 0.9, curve) == pytest.approx(0.5 - (0.1 / 4) ** 0.5, abs=1 / 4096)
    assert _solve(bump, 1.01, curve) is None
    assert _solve(lambda a: 0.7 - 0.3 * a, 0.6, tuple((a, 0.7 - 0.3 * a) for a in CURVE)) == 0.0  # α = 0 reaches it
    (point,) = load_points(ROOT / "scenarios" / "beta_ts_vs_fixed.yaml")[:1]
    falling = BreakEven(point, "eesd", 15, "beta-ts", 0.59, 0.5, 0.0, None, 0.57, None, curve=tuple(
        (a, 0.69 - 0.25 * a if a < 1 else 0.57) for a in CURVE))  # fmt: skip
    assert not falling.rises and falling.best == (0.0, 0.69)
    (note,) = falling_notes([falling])
    assert "does not speed up as acceptance rises: 0.69x at alpha 0, 0.69x at best (alpha 0)" in note
    rising = BreakEven(point, "eesd", 15, "fixed:1", 1.0, 0.5, 0.5, 0.5, 1.3, None, curve=curve[:11])
    assert rising.rises and falling_notes([rising]) == []
    flat = BreakEven(point, "eesd", 15, "beta-ts", 1.0, 0.5, 0.0, 0.0, 1.0, None, curve=tuple((a, 1.0) for a in CURVE))
    (note,) = falling_notes([flat])  # a policy that never drafts: AR at every acceptance
    assert "(eesd beta-ts) runs at 1.00x AR whatever the acceptance: it never drafts" in note


def test_a_sweep_over_hardware_sets_each_best_against_the_fastest_ar(tmp_path: Path) -> None:
    """Two layouts of one workload whose ARs differ (a second stage behind a 50 µs link): the faster layout's best is
    its own; the slower one's is scaled by its AR over the faster AR, so a PPSD layout that beats its own pipelined
    AR can be seen not to beat plain AR."""
    from sim.break_even import rows

    path = scenario(tmp_path, method="ppsd", exit_layer=None, topology={"stages": 2, "link": "ideal"},
                    sweep={"topology.link": ["ideal", {"latency_us": 50.0}]},
                    workload={"requests": 2, "batch_size": 1, "prompt_len": 16, "output_len": 200})  # fmt: skip
    found = [break_even(point) for point in load_points(path)]
    fast, slow = found
    assert slow.ar_tokens_per_s < fast.ar_tokens_per_s
    table = rows(found, 1.0)
    assert table[0]["best_vs_fastest_ar"] == pytest.approx(fast.best[1], abs=1e-4)
    assert table[1]["best_vs_fastest_ar"] == pytest.approx(
        slow.best[1] * slow.ar_tokens_per_s / fast.ar_tokens_per_s, abs=1e-4
    )
    (one,) = load_points(scenario(tmp_path))
    assert "best_vs_fastest_ar" not in rows([break_even(one)], 1.0)[0]  # one layout: nothing to set it against
    sweep = {"workload.output_len": [100, 200], "topology.link": ["ideal", {"latency_us": 50.0}]}
    path = scenario(tmp_path, method="ppsd", exit_layer=None, topology={"stages": 2, "link": "ideal"}, sweep=sweep)
    mixed = [break_even(point) for point in load_points(path)]
    assert all(isinstance(row["best_vs_fastest_ar"], float) for row in rows(mixed, 1.0))
    groups = [item.point.values["workload.output_len"] for item in mixed]
    even = [
        dataclasses.replace(item, ar_tokens_per_s=1.0) if size == 200 else item
        for item, size in zip(mixed, groups, strict=True)
    ]  # the 200-token workload's ARs made equal
    assert [row["best_vs_fastest_ar"] == "" for row in rows(even, 1.0)] == [size == 200 for size in groups]
