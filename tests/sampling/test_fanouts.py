"""resolve_fanouts: the three accepted shapes of ``sampling.fanouts`` and errors that name it."""
from __future__ import annotations

import pytest

from goat_dist.sampling.blocks import ITEM_TO_USER, USER_TO_ITEM, USER_USER, item_item_relation

from goat_dist.sampling.neighbor import resolve_fanouts

II = item_item_relation("text")
RELS = {"user_item": [ITEM_TO_USER, USER_TO_ITEM], "item_item": [II], "user_user": [USER_USER]}


def test_all_neighbours_everywhere():
    out = resolve_fanouts(-1, RELS, {"user_item": 3, "item_item": 1, "user_user": 2})
    assert out == {ITEM_TO_USER: [-1, -1, -1], USER_TO_ITEM: [-1, -1, -1], II: [-1], USER_USER: [-1, -1]}


def test_per_hop_list_applies_to_every_family():
    out = resolve_fanouts([10, 5], RELS, {"user_item": 2, "item_item": 2, "user_user": 2})
    assert set(map(tuple, out.values())) == {(10, 5)} and len(out) == 4


def test_mapping_per_family_missing_family_takes_all():
    out = resolve_fanouts({"user_item": [10, 5], "item_item": 4}, RELS,
                          {"user_item": 2, "item_item": 2, "user_user": 1})
    assert out[ITEM_TO_USER] == [10, 5] and out[USER_TO_ITEM] == [10, 5]
    assert out[II] == [4, 4] and out[USER_USER] == [-1]


@pytest.mark.parametrize("value,match", [
    ([10, 5], r"sampling\.fanouts: \[10, 5\] has 2 entries but the item_item family has 1"),
    ({"user_item": [10]}, r"sampling\.fanouts\.user_item: \[10\] has 1 entries"),
    ({"useritem": [10, 5]}, r"sampling\.fanouts: unknown key"),
    ([10, 0], r"sampling\.fanouts\[1\]: a fanout must be a positive integer or -1"),
    ("ten", r"sampling\.fanouts: expected -1"),
    (True, r"sampling\.fanouts: expected -1"),
])
def test_bad_shapes_name_the_config_key(value, match):
    with pytest.raises(ValueError, match=match):
        resolve_fanouts(value, RELS, {"user_item": 2, "item_item": 1, "user_user": 2})
