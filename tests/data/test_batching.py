"""BatchDraw as it travels: every field, as dataclasses would write it."""

from __future__ import annotations

import dataclasses

from splitnn.data.batching import BatchDraw


def test_a_draw_as_plain_data_holds_every_field_as_asdict_would():
    # non-default values in every field (shuffle off): a field left out or taken from another shows
    draw = BatchDraw(seed=11, epoch=3, position=7, batch_size=32, shuffle=False)
    assert draw.to_dict() == dataclasses.asdict(draw)
    assert BatchDraw(**draw.to_dict()) == draw
