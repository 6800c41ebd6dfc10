"""The synthetic benchmark (`evaluate`), its baselines (residual scoring, the training flags
that make them) and the speed benchmark (`benchmark`), end to end on tiny inputs."""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from EmphysemaUADLib import cli
from EmphysemaUADLib.checkpoint import load_model, save_checkpoint
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.evaluation import benchmark_cases, evaluate, parse_baselines
from EmphysemaUADLib.variants import VARIANTS
from EmphysemaUADLib.inference import predict_anomaly
from EmphysemaUADLib.intensity import hu_to_unit
from EmphysemaUADLib.network import EDLNet
from EmphysemaUADLib.phantom import PHANTOM_MORPHOLOGIES, make_phantom, write_phantom
from EmphysemaUADLib.volume_io import read_ct

TINY_CASES = ["--cases", "small", "--matrix", "48", "--z-extent", "24", "--bootstrap", "20",
              "--device", "cpu", "--progress", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_checkpoint(path, score="anomaly", threshold=0.5, **variant):
    torch.manual_seed(0)
    model = EDLNet(width=4, **variant)
    return save_checkpoint(path, model.state_dict(), {"model": model.config, "input_size": 64,
                                                      "score": score, "threshold": threshold})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"model": tiny_checkpoint(root / "model.pt"),
            "autoencoder": tiny_checkpoint(root / "ae.pt", "residual", 0.03),
            "no-gate": tiny_checkpoint(root / "no_gate.pt", gate=False)}


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# --- the cases ----------------------------------------------------------------------------
def test_full_case_set_covers_every_factor():
    cases = benchmark_cases("full")
    assert len(cases) == 80 and len({c.seed for c in cases}) == 80
    assert min(c.seed for c in cases) >= 1000  # apart from the training phantoms' seeds
    sick = [c for c in cases if c.emphysema]
    assert len(sick) == 60
    conditions = Counter((c.severity, c.morphology) for c in sick)
    assert set(conditions) == {(s, m) for s in ("mild", "moderate", "severe")
                               for m in PHANTOM_MORPHOLOGIES} and set(conditions.values()) == {4}
    for condition in conditions:  # each condition meets every noise level and both kernels
        own = [c for c in sick if (c.severity, c.morphology) == condition]
        assert {c.noise for c in own} == {10.0, 20.0, 35.0, 50.0}
        assert {c.kernel for c in own} == {"smooth", "sharp"}
        assert len({c.thickness for c in own}) >= 2
    assert {c.thickness for c in cases} == {1.0, 2.5, 5.0}
    assert len(benchmark_cases("small")) == 6
    with pytest.raises(InputError):
        benchmark_cases("huge")


def test_phantom_geometry_follows_the_slice_thickness():
    case = benchmark_cases("small")[2]  # 1 mm
    phantom = case.phantom(matrix=32, z_extent_mm=20)
    assert phantom.ct.shape == (20, 32, 32)
    assert phantom.ct.geometry.spacing_zyx[0] == pytest.approx(case.thickness)


# --- baselines ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [("foo=x.pt", "unknown baseline"),
                                           ("autoencoder", "NAME=PATH"),
                                           ("autoencoder=", "NAME=PATH")])
def test_bad_baseline_specs(spec, message):
    with pytest.raises(InputError, match=message):
        parse_baselines([spec])
    with pytest.raises(InputError, match="twice"):
        parse_baselines(["no-gate=a.pt", "no-gate=b.pt"])
    assert parse_baselines(["no-scrb = a.pt"]) == {"no-scrb": " a.pt"}


def test_a_checkpoint_passed_as_the_wrong_baseline_is_refused(models, tmp_path):
    code, _, err = run_cli(["evaluate", "-o", tmp_path, "--model", models["model"],
                            "--baseline-model", f"no-scrb={models['no-gate']}", *TINY_CASES])
    assert code == 2 and "--no-scrb" in err and "Traceback" not in err
    assert not (tmp_path / "results.md").exists()


def test_residual_score_is_the_reconstruction_error_inside_the_lungs(models):
    model, _ = load_model(models["autoencoder"])
    phantom = make_phantom(1, shape=(4, 32, 32), spacing=(5.0, 11.0, 11.0))
    lungs = phantom.lungs
    residual = predict_anomaly(phantom.ct.array, lungs, model, torch.device("cpu"),
                               score="residual")
    assert np.all(residual[lungs == 0] == 0) and residual[lungs > 0].max() > 0
    z = int(np.argmax((lungs > 0).sum(axis=(1, 2))))
    x = torch.from_numpy(hu_to_unit(np.pad(phantom.ct.array[z], 8, constant_values=-1000))
                         [None, None])
    with torch.inference_mode():
        recon = model(x)[0][0, 0, 8:-8, 8:-8].numpy()
    # the lung box crop and the padding above differ in context only at the image border
    inner = (lungs[z] > 0)
    expected = np.abs(hu_to_unit(phantom.ct.array[z]) - recon)[inner]
    assert np.corrcoef(residual[z][inner], expected)[0, 1] > 0.9
    with pytest.raises(InputError, match="unknown voxel score"):
        predict_anomaly(phantom.ct.array, lungs, model, torch.device("cpu"), score="nope")


def test_train_flags_make_the_baselines(tmp_path):
    healthy = tmp_path / "healthy"
    for seed in (11, 12):
        write_phantom(make_phantom(seed, shape=(8, 64, 64), spacing=(6.0, 4.0, 4.0),
                                   noise=15.0), healthy / f"case{seed}.nii.gz")
    tiny = ["--width", "4", "--size", "64", "--patch-size", "32", "--batch-size", "2",
            "--steps-per-epoch", "1", "--epochs", "1", "--val-slices", "4", "--device", "cpu",
            "--workers", "0", "--progress", "none", "--cache-dir", tmp_path / "cache"]
    code, _, _ = run_cli(["train", healthy, "-o", tmp_path / "ae", "--reconstruction-only",
                          "--no-scrb", *tiny])
    assert code == 0
    _, config = load_model(tmp_path / "ae" / "best.pt")
    assert config["score"] == "residual" and config["model"]["scrb"] is False
    assert 0 < config["threshold"] < 1
    code, _, _ = run_cli(["train", healthy, "-o", tmp_path / "fused", "--no-gate",
                          "--detach-fusion", *tiny])
    assert code == 0
    _, config = load_model(tmp_path / "fused" / "best.pt")
    assert config["score"] == "anomaly" and config["threshold"] == 0.5
    assert config["model"]["gate"] is False and config["model"]["detach_fusion"] is True


# --- evaluate end to end ------------------------------------------------------------------
def test_small_evaluate_run_writes_tables_json_and_charts(models, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["evaluate", "-o", out, "--model", models["model"],
                                 "--baseline-model", f"autoencoder={models['autoencoder']}",
                                 "--baseline-model", f"no-gate={models['no-gate']}",
                                 *TINY_CASES])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "dice_by_morphology.png", "dice_by_noise.png", "results.json", "results.md", "roc.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["cases"] == 6 and results["settings"]["healthy"] == 2
    assert list(results["methods"]) == ["model", "autoencoder", "no-gate", "laa950",
                                        "laa950_filtered", "perc15"]
    assert set(results["skipped"]) == set(VARIANTS) - {"autoencoder", "no-gate"}
    laa = results["methods"]["laa950"]["metrics"]
    for key in ("case_auroc", "voxel_auroc", "voxel_ap", "dice", "dice_best", "aupro",
                "stage_accuracy", "stage_macro_auroc"):
        value, (low, high) = laa[key]["value"], laa[key]["ci95"]
        assert 0 <= low <= high <= 1 and 0 <= value <= 1, key
    assert laa["dice_best"]["value"] >= laa["dice"]["value"]
    assert laa["voxel_auroc"]["value"] > 0.8  # density finds synthetic lesions on phantoms
    perc15 = results["methods"]["perc15"]["metrics"]
    assert set(perc15) == {"case_auroc", "spearman"}
    rows = results["methods"]["laa950"]["cases"]
    assert len(rows) == 6 and all(r["stage"] in ("None", "Mild", "Moderate", "Severe")
                                  for r in rows)
    assert results["methods"]["model"]["dice_by"]["noise"].keys() == {"10", "20", "35", "50"}
    text = (out / "results.md").read_text()
    assert "| method | case AUROC" in text and "not run: no checkpoint given" in text
    assert "--baseline-model detached-fusion=PATH" in text and text.strip() in stdout
    for name in ("roc.png", "dice_by_noise.png", "dice_by_morphology.png"):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        assert image.ndim == 3 and image.shape[2] == 3 and image.max() > 0
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 5  # curves in colour


def test_evaluate_needs_cases_and_a_valid_bootstrap(models):
    from EmphysemaUADLib.evaluation import build_methods

    methods, _ = build_methods(models["model"], device="cpu")
    with pytest.raises(InputError, match="no cases"):
        evaluate([], methods)
    with pytest.raises(InputError, match="bootstrap"):
        evaluate(benchmark_cases("small")[:1], methods, n_boot=-1)


# --- benchmark ----------------------------------------------------------------------------
def test_cpu_benchmark_times_every_step(models, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(make_phantom(3, shape=(16, 64, 64), spacing=(10.0, 5.6, 5.6)), ct)
    code, stdout, err = run_cli(["benchmark", "--ct", ct, "--model", models["model"],
                                 "-o", tmp_path / "speed"])
    assert code == 0, err
    results = json.loads((tmp_path / "speed" / "benchmark.json").read_text())
    steps = results["cpu"]["steps_s"]
    assert {"lungs", "regions", "network", "measurements", "write", "total"} <= set(steps)
    assert steps["total"] >= steps["network"] > 0 and results["cpu"]["peak_ram_mb"] > 0
    assert results["cpu"]["slices"] > 0
    assert results["cpu"]["precision"] in ("bfloat16", "float32")
    assert f"slices/s in {results['cpu']['precision']}" in stdout
    assert "| network |" in stdout and ("GPU part skipped" in stdout) != ("gpu" in results)
    code, _, err = run_cli(["benchmark", "--ct", tmp_path / "missing.nii.gz",
                            "--model", models["model"]])
    assert code == 2 and "Traceback" not in err


def test_accelerated_part_runs_on_any_device(models, tmp_path):
    """The GPU part of `benchmark` (warm-up, forward alone, ratios, throughput, report) on the
    CPU with a tiny network, so CI runs its code although no GPU is there."""
    from EmphysemaUADLib.benchmark import accelerated_run, markdown, run_benchmark

    ct = tmp_path / "ct.nii.gz"
    write_phantom(make_phantom(3, shape=(16, 64, 64), spacing=(10.0, 5.6, 5.6)), ct)
    results = run_benchmark(models["model"], ct)
    tiny = {"width": 4, "size": 32, "batch": 2}
    run = accelerated_run(read_ct(ct), models["model"], "cpu", 8, throughput=tiny)
    assert run["slices"] == results["cpu"]["slices"] > 0 and run["forward_s"] > 0
    # end to end holds the forward plus lungs, regions, measurements and writing
    assert run["end_to_end_over_forward"] > 1 and run["network_step_over_forward"] > 0
    t = run["throughput"]
    assert t["inference_slices_per_s"] > 0 and t["training_slices_per_s"] > 0
    assert run["peak_gpu_mb"] is None and t["width"] == 4
    text = markdown({**results, "gpu": run})
    assert "end-to-end / forward" in text and "Width 4 at 32 x 32" in text
