"""The int8 keep-or-refuse rule (msbt.serve.quantize); the whole export: tests/integration/test_serve.py."""

import pytest

from msbt.serve.quantize import accepted


@pytest.mark.parametrize("f32, int8, bound, kept", [
    (0.80, 0.79, 0.02, True),    # a drop within the bound
    (0.80, 0.75, 0.02, False),   # a drop beyond it
    (0.80, 0.81, 0.02, True),    # a rise within the bound
    (0.80, 0.85, 0.02, False),   # a rise beyond it: the float model's numbers do not describe it (kept until 2026-12-07)
    (0.80, 0.80, 0.00, True),    # no change at a zero bound
    (0.80, 0.7999, 0.00, False),
    (0.80, 0.8001, 0.00, False),
])
def test_int8_is_kept_only_when_its_auc_change_either_way_is_within_the_bound(f32, int8, bound, kept):
    assert accepted(f32, int8, bound) is kept
