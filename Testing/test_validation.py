"""`emphysema-uad validate`: metrics worked out by hand on a tiny labelled cohort, every
refusal of a bad labels CSV (the row named, exit 2, nothing written), an end-to-end run on
synthetic one-slice CTs with a tiny network (and the same from a detect results folder), and
the real labelled HRCT slices of ../shared/data when they are there."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from conftest import SHARED_DATA
from EmphysemaUADLib import validation as v
from EmphysemaUADLib.cli import main
from EmphysemaUADLib.phantom import make_phantom
from EmphysemaUADLib.volume_io import Volume, write_volume

HRCT_LABELS = SHARED_DATA / "emphysema-hrct-slices" / "labels.csv"
LABELS = ("model anomaly score", "model EI", "LAA-950", "LAA-910", "Perc15")


def write_csv(folder, text: str, files=()):
    """labels.csv in `folder` with placeholder images for `files` (the CSV is read without
    opening them)."""
    for name in files:
        (folder / name).write_bytes(b"placeholder")
    path = folder / "labels.csv"
    path.write_text(text)
    return path


# --- metrics by hand -------------------------------------------------------------------------
# three subjects with a normal slice and an emphysema slice each
TINY = """file,subject,level,pattern,severity
n1.nii.gz,s1,top,normal,0
e1.nii.gz,s1,top,Centrilobular,3
n2.nii.gz,s2,top,normal,0
e2.nii.gz,s2,top,paraseptal,1
n3.nii.gz,s3,top,normal,0
e3.nii.gz,s3,top,centrilobular,5
"""
TINY_FILES = ("n1.nii.gz", "e1.nii.gz", "n2.nii.gz", "e2.nii.gz", "n3.nii.gz", "e3.nii.gz")
#            anomaly  EI    LAA950 LAA910 Perc15  model stage
MEASURED = [(1.0, 0.0, 2.0, 10.0, -850.0, "None"),
            (3.0, 6.0, 1.0, 30.0, -900.0, "Moderate"),
            (2.0, 0.6, 3.0, 12.0, -860.0, "Mild"),
            (1.5, 0.1, 4.0, 14.0, -870.0, "None"),
            (0.5, 0.0, 2.5, 11.0, -840.0, "None"),
            (4.0, 30.0, 9.0, 40.0, -950.0, "Severe")]


@pytest.fixture
def tiny(tmp_path):
    labels = v.read_labels(write_csv(tmp_path, TINY, TINY_FILES))
    measured = [{"anomaly_score": a, "emphysema_index_percent": ei, "laa950_percent": l950,
                 "laa910_percent": l910, "perc15_hu": p15, "stage": stage}
                for a, ei, l950, l910, p15, stage in MEASURED]
    return labels, measured


def _values(result, key):
    row = next(r for r in result["metrics"] if r["key"] == key)
    return {k: e["value"] for k, e in row["values"].items()}


def test_labels_are_read_with_the_reference_stage_from_the_severity(tiny):
    labels, _ = tiny
    assert labels.columns == ("pattern", "severity") and labels.extra_columns == ["level"]
    assert [c.row for c in labels.cases] == [2, 3, 4, 5, 6, 7]
    assert [c.pattern for c in labels.cases][:2] == ["normal", "centrilobular"]  # lower case
    assert [c.stage for c in labels.cases] == ["None", "Moderate", "None", "Mild", "None",
                                               "Severe"]
    assert [c.emphysema for c in labels.cases] == [False, True] * 3
    assert labels.patterns == ["centrilobular", "paraseptal"]
    assert [c.name for c in labels.cases] == ["n1", "e1", "n2", "e2", "n3", "e3"]


def test_pattern_abbreviations_are_read_as_what_they_stand_for(tmp_path):
    text = "file,subject,pattern\n" + "".join(
        f"{f},s{i},{p}\n" for i, (f, p) in enumerate(zip(TINY_FILES,
                                                         ("NT", "CLE", "Healthy", "PSE",
                                                          "none", "PLE"))))
    labels = v.read_labels(write_csv(tmp_path, text, TINY_FILES))
    assert [c.pattern for c in labels.cases] == ["normal", "centrilobular", "normal",
                                                 "paraseptal", "normal", "panlobular"]
    assert [c.emphysema for c in labels.cases] == [False, True] * 3


def test_every_score_metric_by_hand(tiny):
    result = v.compute_metrics(*tiny, n_boot=0)
    assert [r["key"] for r in result["metrics"]] == ["auroc", "auroc:centrilobular",
                                                     "auroc:paraseptal", "spearman_severity"]
    auroc = _values(result, "auroc")
    # anomaly: emphysema {3, 1.5, 4} vs normal {1, 2, 0.5}: 3 + 2 + 3 of 9 pairs
    assert auroc["anomaly_score"] == pytest.approx(8 / 9, abs=1e-4)
    # EI: {6, 0.1, 30} vs {0, 0.6, 0}: 0.1 beats the two zeros only -> 8 / 9 as well
    assert auroc["model_ei"] == pytest.approx(8 / 9, abs=1e-4)
    # LAA-950: {1, 4, 9} vs {2, 3, 2.5}: 1 beats none, 4 and 9 beat all -> 6 / 9
    assert auroc["laa950"] == pytest.approx(6 / 9, abs=1e-4)
    assert auroc["laa910"] == 1.0
    # Perc15 is ranked as -Perc15: {900, 870, 950} vs {850, 860, 840} -> perfect, not 0
    assert auroc["perc15"] == 1.0
    # per pattern: normal vs centrilobular {3, 4} -> 1; vs paraseptal {1.5} -> 2 of 3
    assert _values(result, "auroc:centrilobular")["anomaly_score"] == 1.0
    assert _values(result, "auroc:paraseptal")["anomaly_score"] == pytest.approx(2 / 3, abs=1e-4)
    assert _values(result, "auroc:paraseptal")["laa950"] == 1.0
    # Spearman, anomaly vs severity: severity ranks 2 5 2 4 2 6 (three tied zeros), anomaly
    # ranks 2 5 4 3 1 6; deviations from 3.5 give sum dx dy = 13.5, dx^2 = 15.5, dy^2 = 17.5
    assert _values(result, "spearman_severity")["anomaly_score"] == \
        pytest.approx(13.5 / np.sqrt(15.5 * 17.5), abs=1e-4)
    # -Perc15 ranks 2 5 3 4 1 6: sum dx dy = 2.25 + 2.25 + 0.75 + 0.25 + 3.75 + 6.25
    assert _values(result, "spearman_severity")["perc15"] == \
        pytest.approx(15.5 / np.sqrt(15.5 * 17.5), abs=1e-4)


def test_leaving_one_subject_out_by_hand(tiny):
    result = v.compute_metrics(*tiny, n_boot=0)
    rows = {r["subject"]: r for r in result["leave_one_subject_out"]}
    assert [(r["normal"], r["emphysema"]) for r in rows.values()] == [(1, 1)] * 3
    # EI without s1: {0.1, 30} vs {0.6, 0} -> 3 of 4; without s2: {6, 30} vs {0, 0} -> 1;
    # without s3: {6, 0.1} vs {0, 0.6} -> 3 of 4
    assert [rows[s]["auroc_without"]["model_ei"] for s in ("s1", "s2", "s3")] == \
        pytest.approx([0.75, 1.0, 0.75])
    # anomaly without s1: {1.5, 4} vs {2, 0.5} -> 3 of 4
    assert rows["s1"]["auroc_without"]["anomaly_score"] == pytest.approx(0.75)
    # the report lists them by how far each moves the EI's 8/9: s1 and s3 (-0.14), then s2
    table = v.markdown({"metrics": result, "cases": [], "labels": "labels.csv",
                        "label_columns": ["pattern"], "model": {},
                        "software": {"version": "test"}})
    section = table.split("## Subjects that move the AUROC most")[1].split("##")[0]
    assert [line.split(" (")[0] for line in section.splitlines() if line.startswith("| s")] \
        == ["| s1", "| s3", "| s2"]
    assert "| none (all images) | 0.89 | 0.89 | 0.67 | 1.00 | 1.00 |" in section


def test_stage_metrics_and_confusion_matrix_by_hand(tiny):
    staging = v.compute_metrics(*tiny, n_boot=0)["staging"]
    rows = {r["key"]: r for r in staging["metrics"]}
    # severity >= 2: e1 (3, Moderate) and e3 (5, Severe), both above None
    assert (rows["sensitivity"]["count"], rows["sensitivity"]["of"]) == (2, 2)
    # normals staged None: n1 and n3, not n2 (Mild)
    assert (rows["specificity"]["count"], rows["specificity"]["of"]) == (2, 3)
    assert rows["specificity"]["value"] == pytest.approx(0.6667)
    # agreement: all but n2 (None -> Mild) and e2 (Mild -> None)
    assert (rows["agreement"]["count"], rows["agreement"]["of"]) == (4, 6)
    assert staging["confusion"]["counts"] == [[2, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0],
                                              [0, 0, 0, 1]]
    assert staging["reference"].startswith("severity 0 -> None, 1-2 -> Mild")


def test_subject_bootstrap_intervals_by_hand(tiny):
    result = v.compute_metrics(*tiny, n_boot=1000, seed=3)
    paraseptal = next(r for r in result["metrics"] if r["key"] == "auroc:paraseptal")
    e = paraseptal["values"]["anomaly_score"]
    # paraseptal is subject s2's only: defined in the resamples that draw s2, 1 - (2/3)^3 =
    # 19/27 of them. There s2's normal (2.0) beats the paraseptal 1.5 and the normals of s1
    # and s3 lose: AUROC = share of normals not from s2 = 2/3 (s2 once, p 12/27), 1/3
    # (twice, 6/27) or 0 (three times, 1/27, i.e. 1/19 > 2.5 % of those used)
    low, high = e["ci95"]
    assert (low, high) == (0.0, pytest.approx(2 / 3, abs=1e-4))
    assert 0.67 < e["resamples"] / 1000 < 0.74
    # every subject has a normal and an emphysema slice: every resample defines the AUROC
    overall = next(r for r in result["metrics"] if r["key"] == "auroc")
    assert all(x["resamples"] == 1000 for x in overall["values"].values())
    # the same seed, the same intervals
    assert v.compute_metrics(*tiny, n_boot=1000, seed=3) == result
    assert result["bootstrap"] == {"unit": "subject", "subjects": 3, "resamples": 1000,
                                   "seed": 3, "level": 0.95}


def test_a_stage_only_csv_gets_stage_metrics_and_no_spearman(tmp_path):
    path = write_csv(tmp_path, "file,subject,stage\na.nii,s1,none\nb.nii,s2,MILD\n",
                     ("a.nii", "b.nii"))
    labels = v.read_labels(path)
    assert [c.stage for c in labels.cases] == ["None", "Mild"]
    measured = [{"anomaly_score": 1.0, "emphysema_index_percent": 0.0, "laa950_percent": 1.0,
                 "laa910_percent": 5.0, "perc15_hu": -850.0, "stage": "None"},
                {"anomaly_score": 2.0, "emphysema_index_percent": 1.0, "laa950_percent": 3.0,
                 "laa910_percent": 9.0, "perc15_hu": -900.0, "stage": "Mild"}]
    result = v.compute_metrics(labels, measured, n_boot=0)
    assert [r["key"] for r in result["metrics"]] == ["auroc"]
    assert result["staging"]["reference"] == "the stage column"
    assert [r["value"] for r in result["staging"]["metrics"]] == [1.0, 1.0, 1.0]


def test_a_new_score_is_one_line(tiny, monkeypatch):
    extra = v.Score("mean_anomaly", "mean anomaly", lambda m: m["anomaly_score"] * 2)
    monkeypatch.setattr(v, "SCORES", v.SCORES + [extra])
    result = v.compute_metrics(*tiny, n_boot=0)
    assert _values(result, "auroc")["mean_anomaly"] == pytest.approx(8 / 9, abs=1e-4)
    assert "| mean anomaly |" in v.markdown({
        "labels": "labels.csv", "label_columns": ["pattern", "severity"], "cases": [],
        "model": {"path": "m.pt", "threshold": 0.5}, "software": {"version": "0"},
        "metrics": result})


def test_the_report_says_how_the_hu_scale_was_read(tiny):
    result = v.compute_metrics(*tiny, n_boot=0)
    report = {"labels": "labels.csv", "label_columns": ["pattern", "severity"],
              "model": {"path": "m.pt", "threshold": 0.5}, "software": {"version": "0"},
              "metrics": result}
    calibrated = [{"hu_shift_hu": 0.0, "hu_corrected": False}] * 3
    assert "HU scale" not in v.markdown({**report, "cases": calibrated})
    shifted = [{"hu_shift_hu": 80.0, "hu_corrected": False}] * 2 + calibrated[:1]
    text = v.markdown({**report, "cases": shifted})
    assert "2 of 3 images have a shifted HU scale (air outside the body -920 HU" in text
    assert "kept as stored (--no-correct-hu)" in text
    corrected = [{**case, "hu_corrected": True} for case in shifted[:2]] + calibrated[:1]
    assert "2 of them corrected (the default; --no-correct-hu keeps them)." in v.markdown(
        {**report, "cases": corrected})


# --- bad labels ------------------------------------------------------------------------------
GOOD = "file,subject,pattern,severity\na.nii.gz,s1,normal,0\nb.nii.gz,s2,paraseptal,2\n"


@pytest.mark.parametrize("text, row, words", [
    (GOOD.replace("paraseptal,2", "paraseptal,7"), 3, "severity '7'"),
    (GOOD.replace("paraseptal,2", "paraseptal,two"), 3, "severity 'two'"),
    (GOOD.replace("paraseptal,2", ",2"), 3, "pattern is empty"),
    (GOOD.replace("normal,0", "normal,2"), 2, "pattern normal with severity 2"),
    (GOOD.replace("paraseptal,2", "paraseptal,0"), 3, "severity 0 means no emphysema"),
    (GOOD.replace("b.nii.gz", "missing.nii.gz"), 3, "missing.nii.gz not found"),
    (GOOD.replace("b.nii.gz", "a.nii.gz"), 3, "already listed in row 2"),
    (GOOD.replace(",s2,", ",,"), 3, "subject is empty"),
    (GOOD.replace("paraseptal,2", "paraseptal,2,extra"), 3, "5 fields where the header has 4"),
    (GOOD.replace("subject", "patient"), 1, "lacks 'subject'"),
    ("file,subject,level\na.nii.gz,s1,top\n", 1, "at least one of 'pattern'"),
    ("file;subject;pattern\na.nii.gz;s1;normal\n", 1, "comma-separated"),
    (GOOD + '"b.nii.gz,s3,normal,0\n', 4, "not valid CSV"),
    ("file,subject,stage\na.nii.gz,s1,None\nb.nii.gz,s2,Big\n", 3, "stage 'Big'"),
    ("file,subject,pattern,stage\na.nii.gz,s1,normal,Mild\n", 2, "stage Mild for an image "
                                                                  "without emphysema"),
    ("file,subject,severity,subject\na.nii.gz,s1,0,s1\n", 1, "appears twice"),
])
def test_bad_labels_name_the_row_exit_2_and_write_nothing(tmp_path, capsys, text, row, words):
    path = write_csv(tmp_path, text, ("a.nii.gz", "b.nii.gz"))
    out = tmp_path / "out"
    assert main(["validate", str(path), "-o", str(out), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"labels.csv row {row}" in err and words in err, err
    assert not out.exists()


def test_empty_and_headless_files_are_refused(tmp_path, capsys):
    for text in ("", "\n\n", "file,subject,pattern\n"):
        path = write_csv(tmp_path, text)
        assert main(["validate", str(path), "-o", str(tmp_path / "out")]) == 2
        assert "labels.csv" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "none.csv"), "-o", str(tmp_path / "out")]) == 2
    assert "no such labels file" in capsys.readouterr().err
    (tmp_path / "latin.csv").write_bytes("file,subject,pattern\nä.nii,s1,normal\n"
                                         .encode("latin-1"))
    assert main(["validate", str(tmp_path / "latin.csv"), "-o", str(tmp_path / "out")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- end to end on synthetic one-slice CTs -----------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six one-slice CTs of three 'subjects' made from one small phantom: the normal slices
    differ by their noise, the emphysema slices have 5, 15 and 30 % of the lung turned into
    air-like voxels (severity 1, 3, 5), and a tiny untrained network."""
    import torch

    from EmphysemaUADLib.checkpoint import save_checkpoint
    from EmphysemaUADLib.network import EDLNet

    folder = tmp_path_factory.mktemp("cohort")
    phantom = make_phantom(seed=3, shape=(1, 96, 96), spacing=(1.25, 3.7, 3.7))
    rng = np.random.default_rng(0)
    lung = np.flatnonzero(phantom.lungs.ravel() > 0)
    images = folder / "images"
    images.mkdir()
    rows = ["file,subject,level,pattern,severity"]
    for k, (pattern, severity, share) in enumerate([("normal", 0, 0.0), ("paraseptal", 1, 0.05),
                                                    ("normal", 0, 0.0),
                                                    ("centrilobular", 3, 0.15),
                                                    ("normal", 0, 0.0),
                                                    ("centrilobular", 5, 0.3)]):
        hu = phantom.ct.array + rng.normal(0, 5, phantom.ct.shape).astype(np.float32)
        holes = rng.choice(lung, int(share * len(lung)), replace=False)
        hu.ravel()[holes] = rng.uniform(-1000, -960, len(holes))
        name = f"case{k}.nii.gz"
        write_volume(np.rint(hu).astype(np.int16), phantom.ct.geometry, images / name)
        rows.append(f"images/{name},subject{k // 2},top,{pattern},{severity}")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)  # the same network whatever ran before
    model = EDLNet(width=4)
    tiny = save_checkpoint(folder / "tiny.pt", model.state_dict(),
                           {"model": model.config, "input_size": 64,
                            "intensity_window": [-1000, 400], "training": {}})
    return labels, tiny


@pytest.fixture(scope="module")
def validated(cohort, tmp_path_factory, one_thread):
    labels, model = cohort
    out = tmp_path_factory.mktemp("validation")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["validate", str(labels), "-o", str(out), "--model", str(model),
                     "--device", "cpu", "--progress", "json", "--bootstrap", "200"])
    return code, out, stdout.getvalue()


def test_validate_writes_every_output(validated, cohort):
    code, out, stdout = validated
    assert code == 0
    events = [json.loads(line) for line in stdout.splitlines()]  # JSON lines only
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("case") == 6 and kinds.count("result") == 6 and "bootstrap" in kinds
    # one-slice images: one coverage warning for the cohort, not one per image
    warnings = [e["message"] for e in events if e.get("level") == "warning"]
    assert [w for w in warnings if "part of the lungs" in w] == [
        "6 of 6 images cover only part of the lungs (single slices or ROIs, for example); every "
        "measure compares what was scanned."]
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "report.json", "report.md",
                                                     "scores_by_severity.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["path"] == str(cohort[1])
    assert report["model"]["precision"] in ("bfloat16", "float32")
    assert report["software"]["version"] and report["model"]["config"]["model"]
    assert report["severity_to_stage"]["2"] == "Mild"
    assert len(report["cases"]) == 6
    rows = report["metrics"]["metrics"]
    assert [r["key"] for r in rows] == ["auroc", "auroc:paraseptal", "auroc:centrilobular",
                                        "spearman_severity"]
    for row in rows:
        assert set(row["values"]) == {"anomaly_score", "model_ei", "laa950", "laa910", "perc15"}
    # the density baselines see the air-like voxels
    for key in ("laa950", "laa910", "perc15"):
        auroc = rows[0]["values"][key]
        assert auroc["value"] == 1.0 and auroc["ci95"] == [1.0, 1.0], key
        # severity ranks 2 2 2 4 5 6 against the scores' ranks (normals may tie among
        # themselves, e.g. LAA-950 0 %): as scipy has it
        scores = [c[f"score_{key}"] for c in report["cases"]]
        severity = [c["severity"] for c in report["cases"]]
        assert rows[3]["values"][key]["value"] == pytest.approx(
            spearmanr(severity, scores).statistic, abs=1e-4) and rows[3]["values"][key][
                "value"] > 0.9
    staging = report["metrics"]["staging"]
    assert sum(map(sum, staging["confusion"]["counts"])) == 6

    md = (out / "report.md").read_text()
    assert "| metric | " + " | ".join(LABELS) + " |" in md
    assert "| AUROC normal vs emphysema (3 vs 3) |" in md and "1.00 [1.00, 1.00]" in md
    assert "subject" in md and "200 resamples" in md
    cases = list(csv.DictReader((out / "cases.csv").open()))
    assert [c["case"] for c in cases] == [f"case{k}" for k in range(6)]
    assert cases[0]["level"] == "top" and cases[5]["reference_stage"] == "Severe"
    assert float(cases[5]["laa950_percent"]) > 25 > float(cases[0]["laa950_percent"])
    png = (out / "scores_by_severity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_noisy_images_get_one_warning_for_the_cohort(cohort, tmp_path, monkeypatch, capsys):
    from EmphysemaUADLib import detection

    readings = iter([10.0, 70.0, 12.0, 9.0, 80.0, 11.0])  # lung noise (HU) of case0..case5
    monkeypatch.setattr(detection, "lung_noise_hu", lambda *args: next(readings))
    labels, model = cohort
    out = tmp_path / "out"
    assert main(["validate", str(labels), "-o", str(out), "--model", str(model), "--device",
                 "cpu", "--progress", "json", "--bootstrap", "0"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    noise = [e["message"] for e in events
             if e.get("level") == "warning" and "noise" in e["message"]]
    assert noise == ["2 of 6 images have lung noise above 55 HU (case1, case4; lung_noise_hu in "
                     "cases.csv): noise can be flagged as emphysema, so their scores are less "
                     "reliable."]
    cases = list(csv.DictReader((out / "cases.csv").open()))
    assert [float(c["lung_noise_hu"]) for c in cases] == [10.0, 70.0, 12.0, 9.0, 80.0, 11.0]


def test_validate_from_a_detect_results_folder_gives_the_same_scores(validated, cohort,
                                                                     tmp_path, capsys):
    labels, model = cohort
    detected = tmp_path / "detected"
    assert main(["detect", str(labels.parent / "images"), "-o", str(detected), "--model",
                 str(model), "--device", "cpu", "--progress", "none"]) == 0
    out = tmp_path / "again"
    assert main(["validate", str(labels), "--results", str(detected), "-o", str(out),
                 "--progress", "none", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC normal vs emphysema (3 vs 3)" in printed and "LAA-910" in printed
    first = json.loads((validated[1] / "report.json").read_text())["cases"]
    again = json.loads((out / "report.json").read_text())
    assert again["source"] == "detect results folder"
    assert again["model"]["path"] == str(model)
    for a, b in zip(first, again["cases"]):
        for key in ("score_anomaly_score", "score_model_ei", "score_laa950", "score_laa910",
                    "score_perc15", "model_stage", "lung_noise_hu"):
            assert a[key] == b[key], key

    # results of a version that wrote no lungs.nii.gz: the lungs are found again, the same
    for lungs in detected.glob("*/lungs.nii.gz"):
        lungs.unlink()
    assert main(["validate", str(labels), "--results", str(detected), "-o",
                 str(tmp_path / "older"), "--progress", "none", "--bootstrap", "0"]) == 0
    older = json.loads((tmp_path / "older" / "report.json").read_text())["cases"]
    for a, b in zip(first, older):
        for key in ("score_laa950", "score_laa910", "score_perc15"):
            assert a[key] == b[key], key

    # a case without results: its row is named and nothing is written
    missing = tmp_path / "detected_missing"
    detected.rename(missing)
    (missing / "case5").rename(missing / "other")
    assert main(["validate", str(labels), "--results", str(missing), "-o",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "labels.csv row 7 (case5.nii.gz)" in err and "report.json not found" in err
    assert not (tmp_path / "none").exists()


def test_an_unreadable_image_names_its_row(cohort, tmp_path, capsys):
    labels, model = cohort
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    path = write_csv(tmp_path, f"file,subject,pattern\n{labels.parent}/images/case0.nii.gz,"
                               f"s1,normal\nbroken.nii.gz,s2,paraseptal\n")
    assert main(["validate", str(path), "-o", str(tmp_path / "out"), "--model", str(model),
                 "--device", "cpu", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "labels.csv row 3 (broken.nii.gz)" in err
    assert not (tmp_path / "out").exists()


# --- the real labelled HRCT slices -------------------------------------------------------------
requires_hrct = pytest.mark.skipif(
    not HRCT_LABELS.is_file(), reason=f"real labelled HRCT slices not found at {HRCT_LABELS} "
                                      "(the ../shared folder beside the checkout)")
@requires_hrct
def test_the_real_labels_csv_is_read_as_it_is():
    labels = v.read_labels(HRCT_LABELS)
    assert len(labels.cases) == 55 and len(labels.subjects) == 19
    assert labels.columns == ("pattern", "severity") and labels.extra_columns == ["level"]
    assert sorted(labels.patterns) == ["centrilobular", "panlobular", "paraseptal"]
    assert sum(not c.emphysema for c in labels.cases) == 31
    assert sum(c.severity >= 2 for c in labels.cases) == 14
    assert len({c.name for c in labels.cases}) == 55


@pytest.mark.slow  # 55 real slices through the bundled model: about 25 s on 2 idle cores
@requires_hrct
def test_real_hrct_slices_get_every_metric(tmp_path):
    out = tmp_path / "validation"
    assert main(["validate", str(HRCT_LABELS), "-o", str(out), "--device", "cpu",
                 "--bootstrap", "200", "--progress", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["cases"]) == 55
    assert report["metrics"]["bootstrap"]["subjects"] == 19
    keys = sorted(r["key"] for r in report["metrics"]["metrics"])
    assert keys == ["auroc", "auroc:centrilobular", "auroc:panlobular", "auroc:paraseptal",
                    "spearman_severity"]
    for row in report["metrics"]["metrics"]:
        for key, entry in row["values"].items():
            assert entry["value"] is not None and entry["ci95"] is not None, (row["key"], key)
            assert entry["ci95"][0] - 1e-9 <= entry["value"] <= entry["ci95"][1] + 1e-9
    # a density threshold separates normal from emphysema slices well above chance
    assert report["metrics"]["metrics"][0]["values"]["perc15"]["value"] > 0.75
    staging = {r["key"]: r for r in report["metrics"]["staging"]["metrics"]}
    assert staging["sensitivity"]["of"] == 14 and staging["specificity"]["of"] == 31
    assert all(staging[k]["ci95"] is not None for k in staging)
    assert sum(map(sum, report["metrics"]["staging"]["confusion"]["counts"])) == 55
    md = (out / "report.md").read_text()
    assert "| AUROC normal vs panlobular (31 vs 3) |" in md
    assert (out / "scores_by_severity.png").stat().st_size > 10_000


# --- site threshold folds ----------------------------------------------------------------------
def test_subjects_are_dealt_into_folds_in_natural_order():
    assert v.subject_folds(["s10", "s2", "s1", "s2"], 2) == {"s1": 0, "s2": 1, "s10": 0}
    assert v.subject_folds(["b", "a", "c"], 3) == {"a": 0, "b": 1, "c": 2}


def test_site_folds_score_each_image_at_a_threshold_its_subject_never_set(cohort, tmp_path,
                                                                          one_thread):
    """Three subjects, three folds: each fold's threshold is the percentile of the other two
    subjects' normal images, worked out here from their lung scores; every image is detected
    at its fold's threshold."""
    from dataclasses import replace

    from EmphysemaUADLib.detection import Detector, detect_case
    from EmphysemaUADLib.site_threshold import HealthyScores, lung_scores
    from EmphysemaUADLib.volume_io import read_ct

    labels, model = cohort
    out = tmp_path / "folds"
    assert main(["validate", str(labels), "-o", str(out), "--model", str(model), "--device",
                 "cpu", "--progress", "none", "--bootstrap", "0", "--site-folds", "3",
                 "--percentile", "90"]) == 0
    report = json.loads((out / "report.json").read_text())
    folds = report["model"]["site_folds"]
    assert report["model"]["threshold"] is None
    assert folds["folds"] == 3 and folds["percentile"] == 90
    detector = Detector.load(model, "cpu")
    images = sorted((labels.parent / "images").glob("case*.nii.gz"))
    scores = [lung_scores(path, detector)[0] for path in images]
    expected = []
    for k in range(3):  # subject k holds case 2k (normal) and case 2k + 1
        pooled = HealthyScores()
        for other in {0, 1, 2} - {k}:
            pooled.add(f"case{2 * other}", scores[2 * other])
        expected.append(pooled.threshold(90))
    assert [f["threshold"] for f in folds["thresholds"]] == pytest.approx(expected)
    assert [f["normal_images_used"] for f in folds["thresholds"]] == [2, 2, 2]
    cases = list(csv.DictReader((out / "cases.csv").open()))
    for k, case in enumerate(cases):
        assert int(case["site_fold"]) == k // 2 + 1
        assert float(case["threshold"]) == pytest.approx(expected[k // 2])
        at_fold = detect_case(read_ct(images[k]), replace(detector, threshold=expected[k // 2]),
                              warn=False)
        assert float(case["emphysema_index_percent"]) == pytest.approx(
            at_fold.measurements.whole.emphysema_index_percent, abs=0.01)
        # the network's share above the threshold, and what density adds to it
        assert float(case["emphysema_index_percent"]) >= 100.0 * np.mean(
            scores[k] > expected[k // 2]) - 0.01
    md = (out / "report.md").read_text()
    assert "## Site threshold folds" in md and "| 1 | 1 | 2 |" in md
    assert "90th percentile of the normal images of the other folds' subjects" in md


@pytest.mark.parametrize("extra, words", [
    (["--site-folds", "1"], "2 or more"),
    (["--site-folds", "4"], "needs at least 4 subjects"),
    (["--percentile", "99"], "give both"),
    (["--site-folds", "2", "--percentile", "100"], "percentile"),
    (["--site-folds", "3"], "too few for the 99.9th percentile"),
])
def test_bad_site_folds_exit_2_and_write_nothing(cohort, tmp_path, capsys, extra, words):
    labels, model = cohort
    assert main(["validate", str(labels), "-o", str(tmp_path / "out"), "--model", str(model),
                 "--device", "cpu", "--progress", "none", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not (tmp_path / "out").exists()


def test_site_folds_refuse_a_fold_without_normal_images_elsewhere(cohort, tmp_path, capsys):
    labels, model = cohort
    images = labels.parent / "images"
    path = write_csv(tmp_path, "file,subject,pattern\n"
                               f"{images}/case0.nii.gz,s1,normal\n"
                               f"{images}/case1.nii.gz,s1,paraseptal\n"
                               f"{images}/case3.nii.gz,s2,centrilobular\n")
    assert main(["validate", str(path), "-o", str(tmp_path / "out"), "--model", str(model),
                 "--device", "cpu", "--progress", "none", "--site-folds", "2"]) == 2
    err = capsys.readouterr().err
    assert "fold 1" in err and "no normal image" in err
    assert main(["validate", str(labels), "-o", str(tmp_path / "out"), "--results",
                 str(tmp_path), "--site-folds", "2"]) == 2
    assert "--site-folds and --results exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the 31 normal slices twice, the others once: about 20 s on 2 idle cores
@requires_hrct
def test_real_hrct_site_folds_set_each_fold_a_threshold_from_the_others(tmp_path):
    out = tmp_path / "folds"
    assert main(["validate", str(HRCT_LABELS), "-o", str(out), "--device", "cpu",
                 "--bootstrap", "0", "--progress", "none", "--site-folds", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    folds = report["model"]["site_folds"]["thresholds"]
    assert [f["subjects"] for f in folds] == [10, 9]
    assert sum(f["normal_images_used"] for f in folds) == 31
    # the slices of one fold never set its threshold: each is scored at the other fold's
    by_fold = {f["fold"]: f["threshold"] for f in folds}
    subjects = {}
    for case in report["cases"]:
        assert case["threshold"] == by_fold[case["site_fold"]]
        subjects.setdefault(case["subject"], set()).add(case["site_fold"])
    assert all(len(f) == 1 for f in subjects.values())
