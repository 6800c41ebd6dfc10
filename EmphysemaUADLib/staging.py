"""Stages from the emphysema index (% of a region's voxels in the emphysema label map).

No labels are used anywhere. Two ways to stage:

- Default cut-points after Fleischner's grades: None below 0.5 % (absent or trace), Mild
  0.5-5 %, Moderate 5-25 % (Fleischner moderate: > 5 %), Severe from 25 % (Fleischner's
  confluent and advanced destructive grades have no percentage; 25 % is the usual
  quantitative-CT cut for severe emphysema, %LAA-950 >= 25 %). The network's index of
  healthy lungs stays far below 0.5 % (real CT and healthy phantoms: <= 0.03 %), whereas
  the noise of a -950 HU threshold alone would not.
  Probabilities express how close an index is to a cut-point (a +-15 % relative uncertainty
  of the index), not a calibrated risk.
- A cohort calibration (`calibrate`): a 4-component 1-D Gaussian mixture fitted on the
  log of the cases' whole-lung indices; components are named by the order of their means
  (None < Mild < Moderate < Severe), never by labels; its cut-points are where adjacent
  components' weighted densities cross, and its probabilities the components' posteriors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError

STAGES = ("None", "Mild", "Moderate", "Severe")
DEFAULT_CUTPOINTS = (0.5, 5.0, 25.0)
RELATIVE_UNCERTAINTY = 0.15
STAGING_FORMAT = "emphysema-uad-staging"


def _log(index_percent):
    return np.log(np.asarray(index_percent, dtype=float) + 0.1)


class Staging:
    """Turns an emphysema index into a stage and stage probabilities."""

    def __init__(self, cutpoints=DEFAULT_CUTPOINTS, mixture: dict | None = None,
                 source: str = "default cut-points"):
        self.cutpoints = tuple(float(c) for c in cutpoints)
        if list(self.cutpoints) != sorted(self.cutpoints) or len(self.cutpoints) != 3:
            raise InputError(f"staging cut-points must be three increasing numbers, "
                             f"not {self.cutpoints}.")
        self.mixture = mixture
        self.source = source

    def probabilities(self, index_percent: float) -> dict[str, float]:
        x = float(_log(index_percent))
        if self.mixture is None:
            cuts = _log(self.cutpoints)
            at_least = 1 / (1 + np.exp(-(x - cuts) / RELATIVE_UNCERTAINTY))
            p = -np.diff(np.concatenate([[1.0], at_least, [0.0]]))
        else:
            m = self.mixture
            means, sds, weights = (np.asarray(m[k], float) for k in ("means", "sds", "weights"))
            # beyond the outer means the outer components keep the stage (a wider middle
            # component must not win back in a tail)
            x = float(np.clip(x, means[0], means[-1]))
            density = weights * np.exp(-0.5 * ((x - means) / sds) ** 2) / sds
            p = density / density.sum()
        return {stage: round(float(v), 4) for stage, v in zip(STAGES, p)}

    def stage(self, index_percent: float) -> str:
        return STAGES[int(np.searchsorted(self.cutpoints, index_percent, side="right"))]

    def to_dict(self) -> dict:
        out = {"format": STAGING_FORMAT, "version": 1, "source": self.source,
               "cutpoints_percent": list(self.cutpoints), "stages": list(STAGES)}
        if self.mixture is not None:
            out["mixture"] = self.mixture
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Staging":
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != STAGING_FORMAT:
                raise ValueError("not an EmphysemaUAD staging file")
            return cls(data["cutpoints_percent"], data.get("mixture"), f"{path}")
        except FileNotFoundError:
            raise InputError(f"{path}: no such staging file.") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: not a staging file written by `emphysema-uad "
                             f"calibrate` ({exc}).") from None


def stage_of(index_percent: float, cutpoints=DEFAULT_CUTPOINTS) -> str:
    return Staging(cutpoints).stage(index_percent)


def calibrate(indices_percent, seed: int = 0) -> Staging:
    """Fit the 4-component mixture on a cohort's whole-lung emphysema indices."""
    from sklearn.mixture import GaussianMixture

    x = _log(np.asarray(indices_percent, dtype=float)).reshape(-1, 1)
    if len(x) < 8 or len(np.unique(x)) < 4:
        raise InputError(f"calibration needs at least 8 cases with 4 or more distinct indices "
                         f"(got {len(x)} cases); the default cut-points need none.")
    gmm = GaussianMixture(4, random_state=seed, n_init=5, reg_covar=1e-3).fit(x)
    order = np.argsort(gmm.means_[:, 0])
    means = gmm.means_[order, 0]
    sds = np.sqrt(gmm.covariances_.reshape(-1)[order])
    weights = gmm.weights_[order]
    # cut-points: where adjacent components' weighted densities cross, between their means
    grid = np.linspace(means[0], means[-1], 4000)
    dens = weights[:, None] * np.exp(-0.5 * ((grid - means[:, None]) / sds[:, None]) ** 2) \
        / sds[:, None]
    winner = dens.argmax(axis=0)
    cuts = []
    for k in range(3):
        above = np.flatnonzero(winner > k)
        cuts.append(float(np.exp(grid[above[0]]) - 0.1) if len(above) else float(np.exp(
            means[k + 1]) - 0.1))
    cuts = list(np.maximum.accumulate(np.round(cuts, 4)))
    mixture = {"space": "log(index_percent + 0.1)", "means": means.round(6).tolist(),
               "sds": sds.round(6).tolist(), "weights": weights.round(6).tolist(),
               "cases": int(len(x))}
    return Staging(cuts, mixture, f"Gaussian mixture on {len(x)} cases")


def cohort_indices(sources) -> list[float]:
    """Whole-lung emphysema indices from detect outputs: report.json files, folders holding
    them (searched recursively) or summary.csv worklists (failed cases skipped)."""
    import csv

    indices = []
    for source in map(Path, sources):
        if not source.exists():
            raise InputError(f"{source}: no such file or folder.")
        if source.suffix.lower() == ".csv":
            with open(source, newline="") as f:
                for row in csv.DictReader(f):
                    if not row.get("error") and row.get("emphysema_index_percent"):
                        indices.append(float(row["emphysema_index_percent"]))
            continue
        reports = sorted(source.rglob("report.json")) if source.is_dir() else [source]
        for report in reports:
            try:
                data = json.loads(report.read_text())
                indices.append(float(data["regions"][0]["emphysema_index_percent"]))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise InputError(f"{report}: not a report.json of `emphysema-uad detect` "
                                 f"({exc}).") from None
    return indices
