"""`emphysema-uad evaluate`: a synthetic benchmark with ground truth, the detector against its
baselines on the same cases and the same lung masks.

Cases are phantoms (phantom.make_phantom) with their truth: the synthesised lesion voxels, the
true lung mask and the true emphysema index and stage. The full set has 80 cases: every
morphology at every severity (15 conditions) and 5 healthy cases, four times over with the
acquisition rotated so that each condition meets all four noise levels (10 HU standard dose
to 50 HU low dose), both kernels and all three slice thicknesses (1, 2.5, 5 mm). Seeds start
at 1000 (the default model's training phantoms use 101-116). Every method sees the true lung
mask, so lung segmentation (tested on its own) does not enter the comparison.

Methods, each a voxel score (higher = more emphysema) with a default threshold (a voxel is
emphysema when its score >= the threshold), or a case score only:
- the model under test (`--model`) and, from given checkpoints, the baselines that need
  training on the same healthy data: the reconstruction-only autoencoder (residual score) and
  the published network's variants without SCRB, without the gate, with detached fusion;
- LAA-950: score -HU, threshold 950 (HU <= -950), the clinical standard;
- LAA-950 after an in-plane Gaussian filter (sigma 1.5 mm) that suppresses noise;
- Perc15: the case's 15th HU percentile in the lungs (case score -Perc15; no voxel map).
The emphysema index of a method is its % of lung voxels called emphysema; its stage comes
from the default cut-points (staging.py) and is compared with the true stage.

Metrics (metrics.py): case AUROC healthy vs emphysema, voxel AUROC, average precision, Dice at
the default and at the best threshold, AUPRO to FPR 0.3 (all voxel metrics pooled over all
cases, each voxel weighted by its volume so that thin slices do not outweigh thick ones),
staging accuracy and macro one-vs-rest AUROC, Spearman between index and true index; 95 %
percentile intervals from a bootstrap over cases, paired across methods.
Known simplification: the phantom samples each slice at its centre, so thick slices carry no
partial-volume averaging along z.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import expit

from . import acquisition, metrics
from .detection import Detector
from .devices import machine_info
from .errors import InputError, setting_error
from .inference import predict_anomaly
from .phantom import PHANTOM_MORPHOLOGIES, SEVERITIES, make_phantom
from .progress import NO_PROGRESS, Progress
from .staging import STAGES, Staging
from .variants import VARIANTS

FIRST_SEED = 1000
THICKNESSES_MM = (1.0, 2.5, 5.0)
NOISE_LEVELS = acquisition.NOISE_LEVELS
FOV_MM = 358.4  # the phantom's default field of view (224 x 1.6 mm): an adult chest fits
MATRIX = 224
Z_EXTENT_MM = 280.0  # scan length: the lungs (about 240 mm) with a margin
REPEATS = 4
HEALTHY_PER_REPEAT = 5
SMALL_CASES = (  # severity, morphology, noise HU, kernel, thickness mm
    ("none", "-", 10.0, "smooth", 2.5), ("none", "-", 50.0, "sharp", 5.0),
    ("mild", "centrilobular", 20.0, "sharp", 1.0), ("moderate", "paraseptal", 35.0, "smooth", 5.0),
    ("severe", "panlobular", 50.0, "smooth", 2.5), ("moderate", "bullous", 10.0, "sharp", 2.5))
FILTER_SIGMA_MM = 1.5  # about the grain of smooth-kernel noise (~2.5 mm blotches)
DENSITY_EDGES = np.arange(-500.0, 1101.0)  # scores -HU in 1 HU bins
# probabilities (fine near 0 and 1) and residuals (0.0005 = 0.7 HU apart) alike
NETWORK_EDGES = np.union1d(expit(np.linspace(-12.0, 12.0, 2401)), np.linspace(0.0, 1.0, 2001))
METRICS = (("case_auroc", "case AUROC"), ("voxel_auroc", "voxel AUROC"),
           ("voxel_ap", "voxel AP"), ("dice", "Dice default"), ("dice_best", "Dice best"),
           ("aupro", "AUPRO 0.3"), ("stage_accuracy", "stage acc."),
           ("stage_macro_auroc", "stage macro AUROC"), ("spearman", "Spearman"))
FACTORS = ("noise", "kernel", "thickness", "morphology", "severity")


# --- the cases ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkCase:
    seed: int
    severity: str
    morphology: str  # "-" for a healthy case
    noise: float
    kernel: str
    thickness: float

    @property
    def name(self) -> str:
        return (f"s{self.seed}_{self.severity}_{self.morphology.strip('-') or 'healthy'}_"
                f"{self.kernel}_{self.noise:g}hu_{self.thickness:g}mm")

    @property
    def emphysema(self) -> bool:
        return self.severity != "none"

    def phantom(self, matrix: int = MATRIX, z_extent_mm: float = Z_EXTENT_MM):
        pixel = FOV_MM / matrix
        slices = max(1, int(round(z_extent_mm / self.thickness)))
        return make_phantom(self.seed, shape=(slices, matrix, matrix),
                            spacing=(self.thickness, pixel, pixel), noise=self.noise,
                            kernel=self.kernel, emphysema=self.severity,
                            morphology="mixed" if self.morphology == "-" else self.morphology)


def benchmark_cases(which: str = "full", first_seed: int = FIRST_SEED) -> list[BenchmarkCase]:
    """The full set (80 cases, see the module notes) or the small one (6 cases)."""
    if which == "small":
        rows = SMALL_CASES
    elif which == "full":
        conditions = [(severity, morphology) for severity in ("mild", "moderate", "severe")
                      for morphology in PHANTOM_MORPHOLOGIES] + [("none", "-")] * HEALTHY_PER_REPEAT
        # shifting by the repeat gives each condition every noise level and thickness and
        # both kernels; noise (period 4) and thickness (period 3) meet in all 12 pairs
        rows = [(severity, morphology, NOISE_LEVELS[(c + r) % 4],
                 acquisition.KERNELS[(c + r // 2) % 2], THICKNESSES_MM[(c + r) % 3])
                for r in range(REPEATS) for c, (severity, morphology) in enumerate(conditions)]
    else:
        raise InputError(f"unknown case set {which!r}; use full or small.")
    return [BenchmarkCase(first_seed + i, *row) for i, row in enumerate(rows)]


# --- the methods --------------------------------------------------------------------------
@dataclass
class Outcome:
    """One method on one case."""

    score: float  # case score, higher = more emphysema
    index: float | None  # % of lung voxels called emphysema (None: no voxel map)
    counts: metrics.Counts | None
    seconds: float


class VoxelMethod:
    """A voxel score with a default threshold; subclasses give `voxel_scores`."""

    key: str
    label: str
    threshold: float
    edges: np.ndarray
    rule: str

    def voxel_scores(self, ct, lungs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def assess(self, ct, lungs: np.ndarray, truth: np.ndarray) -> Outcome:
        start = time.perf_counter()
        scores = self.voxel_scores(ct, lungs)
        seconds = time.perf_counter() - start
        inside = lungs > 0
        index = 100.0 * np.count_nonzero(scores[inside] >= self.threshold) / inside.sum()
        counts = metrics.voxel_counts(scores, truth, inside, self.edges, ct.geometry.voxel_ml)
        return Outcome(index, index, counts, seconds)


class DensityMethod(VoxelMethod):
    threshold = 950.0
    edges = DENSITY_EDGES

    def __init__(self, key: str, label: str, sigma_mm: float = 0.0):
        self.key, self.label, self.sigma_mm = key, label, sigma_mm
        self.rule = "HU <= -950" + (f" after an in-plane Gaussian, sigma {sigma_mm:g} mm"
                                    if sigma_mm else "")

    def voxel_scores(self, ct, lungs):
        hu = ct.array.astype(np.float32)
        if self.sigma_mm:
            _, sy, sx = ct.geometry.spacing_zyx
            hu = ndimage.gaussian_filter(hu, (0.0, self.sigma_mm / sy, self.sigma_mm / sx))
        return -hu


class NetworkMethod(VoxelMethod):
    def __init__(self, key: str, label: str, detector: Detector):
        self.key, self.label, self.detector = key, label, detector
        self.threshold = detector.threshold
        self.edges = np.union1d(NETWORK_EDGES, [self.threshold])
        what = "residual |x - reconstruction|" if detector.score == "residual" else "probability"
        self.rule = f"{what} >= {self.threshold:g} ({Path(detector.model_path).name})"

    def voxel_scores(self, ct, lungs):
        d = self.detector
        return predict_anomaly(ct.array, lungs, d.model, d.device, d.batch_size,
                               score=d.score)


class Perc15Method:
    key, label, threshold = "perc15", "Perc15", None
    rule = "15th HU percentile of the lungs (case score -Perc15; no voxel map, no stage)"

    def assess(self, ct, lungs, truth) -> Outcome:
        start = time.perf_counter()
        perc15 = float(np.percentile(ct.array[lungs > 0], 15))
        return Outcome(-perc15, None, None, time.perf_counter() - start)


def parse_baselines(specs) -> dict[str, str]:
    """`NAME=PATH` strings -> {name: path}; InputError on an unknown name or a repeat."""
    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path:
            raise setting_error("baseline_model", f"takes NAME=PATH, not {spec!r}.")
        if name not in VARIANTS:
            raise InputError(f"unknown baseline {name!r}; use one of {', '.join(VARIANTS)}.")
        if name in out:
            raise setting_error("baseline_model", f"{name} is given twice.")
        out[name] = path
    return out


def _check_baseline(name: str, detector: Detector) -> None:
    """The checkpoint must be the baseline it is passed as (a swapped path is easy to miss)."""
    variant = VARIANTS[name]
    key, wanted = variant.checkpoint
    found = detector.score if key == "score" else detector.config["model"].get(key)
    if found != wanted:
        raise InputError(f"baseline model {name}={detector.model_path}: this checkpoint has "
                         f"{key} = {found}, not {wanted}; train it with `emphysema-uad train "
                         f"... {variant.flag}`.", "baseline_model")


def build_methods(model=None, baselines=None, device: str = "auto",
                  batch_size: int | None = None):
    """(methods in table order, {baseline name: why it is skipped})."""
    paths = parse_baselines(baselines)
    main = Detector.load(model, device, batch_size=batch_size)
    methods = [NetworkMethod("model", f"EDLNet ({Path(main.model_path).name})", main)]
    skipped = {}
    for name, variant in VARIANTS.items():
        if name not in paths:
            skipped[name] = (f"not run: no checkpoint given (train with `emphysema-uad train "
                             f"... {variant.flag}`, pass --baseline-model {name}=PATH)")
            continue
        detector = Detector.load(paths[name], device, batch_size=batch_size)
        _check_baseline(name, detector)
        methods.append(NetworkMethod(name, variant.label, detector))
    methods += [DensityMethod("laa950", "LAA-950"),
                DensityMethod("laa950_filtered", "LAA-950 filtered", FILTER_SIGMA_MM),
                Perc15Method()]
    return methods, skipped


# --- running ------------------------------------------------------------------------------
def run_cases(cases, methods, matrix=MATRIX, z_extent_mm=Z_EXTENT_MM,
              progress: Progress = NO_PROGRESS):
    """Every method on every case: (case rows with truth, {method key: [Outcome per case]})."""
    rows, outcomes = [], {m.key: [] for m in methods}
    for i, case in enumerate(cases):
        phantom = case.phantom(matrix, z_extent_mm)
        truth = phantom.lesions > 0
        rows.append({**asdict(case), "name": case.name,
                     "true_index": phantom.truth["regions"]["whole lung"]
                     ["emphysema_index_percent"], "true_stage": phantom.truth["stage"],
                     "shape": list(phantom.ct.shape)})
        for method in methods:
            outcomes[method.key].append(method.assess(phantom.ct, phantom.lungs, truth))
        progress.step(i + 1, len(cases), stage="cases")
    return rows, outcomes


def _summary(method, rows, outcomes, n_boot: int, seed: int) -> dict:
    staging = Staging()
    sick = np.array([r["severity"] != "none" for r in rows])
    true_index = np.array([r["true_index"] for r in rows], float)
    true_stage = np.array([r["true_stage"] for r in rows])
    score = np.array([o.score for o in outcomes])
    voxel = outcomes[0].counts is not None
    if voxel:
        stacked = metrics.stack([o.counts for o in outcomes])
        stages = np.array([staging.stage(o.index) for o in outcomes])
        probs = np.array([[staging.probabilities(o.index)[s] for s in STAGES] for o in outcomes])

    def statistic(idx) -> dict:
        out = {"case_auroc": metrics.case_auroc(score[idx], sick[idx]),
               "spearman": metrics.spearman(score[idx], true_index[idx])}
        if voxel:
            c = metrics.pool(stacked, idx)
            out.update(voxel_auroc=metrics.auroc(c), voxel_ap=metrics.average_precision(c),
                       dice=metrics.dice_at(c, method.threshold),
                       dice_best=metrics.best_dice(c)[0], aupro=metrics.aupro(c),
                       stage_accuracy=metrics.staging_accuracy(true_stage[idx], stages[idx]),
                       stage_macro_auroc=metrics.macro_ovr_auroc(true_stage[idx], probs[idx],
                                                                 STAGES))
        return out

    everything = np.arange(len(rows))
    values = statistic(everything)
    intervals = metrics.bootstrap(statistic, len(rows), n_boot, seed) if n_boot else {}
    summary = {"label": method.label, "rule": method.rule, "threshold": method.threshold,
               "seconds": round(sum(o.seconds for o in outcomes), 2),
               "metrics": {k: {"value": _round(v), "ci95": [_round(x) for x in
                                                             intervals.get(k, (None, None))]}
                           for k, v in values.items()},
               "cases": [{"score": _round(o.score), "index": _round(o.index),
                          **({"stage": str(stages[i])} if voxel else {})}
                         for i, o in enumerate(outcomes)]}
    fpr, tpr = metrics.roc_curve(metrics.binned(score, sick, np.unique(score)))
    summary["case_roc"] = {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}
    if voxel:
        pooled = metrics.pool(stacked)
        summary["best_threshold"] = _round(metrics.best_dice(pooled)[1])
        fpr, tpr = metrics.roc_curve(pooled)
        keep = np.unique(np.linspace(0, len(fpr) - 1, 400).round().astype(int))
        summary["voxel_roc"] = {"fpr": fpr[keep].round(4).tolist(),
                                "tpr": tpr[keep].round(4).tolist()}
        summary["dice_by"] = {}
        for factor in FACTORS:
            groups = {}
            for i, r in enumerate(rows):
                if r[factor] not in ("-", "none"):  # healthy cases have no morphology
                    groups.setdefault(r[factor], []).append(i)
            summary["dice_by"][factor] = {
                _name(level): _round(metrics.dice_at(metrics.pool(stacked, groups[level]),
                                                   method.threshold))
                for level in sorted(groups, key=_level_order)}
    return summary


def _level_order(level):
    """Numbers in increasing order, names in the order the project lists them."""
    if isinstance(level, (int, float)):
        return 0, level, 0
    named = list(PHANTOM_MORPHOLOGIES) + list(SEVERITIES) + list(acquisition.KERNELS)
    return 1, 0, named.index(level)


def _name(level) -> str:
    return f"{level:g}" if isinstance(level, float) else str(level)


def _round(value, digits: int = 4):
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def evaluate(cases, methods, skipped=None, matrix=MATRIX, z_extent_mm=Z_EXTENT_MM,
             n_boot: int = 1000, seed: int = 0, progress: Progress = NO_PROGRESS) -> dict:
    """Run and summarise; the returned dict is what results.json holds."""
    if not cases:
        raise InputError("the benchmark has no cases.")
    if n_boot < 0:
        raise setting_error("bootstrap", f"must be 0 (no intervals) or more (got {n_boot}).")
    start = time.perf_counter()
    rows, outcomes = run_cases(cases, methods, matrix, z_extent_mm, progress)
    results = {
        "benchmark": "EmphysemaUAD synthetic phantoms",
        "settings": {"cases": len(rows), "healthy": sum(r["severity"] == "none" for r in rows),
                     "matrix": matrix, "fov_mm": FOV_MM, "z_extent_mm": z_extent_mm,
                     "bootstrap": n_boot, "bootstrap_seed": seed,
                     "aupro_max_fpr": metrics.AUPRO_MAX_FPR,
                     "staging_cutpoints_percent": list(Staging().cutpoints)},
        "machine": machine_info(),
        "cases": rows,
        "methods": {m.key: _summary(m, rows, outcomes[m.key], n_boot, seed) for m in methods},
        "skipped": {name: {"label": VARIANTS[name].label, "reason": reason}
                    for name, reason in (skipped or {}).items()},
    }
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


# --- outputs ------------------------------------------------------------------------------
def _cell(metric: dict | None) -> str:
    if metric is None or metric["value"] is None:
        return "n/a"
    low, high = metric["ci95"]
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
    return f"{metric['value']:.3f}{interval}"


def _level(factor: str, level: str) -> str:
    return {"noise": f"{level} HU", "thickness": f"{level} mm"}.get(factor, level)


def markdown(results: dict, command: str | None = None) -> str:
    settings, methods = results["settings"], results["methods"]
    lines = [f"# {results['benchmark']}", "",
             f"{settings['cases']} cases ({settings['healthy']} healthy), "
             f"{settings['matrix']} x {settings['matrix']} pixels over {settings['fov_mm']:g} mm, "
             f"{settings['z_extent_mm']:g} mm scan length; 95 % intervals from "
             f"{settings['bootstrap']} bootstrap samples of the cases. Machine: "
             f"{results['machine']['summary']}; {results['seconds']:.0f} s."]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += ["", "| method | " + " | ".join(label for _, label in METRICS) + " |",
              "|---" * (len(METRICS) + 1) + "|"]
    for summary in methods.values():
        cells = [_cell(summary["metrics"].get(key)) for key, _ in METRICS]
        if summary.get("best_threshold") is not None:
            cells[4] += f" @ {summary['best_threshold']:g}"
        lines.append(f"| {summary['label']} | " + " | ".join(cells) + " |")
    for skipped in results["skipped"].values():
        lines.append(f"| {skipped['label']} | {skipped['reason']} |" + " |" * (len(METRICS) - 1))
    voxel = {k: v for k, v in methods.items() if "dice_by" in v}
    lines += ["", "Dice at the default threshold by acquisition and by emphysema (pooled over "
              "the cases of each group; morphology and severity over the cases with emphysema)",
              "", "| group | " + " | ".join(v["label"] for v in voxel.values()) + " |",
              "|---" * (len(voxel) + 1) + "|"]
    for factor in FACTORS:
        levels = next(iter(voxel.values()))["dice_by"][factor] if voxel else {}
        for level in levels:
            values = [v["dice_by"][factor].get(level) for v in voxel.values()]
            lines.append(f"| {factor} {_level(factor, level)} | " + " | ".join(
                "n/a" if x is None else f"{x:.3f}" for x in values) + " |")
    lines += ["", "Rules (a voxel is emphysema when its score >= the threshold):"]
    lines += [f"- {v['label']}: {v['rule']}" for v in methods.values()]
    lines += ["", "Voxel metrics are pooled over all cases' lung voxels (true lung masks), "
              "weighted by voxel volume. Dice best: at the single threshold (after @) that "
              f"maximises the pooled Dice (an oracle). AUPRO: per-region overlap integrated "
              f"over FPR 0 to {settings['aupro_max_fpr']:g}, divided by "
              f"{settings['aupro_max_fpr']:g}. Stages from the default cut-points "
              f"{settings['staging_cutpoints_percent']} % of the emphysema index; Spearman "
              "between each method's index (Perc15: -Perc15) and the true index.", ""]
    return "\n".join(lines)


def _charts(results: dict) -> dict:
    """{file name: matplotlib figure} of the ROC curves and Dice by noise and morphology."""
    from .plots import lines, new_figure

    methods = results["methods"]
    voxel = [v for v in methods.values() if "voxel_roc" in v]
    fig, (left, right) = new_figure(13, 5.5, panels=2)
    lines(left, [(v["label"], v["voxel_roc"]["fpr"], v["voxel_roc"]["tpr"]) for v in voxel],
          "Voxel ROC inside the lungs", "false positive rate (share of healthy voxels)",
          "true positive rate (share of lesion voxels)", (0, 1), (0, 1), diagonal=True)
    lines(right, [(v["label"], v["case_roc"]["fpr"], v["case_roc"]["tpr"])
                  for v in methods.values()],
          "Case ROC, healthy vs emphysema", "false positive rate (share of healthy cases)",
          "true positive rate (share of cases with emphysema)", (0, 1), (0, 1),
          diagonal=True)
    charts = {"roc.png": fig}
    for factor, title in (("noise", "Dice by noise level"),
                          ("morphology", "Dice by morphology")):
        levels = list(voxel[0]["dice_by"][factor]) if voxel else []
        series = [(v["label"], np.arange(len(levels)),
                   [np.nan if v["dice_by"][factor][k] is None else v["dice_by"][factor][k]
                    for k in levels]) for v in voxel]
        fig, (ax,) = new_figure(9, 5.5)
        lines(ax, series, title + " (default threshold)",
              "noise SD in soft tissue" if factor == "noise" else "emphysema morphology",
              "Dice (label map vs truth)", (-0.5, len(levels) - 0.5), (0, 1),
              x_ticks=[(i, _level(factor, k)) for i, k in enumerate(levels)], markers=True)
        ax.legend(loc="lower left", fontsize=8)
        charts[f"dice_by_{factor}.png"] = fig
    return charts


def write_results(results: dict, output_dir, command: str | None = None) -> list[Path]:
    """results.md, results.json and the PNG charts, each written whole then renamed."""
    from .atomic import write_text_atomic
    from .plots import save_figure

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(folder / "results.md", markdown(results, command)),
               write_text_atomic(folder / "results.json", json.dumps(results, indent=1))]
    written += [save_figure(fig, folder / name) for name, fig in _charts(results).items()]
    return written
