"""The expert runner's accounting of one layer's round trip to the attention service."""

import pytest

from moelens.stats import StepTimings
from services.expert_gpu.runner import settle_exchange


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
