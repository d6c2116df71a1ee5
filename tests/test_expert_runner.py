"""The expert runner's helpers: accounting of a layer's round trip, row selection of a group."""

import pytest
import torch

from moelens.stats import StepTimings
from services.expert_gpu.runner import put_rows, row_selector, settle_exchange, take_rows


@pytest.mark.parametrize("send,waited,attention,exchange,overlap", [
    # the attention ran inside the send (waking it handed it the CPU): not counted twice
    (0.0016, 0.0001, 0.0007, 0.0010, 0.0),
    # sent, then blocked while it ran
    (0.0002, 0.0012, 0.0007, 0.0007, 0.0),
    # it ran while the expert computed prefill attention: overlap, no exchange
    (0.0001, 0.0, 0.0005, 0.0, 0.0004),
])
def test_settle_exchange_counts_attention_once(send, waited, attention, exchange, overlap):
    timings = StepTimings()
    settle_exchange(timings, send, waited, attention)
    settle_exchange(timings, send, waited, attention)  # sums over layers
    assert timings.attention_s == pytest.approx(2 * attention)
    assert timings.exchange_s == pytest.approx(2 * exchange)
    assert timings.overlap_s == pytest.approx(2 * overlap)
    # the blocked time is explained exactly: attention + exchange - overlap
    assert timings.attention_s + timings.exchange_s - timings.overlap_s == \
        pytest.approx(2 * (send + waited))


@pytest.mark.parametrize("rows,is_slice", [([3, 4, 5], True), ([0], True), ([1, 2, 4], False),
                                           ([], False)])
def test_row_selector_takes_and_puts_like_index_ops(rows, is_slice):
    """A run of consecutive rows becomes a slice (views, no gather); others stay indices."""
    index = torch.tensor(rows, dtype=torch.int64)
    sel = row_selector(index)
    assert isinstance(sel, slice) == is_slice
    x = torch.arange(24.0).view(6, 4)
    assert torch.equal(take_rows(x, sel), x.index_select(0, index))
    values = -torch.arange(len(rows) * 4.0).view(len(rows), 4)
    got, expected = x.clone(), x.clone()
    put_rows(got, sel, values)
    expected[index] = values
    assert torch.equal(got, expected)
