"""The slot algebra: unification with refinement, slicing, conflicts."""

from __future__ import annotations

import pytest

from fxconet.passes.slots import Conflict, Slots


def test_unify_equal_blocks_links_variables():
    s = Slots()
    a, b = s.layout(8), s.layout(8)
    s.unify(a, b)
    assert s.find(a[0][1]) == s.find(b[0][1])


def test_unify_concat_against_one_variable_splits_it():
    s = Slots()
    x, y, z = s.layout(3), s.layout(5), s.layout(8)
    s.unify(x + y, z)
    assert s.expand(z) == [(1, s.find(x[0][1]), 1), (1, s.find(y[0][1]), 1)]
    assert s.total(z) == 8 and s.leaves(z) == [s.find(x[0][1]), s.find(y[0][1])]


def test_unify_repetitions_factors_by_lcm():
    s = Slots()
    v = s.new(6)
    w = s.new(4)
    s.unify(((2, v, 1),), ((3, w, 1),))  # 2 x 6 == 3 x 4: both are 6 copies of one 2-slot
    ((o1, a, i1),) = s.expand(((1, v, 1),))
    ((o2, b, i2),) = s.expand(((1, w, 1),))
    assert (o1, i1, o2, i2) == (3, 1, 2, 1) and a == b and s.size[a] == 2


def test_inner_and_outer_structure_meet():
    s = Slots()
    v, w = s.new(8), s.new(8)
    s.unify(((2, v, 1),), ((1, w, 2),))
    leaves = s.leaves(((1, v, 1),))
    assert leaves == s.leaves(((1, w, 1),)) and s.size[leaves[0]] == 4


def test_slice_refines_at_the_cuts_and_repeats_follow():
    s = Slots()
    v = s.new(10)
    part = s.slice(((2, v, 1),), 3, 7)  # crosses into the second copy? no: first copy 0..9
    assert s.total(part) == 4
    leaves = s.leaves(((1, v, 1),))
    assert [s.size[x] for x in leaves] == [3, 4, 3]
    assert s.total(((2, v, 1),)) == 20


def test_conflicts_are_reported_not_guessed():
    s = Slots()
    v = s.new(6)
    with pytest.raises(Conflict):
        s.slice(((1, v, 2),), 0, 3)  # cuts through a repeated channel


def test_freeze_and_flags_follow_unions_and_refinements():
    s = Slots()
    a = s.layout(4, produced=True)
    b = s.layout(4, reason="model input")
    s.unify(a, b)
    assert s.reason[s.find(a[0][1])] == "model input"
    c = s.layout(6, produced=True)
    s.freeze(c, "because")
    left, right = s.split(c[0][1], [2, 4])
    assert s.reason[left] == s.reason[right] == "because" and s.produced[left]
