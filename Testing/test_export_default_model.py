"""scripts/export_default_model.py: what the shipped model's config says about its origin."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export_default_model",
                                               ROOT / "scripts" / "export_default_model.py")
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)


TRAINING = {"patch_size": 256, "size": 384, "cases": 3, "slices": 90, "train_slices": 80,
            "val_slices": 10, "skipped": 0, "epochs": 4, "steps_per_epoch": 100,
            "batch_size": 8, "lr": 3e-4, "weight_decay": 5e-5, "anomaly_loss": "bce",
            "seed": 0, "epoch": 3, "step": 300, "val_auroc": 0.98, "val_dice": 0.85,
            "init_from": None}


def _config(init_from):
    return {"model": {"width": 16}, "training": {"seed": 0, "init_from": init_from}}


def test_a_start_model_inside_the_repository_is_named_relative_to_it():
    start = ROOT / "output" / "default-model" / "start.pt"
    config = export._without_machine_paths(_config(str(start)))
    assert config["training"] == {"seed": 0, "init_from": "output/default-model/start.pt"}
    assert config["model"] == {"width": 16}


def test_other_start_models_are_left_as_given(tmp_path):
    for given in (str(tmp_path / "start.pt"), "output/default-model/start.pt", None):
        assert export._without_machine_paths(_config(given)) == _config(given)
    assert export._without_machine_paths({"model": {}}) == {"model": {}}


def _detect_report(folder, case, config, index, stage):
    """A `detect` case report as export reads it: the model's config and the whole lung."""
    (folder / case).mkdir(parents=True)
    report = {"case": case, "model": {"path": "m.pt", "config": config},
              "regions": [{"region": "right lung", "emphysema_index_percent": 9.0},
                          {"region": "whole lung", "emphysema_index_percent": index,
                           "stage": stage}]}
    (folder / case / "report.json").write_text(json.dumps(report))


def test_the_card_states_the_healthy_scans_whole_lung_index(tmp_path):
    config = _config(None)
    _detect_report(tmp_path, "kernel_L", config, 1.684, "Mild")
    _detect_report(tmp_path, "kernel_B", config, 0.3639, "None")
    sentence = export.healthy_scans(tmp_path, config)
    assert sentence == "kernel_B 0.36 % (None); kernel_L 1.68 % (Mild)"
    card = export.model_card({**config, "model": {"architecture": "EDLNet", "width": 16,
                                                  "scrb": True, "gate": True,
                                                  "detach_fusion": False},
                              "training": TRAINING, "intensity_window": [-1000, 400],
                              "threshold": 0.5}, 10, "train", 1.0, (), sentence)
    assert "(healthy lungs) with this model: kernel_B 0.36 % (None); kernel_L 1.68 %" in card
    assert "The run trains the network from scratch." in card


def test_detect_results_of_another_model_or_none_are_refused(tmp_path):
    _detect_report(tmp_path, "scan", _config("other.pt"), 0.1, "None")
    with pytest.raises(SystemExit, match="another model"):
        export.healthy_scans(tmp_path, _config(None))
    with pytest.raises(SystemExit, match="holds no detect results"):
        export.healthy_scans(tmp_path / "scan", _config(None))


def test_the_card_names_the_start_model_of_a_fine_tune():
    assert export._start(_config("output/default-model/start.pt")) == (
        "The run fine-tunes the network of `output/default-model/start.pt` (the command says "
        "where it comes from).")



def _validation_report(folder, config, corrected: bool) -> dict:
    """A `validate` report as export reads it, with metrics computed on four slices of two
    subjects (placeholder images: the labels are read without opening them)."""
    from EmphysemaUADLib import validation

    for name in "abcd":
        (folder / f"{name}.nii.gz").write_bytes(b"placeholder")
    (folder / "labels.csv").write_text(
        "file,subject,pattern,severity\na.nii.gz,s1,normal,0\nb.nii.gz,s1,centrilobular,3\n"
        "c.nii.gz,s2,normal,0\nd.nii.gz,s2,paraseptal,2\n")
    labels = validation.read_labels(folder / "labels.csv")
    measured = [{"anomaly_score": score, "emphysema_index_percent": index, "laa950_percent": 1.0,
                 "laa910_percent": 5.0, "perc15_hu": -880.0, "stage": stage}
                for score, index, stage in ((0.5, 0.0, "None"), (2.0, 6.0, "Moderate"),
                                            (0.7, 0.1, "None"), (1.5, 0.8, "Mild"))]
    return {"labels": "data/hrct/labels.csv", "label_columns": ["pattern", "severity"],
            "model": {"path": "best.pt", "threshold": 0.5, "config": config},
            "software": {"version": "0"},
            "metrics": validation.compute_metrics(labels, measured, n_boot=20),
            "cases": [{"hu_shift_hu": 80.0, "hu_corrected": corrected}] * 4}


def test_the_card_shows_each_validation_under_how_it_read_the_hu_scale(tmp_path):
    config = {**_config(None), "model": {"architecture": "EDLNet", "width": 16, "scrb": True,
                                         "gate": True, "detach_fusion": False},
              "training": TRAINING, "intensity_window": [-1000, 400], "threshold": 0.5}
    validated = [export.real_data(_validation_report(tmp_path, config, corrected), config)
                 for corrected in (True, False)]
    card = export.model_card(config, 10, "train", 1.0, validated)
    assert "| real HRCT AUROC normal vs emphysema (hrct) | 1.00" in card
    assert "| real HRCT normal staged None | 2/2 |" in card
    assert "HU scale as stored |" not in card  # the headline rows: the first report's only
    corrected = card.index("### labels.csv, HU scale corrected where shifted (the default)")
    stored = card.index("### labels.csv, HU scale as stored (`validate --no-correct-hu`)")
    assert corrected < stored < card.index("**Limits.**")
    assert "4 of 4 images have a shifted HU scale" in card[stored:]
    assert "4 of them corrected (the default; --no-correct-hu keeps them)." in \
        card[corrected:stored]
    assert "#### Model stage" in card[corrected:stored]
