"""Window construction per method: pure functions, checked against hand-made expectations."""

from __future__ import annotations

import pytest

from llmslim.errors import UserError
from llmslim.metrics.windows import (
    get_rolling_token_windows,
    gptq_windows,
    make_disjoint_window,
    rolling_windows,
    sliding_windows,
)


def targets(windows):
    """The token positions each window scores, as values (tokens are their own positions here)."""
    return [t for w in windows for t in w.ids[len(w.ids) - w.n_pred:]]


def test_gptq_drops_the_tail_and_skips_each_first_token():
    ws = gptq_windows(list(range(10)), 4)
    assert [w.ids for w in ws] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert targets(ws) == [1, 2, 3, 5, 6, 7]


def test_gptq_exact_multiple_uses_every_window():
    assert len(gptq_windows(list(range(8)), 4)) == 2


def test_gptq_with_bos_scores_every_text_token():
    ws = gptq_windows(list(range(9)), 4, bos=99)
    assert [w.ids for w in ws] == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert targets(ws) == list(range(9))


def test_text_shorter_than_a_window_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one window"):
        gptq_windows(list(range(3)), 4)


def test_sliding_scores_every_token_once_with_long_context():
    ws = sliding_windows(list(range(10)), seqlen=4, stride=2)
    assert [w.ids for w in ws] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert targets(ws) == list(range(1, 10))


def test_sliding_with_stride_equal_to_seqlen_is_gptq_on_an_exact_multiple():
    tokens = list(range(12))
    assert sliding_windows(tokens, 4, 4) == gptq_windows(tokens, 4)
    assert sliding_windows(tokens, 4, 4, bos=99) == gptq_windows(tokens, 4, bos=99)


def test_sliding_keeps_the_tail_and_skips_a_lone_last_token():
    assert targets(sliding_windows(list(range(10)), 4, 4)) == [1, 2, 3, 5, 6, 7, 9]
    assert targets(sliding_windows(list(range(9)), 4, 4)) == [1, 2, 3, 5, 6, 7]


def test_sliding_short_text_is_one_window():
    assert targets(sliding_windows([5, 6, 7], 8, 4)) == [6, 7]


@pytest.mark.parametrize("stride", [0, 5])
def test_sliding_stride_out_of_range(stride):
    with pytest.raises(UserError, match="--stride"):
        sliding_windows(list(range(10)), 4, stride)


def test_rolling_matches_lm_eval_gold():
    # lm-evaluation-harness tests/test_utils.py::test_get_rolling_token_windows_v1
    gold = [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]
    assert list(get_rolling_token_windows(list(range(34)), -100, 10, 1)) == gold
    assert make_disjoint_window(gold[3]) == ([23, 24, 25, 26, 27, 28, 29], [30, 31, 32, 33])


def test_rolling_windows_score_every_token_from_the_prefix():
    ws = rolling_windows(list(range(34)), 10, prefix_token=-100)
    assert targets(ws) == list(range(34))
    assert ws[0].ids[0] == -100
    assert all(len(w.ids) - 1 <= 10 for w in ws)


def test_rolling_empty_text():
    with pytest.raises(UserError, match="empty"):
        rolling_windows([], 10, 0)
