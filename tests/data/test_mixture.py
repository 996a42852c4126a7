"""The weighted mixture: proportions within binomial noise, exact state, retiring exhausted sources."""
import math

import numpy as np
import pytest

from qwen3vl.data.mixture import WeightedMixture

N = 20000


def test_empirical_proportions_match_weights_within_4_sigma():
    weights = [0.5, 0.3, 0.15, 0.05]
    mixture = WeightedMixture([w * 7 for w in weights], seed=11)  # unnormalised weights are fine
    counts = np.bincount([mixture.next_source() for _ in range(N)], minlength=4)
    for p, n in zip(weights, counts):
        sigma = math.sqrt(N * p * (1 - p))
        assert abs(n - N * p) <= 4 * sigma, (p, n)


def test_seeds_and_consumers_give_different_streams():
    def draws(seed, stream):
        mixture = WeightedMixture([1, 1], seed, stream)
        return [mixture.next_source() for _ in range(64)]

    assert draws(0, 0) == draws(0, 0)
    assert draws(0, 0) != draws(1, 0) and draws(0, 0) != draws(0, 1)


def test_state_round_trip_continues_the_same_draws():
    mixture = WeightedMixture([2, 1, 1], seed=3)
    for _ in range(100):
        mixture.next_source()
    state = mixture.state_dict()
    expected = [mixture.next_source() for _ in range(200)]
    restored = WeightedMixture([2, 1, 1], seed=3)
    restored.load_state_dict(state)
    assert [restored.next_source() for _ in range(200)] == expected


def test_retired_sources_are_never_drawn_and_the_rest_renormalise():
    mixture = WeightedMixture([1, 1, 2], seed=0)
    mixture.retire(2)
    counts = np.bincount([mixture.next_source() for _ in range(4000)], minlength=3)
    assert counts[2] == 0 and abs(counts[0] - 2000) <= 4 * math.sqrt(1000)
    mixture.retire(0)
    mixture.retire(1)
    assert mixture.exhausted
    with pytest.raises(StopIteration):
        mixture.next_source()


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_invalid_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        WeightedMixture(weights, seed=0)
