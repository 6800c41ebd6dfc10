"""Writes a trained checkpoint as the bundled default model, with its model card.

Usage: export_default_model.py BEST.pt --output Resources/Models --command "how it was trained"
       [--validation VALIDATE_DIR/report.json ...] [--healthy-scans DETECT_DIR]

The card's numbers come from the checkpoint's own config (what `train` recorded), from the
report of `emphysema-uad validate` run with this checkpoint on real labelled CT, and from
`emphysema-uad detect` run with it on healthy scans, so the card cannot drift from the
weights it describes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from EmphysemaUADLib import __version__, validation
from EmphysemaUADLib.atomic import write_text_atomic
from EmphysemaUADLib.checkpoint import load_checkpoint, save_checkpoint
from EmphysemaUADLib.modelinfo import DEFAULT_MODEL_NAME, MODEL_CARD_NAME
from EmphysemaUADLib.network import build_model, count_parameters


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()} {platform.release()}"


def _check_made_with(report: dict, config: dict, what: str) -> None:
    if (report.get("model") or {}).get("config", {}).get("training") != config["training"]:
        raise SystemExit(f"{what} was made with another model")


def real_data(report: dict, config: dict) -> tuple[list[tuple[str, str]], str]:
    """Card rows (keys naming "real", which the Slicer panel shows) and the full validation
    table, from a `validate` report made with this very model."""
    _check_made_with(report, config, "the validation report")
    metrics = {row["key"]: row for row in report["metrics"]["metrics"]}
    staging = {row["key"]: row for row in report["metrics"]["staging"]["metrics"]}
    name = Path(report["labels"]).parent.name
    stored = _stored(report)
    scale = ", HU scale as stored" if stored else ""
    overall = metrics["auroc"]["values"]["anomaly_score"]
    sensitivity = staging["sensitivity"]
    specificity = staging["specificity"]
    rows = [(f"real HRCT AUROC normal vs emphysema ({name}{scale})",
             f"{overall['value']:.2f} [{overall['ci95'][0]:.2f}, {overall['ci95'][1]:.2f}]"),
            (f"real HRCT staged above None, severity >= 2{scale}",
             f"{sensitivity['count']}/{sensitivity['of']}"),
            (f"real HRCT normal staged None{scale}",
             f"{specificity['count']}/{specificity['of']}")]
    # its sections one level below the card's, under a title that says how the scale was read
    title = ("HU scale as stored (`validate --no-correct-hu`)" if stored else
             "HU scale corrected where shifted (the default)")
    body = validation.markdown(report).split("\n", 1)[1].replace("\n## ", "\n#### ")
    table = f"### {Path(report['labels']).name}, {title}\n{body}"
    return rows, table


def _stored(report: dict) -> bool:
    """Whether the report read shifted scans on their shifted scale (--no-correct-hu)."""
    return any(case.get("hu_shift_hu") and not case.get("hu_corrected")
               for case in report["cases"])


def healthy_scans(folder, config: dict) -> str:
    """The whole-lung index and stage of each healthy scan, from the per-case reports of a
    `detect` run with this very model (case folders in name order)."""
    cases = []
    for path in sorted(Path(folder).glob("*/report.json")):
        report = json.loads(path.read_text())
        _check_made_with(report, config, str(path))
        whole = next(r for r in report["regions"] if r["region"] == "whole lung")
        cases.append(f"{report['case']} {whole['emphysema_index_percent']:.2f} % "
                     f"({whole['stage']})")
    if not cases:
        raise SystemExit(f"{folder}: holds no detect results (CASE/report.json)")
    return "; ".join(cases)


def _start(config: dict) -> str:
    start = config["training"].get("init_from")
    return (f"The run fine-tunes the network of `{start}` (the command says where it comes "
            "from)." if start else "The run trains the network from scratch.")


def model_card(config: dict, params: int, command: str, size_mb: float,
               validated: list[tuple[list, str]] = (), healthy: str | None = None) -> str:
    t = config["training"]
    m = config["model"]
    device = t.get("device", "cpu")
    machine = (torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available()
               else _machine())
    rows = [
        ("architecture", f"{m['architecture']}, width {m['width']}, SCRB {m['scrb']}, "
                         f"gate {m['gate']}, detached fusion {m['detach_fusion']}"),
        ("parameters", f"{params:,}"),
        ("file size", f"{size_mb:.1f} MB"),
        ("input", f"axial slices, HU window {config['intensity_window']} -> [0, 1], "
                  f"trained on {t['patch_size'] or t['size']} px patches of "
                  f"{t['size']} px lung-box slices (fully convolutional at use)"),
        ("training data", f"{t['cases']} healthy CTs ({t['slices']} lung slices: "
                          f"{t['train_slices']} training, {t['val_slices']} validation, "
                          f"split by case); skipped: {t['skipped']}"),
        ("schedule", f"{t['epochs']} epochs x {t['steps_per_epoch']} steps, batch "
                     f"{t['batch_size']}, AdamW lr {t['lr']} (warm-up then cosine), "
                     f"weight decay {t['weight_decay']}, anomaly loss {t['anomaly_loss']}, "
                     f"seed {t['seed']}"),
        ("best epoch", f"{t['epoch']} (step {t['step']})"),
        ("validation voxel AUROC", f"{t['val_auroc']:.4f}"),
        ("validation Dice at 0.5", f"{t['val_dice']:.4f}"),
        ("threshold", f"{config['threshold']}"),
        ("machine", f"{machine} ({device})"),
        ("software", f"EmphysemaUAD {__version__}, torch {torch.__version__}, "
                     f"Python {platform.python_version()}"),
        ("date", datetime.date.today().isoformat()),
    ] + (validated[0][0] if validated else [])  # the first (default) setting's headline
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# Model card: {DEFAULT_MODEL_NAME}

The default model of EmphysemaUAD, used by `emphysema-uad detect` and the Slicer module when
no other model is chosen. It was trained self-supervised: only healthy lungs, into which
emphysema-like lesions (centrilobular, paraseptal, panlobular, bullous) were
synthesised; no emphysema label of any patient was used.

| | |
| --- | --- |
{table}

**Data.** Healthy synthetic chest CTs (`emphysema-uad phantom --emphysema none`) at noise
levels 10, 20, 35 and 50 HU, smooth and sharp kernels, in two geometries (112 x 224 x 224 at
2.5 x 1.6 x 1.6 mm and 120 x 400 x 400 at 2.0 x 0.9 x 0.9 mm), plus the real CTs of
`../shared/data`: one thorax CT (POPI 4D-CT phase, Philips Brilliance Big Bore, 0.98 x 0.98 x 2
mm, healthy apart from a tumour) and one scan of another scanner reconstructed with a standard
and a sharp kernel (Lung-PET-CT-Dx A0001, Philips Brilliance 16, 0.84 x 0.84 x 5 mm). Lesions
are tissue loss (a drawn share of the local parenchymal density is kept, with the image's own
texture); training applies flips, rotations, lung-density-level (the parenchyma's tissue
fraction scaled by 2/3 to 3/2 in half of the samples, as at other inspiration levels),
reconstruction-kernel and noise augmentation.
{_start(config)}

**Command.** `{command}`

**Validation.** Voxel AUROC and Dice inside the lungs on held-out slices (held-out cases)
with synthetic lesions of every morphology; this measures lesion finding on synthetic
lesions, not clinical accuracy. The results on phantoms with ground truth and on the real CT
are in the README ("Results").

{_real_section(validated)}\
**Limits.** Trained on three real CTs and phantoms; "Real emphysema" in the README's Results
says what it finds and what it misses. The real HRCT slices it was checked on read a HU scale
shifted by about +77 HU (air outside the body -920 HU); each table above says whether it
scored them as stored or with the shift taken off. `detect` measures every scan's scale and
takes a shift off (README, "HU scale"; `--no-correct-hu` keeps it). On a sharp lung kernel the heart
border and vessel edges raise the emphysema index of a healthy scan, and so does more noise
than the scans it was checked on (README, "Other kernels and noise").{_healthy(healthy)} Its threshold, \
{config['threshold']:g}, is not every scanner's: set it from your scanner's healthy CTs
(`emphysema-uad site-threshold`, or "Set threshold from these CTs" in Slicer's Training tab),
or fine-tune the model on them (`emphysema-uad train --init-from bundled`), and check it on
labelled cases of your own with `emphysema-uad validate` (`--site-folds 2`: at thresholds set
from their normal cases, no subject setting its own). Not a medical device; for research.
"""


def _healthy(healthy: str | None) -> str:
    return (f" The whole-lung index of its real training CTs (healthy lungs) with this model: "
            f"{healthy}." if healthy else "")


def _real_section(validated) -> str:
    if not validated:
        return ""
    return ("**Real emphysema** (`emphysema-uad validate` on real labelled HRCT, whole "
            "slices or ROIs, with a radiologist's pattern and, for slices, severity; the labels "
            "only measure, they never trained or tuned anything; the model's label map, index "
            "and stages are those of `detect`, which keeps the network's flags on lung at "
            "emphysema density and adds bullae, lobules at emphysema density and each flag's "
            "extent by density):\n\n"
            + "\n".join(table for _, table in validated) + "\n")


def _without_machine_paths(config: dict) -> dict:
    """The config with a start model inside this repository named relative to it: the
    shipped files must not carry the path of the machine that trained them."""
    training = config.get("training", {})
    start = Path(training.get("init_from") or "")
    root = Path(__file__).resolve().parents[1]
    if not start.is_absolute() or not start.is_relative_to(root):
        return config
    return {**config, "training": {**training, "init_from": str(start.relative_to(root))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--output", required=True, help="folder for the model and its card")
    parser.add_argument("--command", required=True, help="the command that trained it")
    parser.add_argument("--validation", action="append", default=[],
                        help="report.json of `emphysema-uad validate` run with this checkpoint "
                             "on real labelled CT (again for another setting, e.g. "
                             "--correct-hu)")
    parser.add_argument("--healthy-scans", metavar="DETECT_DIR",
                        help="output folder of `emphysema-uad detect` run with this checkpoint "
                             "on its real training CTs (healthy lungs)")
    args = parser.parse_args()

    saved = load_checkpoint(args.checkpoint)
    # both checked before anything is written
    validated = [real_data(json.loads(Path(report).read_text()), saved.config)
                 for report in args.validation]
    healthy = healthy_scans(args.healthy_scans, saved.config) if args.healthy_scans else None
    out = Path(args.output)
    config = _without_machine_paths(saved.config)
    target = save_checkpoint(out / DEFAULT_MODEL_NAME, saved.state_dict, config)
    with torch.device("meta"):
        params = count_parameters(build_model(config["model"]))
    size_mb = target.stat().st_size / 1e6
    card = out / MODEL_CARD_NAME
    write_text_atomic(card, model_card(config, params, args.command, size_mb, validated, healthy))
    print(f"written: {target} ({size_mb:.1f} MB), {target.with_suffix('.json')}, {card}")


if __name__ == "__main__":
    main()
