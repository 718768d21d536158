"""SplitPlan and fastsplit.plan: the fields DESIGN.md defines, and the refusals."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsplit
from fastsplit import SplitError, SplitPlan, plan
from fastsplit.plan import SYMMETRIES


def test_split_all_is_the_articles_doubling():
    p = plan(3, symmetry="none")
    assert p.width == 3 and p.new_width == 6
    np.testing.assert_array_equal(p.src, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(p.ratio, [0.5] * 6)
    np.testing.assert_array_equal(p.offset, 0)
    np.testing.assert_array_equal(p.counts, [2, 2, 2])


def test_selected_units_append_copies_in_ascending_order():
    p = plan(5, [3, 1], symmetry="none")
    np.testing.assert_array_equal(p.src, [0, 1, 2, 3, 4, 1, 3])
    np.testing.assert_array_equal(p.ratio, [1, 0.5, 1, 0.5, 1, 0.5, 0.5])
    np.testing.assert_array_equal(p.is_copy, [False] * 5 + [True, True])


def test_repeated_index_adds_another_copy_and_mask_selects():
    p = plan(3, [2, 2], symmetry="none")
    np.testing.assert_array_equal(p.src, [0, 1, 2, 2, 2])
    np.testing.assert_allclose(p.ratio[[2, 3, 4]], 1 / 3)
    q = plan(3, np.array([False, True, False]), symmetry="none")
    np.testing.assert_array_equal(q.src, [0, 1, 2, 1])


def test_copies_and_unequal_ratios():
    p = plan(2, [0], copies=3, ratios=[0.5, 0.25, 0.25], symmetry="none")
    np.testing.assert_array_equal(p.src, [0, 1, 0, 0])
    np.testing.assert_allclose(p.ratio, [0.5, 1, 0.25, 0.25])


def test_nudge_offsets_follow_the_design_formula():
    p = plan(2, [0], copies=3, eps=0.1)
    # copy c of k gets eps * (1 - 2c/(k-1)): +eps, 0, -eps; the unsplit unit 0
    np.testing.assert_allclose(p.offset, [0.1, 0.0, 0.0, -0.1])
    q = plan(1, eps=1e-3)
    np.testing.assert_allclose(q.offset, [1e-3, -1e-3])


def test_noise_plan_carries_sigma_and_seed():
    p = plan(4, symmetry="noise", sigma=0.05, seed=7)
    assert p.sigma == 0.05 and p.seed == 7
    assert plan(4, symmetry="none").sigma == 0.0


@pytest.mark.parametrize("symmetry", SYMMETRIES)
def test_every_symmetry_keeps_what_it_draws_with(symmetry):
    p = plan(4, [1, 1, 3], symmetry=symmetry, eps=0.2, sigma=0.3, seed=5)
    drawing = symmetry in ("noise", "direction", "fresh")
    assert p.seed == (5 if drawing else None)
    assert p.sigma == {"noise": 0.3, "fresh": 0.3, "direction": 0.2}.get(symmetry, 0.0)
    assert bool(np.any(p.offset)) == (symmetry == "nudge")
    np.testing.assert_allclose(np.bincount(p.src, p.ratio), 1.0)


def test_direction_coefficients_and_fresh_shares():
    d = plan(3, [0, 0, 2], symmetry="direction")
    np.testing.assert_array_equal(d.src, [0, 1, 2, 0, 0, 2])
    np.testing.assert_allclose(d.direction, [1, 0, 1, 0, -1, -1])  # 3 copies: +1, 0, -1; a pair: +1, -1
    a = plan(2, [1], ratios=[0.75, 0.25], symmetry="direction")
    np.testing.assert_allclose(a.direction, [0, 0.5, -1.5])  # centred with the ratios: 0.75*0.5 = 0.25*1.5
    f = plan(3, [0, 0, 2], symmetry="fresh")
    np.testing.assert_array_equal(f.ratio, [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(f.is_copy, [False] * 3 + [True] * 3)


def test_embed_places_the_plan_inside_a_wider_axis():
    p = plan(3, [0, 2], symmetry="none")
    e = p.embed(7, 2)
    np.testing.assert_array_equal(e.src, [0, 1, 2, 3, 4, 2, 4, 5, 6])
    np.testing.assert_array_equal(e.ratio, [1, 1, 0.5, 1, 0.5, 0.5, 0.5, 1, 1])
    assert e.width == 7 and e.new_width == 9


def test_plan_is_frozen_and_read_only():
    p = plan(3)
    with pytest.raises(AttributeError):
        p.width = 4
    with pytest.raises(ValueError):
        p.src[0] = 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=3, neurons=[3]), "neuron index 3"),
        (dict(width=3, neurons=[-1]), "neuron index -1"),
        (dict(width=3, neurons=np.array([True, False])), "length 3"),
        (dict(width=3, copies=0), "copies must be at least 1, got 0"),
        (dict(width=3, ratios=[0.7, 0.7]), "sum to 1"),
        (dict(width=3, ratios=[1.5, -0.5]), "positive"),
        (dict(width=3, ratios=[1.0]), "one entry per copy"),
        (dict(width=3, symmetry="jitter"), "'jitter'"),
        (dict(width=0), "width must be at least 1, got 0"),
        (dict(width=3, neurons=[0.5]), "integer"),
    ],
)
def test_bad_plans_name_the_bad_value(kwargs, match):
    neurons = kwargs.get("neurons")
    before = None if neurons is None else np.array(neurons, copy=True)
    with pytest.raises(SplitError, match=match):
        plan(**kwargs)
    if neurons is not None:
        np.testing.assert_array_equal(neurons, before)


def test_split_plan_checks_its_own_invariants():
    with pytest.raises(SplitError, match="out of range"):
        SplitPlan(2, np.array([0, 1, 2]), np.ones(3), np.zeros(3))
    with pytest.raises(SplitError, match="no copy"):
        SplitPlan(3, np.array([0, 1]), np.ones(2), np.zeros(2))
    with pytest.raises(SplitError, match="sum to"):
        SplitPlan(2, np.array([0, 1, 1]), np.ones(3), np.zeros(3))
    with pytest.raises(SplitError, match="embed"):
        plan(3).embed(4, 2)


def test_split_error_is_a_value_error():
    assert issubclass(fastsplit.SplitError, ValueError)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 40),
    data=st.data(),
    copies=st.integers(1, 4),
)
def test_plans_keep_old_units_in_place_and_ratios_sum_to_one(width, data, copies):
    neurons = data.draw(st.lists(st.integers(0, width - 1), max_size=2 * width))
    p = plan(width, np.array(neurons, dtype=np.int64), copies=copies)
    np.testing.assert_array_equal(p.src[:width], np.arange(width))
    assert np.all(np.diff(p.src[width:]) >= 0)
    np.testing.assert_allclose(np.bincount(p.src, weights=p.ratio, minlength=width), 1.0)
    np.testing.assert_allclose(np.bincount(p.src, weights=p.offset, minlength=width), 0.0, atol=1e-15)
    assert p.new_width == width + len(neurons) * (copies - 1)


def test_asymmetric_plans_give_unequal_exact_shares():
    p = plan(4, [0, 2, 2], symmetry="asymmetric")
    np.testing.assert_allclose(np.bincount(p.src, weights=p.ratio, minlength=4), 1.0)
    np.testing.assert_allclose(p.ratio[p.src == 0], [2 / 3, 1 / 3])
    np.testing.assert_allclose(p.ratio[p.src == 2], [3 / 6, 2 / 6, 1 / 6])  # three copies: 3:2:1
    assert np.all(p.offset == 0) and p.symmetry == "asymmetric"
    assert plan(2, [0], symmetry="asymmetric", ratios=[0.9, 0.1]).ratio.tolist() == [0.9, 1.0, 0.1]


def test_scaled_offsets_are_relative_to_each_source_unit():
    p = plan(3, [0, 2], eps=1e-2)
    q = p.scaled([2.0, 5.0, 0.5])
    np.testing.assert_allclose(q.offset, p.offset * np.array([2.0, 5.0, 0.5])[p.src])
    np.testing.assert_array_equal(q.src, p.src)
    with pytest.raises(SplitError, match="scale"):
        p.scaled([1.0, np.nan, 1.0])
    with pytest.raises(SplitError, match="scale"):
        p.scaled([1.0, 1.0])
