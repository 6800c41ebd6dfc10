"""Staging without labels: default cut-points, probabilities, cohort calibration."""
from __future__ import annotations

import json

import numpy as np
import pytest

from EmphysemaUADLib.cli import main
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.staging import STAGES, Staging, calibrate, cohort_indices, stage_of


@pytest.mark.parametrize("index,stage", [(0.0, "None"), (0.49, "None"), (0.5, "Mild"),
                                         (4.99, "Mild"), (5.0, "Moderate"), (24.9, "Moderate"),
                                         (25.0, "Severe"), (80.0, "Severe")])
def test_default_cutpoints(index, stage):
    assert stage_of(index) == stage


def test_probabilities_sum_to_one_and_peak_at_the_stage():
    staging = Staging()
    for index in np.geomspace(0.01, 90, 40):
        p = staging.probabilities(index)
        assert abs(sum(p.values()) - 1) < 1e-3 and list(p) == list(STAGES)
        assert max(p, key=p.get) == staging.stage(index) or \
            min(abs(index - c) / c for c in staging.cutpoints) < 0.01
    assert staging.probabilities(5.0)["Mild"] == pytest.approx(0.5, abs=0.01)


def cohort(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0.05, 0.6, 25), rng.uniform(1.5, 3.5, 15),
                           rng.uniform(9, 16, 12), rng.uniform(35, 55, 8)])


def test_calibration_orders_components_by_their_means():
    staging = calibrate(cohort())
    means = staging.mixture["means"]
    assert means == sorted(means)
    lo, mid, hi = staging.cutpoints
    assert 0.6 < lo < 1.5 and 3.5 < mid < 9 and 16 < hi < 35
    assert [staging.stage(v) for v in (0.2, 2.5, 12, 45, 95)] == list(STAGES) + ["Severe"]
    # no tail reversal: far beyond the outer means the outer stages keep all probability
    assert staging.probabilities(0.001)["None"] > 0.99
    assert staging.probabilities(99.0)["Severe"] > 0.99


def test_calibration_needs_a_cohort():
    with pytest.raises(InputError, match="at least 8 cases"):
        calibrate([0.1, 2, 10, 40])


def test_staging_file_round_trip_and_refusal(tmp_path):
    staging = calibrate(cohort())
    path = tmp_path / "staging.json"
    path.write_text(json.dumps(staging.to_dict()))
    again = Staging.load(path)
    assert again.cutpoints == staging.cutpoints and again.stage(12) == "Moderate"
    (tmp_path / "bad.json").write_text('{"cutpoints": [1, 2, 3]}')
    with pytest.raises(InputError, match="not a staging file"):
        Staging.load(tmp_path / "bad.json")


def test_calibrate_command_reads_reports_and_worklists(tmp_path, capsys):
    indices = cohort()
    for i, v in enumerate(indices[:30]):
        case = tmp_path / "out" / f"case{i}"
        case.mkdir(parents=True)
        (case / "report.json").write_text(json.dumps(
            {"regions": [{"region": "whole lung", "emphysema_index_percent": float(v)}]}))
    rows = ["case,emphysema_index_percent,error"] + [f"c{i},{v},"
                                                     for i, v in enumerate(indices[30:])]
    rows.append("broken,,could not read")
    (tmp_path / "summary.csv").write_text("\n".join(rows) + "\n")
    assert sorted(cohort_indices([tmp_path / "out", tmp_path / "summary.csv"])) == \
        pytest.approx(sorted(indices))
    out = tmp_path / "staging.json"
    assert main(["calibrate", str(tmp_path / "out"), str(tmp_path / "summary.csv"),
                 "--output", str(out)]) == 0
    assert "60 cases" in capsys.readouterr().out
    assert Staging.load(out).mixture["cases"] == 60
