import math

import pytest
import torch

from rm.loss import pair_statistics, pairwise_loss, reward_metrics, split_rewards


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_pairwise_loss_matches_hand_computed_values():
    """Differences 1 and -0.5 (not symmetric: swapping chosen and rejected changes the value)."""
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    expected = (softplus(-1.0) + softplus(0.5)) / 2
    assert math.isclose(pairwise_loss(chosen, rejected).item(), expected, rel_tol=1e-6)


def test_per_pair_weights_make_a_weighted_sum():
    chosen, rejected, weights = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([0.25, 1.0])
    expected = 0.25 * softplus(-1.0) + 1.0 * softplus(0.5)
    assert math.isclose(pairwise_loss(chosen, rejected, weights=weights).item(), expected, rel_tol=1e-6)


def test_margin_shifts_the_difference():
    chosen, rejected, margin = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5])
    assert math.isclose(pairwise_loss(chosen, rejected, margin).item(), softplus(-0.5), rel_tol=1e-6)


def test_centering_adds_squared_sum():
    chosen, rejected = torch.tensor([3.0, -1.0]), torch.tensor([1.0, -2.0])
    expected = (softplus(-2.0) + softplus(-1.0)) / 2 + 0.1 * (16 + 9) / 2
    assert math.isclose(pairwise_loss(chosen, rejected, center_rewards_coefficient=0.1).item(), expected,
                        rel_tol=1e-6)


def test_loss_is_float32_for_bf16_rewards():
    loss = pairwise_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16))
    assert loss.dtype == torch.float32


def test_split_rewards_takes_chosen_rows_first():
    chosen, rejected = split_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]


def test_metrics_against_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, -1.0])
    m = reward_metrics(chosen, rejected)
    assert math.isclose(m["accuracy"], 2 / 3)
    assert math.isclose(m["margin"], (1 - 1 + 2) / 3)
    assert math.isclose(m["reward_chosen"], 1.0) and math.isclose(m["reward_rejected"], 1 / 3)
    both = [2.0, 0.0, 1.0, 1.0, 1.0, -1.0]
    mean = sum(both) / 6
    assert math.isclose(m["reward_mean"], mean)
    assert math.isclose(m["reward_std"], math.sqrt(sum((x - mean) ** 2 for x in both) / 6))
    assert math.isclose(m["loss"], (softplus(-1.0) + softplus(1.0) + softplus(-2.0)) / 3, rel_tol=1e-6)


def test_pair_statistics_are_sums():
    s = pair_statistics(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert s.keys() == {"correct", "margin"} and s["correct"].item() == 1 and s["margin"].item() == 0.0


def test_wilson_interval_by_hand_and_only_for_few_pairs():
    """3 of 10 and 9 of 10 correct: intervals that overlap (10 pairs cannot tell 0.3 from 0.9 apart for sure)."""
    from rm.evaluate import summarize_rewards, wilson_interval

    assert wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    chosen = torch.tensor([1.0] * 9 + [-1.0])
    few = summarize_rewards(chosen, torch.zeros(10), torch.zeros(10))
    assert few["accuracy"] == 0.9 and (few["accuracy_ci95_low"], few["accuracy_ci95_high"]) == wilson_interval(9, 10)
    many = summarize_rewards(torch.ones(100), torch.zeros(100), torch.zeros(100))
    assert "accuracy_ci95_low" not in many
