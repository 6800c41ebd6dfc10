"""Evaluation metrics against a ground truth: voxel maps, cases, stages, and bootstrap CIs.

Voxel metrics work on `Counts`: how many true-emphysema ("positive") and other ("negative")
voxels fall in each bin of fixed score edges, per case. Summed over any set of cases they give
the pooled metrics of that set exactly as the voxels would, so a bootstrap over cases never
touches the voxels again. Cases that come in clusters (several slices or scans of one
subject) are resampled by cluster (`cluster_bootstrap`). Conventions:
- A voxel is called emphysema when its score >= the threshold; thresholds are bin edges.
  Bin i holds scores in [edges[i], edges[i + 1]); the first bin also takes scores below
  edges[0], the last those >= edges[-1]. Voxels in one bin are ties.
- With one bin per distinct score (what `case_auroc` uses) every metric is exact; with finer
  edges than the scores' resolution the voxel metrics are exact too.
- AUROC counts ties as half (Mann-Whitney); average precision is sklearn's step-wise sum
  sum_k (R_k - R_k-1) P_k over thresholds from high to low (no interpolation).
- AUPRO (per-region overlap, as in the MVTec AD benchmark): the truth is split into connected
  regions (3-D, face connectivity). At a threshold, a region's overlap is the share of its
  voxels called emphysema; PRO is the mean overlap over all regions of all cases (each region
  counts once, whatever its size), FPR the share of all negative voxels called emphysema.
  AUPRO is the area under PRO(FPR) from FPR 0 to `max_fpr` (0.3; linear between thresholds),
  divided by `max_fpr`, so that a perfect detector scores 1 and chance about max_fpr / 2.
- Dice = 2 TP / (2 TP + FP + FN); 1 when both truth and prediction are empty.
An undefined value (a class or region missing) is NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AUPRO_MAX_FPR = 0.3


@dataclass
class Counts:
    """Voxel counts per score bin; the arrays are (bins,) for one case or pooled cases, or
    (cases, bins) for a stack of cases (see `stack` and `pool`)."""

    edges: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    overlap: np.ndarray  # per bin, sum over truth regions of (region voxels in bin / region size)
    regions: np.ndarray | int  # number of truth regions


def binned(scores, truth, edges, weight: float = 1.0, region_share=None) -> Counts:
    """Counts of 1-D scores with their truth (bool); `weight` per voxel (e.g. its volume);
    `region_share` per voxel (1 / size of its truth region, 0 outside regions)."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) == 0 or np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be a non-empty, strictly increasing 1-D array")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 1)
    n = len(edges)
    positive = np.bincount(bins[truth], minlength=n) * float(weight)
    negative = np.bincount(bins[~truth], minlength=n) * float(weight)
    if region_share is None:
        overlap = np.zeros(n)
    else:
        overlap = np.bincount(bins, weights=np.asarray(region_share, float).ravel(), minlength=n)
    regions = 0 if region_share is None else int(round(float(np.sum(region_share))))
    return Counts(edges, positive, negative, overlap, regions)


def voxel_counts(score_map, truth_map, mask, edges, weight: float = 1.0) -> Counts:
    """Counts of the voxels inside `mask`, with the truth's connected regions for AUPRO."""
    mask = np.asarray(mask, dtype=bool)
    truth = np.asarray(truth_map, dtype=bool) & mask
    labels, n = ndimage.label(truth)
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    share = np.zeros(n + 1)
    share[1:] = 1.0 / np.maximum(sizes[1:], 1.0)
    return binned(np.asarray(score_map)[mask], truth[mask], edges, weight, share[labels[mask]])


def stack(counts: list[Counts]) -> Counts:
    """Per-case counts (same edges) as one (cases, bins) stack."""
    edges = counts[0].edges
    if any(not np.array_equal(c.edges, edges) for c in counts):
        raise ValueError("all counts must share their edges")
    return Counts(edges, *(np.stack([getattr(c, k) for c in counts])
                           for k in ("positive", "negative", "overlap")),
                  np.asarray([c.regions for c in counts]))


def pool(stacked: Counts, cases=None) -> Counts:
    """The pooled counts of a stack: all cases, or the case indices given (repeats count
    again, as in a bootstrap sample)."""
    n = stacked.positive.shape[0]
    weights = np.ones(n) if cases is None else np.bincount(np.asarray(cases, int), minlength=n)
    return Counts(stacked.edges, weights @ stacked.positive, weights @ stacked.negative,
                  weights @ stacked.overlap, int(weights @ stacked.regions))


def _from_top(values: np.ndarray) -> np.ndarray:
    """Cumulative sums from the highest bin down, with 0 first (threshold above all)."""
    return np.concatenate([[0.0], np.cumsum(values[::-1])])


def roc_curve(c: Counts) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from the threshold above all scores down to the lowest edge."""
    p, n = c.positive.sum(), c.negative.sum()
    if p == 0 or n == 0:
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    return _from_top(c.negative) / n, _from_top(c.positive) / p


def auroc(c: Counts) -> float:
    fpr, tpr = roc_curve(c)
    return float(np.trapezoid(tpr, fpr))


def average_precision(c: Counts) -> float:
    tp, fp = _from_top(c.positive)[1:], _from_top(c.negative)[1:]
    p = c.positive.sum()
    if p == 0:
        return float("nan")
    gain = np.diff(np.concatenate([[0.0], tp])) / p
    called = tp + fp
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    return float(np.sum(gain * precision))


def _dice(tp, fp, p):
    denominator = tp + fp + p  # 2 TP + FP + FN with FN = P - TP
    return np.divide(2 * tp, denominator, out=np.ones_like(denominator, dtype=float),
                     where=denominator > 0)


def dice_at(c: Counts, threshold: float) -> float:
    """Dice of calling emphysema where score >= threshold (which must be one of the edges)."""
    i = np.flatnonzero(np.isclose(c.edges, threshold, rtol=0, atol=1e-12))
    if len(i) == 0:
        raise ValueError(f"threshold {threshold} is not one of the bin edges")
    tp, fp = c.positive[i[0]:].sum(), c.negative[i[0]:].sum()
    return float(_dice(np.float64(tp), np.float64(fp), c.positive.sum()))


def best_dice(c: Counts) -> tuple[float, float]:
    """(the highest Dice over all edge thresholds, the lowest threshold that reaches it)."""
    tp = np.cumsum(c.positive[::-1])[::-1]
    fp = np.cumsum(c.negative[::-1])[::-1]
    dice = _dice(tp, fp, c.positive.sum())
    i = int(np.flatnonzero(dice == dice.max())[0])
    return float(dice[i]), float(c.edges[i])


def aupro(c: Counts, max_fpr: float = AUPRO_MAX_FPR) -> float:
    n = c.negative.sum()
    if n == 0 or c.regions == 0:
        return float("nan")
    fpr = _from_top(c.negative) / n
    pro = _from_top(c.overlap) / c.regions
    # fpr is non-decreasing; the last point (all voxels called) has FPR 1
    end = int(np.searchsorted(fpr, max_fpr, side="left"))
    x, y = list(fpr[:end]), list(pro[:end])
    x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
    x.append(max_fpr)
    y.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1)
    return float(np.trapezoid(y, x) / max_fpr)


# --- cases and stages ---------------------------------------------------------------------
def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy's rankdata, a few times faster on
    the small arrays of a bootstrap)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    first = np.flatnonzero(starts)
    average = (first + np.append(first[1:], len(values)) + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = average[np.cumsum(starts) - 1]
    return ranks


def case_auroc(scores, labels) -> float:
    """AUROC of case scores against bool labels (ties count half); NaN without both."""
    # Mann-Whitney with average ranks: the same as `auroc` with one bin per distinct score,
    # and fast enough for thousands of bootstrap samples
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(np.count_nonzero(labels))
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def staging_accuracy(true, predicted) -> float:
    true, predicted = np.asarray(true), np.asarray(predicted)
    return float(np.mean(true == predicted)) if len(true) else float("nan")


def macro_ovr_auroc(true, probabilities, classes) -> float:
    """Mean over the classes of AUROC(P(class), true == class), one class against the rest;
    classes absent from `true` (or all of it) are left out."""
    true = np.asarray(true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    values = [case_auroc(probabilities[:, k], true == name) for k, name in enumerate(classes)
              if 0 < np.count_nonzero(true == name) < len(true)]
    return float(np.mean(values)) if values else float("nan")


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float(np.dot(rx, ry) / np.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))


def bootstrap(statistic, n_cases: int, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals by case: `statistic(cases)` gets an array of case indices drawn
    with replacement and returns {name: value}; NaN values (e.g. a class missing from a
    sample) are left out of that name's interval. The same seed gives the same samples, so
    methods bootstrapped with one seed are compared on paired samples."""
    rng = np.random.default_rng(seed)
    intervals = _percentile_intervals(
        statistic, lambda: rng.integers(0, n_cases, n_cases), n_boot, level)
    return {name: (low, high) for name, (low, high, _) in intervals.items()}


def cluster_bootstrap(statistic, clusters, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, tuple[float, float, int]]:
    """Percentile intervals by cluster (e.g. by subject when a subject has several cases):
    each sample draws as many clusters as there are, with replacement, and keeps every case
    of each cluster drawn (a cluster drawn twice counts twice). `clusters` holds one cluster
    id per case; `statistic(cases)` gets the case indices of a sample and returns {name:
    value}. Returns {name: (low, high, samples used)}: a sample where a value is NaN (e.g.
    a class missing) is left out of that name's interval and not counted as used. With one
    case per cluster this is `bootstrap` (the same samples for the same seed)."""
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(cluster_of == k) for k in range(int(cluster_of.max()) + 1)] \
        if len(cluster_of) else []
    rng = np.random.default_rng(seed)

    def sample():
        drawn = rng.integers(0, len(members), len(members))
        return np.concatenate([members[k] for k in drawn]) if len(drawn) else drawn

    return _percentile_intervals(statistic, sample, n_boot, level)


def _percentile_intervals(statistic, sample, n_boot: int, level: float
                          ) -> dict[str, tuple[float, float, int]]:
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for name, value in statistic(sample()).items():
            draws.setdefault(name, []).append(value)
    tail = 100 * (1 - level) / 2
    out = {}
    for name, values in draws.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = ((float("nan"),) * 2 if len(values) == 0 else
                     (float(v) for v in np.percentile(values, [tail, 100 - tail])))
        out[name] = (low, high, int(len(values)))
    return out
