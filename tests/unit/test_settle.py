"""A file's verdict is final only once the ladder's curve around it is measured (converters/ladder/evaluate/settle.py,
verdict.awaits_curve), and the pipeline measures the first publish group's curve neighbours right after it
(flow.measure_order). Pure: fake FileResults with the SmolLM2 figures of tests/unit/test_gate.py."""

from __future__ import annotations

from collections.abc import Sequence

from bot.commands import CliHooks
from converters.core import quants
from converters.core.hooks import PROGRESS, Event
from converters.core.report import FAILED, PASSED, FileResult
from converters.ladder import flow
from converters.ladder.evaluate import settle, verdict
from tests.unit.test_evaluate_sequential import f
from tests.unit.test_gate import NORMAL, SMOL, SMOL_Q2_ATTN_OUT_0, SMOL_Q4_FFN_UP_1

BITS = {t: quants.get(t).bpw for t, _, _ in SMOL}  # Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K
# the ladder of tests/integration/test_gate_damage.py in the pipeline's measuring order (flow.measure_order)
ORDER = ("Q4_K_M", "Q6_K", "Q5_K_M", "Q3_K_M", "Q2_K", "Q8_0")


def smol(**changed: tuple[float, float]) -> dict[str, FileResult]:
    return {t: f(t, *changed.get(t, (kld, err)), BITS[t]) for t, kld, err in SMOL}


def evaluate(files: Sequence[FileResult], ladder_bits: Sequence[float] | None = None,
             ) -> tuple[settle.Settling, list[list[str]]]:
    """What LadderEvaluation does, file by file: judge against the earlier files, then hold or settle; the types
    settled after each measurement, and (last) at the end."""
    bits = list(ladder_bits if ladder_bits is not None else (verdict.nominal_bits(x) for x in files))
    s = settle.Settling(lambda x, others: verdict.judge_file(x, others))
    measured: list[FileResult] = []
    steps = []
    for fr in files:
        fr.reasons = verdict.judge_file(fr, measured)
        fr.status = FAILED if fr.reasons else PASSED
        measured.append(fr)
        s.measured(fr, measured, bits)
        steps.append([x.type for x in s.settled()])
    s.finish(measured)
    steps.append([x.type for x in s.settled()])
    return s, steps


def test_a_damaged_first_file_below_its_ceiling_is_held_then_refused_by_the_curve() -> None:
    files = smol(Q4_K_M=SMOL_Q4_FFN_UP_1)
    q4 = files["Q4_K_M"]
    assert q4.stats.kld_mean < verdict.ceiling_for(q4)  # the ceiling alone passes it
    assert verdict.judge_file(q4, []) == []
    s, steps = evaluate([files[t] for t in ORDER])
    # held after its own measurement (it would have been published on its ceiling), settled by Q2_K's
    assert steps[0] == [] and "Q4_K_M" in steps[4]
    assert q4.status == FAILED and any("far above the ladder's curve" in r for r in q4.reasons), q4.reasons
    assert {t for t, x in files.items() if x.status == FAILED} == {"Q4_K_M"}
    assert s.held == [] and s.against["Q4_K_M"] == ["Q6_K", "Q5_K_M", "Q3_K_M", "Q2_K"]  # those measured by then


def test_the_nearest_pair_alone_would_not_catch_it_on_this_ladder() -> None:
    # SmolLM2's Q5_K_M measures worse than its Q4_K_M (Q4_1 weights): one neighbour on each side shields the damage;
    # the curve's two neighbours on each side (CurveRules.neighbours) do not
    files = smol(Q4_K_M=SMOL_Q4_FFN_UP_1)
    assert verdict.judge_file(files["Q4_K_M"], [files["Q5_K_M"], files["Q3_K_M"]]) == []
    assert not verdict.awaits_curve(files["Q4_K_M"], list(BITS.values()),
                                    [files[t] for t in ("Q6_K", "Q5_K_M", "Q3_K_M", "Q2_K")])
    assert verdict.awaits_curve(files["Q4_K_M"], list(BITS.values()), [files["Q5_K_M"], files["Q3_K_M"]])


def test_a_clean_first_file_passes_once_settled() -> None:
    files = smol()
    _s, steps = evaluate([files[t] for t in ORDER])
    assert all(x.status == PASSED for x in files.values()), {t: x.reasons for t, x in files.items()}
    settled = [t for step in steps for t in step]
    assert sorted(settled) == sorted(ORDER) and len(settled) == len(set(settled))  # each file once


def test_settled_files_come_in_order_and_the_ends_of_the_ladder_settle_with_one_side() -> None:
    files = smol(Q4_K_M=SMOL_Q4_FFN_UP_1, Q2_K=SMOL_Q2_ATTN_OUT_0)
    _s, steps = evaluate([files[t] for t in ORDER])
    # Q4_K_M, Q6_K, Q5_K_M, Q3_K_M held; Q2_K (the bottom: nothing below it) is settled at once and brackets
    # Q4_K_M and Q3_K_M (settled first, in measuring order); Q8_0 (the top) settles Q6_K and Q5_K_M
    assert steps == [[], [], [], [], ["Q4_K_M", "Q3_K_M", "Q2_K"], ["Q6_K", "Q5_K_M", "Q8_0"], []]
    assert {t for t, x in files.items() if x.status == FAILED} == {"Q4_K_M", "Q2_K"}
    assert any("far above the ladder's curve" in r for r in files["Q2_K"].reasons)


def test_in_ladder_order_the_files_wait_for_the_ones_below_and_finish_settles_the_rest() -> None:
    order = [t for t, _, _ in NORMAL]  # the default ladder, Q8_0 first ... Q2_K last
    files = {t: f(t, kld, err, quants.get(t).bpw) for t, kld, err in NORMAL}
    _s, steps = evaluate([files[t] for t in order[:-1]], ladder_bits=[quants.get(t).bpw for t in order])
    # each settles when the two types nearest below it are measured: Q4_K_M and Q4_K_S wait for Q3_K_L (4.27 bits,
    # nearer than IQ4_XS at 4.25, measured before it), IQ4_XS for Q3_K_M; Q3_K_S and IQ3_M wait for Q2_K, never
    # measured: the end of the evaluation settles them against all the others
    assert steps == [[], [], ["Q8_0"], ["Q6_K"], ["Q5_K_M"], ["Q5_K_S"], [], ["Q4_K_M", "Q4_K_S"], ["Q3_K_L"],
                     [], ["IQ4_XS", "Q3_K_M"], ["Q3_K_S", "IQ3_M"]]
    assert all(files[t].status == PASSED for t in order[:-1])


def test_the_top_of_the_ladder_waits_for_its_nearest_neighbours_not_for_any_two_below() -> None:
    # SmolLM2's flat top (Q4_1 weights, figures of benchmarks/ladder.py --pipeline, 12 types): measured in the
    # pipeline's order, Q8_0 comes after the Q4/Q5 files and before Q6_K. Judged on those, it lies 3 bits past them
    # and the ladder's slope predicts far too little; Q6_K, nearer, says the top is flat
    figures = {"Q4_K_M": (0.0310, 0.0008), "Q5_K_M": (0.00651, 0.0002), "Q5_K_S": (0.00645, 0.0002),
               "Q4_K_S": (0.0480, 0.0012), "Q3_K_L": (0.0900, 0.002), "Q8_0": (0.00409, 0.00005),
               "Q6_K": (0.00706, 0.0002)}
    files = {t: f(t, kld, err, quants.get(t).bpw) for t, (kld, err) in figures.items()}
    order = list(figures)
    before = [files[t] for t in order[:5]]
    assert verdict.judge_file(files["Q8_0"], before)  # refused by the extrapolation past the measured top
    ladder = [quants.get(t).bpw for t in order]
    assert verdict.awaits_curve(files["Q8_0"], ladder, before)  # Q6_K, not measured, lies nearer than Q5_K_M
    _s, steps = evaluate([files[t] for t in order], ladder_bits=ladder)
    assert steps[5] == [] and "Q8_0" in steps[6]
    assert all(x.status == PASSED for x in files.values()), {t: x.reasons for t, x in files.items()}


def test_a_file_without_a_curve_point_or_judged_against_a_baseline_is_never_held() -> None:
    bits = list(BITS.values())
    broken = FileResult(type="Q4_K_M", path="M-Q4_K_M.gguf", size=1, bpw=None, bpw_nominal=4.89, error="crashed")
    assert not verdict.awaits_curve(broken, bits, [])
    assert not verdict.awaits_curve(f("Q4_K_M-tuned", 0.03, 0.001, 4.89), bits, [])
    unmeasured = FileResult(type="Q4_K_M", path="M-Q4_K_M.gguf", size=1, bpw=None, bpw_nominal=4.89)
    assert verdict.awaits_curve(unmeasured, bits, [])  # decided before measuring, from its bits
    assert not verdict.awaits_curve(unmeasured, [4.89], [])  # the only stock type of its ladder


def test_ladder_notes_leave_out_the_files_found_far_above_the_curve_they_were_judged_on() -> None:
    files = smol(Q4_K_M=SMOL_Q4_FFN_UP_1)
    s, _steps = evaluate([files[t] for t in ORDER])
    ordered = [files[t] for t in ORDER]
    # Q4_K_M measured first: against no earlier file it is no outlier, so an inversion note names it; judged as it
    # was settled (against all the others) it is far above the curve and named in no note
    assert any("Q4_K_M" in n for n in verdict.ladder_notes(ordered))
    assert not any("Q4_K_M" in n for n in verdict.ladder_notes(ordered, against=s.against))


def names(types: Sequence[quants.QuantType]) -> list[str]:
    return [q.name for q in types]


def test_the_measuring_order_moves_the_first_groups_curve_neighbours_up() -> None:
    default = [quants.get(t) for t in ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_S", "IQ4_XS", "Q3_K_L",
                                       "Q3_K_M", "Q3_K_S", "IQ3_M", "Q2_K")]  # the default ladder in publish order
    assert names(flow.measure_order(default)) == ["Q4_K_M", "Q5_K_M", "Q5_K_S", "Q4_K_S", "Q3_K_L", "Q8_0", "Q6_K",
                                                  "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_M", "Q2_K"]
    damage = [quants.get(t) for t in ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M", "Q3_K_M", "Q2_K")]
    assert tuple(names(flow.measure_order(damage))) == ORDER
    # a first group of three: the neighbours of each, those not in the group, once
    assert names(flow.measure_order(damage, first=3)) == ["Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M", "Q3_K_M", "Q2_K"]
    assert names(flow.measure_order(damage, neighbours=1)) == ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q8_0", "Q6_K", "Q2_K"]
    top = [quants.get(t) for t in ("Q8_0", "Q4_K_M", "Q2_K", "Q6_K")]  # a first file at the end: one side only
    assert names(flow.measure_order(top)) == ["Q8_0", "Q4_K_M", "Q6_K", "Q2_K"]
    assert names(flow.measure_order(top[:1])) == ["Q8_0"] and names(flow.measure_order(top, first=0)) == names(top)


def test_the_command_line_prints_a_held_files_verdict_when_it_is_settled(capsys) -> None:
    hooks = CliHooks()
    for data, done in (({"file": "Q4_K_M", "state": "measured", "task": "measure Q4_K_M", "phase": "end"}, 2),
                       ({"file": "Q4_K_M", "state": "failed", "phase": "settled"}, 10),
                       ({"file": "Q2_K", "state": "passed", "task": "measure Q2_K", "phase": "end"}, 10)):
        hooks.progress(Event("ladder", PROGRESS, done=done, total=12, data=data))
    assert capsys.readouterr().err.splitlines() == ["[ladder] Q4_K_M measured (2/12)", "[ladder] Q4_K_M failed (10/12)",
                                                   "[ladder] Q2_K passed (10/12)"]
