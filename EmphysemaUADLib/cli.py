"""The `emphysema-uad` command line. Each subcommand: a parser builder and a runner.

Exit codes, the same for every command (README, "Exit codes"):
0 success; 1 a runtime failure (a failed write, out of memory, an internal error) or some
cases of a batch failed while others were done; 2 bad input or usage (nothing was done: a bad
option, an input refused, an output location that cannot be written); 130 / 143 interrupted
(Ctrl-C / SIGTERM). Every failure is one line on stderr ("emphysema-uad: error: ...") and,
under --progress json, an "error" event on stdout; never a traceback (set
EMPHYSEMA_UAD_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .devices import DEVICE_CHOICES
from .errors import InputError, message_for
from .variants import VARIANTS

# library settings whose flag is not --setting-with-dashes
FLAGS = {"max_val_slices": "--val-slices"}


def flag_of(setting: str) -> str:
    """The command line's flag for a library setting (errors name settings, not flags)."""
    return FLAGS.get(setting, "--" + setting.replace("_", "-"))


def _message(exc: InputError) -> str:
    return message_for(exc, flag_of)


def _err(message: str) -> None:
    print(f"emphysema-uad: error: {message}", file=sys.stderr)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (none for flags and unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings and default is not None
                and default is not argparse.SUPPRESS and not isinstance(default, bool)):
            text += " (default: %(default)s)"
        return text


def _parser(sub, name: str, **kwargs):
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _add_output(p, what: str, required: bool = True, folder: bool = False, **kwargs) -> None:
    """-o/--output in every command (--output-dir kept as an alias where it was the name)."""
    names = ["-o", "--output"] + (["--output-dir"] if folder else [])
    p.add_argument(*names, dest="output", required=required, help=what, **kwargs)


def _add_progress(p) -> None:
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar: a progress bar on a terminal (plain lines in a log); json: one "
                        "JSON event per stdout line; none: only warnings and errors")


def _progress(args):
    from .progress import Progress
    return Progress(getattr(args, "progress", "bar"), errors_to_stderr=True)


def _info(message: str) -> None:
    print(message, file=sys.stderr)


# --- lungs -------------------------------------------------------------------------------
def _add_lungs(sub) -> None:
    p = _parser(sub, "lungs", help="segment the lungs (right = 1, left = 2)",
                       description="Segment both lungs of a chest CT without any trained "
                                   "weights; writes right lung = 1, left lung = 2.")
    p.add_argument("input", help="CT file (NIfTI, NRRD, MHA/MHD) or DICOM series folder")
    _add_output(p, "lung mask to write, e.g. lungs.nii.gz")
    p.add_argument("--png", help="also write an axial and coronal preview with the lungs "
                                 "outlined")
    p.set_defaults(run=_run_lungs)


def _run_lungs(args) -> int:
    from .atomic import check_output_file
    from .lungs import segment_lungs
    from .volume_io import read_ct, write_volume

    for path in (args.output, args.png):
        if path:
            check_output_file(path)
    ct = read_ct(args.input, _progress(args))
    lungs = segment_lungs(ct)
    ml = ct.geometry.voxel_ml
    right, left = (int((lungs == v).sum()) * ml for v in (1, 2))
    if right + left == 0:
        raise InputError(f"{args.input}: no lung found in this CT; is it a chest CT?")
    write_volume(lungs, ct.geometry, args.output)
    if args.png:
        from .render import render_preview
        render_preview(ct, args.png, outline=lungs)
    print(f"right lung: {right:.0f} mL\nleft lung:  {left:.0f} mL\ntotal:      "
          f"{right + left:.0f} mL\nwritten: {args.output}"
          + (f"\nwritten: {args.png}" if args.png else ""))
    return 0


# --- phantom -----------------------------------------------------------------------------
def _add_phantom(sub) -> None:
    from .phantom import KERNELS, PHANTOM_MORPHOLOGIES, SEVERITIES

    p = _parser(sub, "phantom", help="write a synthetic chest CT with known truth",
                       description="Synthesise a chest CT (deterministic from --seed) with "
                                   "optional emphysema and its ground truth.")
    _add_output(p, "CT file to write, e.g. ct.nii.gz")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the "
                                                       "same phantom")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="voxels along z, y, x (default: 112 224 224)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("z", "y", "x"),
                   help="voxel size in mm (default: 2.5 1.6 1.6)")
    p.add_argument("--noise", type=float, help="noise SD in HU in soft tissue (default: 20)")
    p.add_argument("--kernel", choices=KERNELS, default="smooth",
                   help="reconstruction kernel")
    p.add_argument("--emphysema", choices=SEVERITIES, default="none",
                   help="severity of the synthesised emphysema")
    p.add_argument("--morphology", choices=PHANTOM_MORPHOLOGIES, default="mixed",
                   help="morphology of the synthesised emphysema")
    p.add_argument("--truth-dir", help="folder for the truth: lesion mask, lung mask, zones, "
                                       "truth.json")
    p.add_argument("--png", help="axial and coronal preview PNG (default: beside the CT)")
    p.set_defaults(run=_run_phantom)


def _run_phantom(args) -> int:
    from .atomic import check_output_file, check_output_folder
    from .phantom import make_phantom, write_phantom

    for path in (args.output, args.png):
        if path:
            check_output_file(path)
    if args.truth_dir:
        check_output_folder(args.truth_dir)
    kwargs = {k: getattr(args, k) for k in ("shape", "spacing", "noise") if getattr(args, k)}
    phantom = make_phantom(seed=args.seed, kernel=args.kernel, emphysema=args.emphysema,
                           morphology=args.morphology, **kwargs)
    written = write_phantom(phantom, args.output, truth_dir=args.truth_dir, png=args.png)
    for path in written:
        print(f"written: {path}")
    return 0


# --- detect ------------------------------------------------------------------------------
def _add_detect(sub) -> None:
    p = _parser(sub, "detect", help="detect and stage emphysema in one or many CTs",
                       description="Detect emphysema: per case an anomaly map, a label map, "
                                   "the regions, report.json and overlay.png; summary.csv is "
                                   "the worklist of all cases, highest anomaly score first.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="CT file, DICOM series folder, or folder of cases")
    _add_output(p, "folder for the results (one folder per case and summary.csv)",
                folder=True)
    p.add_argument("--model", help="checkpoint (.pt) or the folder `train` wrote (its best.pt) "
                                   "(default: the bundled model)")
    p.add_argument("--lobes", help="lobe segmentation of the (single) case: TotalSegmentator "
                                   "file or folder, lungmask LTRCLobes, or labels + JSON legend "
                                   "(default: zones, thirds of each lung's height)")
    p.add_argument("--staging", help="staging.json from `emphysema-uad calibrate` (default: "
                                     "the Fleischner-based cut-points 0.5, 5, 25 %%)")
    p.add_argument("--threshold", type=float,
                   help="anomaly probability above which a voxel is emphysema "
                        "(default: the model's)")
    _add_correct_hu(p)
    _add_device(p, batch=True)
    _add_progress(p)
    p.set_defaults(run=_run_detect)


def _add_correct_hu(p) -> None:
    p.add_argument("--correct-hu", action=argparse.BooleanOptionalAction, default=None,
                   help="take a shifted HU scale's shift off each scan before anything else "
                        "(air outside the body should read -1000 HU, fat about -100; the "
                        "shift is always measured and reported). The default: corrected, "
                        "unless the model's site threshold was set on scans as stored; "
                        "--no-correct-hu keeps every scan's scale as stored")


def _add_device(p, batch: bool = False) -> None:
    """--device, and with `batch` the --batch-size of a command that runs the network."""
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto: the GPU when PyTorch sees one, else the CPU")
    if batch:
        p.add_argument("--batch-size", type=int,
                       help="slices per network batch (default: 1 on the CPU, 8 on a GPU)")


def _run_detect(args) -> int:
    from .batch import plan_batch, run_batch
    from .detection import Detector

    progress = _progress(args)
    cases = plan_batch(args.inputs, args.output, args.lobes)  # before any work
    detector = Detector.load(args.model, args.device, args.threshold, args.staging,
                             args.batch_size, args.correct_hu)
    result = run_batch(args.inputs, args.output, detector, args.lobes, progress, cases)
    if result.exit_code == 2 and args.progress == "json":  # the case errors said why
        from .progress import Progress
        Progress("json").event("error", "nothing done: every input was refused.",
                               exit_code=2)
    return result.exit_code


# --- calibrate ---------------------------------------------------------------------------
def _add_calibrate(sub) -> None:
    p = _parser(sub, "calibrate", help="fit cohort staging (4-component Gaussian mixture)",
                       description="Fit a 4-component Gaussian mixture on the whole-lung "
                                   "emphysema indices of a cohort's detect results; "
                                   "components are named by the order of their means.")
    p.add_argument("cases", nargs="+", metavar="CASES",
                   help="detect output folders, report.json or summary.csv files")
    _add_output(p, "staging.json to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture fit")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
    import json

    from .atomic import check_output_file, write_text_atomic
    from .staging import calibrate, cohort_indices

    check_output_file(args.output)
    indices = cohort_indices(args.cases)
    staging = calibrate(indices, seed=args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(staging.to_dict(), indent=2))
    cuts = ", ".join(f"{c:.2f} %" for c in staging.cutpoints)
    print(f"{len(indices)} cases; cut-points None|Mild|Moderate|Severe at {cuts}\n"
          f"written: {out}")
    return 0


# --- site-threshold ----------------------------------------------------------------------
def _add_site_threshold(sub) -> None:
    from .site_threshold import DEFAULT_PERCENTILE

    p = _parser(sub, "site-threshold", help="set the voxel threshold from a site's healthy CTs",
                       description="Run the model on CTs your site calls healthy and write a "
                                   "copy of it whose threshold is a high percentile of their "
                                   "lung voxels' scores, so that a healthy lung of this scanner "
                                   "and kernel reads about 0.1 % emphysema. Use the copy with "
                                   "`detect --model` or in the Slicer panel. No labels needed.")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY",
                   help="healthy chest CTs: files, DICOM series folders or folders of them, "
                        "of the scanner and kernel the threshold is for")
    _add_output(p, "the model copy to write, e.g. site_model.pt (and its .json beside it)")
    p.add_argument("--model", help="checkpoint (.pt) or the folder `train` wrote (default: "
                                   "the bundled model)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help="percentile of the healthy lung voxels' scores that becomes the "
                        "threshold")
    _add_correct_hu(p)
    _add_device(p, batch=True)
    _add_progress(p)
    p.set_defaults(run=_run_site_threshold)


def _run_site_threshold(args) -> int:
    from .atomic import check_output_file
    from .detection import Detector
    from .site_threshold import check_percentile, site_threshold, write_site_model

    check_output_file(args.output)
    if Path(args.output).suffix == ".json":
        raise InputError(f"{args.output}: the model copy must not end in .json (its config "
                         "is written beside it as <name>.json).")
    check_percentile(args.percentile)
    progress = _progress(args)
    detector = Detector.load(args.model, args.device, batch_size=args.batch_size,
                             correct_hu=args.correct_hu)
    if Path(args.output).resolve() == Path(detector.model_path).resolve():
        raise InputError(f"{args.output} is the model itself; write the copy to another file.")
    result = site_threshold(args.healthy, detector, args.percentile, progress)
    written = write_site_model(detector, args.output, result)
    for name, share in result.suspects:
        progress.log(f"{name}: {share:.2f} % of its lung lies above the threshold, as much "
                     "as in emphysema; if it is not healthy, leave it out and run again.",
                     "warning")
    if result.mixed_noise:
        low, high = result.scores.noise_range
        progress.log(f"the scans' lung noise ranges from {low:.0f} to {high:.0f} HU, as far "
                     "apart as different kernels or doses; a threshold fits the scans it was "
                     "set on: set one for each kernel.", "warning")
    if result.clipped:
        progress.log(f"the {args.percentile:g}th percentile lies outside the usable range; "
                     f"the threshold is set to {result.threshold:g}.", "warning")
    progress.event("done", f"threshold {result.threshold:g} from {len(result.scores.names)} "
                   f"healthy scan(s); written: {written}", threshold=result.threshold,
                   model=str(written), scans=len(result.scores.names),
                   refused=len(result.refused))
    if args.progress != "json":
        scores = result.scores
        width = max(map(len, scores.names + ["healthy scan"]))
        print(f"{'healthy scan':<{width}}  lung above threshold (%)  lung noise (HU)")
        for name, share, noise in zip(scores.names, result.percent_above, scores.noise_hu):
            print(f"{name:<{width}}  {share:24.3f}  "
                  + ("-" if noise is None else f"{noise:15.1f}"))
        print(f"threshold: {result.threshold:g} (the {args.percentile:g}th percentile of "
              f"{result.scores.voxels} lung voxels; the model's own was "
              f"{detector.threshold:g})\nwritten: {written}")
    return 1 if result.refused else 0


# --- train -------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = _parser(sub, "train", help="train a model on healthy CTs (self-supervised)",
                       description="Train EDLNet on CTs of healthy lungs into which "
                                   "emphysema-like lesions are synthesised. MODEL_DIR/best.pt "
                                   "(best validation AUROC) is the model for `detect --model`; "
                                   "MODEL_DIR/last.pt holds the state for --resume. Ctrl-C "
                                   "stops after the current step and keeps the run resumable. "
                                   "Multi-GPU: launch with torchrun --nproc_per_node N.")
    p.add_argument("healthy", nargs="+", metavar="HEALTHY_DIR",
                   help="folder(s) of healthy chest CTs (volume files and DICOM series "
                        "folders, searched recursively)")
    _add_output(p, "folder for best.pt, last.pt and the slice cache", metavar="MODEL_DIR")
    p.add_argument("--epochs", type=int,
                   help="epochs to train (default: 100; with --resume the run's own, and a "
                        "larger number extends a run, finished or not)")
    p.add_argument("--width", type=int, default=64, help="network width (64 = published)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per step and process")
    p.add_argument("--size", type=int, default=384,
                   help="slice size of the cache (lung box padded or cropped to it)")
    p.add_argument("--patch-size", type=int,
                   help="train on random patches of this size (faster on CPU; the network "
                        "is fully convolutional)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="steps per epoch (default: one pass over the training slices)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the cases held out for validation")
    p.add_argument("--val-slices", type=int, default=256,
                   help="at most this many held-out slices are validated each epoch")
    p.add_argument("--anomaly-loss", choices=("mse", "bce"), default="mse",
                   help="anomaly term: MSE of the probability (published) or BCE with logits")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="peak learning rate of AdamW (1e-4 published; short runs need more)")
    _add_device(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in MODEL_DIR from last.pt")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune: start from this checkpoint's network and weights ("
                        "'bundled' = the default model), e.g. on your own scanner's healthy "
                        "CTs; its width and variant replace --width and the variant flags")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initial "
                                                       "weights and the lesions")
    _add_progress(p)
    p.add_argument("--cache-dir", help="slice cache folder (default: MODEL_DIR/cache)")
    p.add_argument("--workers", type=int,
                   help="data loading processes (default: 0 on CPU, up to 12 on a GPU)")
    baselines = p.add_argument_group("baselines for `evaluate` (train them on the same data)")
    for variant in VARIANTS.values():
        baselines.add_argument(variant.flag, dest=variant.option,
                               action="store_true" if variant.value else "store_false",
                               help=f"{variant.help} (baseline {variant.name})")
    p.set_defaults(run=_run_train)


def _checkpoint_path(name: str | None) -> str | None:
    """--init-from's value: 'bundled' names the default model."""
    if name != "bundled":
        return name
    from .modelinfo import default_model_path
    return str(default_model_path())


def _run_train(args) -> int:
    from .atomic import check_output_folder
    from .training import TrainOptions, train

    progress = _progress(args)
    check_output_folder(args.output)
    if args.cache_dir:
        check_output_folder(args.cache_dir)
    options = TrainOptions(
        healthy=args.healthy, output=args.output, width=args.width,
        **({"epochs": args.epochs} if args.epochs is not None else {}),
        batch_size=args.batch_size, size=args.size, patch_size=args.patch_size,
        steps_per_epoch=args.steps_per_epoch, seed=args.seed, val_fraction=args.val_fraction,
        max_val_slices=args.val_slices, anomaly_loss=args.anomaly_loss, lr=args.lr,
        device=args.device, resume=args.resume, cache_dir=args.cache_dir, workers=args.workers,
        init_from=_checkpoint_path(args.init_from),
        **{v.option: getattr(args, v.option) for v in VARIANTS.values()})
    result = train(options, progress)
    if result.interrupted_by:
        return result.exit_code
    if args.progress != "json":
        auroc = "n/a" if result.best_auroc is None else f"{result.best_auroc:.4f}"
        print(f"best model: {result.best_path} (validation AUROC {auroc})\n"
              f"last state: {result.last_path}")
    return 0


# --- evaluate ----------------------------------------------------------------------------
def _add_evaluate(sub) -> None:
    p = _parser(sub, "evaluate", help="synthetic benchmark against ground truth and baselines",
                       description="Run the model and the baselines (LAA-950, LAA-950 after "
                                   "a noise filter, Perc15, and the trained baselines whose "
                                   "checkpoints are given) on phantoms with known emphysema; "
                                   "writes results.md, results.json and PNG charts.")
    _add_output(p, "folder for results.md, results.json and the charts", folder=True)
    p.add_argument("--model", help="checkpoint under test (default: the bundled model)")
    p.add_argument("--baseline-model", action="append", metavar="NAME=PATH",
                   help=f"a trained baseline, repeatable; NAME: {', '.join(VARIANTS)} (see "
                        "`emphysema-uad train --help`)")
    p.add_argument("--cases", choices=("full", "small"), default="full",
                   help="full: 80 cases (60 with emphysema); small: 6 cases, a quick check")
    p.add_argument("--matrix", type=int, default=224,
                   help="in-plane pixels of the phantoms (over a 358 mm field of view)")
    p.add_argument("--z-extent", type=float, default=280.0,
                   help="scan length in mm (slices = length / slice thickness)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap samples of the cases for the 95 %% intervals (0: none)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first case")
    _add_device(p, batch=True)
    _add_progress(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .atomic import check_output_folder
    from .evaluation import benchmark_cases, build_methods, evaluate, markdown, write_results

    check_output_folder(args.output)
    if args.matrix < 16 or args.z_extent <= 0:
        raise InputError(f"matrix must be at least 16 and z extent positive (got "
                         f"{args.matrix}, {args.z_extent}).", "matrix", "z_extent")
    methods, skipped = build_methods(args.model, args.baseline_model, args.device,
                                     args.batch_size)
    cases = benchmark_cases(args.cases, args.seed)
    results = evaluate(cases, methods, skipped, args.matrix, args.z_extent, args.bootstrap,
                       progress=_progress(args))
    command = " ".join(
        ["emphysema-uad evaluate", f"--cases {args.cases}", f"--matrix {args.matrix}",
         f"--z-extent {args.z_extent:g}", f"--bootstrap {args.bootstrap}", f"--seed {args.seed}"]
        + [f"--model {args.model}"] * bool(args.model)
        + [f"--baseline-model {spec}" for spec in args.baseline_model or ()]
        + [f"-o {args.output}"])
    written = write_results(results, args.output, command)
    if args.progress != "json":
        print(markdown(results, command))
    for path in written:
        _info(f"written: {path}")
    return 0


# --- benchmark ---------------------------------------------------------------------------
def _add_benchmark(sub) -> None:
    p = _parser(sub, "benchmark", help="speed and memory of detection (CPU, and GPU if any)",
                       description="Time detection step by step on the real CT of "
                                   "../shared/data (or --ct; a phantom when neither is "
                                   "there), on the CPU and, where PyTorch sees one, the GPU.")
    p.add_argument("--ct", help="CT file or DICOM folder to time (default: the shared real CT)")
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--batch-size", type=int,
                   help="slices per network batch (default: 1 on the CPU, 8 on a GPU)")
    _add_output(p, "also write benchmark.md, benchmark.json and benchmark.png here "
                   "(default: print only)", required=False, folder=True)
    p.set_defaults(run=_run_benchmark)


def _run_benchmark(args) -> int:
    import json

    from .atomic import check_output_folder, write_text_atomic
    from .benchmark import markdown, run_benchmark

    if args.output:
        check_output_folder(args.output)
    results = run_benchmark(args.model, args.ct, args.batch_size, _progress(args))
    text = markdown(results)
    print(text)
    if args.output:
        from .benchmark import write_chart
        folder = Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        for path in (write_text_atomic(folder / "benchmark.md", text),
                     write_text_atomic(folder / "benchmark.json", json.dumps(results, indent=1)),
                     write_chart(results, folder / "benchmark.png")):
            _info(f"written: {path}")
    return 0


# --- validate ----------------------------------------------------------------------------
def _add_validate(sub) -> None:
    p = _parser(sub, "validate", help="quality on your own labelled cases (AUROC, Spearman, "
                                      "stages) against density baselines",
                description="Run detection (or read a detect results folder) on the images a "
                            "labels CSV names and compare the model with LAA-950, LAA-910 and "
                            "Perc15: AUROC normal vs emphysema and per pattern, Spearman with "
                            "severity, the stage confusion matrix, with 95 %% intervals by "
                            "subject-level bootstrap. Writes report.json, report.md, cases.csv "
                            "and a PNG.")
    p.add_argument("labels", metavar="LABELS.csv",
                   help="columns file (relative to the CSV), subject, and pattern and/or "
                        "severity (0-5) and/or stage (None/Mild/Moderate/Severe)")
    _add_output(p, "folder for the results", required=False, folder=True, default="validation")
    p.add_argument("--model", help="checkpoint (.pt); default: the bundled model")
    p.add_argument("--results", metavar="DETECT_DIR",
                   help="read an earlier `detect -o DETECT_DIR` run on these images instead "
                        "of running the network")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where the network runs")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="subject resamples for the 95 %% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--site-folds", type=int, metavar="K",
                   help="score at a site threshold instead of the model's: the subjects are "
                        "split into K folds and each image is scored at the threshold "
                        "`site-threshold` sets from the normal images of the other folds, so "
                        "no subject sets its own threshold")
    p.add_argument("--percentile", type=float,
                   help="with --site-folds: the percentile of the normal images' lung scores "
                        "that becomes the threshold (default 99.9)")
    _add_correct_hu(p)
    _add_progress(p)
    p.set_defaults(run=_run_validate)


def _run_validate(args) -> int:
    from .atomic import check_output_folder
    from .validation import summary_text, validate

    check_output_folder(args.output)
    report, written = validate(args.labels, args.output, args.model, args.results,
                               args.device, args.bootstrap, args.seed, _progress(args),
                               args.site_folds, args.percentile, args.correct_hu)
    if args.progress != "json":
        print(summary_text(report))
    for path in written:
        _info(f"written: {path}")
    return 0


COMMANDS = [_add_lungs, _add_phantom, _add_detect, _add_calibrate, _add_site_threshold,
            _add_train, _add_evaluate, _add_benchmark, _add_validate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emphysema-uad", formatter_class=HelpFormatter,
        description="Unsupervised emphysema detection and staging on chest CT.",
        epilog="Exit codes: 0 success; 1 a runtime failure, or some cases of a batch failed; "
               "2 bad input or usage (nothing done); 130/143 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _fail(args, message: str, code: int, event_message: str | None = None) -> int:
    """One line on stderr; under --progress json also the "error" event on stdout."""
    _err(message)
    if getattr(args, "progress", None) == "json":
        from .progress import Progress
        # for a GUI the setting's own name, not the flag
        Progress("json").event("error", event_message or message, exit_code=code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as exc:
        return _fail(args, _message(exc), 2, str(exc))
    except KeyboardInterrupt:
        return _fail(args, "interrupted.", 130)
    except MemoryError:
        return _fail(args, "out of memory; try a smaller --batch-size or a machine with more "
                           "memory.", 1)
    except OSError as exc:
        from .atomic import write_failure
        return _fail(args, write_failure(exc), 1)
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("EMPHYSEMA_UAD_DEBUG"):
            raise
        return _fail(args, f"internal error ({type(exc).__name__}: {exc}); set "
                           "EMPHYSEMA_UAD_DEBUG=1 to see the traceback, and report it.", 1)
