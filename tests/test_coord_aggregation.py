"""Aggregation strategies: exactness, the naive gap, robust statistics, bounds on what a report
can do, and what is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coordinator.aggregation import (
    STRATEGIES,
    AggregationError,
    CoordinateMedianStrategy,
    ExactDeltaStrategy,
    FitFailure,
    FitResult,
    NaiveFedAvgStrategy,
    TrimmedMeanStrategy,
    TrustBounds,
    aggregation_gap,
    bound_reports,
    validate_fit_result,
)
from coordinator.aggregation import arrays as aggregation_arrays
from coordinator.aggregation.arrays import effective_delta
from tests.coord_helpers import SHAPE, random_deltas, random_factors


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def reports(rng: np.random.Generator, counts=(10, 30, 60), with_deltas=True) -> list[FitResult]:
    out = []
    for i, n in enumerate(counts):
        arrays = random_factors(rng)
        if with_deltas:
            arrays |= random_deltas(rng)
        out.append(FitResult(f"dev-{i}", arrays, n))
    return out


def weighted_mean_of_products(results: list[FitResult], layer: int) -> np.ndarray:
    """Computed independently of the library: Σ n_i (delta + A B) / Σ n_i, in float64."""
    total = np.zeros(SHAPE.delta_shape(layer))
    for r in results:
        a = r.arrays[f"A{layer}"].astype(np.float64)
        b = r.arrays[f"B{layer}"].astype(np.float64)
        delta = r.arrays.get(f"delta{layer}", np.zeros_like(total))
        total += r.num_samples * (delta + a @ b)
    return total / sum(r.num_samples for r in results)


def test_exact_aggregate_is_sample_weighted_mean_of_products(rng):
    results = reports(rng)
    aggregate = ExactDeltaStrategy(SHAPE).aggregate_fit(results)
    assert set(aggregate.arrays) == {"delta1", "delta2", "delta3"}
    for k in SHAPE.layers:
        np.testing.assert_allclose(
            aggregate.arrays[f"delta{k}"], weighted_mean_of_products(results, k), rtol=1e-5
        )
    assert aggregate.weights == pytest.approx({"dev-0": 0.1, "dev-1": 0.3, "dev-2": 0.6})
    assert aggregate.num_samples == 100


def test_exact_accepts_different_ranks_and_delta_only_reports(rng):
    results = [
        FitResult("low-rank", random_factors(rng, rank=2), 5),
        FitResult("high-rank", random_factors(rng, rank=6), 5),
        FitResult("delta-only", random_deltas(rng), 10),
    ]
    aggregate = ExactDeltaStrategy(SHAPE).aggregate_fit(results)
    expected = 0.25 * (results[0].arrays["A1"] @ results[0].arrays["B1"])
    expected += 0.25 * (results[1].arrays["A1"] @ results[1].arrays["B1"])
    expected += 0.5 * results[2].arrays["delta1"]
    np.testing.assert_allclose(aggregate.arrays["delta1"], expected, rtol=1e-5)


def test_naive_differs_from_exact_on_random_adapters(rng):
    results = reports(rng, with_deltas=False)
    exact = ExactDeltaStrategy(SHAPE).aggregate_fit(results)
    naive = NaiveFedAvgStrategy(SHAPE).aggregate_fit(results)
    assert {"A1", "B1", "A3", "B3"} <= set(naive.arrays)
    gap = aggregation_gap(exact.arrays, naive.arrays, SHAPE)
    assert len(gap.relative_frobenius) == 3
    assert min(gap.relative_frobenius) > 0.1


def test_naive_equals_exact_when_all_devices_share_a(rng):
    results = reports(rng)
    shared = random_factors(rng)
    for r in results:
        for k in SHAPE.layers:
            r.arrays[f"A{k}"] = shared[f"A{k}"]
    exact = ExactDeltaStrategy(SHAPE).aggregate_fit(results)
    naive = NaiveFedAvgStrategy(SHAPE).aggregate_fit(results)
    gap = aggregation_gap(exact.arrays, naive.arrays, SHAPE)
    assert max(gap.relative_frobenius) < 1e-5


def test_gap_in_logits_on_given_inputs(rng):
    results = reports(rng, with_deltas=False)
    exact = ExactDeltaStrategy(SHAPE).aggregate_fit(results).arrays
    naive = NaiveFedAvgStrategy(SHAPE).aggregate_fit(results).arrays
    inputs = [rng.normal(size=(20, d)) for d in SHAPE.layer_dims]
    gap = aggregation_gap(exact, naive, SHAPE, layer_inputs=inputs)
    naive_w = [naive[f"A{k}"] @ naive[f"B{k}"] for k in SHAPE.layers]
    expected = sum(
        x @ (n - exact[f"delta{k}"]) for k, x, n in zip(SHAPE.layers, inputs, naive_w, strict=True)
    )
    assert gap.logit_max_abs_diff == pytest.approx(np.abs(expected).max(), rel=1e-4)
    assert gap.logit_relative_diff > 0
    same = aggregation_gap(exact, exact, SHAPE, layer_inputs=inputs)
    assert same.logit_max_abs_diff == 0.0
    with pytest.raises(AggregationError, match="layer 2 input"):
        aggregation_gap(exact, naive, SHAPE, layer_inputs=[inputs[0], inputs[0], inputs[2]])


def test_failures_are_listed_and_survivors_aggregated(rng):
    results = reports(rng)
    failures = [FitFailure("dev-dead", "TIMED_OUT"), FitFailure("dev-bad", "FAILED: oom")]
    aggregate = ExactDeltaStrategy(SHAPE).aggregate_fit(results[:2], failures)
    assert aggregate.device_ids == ("dev-0", "dev-1")
    assert aggregate.failed_device_ids == ("dev-dead", "dev-bad")
    np.testing.assert_allclose(
        aggregate.arrays["delta2"], weighted_mean_of_products(results[:2], 2), rtol=1e-5
    )


def test_empty_round_is_an_error_naming_the_failures():
    with pytest.raises(AggregationError, match=r"empty round.*dev-x \(TIMED_OUT\)"):
        ExactDeltaStrategy(SHAPE).aggregate_fit([], [FitFailure("dev-x", "TIMED_OUT")])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_mismatched_shape_is_refused_not_broadcast(rng, strategy):
    results = reports(rng)
    # (1, 3) would broadcast against (8, 3): it must be refused.
    results[1].arrays["delta2"] = np.ones((1, SHAPE.n_classes), dtype=np.float32)
    with pytest.raises(AggregationError, match=r"device dev-1: delta2 has shape \(1, 3\)"):
        STRATEGIES[strategy](SHAPE).aggregate_fit(results)


def test_factor_rank_mismatch_inside_one_report_is_refused(rng):
    arrays = random_factors(rng, rank=4)
    arrays["B3"] = arrays["B3"][:3]
    with pytest.raises(AggregationError, match=r"device dev-a: B3 has shape \(3, 3\)"):
        validate_fit_result(FitResult("dev-a", arrays, 1), SHAPE)


def test_naive_refuses_devices_of_different_ranks(rng):
    results = [
        FitResult("dev-a", random_factors(rng, rank=2), 5),
        FitResult("dev-b", random_factors(rng, rank=4), 5),
    ]
    with pytest.raises(AggregationError, match="device dev-b: ranks"):
        NaiveFedAvgStrategy(SHAPE).aggregate_fit(results)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(rng, bad):
    results = reports(rng)
    results[2].arrays["A1"][0, 0] = bad
    with pytest.raises(AggregationError, match="device dev-2: A1 contains NaN or infinite"):
        ExactDeltaStrategy(SHAPE).aggregate_fit(results)


def test_a_round_check_names_the_report_with_an_array_beyond_the_bound_among_other_ranks(rng):
    results = reports(rng, with_deltas=False)
    arrays = random_factors(rng, rank=2)
    arrays["B3"][1, 0] = 1e6  # finite, alone among reports of rank 4
    results.append(FitResult("dev-3", arrays, 10))
    with pytest.raises(AggregationError, match=r"device dev-3: B3 holds 1e\+06, beyond"):
        ExactDeltaStrategy(SHAPE).aggregate_fit(results)


@pytest.mark.parametrize("count", [0, -5, 2.5, True])
def test_bad_sample_counts_are_refused(rng, count):
    results = reports(rng)
    results[0] = FitResult("dev-0", results[0].arrays, count)
    with pytest.raises(AggregationError, match="device dev-0: sample count"):
        ExactDeltaStrategy(SHAPE).aggregate_fit(results)


def test_incomplete_unknown_and_duplicate_reports_are_refused(rng):
    strategy = ExactDeltaStrategy(SHAPE)
    partial = random_factors(rng)
    del partial["B2"]
    with pytest.raises(
        AggregationError, match=r"device dev-p: incomplete adapter, missing \['B2'\]"
    ):
        strategy.aggregate_fit([FitResult("dev-p", partial, 1)])
    with pytest.raises(AggregationError, match=r"unknown adapter arrays \['A4'\]"):
        extra = random_factors(rng) | {"A4": np.zeros((2, 2), np.float32)}
        strategy.aggregate_fit([FitResult("dev-u", extra, 1)])
    twice = FitResult("dev-t", random_factors(rng), 1)
    with pytest.raises(AggregationError, match="reported twice"):
        strategy.aggregate_fit([twice, twice])
    with pytest.raises(AggregationError, match="both as result and as failure"):
        strategy.aggregate_fit([twice], [FitFailure("dev-t", "late")])


def test_configure_round_gives_every_device_the_fleet_adapter(rng):
    fleet = random_deltas(rng)
    instructions = ExactDeltaStrategy(SHAPE).configure_round("r1", ["dev-a", "dev-b"], fleet)
    assert set(instructions) == {"dev-a", "dev-b"}
    assert instructions["dev-a"].round_id == "r1"
    assert instructions["dev-a"].algorithm == "exact-delta"
    np.testing.assert_array_equal(instructions["dev-b"].start_arrays["delta3"], fleet["delta3"])
    first = ExactDeltaStrategy(SHAPE).configure_round("r0", ["dev-a"])
    assert first["dev-a"].start_arrays is None


def deltas_reports(values: list[float], counts=None) -> list[FitResult]:
    """Reports whose every ΔW entry is one value each: robust statistics are easy to check."""
    counts = counts or [10] * len(values)
    return [
        FitResult(
            f"dev-{i}",
            {f"delta{k}": np.full(SHAPE.delta_shape(k), v, np.float32) for k in SHAPE.layers},
            n,
        )
        for i, (v, n) in enumerate(zip(values, counts, strict=True))
    ]


def test_coordinate_median_ignores_a_minority_of_liars_and_their_sample_claims():
    results = deltas_reports([0.1, 0.2, 0.3, 900.0], counts=[10, 10, 10, 2**62])
    aggregate = CoordinateMedianStrategy(SHAPE).aggregate_fit(results)
    np.testing.assert_allclose(aggregate.arrays["delta2"], 0.25)  # median of 0.1 .. 0.3, 900
    exact = ExactDeltaStrategy(SHAPE).aggregate_fit(results)
    assert exact.arrays["delta2"].min() > 800  # the weighted mean follows the liar


def test_trimmed_mean_drops_each_coordinates_extremes():
    strategy = TrimmedMeanStrategy(SHAPE, trim=0.1)
    assert [strategy.dropped_per_end(n) for n in (2, 3, 10, 20)] == [0, 1, 1, 2]
    aggregate = strategy.aggregate_fit(deltas_reports([-500.0, 0.1, 0.2, 0.3, 700.0]))
    np.testing.assert_allclose(aggregate.arrays["delta1"], 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="trim"):
        TrimmedMeanStrategy(SHAPE, trim=0.5)


@pytest.mark.parametrize("strategy", [CoordinateMedianStrategy, TrimmedMeanStrategy])
def test_a_coordinate_statistic_stacked_a_few_rows_at_a_time_is_the_same(
    rng, strategy, monkeypatch
):
    results = reports(rng, counts=(5, 7, 9, 11))
    whole = strategy(SHAPE).aggregate_fit(results)
    per_row = len(results) * SHAPE.n_classes * 8
    monkeypatch.setattr(aggregation_arrays, "LAYER_STACK_BYTES", 3 * per_row)  # 3 rows a block
    blocks = strategy(SHAPE).aggregate_fit(results)
    assert whole.arrays.keys() == blocks.arrays.keys()
    for name in whole.arrays:
        np.testing.assert_array_equal(whole.arrays[name], blocks.arrays[name])


def test_a_deltas_rows_are_those_rows_of_the_whole_and_another_shape_is_refused(rng):
    arrays = {**random_factors(rng), **random_deltas(rng)}
    whole = effective_delta(arrays, SHAPE, 1)
    np.testing.assert_array_equal(effective_delta(arrays, SHAPE, 1, slice(2, 5)), whole[2:5])
    wrong = {**arrays, "B1": np.zeros((4, SHAPE.n_classes + 1), np.float32)}
    with pytest.raises(ValueError, match="shape"):
        effective_delta(wrong, SHAPE, 1)


def test_stacked_products_in_batched_chunks_equal_each_reports_own_product(rng, monkeypatch):
    monkeypatch.setattr(aggregation_arrays, "PRODUCT_CHUNK", 3)  # chunks of 3, the last of 1
    factors = [random_factors(rng) for _ in range(4)]
    mixed = [*factors[:2], random_factors(rng, rank=2), {**factors[3], **random_deltas(rng)}]
    for chunked in (factors, mixed):  # one rank and no deltas: batched; mixed: one at a time
        for layer in SHAPE.layers:
            stack = aggregation_arrays.layer_stack(chunked, SHAPE, layer, slice(1, 4))
            for i, arrays in enumerate(chunked):
                own = effective_delta(arrays, SHAPE, layer, slice(1, 4))
                np.testing.assert_allclose(stack[i], own, rtol=1e-12, atol=0)
            seen = [(begin, len(c)) for begin, c in aggregation_arrays.delta_chunks(
                chunked, SHAPE, layer)]  # fmt: skip
            assert seen == [(0, 3), (3, 1)]


def test_a_chunk_holds_fewer_reports_the_larger_they_are_and_always_one():
    budget = aggregation_arrays.LAYER_STACK_BYTES
    assert aggregation_arrays.chunk_length(1) == aggregation_arrays.PRODUCT_CHUNK
    assert aggregation_arrays.chunk_length(budget // 4) == 4
    assert aggregation_arrays.chunk_length(10 * budget) == 1


def test_a_batched_chunk_with_a_factor_of_another_shape_is_refused_by_name(rng):
    arrays = [random_factors(rng) for _ in range(3)]
    arrays[1] = {**arrays[1], "B1": np.zeros((4, SHAPE.n_classes + 1), np.float32)}
    with pytest.raises(ValueError, match="shape"):
        aggregation_arrays.layer_stack(arrays, SHAPE, 1)


def test_a_round_check_names_the_report_whose_product_alone_passes_the_bound(rng):
    results = reports(rng, counts=(10, 20, 30, 40), with_deltas=False)
    huge = {**results[2].arrays, "A1": np.full((SHAPE.input_dim(1), 4), 30.0, np.float32),
            "B1": np.full((4, SHAPE.n_classes), 30.0, np.float32)}  # fmt: skip
    results[2] = FitResult("dev-2", huge, 30)  # each factor within the bound, ΔW1 = 3,600
    with pytest.raises(AggregationError, match=r"dev-2: ΔW1 holds 3\.6e"):
        STRATEGIES["exact-delta"](SHAPE).aggregate_fit(results)


def test_reports_beyond_the_value_bound_are_refused_even_as_finite_products(rng):
    huge = {**random_factors(rng), "A1": np.full((SHAPE.input_dim(1), 4), 30.0, np.float32),
            "B1": np.full((4, SHAPE.n_classes), 30.0, np.float32)}  # fmt: skip
    with pytest.raises(AggregationError, match="beyond the bound"):
        validate_fit_result(FitResult("liar", huge, 10), SHAPE)  # 30 x 30 x 4 per entry
    with pytest.raises(AggregationError, match="beyond the bound"):
        validate_fit_result(deltas_reports([1e30])[0], SHAPE)


def test_bounds_cap_weights_at_the_registered_samples_and_the_others_median():
    results = deltas_reports([0.1, 0.2, 0.3, 0.4], counts=[100, 120, 80, 2**62])
    bounded = bound_reports(
        results, shape=SHAPE, bounds=TrustBounds(max_weight_ratio=10.0, clip_factor=None),
        registered={"dev-0": 50, "dev-3": 2**62},
    )  # fmt: skip
    samples = {r.device_id: r.num_samples for r in bounded.results}
    assert samples["dev-0"] == 50  # it claimed 100, it registered 50
    assert samples["dev-3"] == 800  # 10 x the median of the others' (50, 120, 80)
    assert "capped" in bounded.notes["dev-3"] and not bounded.outliers


def test_bounds_clip_an_update_far_beyond_the_others_and_mark_its_device():
    start = {f"delta{k}": np.full(SHAPE.delta_shape(k), 0.5, np.float32) for k in SHAPE.layers}
    results = deltas_reports([0.6, 0.55, 0.45, 600.0])  # updates +-0.05..0.1, and one huge
    bounded = bound_reports(results, shape=SHAPE, bounds=TrustBounds(clip_factor=3.0),
                            registered={}, start=start)  # fmt: skip
    assert bounded.outliers == {"dev-3"}
    update = bounded.results[3].arrays["delta1"].astype(np.float64) - 0.5
    every = [0.1, 0.05, 0.05, 599.5]  # each report's update per entry, the huge one's own too
    assert np.abs(update).max() == pytest.approx(3.0 * np.median(every), rel=1e-5)
    for honest, original in zip(bounded.results[:3], results[:3], strict=True):
        assert honest.arrays is original.arrays  # untouched


def test_bounds_leave_two_honest_sub_groups_of_a_cluster_alone():
    """Two devices that drifted further than the other two: not outliers (the median of all)."""
    start = {f"delta{k}": np.zeros(SHAPE.delta_shape(k), np.float32) for k in SHAPE.layers}
    results = deltas_reports([0.3, 0.32, 0.05, 0.06])
    bounded = bound_reports(results, shape=SHAPE, bounds=TrustBounds(), registered={},
                            start=start)  # fmt: skip
    assert not bounded.outliers and not bounded.notes


def test_leave_one_out_bounds_equal_the_median_of_the_others_for_every_report():
    """From one sort, as each report's own median of the others would be (ties, odd and even
    counts, and non-positive medians that bound nothing)."""
    from coordinator.aggregation.bounds import leave_one_out_bounds

    rng = np.random.default_rng(3)
    for n in (3, 4, 5, 8, 41):
        values = [int(v) for v in rng.integers(0, 6, size=n)]  # small range: many ties, zeros
        expected = []
        for i in range(n):
            median = float(np.median(values[:i] + values[i + 1 :]))
            expected.append(2.5 * median if median > 0 else None)
        assert leave_one_out_bounds(values, 2.5) == expected, values
    assert leave_one_out_bounds([5, 7], 2.0) == [None, None]  # one other: no norm
    assert leave_one_out_bounds([5, 7, 9], None) == [None, None, None]


def test_strategies_over_one_round_validate_each_report_once_and_agree_with_aggregate_fit(
    rng, monkeypatch
):
    import coordinator.aggregation.validation as validation
    from coordinator.aggregate_task import run_strategies

    results = reports(rng)
    calls = []
    real = validation.validate_fit_result
    monkeypatch.setattr(
        validation,
        "validate_fit_result",
        lambda r, s, **kw: calls.append(r.device_id) or real(r, s, **kw),
    )
    runs = run_strategies(("coordinate-median", "exact-delta", "naive-fedavg"), SHAPE, results, ())
    assert sorted(calls) == ["dev-0", "dev-1", "dev-2"]  # once each, not once per strategy
    for run in runs:
        alone = STRATEGIES[run.algorithm](SHAPE).aggregate_fit(results).arrays
        assert run.error is None and run.result.arrays.keys() == alone.keys()
        for name, array in alone.items():
            np.testing.assert_array_equal(run.result.arrays[name], array)


def test_a_round_that_fails_its_check_is_an_error_for_every_strategy_run_over_it(rng):
    from coordinator.aggregate_task import run_strategies

    results = reports(rng)
    results[1] = FitResult("dev-1", results[1].arrays, 0)  # no samples
    runs = run_strategies(("exact-delta", "naive-fedavg"), SHAPE, results, ())
    assert [r.result for r in runs] == [None, None]
    assert all("dev-1: sample count must be > 0" in r.error for r in runs)


def test_a_refused_round_frees_its_reports_without_waiting_for_the_collector(rng):
    """The check's error is kept without its traceback, which held the round's reports in a
    cycle (found by a review after the collector was set to run less often)."""
    import gc
    import weakref

    from coordinator.aggregate_task import run_strategies

    results = reports(rng)
    results[1] = FitResult("dev-1", results[1].arrays, 0)  # no samples
    alive = weakref.ref(results[0].arrays["A1"])
    gc.disable()
    try:
        runs = run_strategies(("exact-delta", "naive-fedavg"), SHAPE, results, ())
        del results
        assert all(r.error for r in runs) and alive() is None
    finally:
        gc.enable()


def test_a_checked_round_is_refused_for_other_results(rng):
    from coordinator.aggregation.validation import check_round

    results = reports(rng)
    checked = check_round(results[:2], (), SHAPE)
    with pytest.raises(ValueError, match="made for other results"):
        ExactDeltaStrategy(SHAPE).aggregate_checked(results, (), checked)


def test_an_error_about_many_devices_names_ten_and_counts_the_rest(rng):
    results = [FitResult(f"dev-{i:02d}", random_deltas(rng), 5) for i in range(25)]
    with pytest.raises(AggregationError) as refused:
        NaiveFedAvgStrategy(SHAPE).aggregate_fit(results)
    message = str(refused.value)
    assert "'dev-00'" in message and "'dev-09'" in message and "'dev-10'" not in message
    assert message.endswith("and 15 more: no A/B factors to average")


def test_a_round_check_reads_again_only_the_values_of_reports_not_checked_on_receipt(
    rng, monkeypatch
):
    from coordinator.aggregation import validation

    results = reports(rng, counts=(10, 30, 60, 20))
    results[:2] = [dataclasses.replace(r, checked_on_receipt=True) for r in results[:2]]
    read: dict[str, list[str]] = {"values": [], "products": []}
    for name, key in (("_check_values", "values"), ("_check_product_bounds", "products")):
        original = getattr(validation, name)

        def spy(found, *args, _original=original, _key=key):
            read[_key] += [r.device_id for r in found]
            return _original(found, *args)

        monkeypatch.setattr(validation, name, spy)
    validation.check_round(results, (), SHAPE)
    assert read == {"values": ["dev-2", "dev-3"], "products": ["dev-2", "dev-3"]}
    results[3].arrays["A1"][0, 0] = np.nan  # not checked on receipt: refused as before
    with pytest.raises(AggregationError, match="device dev-3: A1 contains NaN"):
        validation.check_round(results, (), SHAPE)


def test_a_report_checked_on_receipt_still_has_its_shapes_checked_in_the_round(rng):
    from coordinator.aggregation.validation import check_round

    results = reports(rng)
    results[1].arrays["B2"] = results[1].arrays["B2"][:, :2]
    results = [dataclasses.replace(r, checked_on_receipt=True) for r in results]
    with pytest.raises(AggregationError, match="device dev-1: B2 has shape"):
        check_round(results, (), SHAPE)


def test_bounds_keep_the_receipt_mark_of_an_untouched_report_and_drop_it_from_a_clipped_one():
    start = {f"delta{k}": np.full(SHAPE.delta_shape(k), 0.5, np.float32) for k in SHAPE.layers}
    results = [dataclasses.replace(r, checked_on_receipt=True)
               for r in deltas_reports([0.6, 0.55, 0.45, 600.0])]  # fmt: skip
    bounded = bound_reports(results, shape=SHAPE, bounds=TrustBounds(clip_factor=3.0),
                            registered={}, start=start)  # fmt: skip
    assert bounded.outliers == {"dev-3"}  # clipped: new arrays, checked in the round
    assert [r.checked_on_receipt for r in bounded.results] == [True, True, True, False]
