"""Every evaluation metric against values worked out by hand on tiny arrays (the reasoning is
in the comments), plus sklearn where it defines the metric."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from EmphysemaUADLib import metrics as m

# the classic example: descending scores 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg)
SCORES = np.array([0.1, 0.4, 0.35, 0.8])
TRUTH = np.array([False, False, True, True])


def test_auroc_and_average_precision_by_hand():
    c = m.binned(SCORES, TRUTH, np.unique(SCORES))
    # pairs (pos, neg): 0.8 beats both, 0.35 beats 0.1 only: 3 of 4
    assert m.auroc(c) == pytest.approx(0.75)
    # from the top: 0.8 -> R 0.5, P 1; 0.4 -> no recall gain; 0.35 -> R 1, P 2/3
    assert m.average_precision(c) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    fpr, tpr = m.roc_curve(c)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_ties_count_half_and_coarse_bins_are_ties():
    c = m.binned([0.5, 0.5], [True, False], [0.0, 1.0])
    assert m.auroc(c) == pytest.approx(0.5)
    # all four scores in one bin: every pair is a tie
    assert m.auroc(m.binned(SCORES, TRUTH, [0.0])) == pytest.approx(0.5)
    assert m.average_precision(m.binned(SCORES, TRUTH, [0.0])) == pytest.approx(0.5)


def test_binned_metrics_match_sklearn_when_every_score_has_its_bin():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 30, 400).astype(float)
    truth = rng.random(400) < 0.2 + scores / 60
    c = m.binned(scores, truth, np.arange(-2.0, 40.0))
    assert m.auroc(c) == pytest.approx(roc_auc_score(truth, scores))
    assert m.average_precision(c) == pytest.approx(average_precision_score(truth, scores))


def test_dice_at_threshold_and_best_threshold():
    c = m.binned(SCORES, TRUTH, [0.0, 0.3, 0.5], weight=2.0)
    # >= 0.3 calls 0.4, 0.35, 0.8: TP 2, FP 1, FN 0 -> 4 / 5 (weights cancel)
    assert m.dice_at(c, 0.3) == pytest.approx(0.8)
    # >= 0.5 calls 0.8 only: TP 1, FP 0, FN 1 -> 2 / 3
    assert m.dice_at(c, 0.5) == pytest.approx(2 / 3)
    # >= 0 calls all: TP 2, FP 2 -> 4 / 6
    assert m.dice_at(c, 0.0) == pytest.approx(2 / 3)
    assert m.best_dice(c) == (pytest.approx(0.8), 0.3)
    with pytest.raises(ValueError):
        m.dice_at(c, 0.4)
    # nothing true and nothing called: perfect agreement
    assert m.dice_at(m.binned([0.1, 0.2], [False, False], [0.0, 0.5]), 0.5) == 1.0


def test_aupro_by_hand():
    # one row of 10 voxels: region A = voxel 0, region B = voxels 2-4, 6 negatives
    score = np.array([0.9, 0.85, 0.8, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1])[None, None]
    truth = np.zeros((1, 1, 10), bool)
    truth[..., 0] = truth[..., 2:5] = True
    c = m.voxel_counts(score, truth, np.ones_like(truth), np.unique(score))
    assert c.regions == 2
    # (FPR, PRO) from the top: (0, 0) -> >=0.9: A found (0, 1/2) -> >=0.85: one negative
    # (1/6, 1/2) -> >=0.8: a third of B (1/6, 2/3) -> >=0.3: all of B (1/6, 1) -> (1, 1).
    # Area to FPR 0.3: 1/6 * 1/2 + (0.3 - 1/6) * 1 = 0.216667; / 0.3 = 0.722222
    assert m.aupro(c) == pytest.approx((1 / 12 + (0.3 - 1 / 6)) / 0.3)
    # a larger limit integrates further along PRO = 1
    assert m.aupro(c, max_fpr=1.0) == pytest.approx(1 / 12 + 5 / 6)
    # no region: undefined
    assert np.isnan(m.aupro(m.voxel_counts(score, truth & False, truth | True, [0.0])))


def test_aupro_counts_each_region_once_whatever_its_size():
    truth = np.zeros((1, 1, 12), bool)
    truth[..., 0] = True  # small region, found
    truth[..., 2:12] = True  # large region, missed
    score = np.where(np.arange(12) == 0, 1.0, 0.0)[None, None]
    mask = np.ones_like(truth)
    mask[..., 1] = True  # the only negative voxel, score 0
    c = m.voxel_counts(score, truth, mask, [0.0, 1.0])
    # PRO (mean of 1 and 0) is 1/2 at FPR 0, not the voxel share 1/11; then 1 at FPR 1
    # (everything called); linear between: 0.65 at 0.3, area (0.5 + 0.65) / 2 * 0.3 / 0.3
    assert m.aupro(c) == pytest.approx(0.575)


def test_stack_and_pool_sum_cases_with_repeats():
    a = m.binned([0.2, 0.9], [False, True], [0.0, 0.5])
    b = m.binned([0.7, 0.1, 0.6], [False, True, True], [0.0, 0.5])
    s = m.stack([a, b])
    both = m.pool(s)
    assert both.positive.tolist() == [1, 2] and both.negative.tolist() == [1, 1]
    twice_b = m.pool(s, [1, 1])
    assert twice_b.positive.tolist() == [2, 2] and twice_b.negative.tolist() == [0, 2]
    with pytest.raises(ValueError):
        m.stack([a, m.binned([0.1], [True], [0.0])])


def test_case_auroc_staging_and_spearman_by_hand():
    # pos {3, 2} vs neg {1, 2}: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4
    assert m.case_auroc([3, 1, 2, 2], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert np.isnan(m.case_auroc([1, 2], [1, 1]))
    assert m.staging_accuracy(["None", "Mild", "Severe", "Mild"],
                              ["None", "Moderate", "Severe", "Mild"]) == 0.75
    true = ["None", "Mild", "Mild", "Severe"]
    probs = [[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4],
             [0.1, 0.3, 0.3, 0.3]]
    # None: 0.7 above all three -> 1; Mild: {0.5, 0.2} vs {0.1, 0.3} -> 3/4;
    # Severe: 0.3 vs {0.1, 0.1, 0.4} -> 2/3; Moderate is absent and left out
    assert m.macro_ovr_auroc(true, probs, ("None", "Mild", "Moderate", "Severe")) == \
        pytest.approx((1 + 0.75 + 2 / 3) / 3)
    # ranks of y: 1 3 2 4, d^2 sums to 2: 1 - 6 * 2 / (4 * 15)
    assert m.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # tied x ranks 1.5 1.5 3 against 1 2 3: cov 1.5 / sqrt(1.5 * 2)
    assert m.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / np.sqrt(3.0))
    assert np.isnan(m.spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_intervals_by_hand():
    values = np.array([0.0, 1.0])

    def mean(idx):
        return {"mean": values[idx].mean(), "constant": 3.0}

    ci = m.bootstrap(mean, 2, n_boot=2000, seed=1)
    # a sample mean is 0 (p 1/4), 1/2 (p 1/2) or 1 (p 1/4): the 2.5 % and 97.5 % points
    # are 0 and 1; a constant has a zero-width interval
    assert ci["mean"] == (0.0, 1.0)
    assert ci["constant"] == (3.0, 3.0)
    assert m.bootstrap(mean, 2, n_boot=50, seed=7) == m.bootstrap(mean, 2, n_boot=50, seed=7)

    def undefined_without_case_1(idx):
        return {"mean": values[idx].mean() if 1 in idx else float("nan")}

    # samples without case 1 (p 1/4) are left out: 1/2 (p 2/3) or 1 (p 1/3) remain
    assert m.bootstrap(undefined_without_case_1, 2, n_boot=2000, seed=1)["mean"] == (0.5, 1.0)
    # a single case: every sample is that case
    assert m.bootstrap(lambda idx: {"v": float(idx.sum())}, 1, n_boot=10)["v"] == (0.0, 0.0)


def test_cluster_bootstrap_resamples_subjects_with_all_their_cases():
    # subject a holds cases 0 and 1 (values 0, 0), subject b case 2 (value 1). A sample draws
    # two subjects: aa (p 1/4) -> 4 cases, mean 0; ab or ba (p 1/2) -> 3 cases, mean 1/3;
    # bb (p 1/4) -> 2 cases, mean 1
    values = np.array([0.0, 0.0, 1.0])

    def statistic(idx):
        return {"cases": float(len(idx)), "mean": values[idx].mean(),
                "needs_b": values[idx].mean() if 2 in idx else float("nan")}

    ci = m.cluster_bootstrap(statistic, ["a", "a", "b"], n_boot=2000, seed=1)
    assert ci["cases"] == (2.0, 4.0, 2000)
    assert ci["mean"] == (0.0, 1.0, 2000)
    # samples without b (aa, p 1/4) are undefined: left out and not counted as used
    low, high, used = ci["needs_b"]
    assert (low, high) == (pytest.approx(1 / 3), 1.0) and 0.72 < used / 2000 < 0.78
    # one case per cluster: the very samples of the case bootstrap
    case_ci = m.bootstrap(statistic, 3, n_boot=300, seed=4)
    by_cluster = m.cluster_bootstrap(statistic, [7, 8, 9], n_boot=300, seed=4)
    assert {k: v[:2] for k, v in by_cluster.items()} == case_ci


def test_case_auroc_and_spearman_match_sklearn_and_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(5)
    for n in (2, 7, 55):
        scores = rng.integers(0, 6, n).astype(float)
        truth = rng.random(n) < 0.4
        truth[:2] = [True, False]
        scores[:2] = [1.0, 3.0]
        other = rng.integers(0, 4, n).astype(float)
        other[:2] = [0.0, 1.0]
        assert m._ranks(scores).tolist() == rankdata(scores).tolist()
        assert m.case_auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores))
        assert m.spearman(scores, other) == pytest.approx(spearmanr(scores, other).statistic)
