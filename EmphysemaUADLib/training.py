"""Self-supervised training of EDLNet on healthy CTs with synthesised lesions.

Each sample is a cached healthy slice, augmented (flips, 90-degree rotations, reconstruction
kernel and noise, optional random patch), into which lesions are synthesised: the network gets
the slice with lesions and learns to return the slice without them (the augmented one, noise
included, so it learns lesions rather than denoising) and the lesion mask.

Everything random is a function of (seed, epoch, position in the epoch), and the run state in
`last.pt` (model, optimiser, step, RNG) is complete, so a resumed run continues exactly as an
uninterrupted one would. SIGINT/SIGTERM finish the current step, save `last.pt` and stop.
Under torchrun (WORLD_SIZE > 1) the batches are shared over the processes with DDP; rank 0
alone validates, writes checkpoints and reports progress.

Baselines train the same way: the published network's variants (no SCRB, no gate, detached
fusion) and a reconstruction-only model (no anomaly term; it detects by the residual
|input - reconstruction|, with the cut-point of best Dice on the validation slices).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .acquisition import KERNELS, NOISE_LEVELS, add_ct_noise, apply_kernel
from .checkpoint import load_checkpoint, save_checkpoint
from .devices import choose_device
from .errors import InputError, setting_error
from .inference import score_batch, use_bfloat16
from .intensity import HU_WINDOW, hu_to_unit
from .lesions import MORPHOLOGIES, random_training_lesions, synthesize_lesions
from .metrics import best_dice, binned
from .network import EDLNet, build_model, count_parameters
from .process import stop_requested
from .progress import NO_PROGRESS, Progress
from .training_data import SliceCache, build_slice_cache, find_training_cases

P_FLIP = 0.3  # published: flips and 90-degree rotations, p = 0.3 each
P_ROTATE = 0.3
P_KERNEL = 0.5  # re-filter with a random reconstruction kernel
P_NOISE = 0.5  # add noise of a random level (so a quarter of the samples keep neither)
# Healthy lungs scanned at other inspiration levels: the parenchyma's tissue fraction
# (HU + 1000) scaled by a log-uniform factor in this range, i.e. -900 to -775 HU at -850 HU.
P_DENSITY = 0.5
DENSITY_RANGE = (2 / 3, 3 / 2)
WARMUP_SHARE = 0.1
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# residual cut-points tried (0.35 HU apart); strictly inside (0, 1) as detection requires
RESIDUAL_EDGES = np.linspace(0.0, 1.0, 4001)[1:-1]


@dataclass
class TrainOptions:
    healthy: list[str]
    output: str
    epochs: int | None = None  # None: DEFAULT_EPOCHS for a new run, the run's own on resume
    width: int = 64
    batch_size: int = 32
    size: int = 384
    patch_size: int | None = None
    steps_per_epoch: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    max_val_slices: int = 256
    anomaly_loss: str = "mse"  # "mse" (published) or "bce" (BCE with logits)
    lr: float = 1e-4
    weight_decay: float = 5e-5
    scrb: bool = True  # the network variants (network.EDLNet)
    gate: bool = True
    detach_fusion: bool = False
    reconstruction_only: bool = False  # no anomaly term; detection by the residual
    init_from: str | None = None  # a checkpoint whose network (and weights) the run starts from
    # per invocation, not part of the run's identity:
    device: str = "auto"
    resume: bool = False
    cache_dir: str | None = None
    workers: int | None = None

    def check(self) -> None:
        for name in ("epochs", "width", "batch_size", "max_val_slices"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise setting_error(name, f"must be at least 1 (got {getattr(self, name)}).")
        if self.size < 16 or self.size % 16:
            raise setting_error("size", f"must be a multiple of 16 (got {self.size}).")
        if self.patch_size is not None and (self.patch_size < 16 or self.patch_size % 16 or
                                            self.patch_size > self.size):
            raise InputError(f"patch size must be a multiple of 16 and at most the size "
                             f"{self.size} (got {self.patch_size}).", "patch_size", "size")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise setting_error("steps_per_epoch",
                                f"must be at least 1 (got {self.steps_per_epoch}).")
        if self.anomaly_loss not in ("mse", "bce"):
            raise setting_error("anomaly_loss", f"must be mse or bce (got {self.anomaly_loss}).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise setting_error("lr", f"must be a positive number (got {self.lr}).")
        if not 0.0 < self.val_fraction < 1.0:
            raise setting_error("val_fraction",
                                f"must lie between 0 and 1 (got {self.val_fraction}).")


DEFAULT_EPOCHS = 100
# What defines a run: on --resume these come from last.pt.
RUN_KEYS = ("epochs", "width", "batch_size", "size", "patch_size", "steps_per_epoch", "seed",
            "val_fraction", "max_val_slices", "anomaly_loss", "lr", "weight_decay", "scrb",
            "gate", "detach_fusion", "reconstruction_only", "init_from")


# --- samples ------------------------------------------------------------------------------
def scale_lung_density(hu: np.ndarray, factor: float) -> np.ndarray:
    """The tissue fraction (HU + 1000) of parenchyma (below -600 HU) scaled by `factor`; the
    shift fades linearly to nothing at -400 HU, so air, vessels and walls keep their HU and,
    for factors up to 1.5, no two values swap order."""
    shift = np.interp(hu, (-1000.0, -600.0, -400.0), (0.0, (factor - 1.0) * 400.0, 0.0))
    return (hu + shift).astype(np.float32)


def augment(hu: np.ndarray, lungs: np.ndarray, spacing, rng, patch_size: int | None = None):
    """A random patch (centred on a lung pixel), flips, 90-degree rotations, then a random
    lung density (another inspiration level), reconstruction kernel and noise level.
    Returns (hu float32, lungs, spacing (y, x))."""
    spacing = tuple(float(s) for s in spacing)
    if patch_size and patch_size < hu.shape[-1]:
        points = np.flatnonzero(lungs)
        flat = rng.choice(points) if points.size else hu.size // 2
        cy, cx = np.unravel_index(flat, hu.shape)
        y0 = int(np.clip(cy - patch_size // 2, 0, hu.shape[0] - patch_size))
        x0 = int(np.clip(cx - patch_size // 2, 0, hu.shape[1] - patch_size))
        window = (slice(y0, y0 + patch_size), slice(x0, x0 + patch_size))
        hu, lungs = hu[window], lungs[window]
    if rng.random() < P_FLIP:
        hu, lungs = hu[:, ::-1], lungs[:, ::-1]
    if rng.random() < P_FLIP:
        hu, lungs = hu[::-1], lungs[::-1]
    if rng.random() < P_ROTATE:
        k = int(rng.integers(1, 4))
        hu, lungs = np.rot90(hu, k), np.rot90(lungs, k)
        if k % 2:
            spacing = spacing[::-1]
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    lungs = np.ascontiguousarray(lungs)
    if rng.random() < P_DENSITY:
        hu = scale_lung_density(hu, float(np.exp(rng.uniform(*np.log(DENSITY_RANGE)))))
    if rng.random() < P_KERNEL:
        hu = apply_kernel(hu, spacing, KERNELS[rng.integers(len(KERNELS))])
    if rng.random() < P_NOISE:
        hu = add_ct_noise(hu, spacing, float(rng.choice(NOISE_LEVELS)),
                          KERNELS[rng.integers(len(KERNELS))], rng)
    return hu, lungs, spacing


def training_sample(hu, lungs, spacing, rng, patch_size=None):
    """(input, clean target, lesion mask) as float32 images in the network's units."""
    clean, lungs, spacing = augment(hu, lungs, spacing, rng, patch_size)
    with_lesions, label = random_training_lesions(clean, lungs, spacing, rng)
    return hu_to_unit(with_lesions), hu_to_unit(clean), label.astype(np.float32)


class AugmentedSlices(torch.utils.data.Dataset):
    """Training samples addressed by key (epoch, position, slice): the same key gives the
    same sample in any process, which is what makes resuming and DDP reproducible."""

    def __init__(self, cache: SliceCache, seed: int, patch_size: int | None = None):
        self.cache = cache
        self.seed = seed
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        epoch, position, index = (int(k) for k in key)
        rng = np.random.default_rng([self.seed, epoch, position, index])
        sample = training_sample(self.cache.hu[index], self.cache.lungs(index),
                                 self.cache.spacing[index], rng, self.patch_size)
        return tuple(torch.from_numpy(np.ascontiguousarray(a))[None] for a in sample)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of keys for one process: each epoch a seeded permutation of the training slices
    (repeated when the epoch needs more), cut into global batches of batch x world; this rank
    takes its share of each. `set_epoch(epoch, start)` skips the first `start` steps."""

    def __init__(self, indices, batch_size: int, steps: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.indices = np.asarray(indices)
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        per_step = self.batch_size * self.world
        need = self.steps * per_step
        order = np.concatenate([rng.permutation(self.indices)
                                for _ in range(math.ceil(need / len(self.indices)))])[:need]
        for step in range(self.start, self.steps):
            first = step * per_step + self.rank * self.batch_size
            yield [(self.epoch, p, int(order[p])) for p in range(first, first + self.batch_size)]


def _worker_init(_):
    # Ctrl-C reaches the whole process group; the main process decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


# --- validation ---------------------------------------------------------------------------
@dataclass
class ValidationSet:
    x: np.ndarray  # (n, 1, S, S) float32 input with lesions
    mask: np.ndarray  # (n, S, S) bool lesion
    lungs: np.ndarray  # (n, S, S) bool


def validation_set(cache: SliceCache, indices, seed: int, max_slices: int) -> ValidationSet:
    """Held-out slices, evenly spread, with lesions of every morphology in turn, fixed seed."""
    indices = np.asarray(indices)
    if len(indices) > max_slices:
        indices = indices[np.linspace(0, len(indices) - 1, max_slices).round().astype(int)]
    xs, masks, lungs = [], [], []
    for j, index in enumerate(indices):
        lung = cache.lungs(index)
        rng = np.random.default_rng([seed, 1, j])
        hu, label = synthesize_lesions(cache.hu[index].astype(np.float32), lung,
                                       cache.spacing[index], rng,
                                       MORPHOLOGIES[j % len(MORPHOLOGIES)])
        xs.append(hu_to_unit(hu))
        masks.append(label > 0)
        lungs.append(lung > 0)
    return ValidationSet(np.stack(xs)[:, None], np.stack(masks), np.stack(lungs))


def validate(model, val: ValidationSet, device: torch.device, batch_size: int,
             score: str = "anomaly"):
    """(voxel AUROC inside the lungs or None, Dice, threshold): for the anomaly probability
    at 0.5; for the residual, which has no natural cut-point, at the one of best Dice."""
    from sklearn.metrics import roc_auc_score

    was_training = model.training
    model.eval()
    probs = []
    with torch.inference_mode():
        for start in range(0, len(val.x), batch_size):
            x = torch.from_numpy(val.x[start:start + batch_size]).to(device)
            if channels_last(device):
                x = x.contiguous(memory_format=torch.channels_last)
            probs.append(score_batch(model, x, score)[:, 0].cpu().numpy())
    model.train(was_training)
    prob, truth = np.concatenate(probs)[val.lungs], val.mask[val.lungs]
    auroc = float(roc_auc_score(truth, prob)) if 0 < truth.sum() < truth.size else None
    if score == "residual":
        dice, threshold = best_dice(binned(prob, truth, RESIDUAL_EDGES))
        return auroc, dice, threshold
    predicted = prob > 0.5
    denominator = predicted.sum() + truth.sum()
    dice = float(2 * (predicted & truth).sum() / denominator) if denominator else 1.0
    return auroc, dice, 0.5


# --- optimisation -------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def channels_last(device: torch.device) -> bool:
    """Training tensors channels-last: faster on GPUs, and on the CPU in bfloat16 only (a
    float32 step of 8 patches took 1.98 s against 1.91 s contiguous on 2 Xeon cores)."""
    return device.type == "cuda" or use_bfloat16(device)


def compute_loss(model, x, target, mask, anomaly_loss: str | None = "mse"):
    """MSE(reconstruction, clean) + anomaly term (MSE of the probability, published, or BCE
    with logits; None: no anomaly term), 1:1; computed in float32 whatever the autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bfloat16(x.device)):
        recon, logit = model(x)
    recon, logit = recon.float(), logit.float()
    if anomaly_loss is None:
        return F.mse_loss(recon, target)
    if anomaly_loss == "bce":
        anomaly = F.binary_cross_entropy_with_logits(logit, mask)
    else:
        anomaly = F.mse_loss(torch.sigmoid(logit), mask)
    return F.mse_loss(recon, target) + anomaly


def train_step(model, optimizer, batch, device: torch.device, lr: float,
               anomaly_loss: str | None = "mse") -> torch.Tensor:
    """One optimiser step on one batch; returns the (detached) loss before the step."""
    x, target, mask = (t.to(device, non_blocking=True) for t in batch)
    if channels_last(device):
        x = x.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    loss = compute_loss(model, x, target, mask, anomaly_loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# --- stopping on signals ------------------------------------------------------------------
class StopFlag:
    """Set by SIGINT/SIGTERM once installed (or by a caller, or by the launcher's stop file:
    `process.stop_requested`); a second SIGINT interrupts at once. Installed only when the
    training loop starts: before that (reading the cases) there is nothing to save, and
    Ctrl-C stops straight away."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def request(self, signum: int = signal.SIGINT) -> None:
        self.signum = self.signum or signum

    def is_set(self) -> bool:
        # a GUI's Cancel on any platform (Windows has no SIGINT for a GUI's workers): the
        # stop file of process.BackgroundProcess, handled like Ctrl-C
        if self.signum is None and stop_requested():
            self.request(signal.SIGINT)
        return self.signum is not None

    def _handler(self, signum, _frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNAL_EXIT}

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# --- processes ----------------------------------------------------------------------------
class _Processes:
    """This process's place in a torchrun launch (or a single process)."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = choose_device(device_name)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """Mean loss over processes, and stop if any process was asked to."""
        if self.world == 1:
            return float(loss), stop
        both = torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)])
        torch.distributed.all_reduce(both)
        return float(both[0]) / self.world, bool(both[1] > 0)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def selection_score(auroc: float | None) -> float:
    """What picks best.pt: the first epoch with the highest score."""
    return -1.0 if auroc is None else auroc


CHANCE_AUROC = 0.6  # below: the model hardly separates lesion voxels from healthy ones


def threshold_warning(history: list[dict], min_dice: float = 0.05) -> str | None:
    """A warning when the epoch saved as best.pt flags almost no lesion voxel at its
    threshold, worded by what validation measured: an AUROC near chance (undertrained), or
    a good AUROC with every lesion probability on one value under the threshold (a
    collapsed output, where detect would find nothing while the AUROC looks fine)."""
    validated = [r for r in history if "auroc" in r]
    if not validated:
        return None
    best = max(validated, key=lambda r: selection_score(r["auroc"]))  # first of equals
    if best["auroc"] is None or best["dice"] is None or best["dice"] >= min_dice:
        return None
    if best["auroc"] < CHANCE_AUROC:
        return (f"the best model is undertrained: its validation AUROC {best['auroc']:.3f} is "
                f"near chance (0.5) and it flags almost no lesion voxel (validation Dice "
                f"{best['dice']:.3f}), so detect would report no emphysema; train longer "
                f"(--resume with a larger --epochs) or with more healthy CTs.")
    return (f"the best model separates lesion voxels from healthy ones (validation AUROC "
            f"{best['auroc']:.3f}) but its probabilities stay under its threshold "
            f"{best['threshold']:g}, so it flags almost none (validation Dice "
            f"{best['dice']:.3f}) and detect would report no emphysema; retrain with another "
            f"--seed.")


# --- the run ------------------------------------------------------------------------------
@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_auroc: float | None
    steps: int
    interrupted_by: int | None = None  # signal number
    history: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT.get(self.interrupted_by, 1) if self.interrupted_by else 0


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _resumed_options(opts: TrainOptions, saved: dict, progress: Progress) -> TrainOptions:
    """The run's saved settings; a warning for those asked for otherwise (a value left at
    its default is not taken as asked for)."""
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    extend = opts.epochs is not None and opts.epochs > saved.get("epochs", opts.epochs)
    changed = [k for k in RUN_KEYS if getattr(opts, k) not in (saved.get(k), defaults[k])
               and not (k == "epochs" and extend)]
    if changed:
        progress.log("resuming with the run's own settings; ignoring "
                     + ", ".join(f"--{k.replace('_', '-')} {getattr(opts, k)} (run: "
                                 f"{saved.get(k)})" for k in changed), "warning")
    values = asdict(opts)
    values.update({k: saved[k] for k in RUN_KEYS if k in saved})
    if extend:  # "train longer": the cosine schedule is stretched over the new length
        progress.log(f"extending the run from {saved['epochs']} to {opts.epochs} epochs.")
        values["epochs"] = opts.epochs
    return TrainOptions(**values)


def train(opts: TrainOptions, progress: Progress = NO_PROGRESS, stop: StopFlag | None = None,
          on_step=None) -> TrainResult:
    """Train (or resume) the run in `opts.output`. `on_step(step, loss)` is called after
    every step with this process's loss (tests use it); `stop` is set by signals unless
    given."""
    opts.check()
    procs = _Processes(opts.device)
    own_signals = stop is None
    stop = stop or StopFlag()
    try:
        trainer = Trainer(opts, procs, progress if procs.main else NO_PROGRESS, stop, on_step)
        return trainer.run(install_signals=own_signals)
    finally:
        stop.uninstall()
        procs.close()


class Trainer:
    """One training run, shaped like nnU-Net's trainer: `set_up` (the run, data, model,
    optimiser, resumed state, loader), then per epoch the `train_step`s and `end_epoch`
    (`validate_and_save` and `save_last` on rank 0), and `on_interrupt` when a stop is agreed
    on. The run's changing state (step, epochs done, best score, history, threshold) lives on
    the object, so each step reads and writes it in one place."""

    def __init__(self, opts: TrainOptions, procs: _Processes, progress: Progress,
                 stop: StopFlag, on_step=None):
        self.opts, self.procs, self.progress, self.stop = opts, procs, progress, stop
        self.on_step = on_step
        self.device = procs.device
        out = Path(opts.output)
        self.last_path, self.best_path = out / "last.pt", out / "best.pt"
        self.resumed = False
        self.step, self.epochs_done = 0, 0
        self.best_auroc: float | None = None
        self.best_score: float | None = None
        self.history: list[dict] = []
        self.threshold = 0.5  # of the anomaly probability; a residual's comes from validation
        self._epoch_started = 0.0

    # --- set-up ---------------------------------------------------------------------------
    def set_up(self) -> None:
        saved = self._open_run()
        self._load_data()
        self._build_model(saved)
        if saved:
            self._restore(saved.training_state)
        self._build_loader()

    def _open_run(self):
        """The checkpoint to resume (its settings replace the given ones), or None for a new
        run; a new run never overwrites an existing one."""
        out = self.last_path.parent
        if not self.opts.resume:
            if self.last_path.exists():
                raise InputError(f"{out} already holds a training run (last.pt); continue it with "
                                 "resume, or choose another output folder.", "resume", "output")
            if self.opts.epochs is None:
                self.opts = replace(self.opts, epochs=DEFAULT_EPOCHS)
            return None
        if not self.last_path.is_file():
            raise InputError(f"{self.last_path}: not found; there is no run to resume in {out}.")
        saved = load_checkpoint(self.last_path)
        self.opts = _resumed_options(self.opts, saved.training_state["options"], self.progress)
        self.resumed = True
        if saved.training_state["epochs_done"] >= self.opts.epochs:
            self.progress.log(f"the run in {out} is finished ({self.opts.epochs} epochs); "
                              "resume with a larger --epochs to train longer.", "warning")
        return saved

    def _load_data(self) -> None:
        """The slice cache (built by rank 0, read by the others), the split by case and the
        fixed validation set."""
        opts, procs = self.opts, self.procs
        cases = find_training_cases(opts.healthy)
        cache_dir = Path(opts.cache_dir) if opts.cache_dir else self.last_path.parent / "cache"
        if procs.main:
            self.cache = build_slice_cache(cases, cache_dir, opts.size, self.progress)
        procs.barrier()
        if not procs.main:  # the cache rank 0 just built
            self.cache = build_slice_cache(cases, cache_dir, opts.size)
        self.train_idx, self.val_idx = self.cache.split_by_case(opts.val_fraction, opts.seed)
        if self.cache.n_cases == 1:
            self.progress.log("only one usable case: validation uses contiguous blocks of its "
                              "slices, which are not independent of the training slices",
                              "warning")
        self.val = (validation_set(self.cache, self.val_idx, opts.seed, opts.max_val_slices)
                    if procs.main else None)

    def _build_model(self, saved) -> None:
        """The network (seeded; a resumed one's weights), on the device, DDP-wrapped under
        torchrun, its optimiser and the learning-rate schedule."""
        opts, device = self.opts, self.device
        torch.manual_seed(opts.seed)
        if saved:
            model = build_model(saved.config["model"])
        elif opts.init_from:
            model = self._initial_model(opts.init_from)
        else:
            model = EDLNet(width=opts.width, scrb=opts.scrb, gate=opts.gate,
                           detach_fusion=opts.detach_fusion)
        self.voxel_score = "residual" if opts.reconstruction_only else "anomaly"
        self.anomaly_loss = None if opts.reconstruction_only else opts.anomaly_loss
        if saved:
            model.load_state_dict(saved.state_dict)
        model = model.to(device)
        if channels_last(device):
            model = model.to(memory_format=torch.channels_last)
        self.model = self.net = model
        if self.procs.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr,
                                           weight_decay=opts.weight_decay)
        per_step = opts.batch_size * self.procs.world
        self.steps_per_epoch = (opts.steps_per_epoch or
                                max(1, math.ceil(len(self.train_idx) / per_step)))
        self.total = opts.epochs * self.steps_per_epoch
        warmup_epochs = max(1, round(WARMUP_SHARE * opts.epochs)) if opts.epochs > 1 else 0
        self.warmup = warmup_epochs * self.steps_per_epoch

    def _initial_model(self, path) -> EDLNet:
        """Fine-tuning: the network of checkpoint `path`, with its weights; its architecture
        replaces the run's width and variant settings, which are reported when they differ."""
        start = load_checkpoint(path)
        model = build_model(start.config["model"])
        model.load_state_dict(start.state_dict)
        asked = {"width": self.opts.width, "scrb": self.opts.scrb, "gate": self.opts.gate,
                 "detach_fusion": self.opts.detach_fusion}
        differ = {k: model.config[k] for k, v in asked.items()
                  if k in model.config and model.config[k] != v}
        if differ:
            self.opts = replace(self.opts, **differ)
            self.progress.log(f"starting from {path}: its network ("
                              + ", ".join(f"{k} {v}" for k, v in differ.items())
                              + ") replaces the one asked for", "info")
        return model

    def _restore(self, state: dict) -> None:
        """Optimiser, RNG and progress of a resumed run, as `save_last` left them."""
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.epochs_done = state["step"], state["epochs_done"]
        self.best_auroc, self.history = state["best_auroc"], list(state["history"])
        self.best_score = state["best_score"]

    def _build_loader(self) -> None:
        opts, device = self.opts, self.device
        self.sampler = EpochBatches(self.train_idx, opts.batch_size, self.steps_per_epoch,
                                    opts.seed, self.procs.rank, self.procs.world)
        workers = opts.workers if opts.workers is not None else \
            (min(12, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0)
        self.loader = torch.utils.data.DataLoader(
            AugmentedSlices(self.cache, opts.seed, opts.patch_size), batch_sampler=self.sampler,
            num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
            persistent_workers=workers > 0)

    # --- the loop -------------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> TrainResult:
        self.set_up()
        cache = self.cache
        self.progress.event(
            "start", cases=cache.n_cases, slices=len(cache), train_slices=len(self.train_idx),
            val_slices=len(self.val_idx), params=count_parameters(self.model),
            device=str(self.device), world_size=self.procs.world, epochs=self.opts.epochs,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total,
            resumed_at=self.step if self.resumed else None)
        if install_signals:
            self.stop.install()
        for epoch in range(self.epochs_done, self.opts.epochs):
            if not self.train_epoch(epoch) or self.end_epoch(epoch):
                return self.on_interrupt()
        return self.finish()

    def train_epoch(self, epoch: int) -> bool:
        """The epoch's steps (from where a resumed run stopped); False when stopped."""
        self.progress.event("epoch", epoch=epoch + 1, epochs=self.opts.epochs)
        self.sampler.set_epoch(epoch, self.step - epoch * self.steps_per_epoch)
        self._epoch_started = time.monotonic()
        for batch in self.loader:
            if self.train_step(batch, epoch):
                return False
        return True

    def train_step(self, batch, epoch: int) -> bool:
        """One optimiser step; True when any process was asked to stop."""
        lr = self.opts.lr * lr_factor(self.step, self.total, self.warmup)
        loss = train_step(self.net, self.optimizer, batch, self.device, lr, self.anomaly_loss)
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step, float(loss))
        loss, stopping = self.procs.agree(loss, self.stop.is_set())
        self.progress.step(self.step, self.total, loss=round(loss, 6), lr=lr, epoch=epoch + 1)
        return stopping

    def end_epoch(self, epoch: int) -> bool:
        """Validate, save best.pt and last.pt (rank 0); True when any process was asked to
        stop meanwhile."""
        self.epochs_done = epoch + 1
        record = {"epoch": self.epochs_done, "step": self.step,
                  "seconds": round(time.monotonic() - self._epoch_started, 2)}
        if self.procs.main:
            self.validate_and_save(record)
            self.history.append(record)
            self.save_last()
        self.procs.barrier()
        _, stopping = self.procs.agree(torch.zeros((), device=self.device), self.stop.is_set())
        return stopping

    def validate_and_save(self, record: dict) -> None:
        """Validation into `record`; best.pt when the epoch scores best (selection_score)."""
        auroc, dice, self.threshold = validate(self.model, self.val, self.device,
                                               self.opts.batch_size, self.voxel_score)
        record.update(auroc=auroc, dice=dice, threshold=self.threshold)
        self.progress.event("validation", epoch=self.epochs_done, auroc=auroc, dice=dice,
                            threshold=self.threshold)
        score = selection_score(auroc)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_auroc = score, auroc
            save_checkpoint(self.best_path, _cpu(self.model.state_dict()),
                            self.config({"epoch": self.epochs_done, "step": self.step,
                                         "val_auroc": auroc, "val_dice": dice}))
            self.progress.event("checkpoint", path=str(self.best_path), best=True)

    def save_last(self) -> None:
        """The complete run state, so that --resume continues bit for bit."""
        device = self.device
        state = {"options": self._run_settings(), "step": self.step,
                 "epochs_done": self.epochs_done, "best_auroc": self.best_auroc,
                 "best_score": self.best_score, "history": self.history,
                 "optimizer": _cpu(self.optimizer.state_dict()),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        save_checkpoint(self.last_path, _cpu(self.model.state_dict()),
                        self.config({"step": self.step, "epochs_done": self.epochs_done}), state)
        self.progress.event("checkpoint", path=str(self.last_path), best=False)

    def on_interrupt(self) -> TrainResult:
        """Save last.pt (rank 0) and report where to resume."""
        self.stop.request(self.stop.signum or signal.SIGTERM)
        if self.procs.main:
            self.save_last()
        name = signal.Signals(self.stop.signum).name
        self.progress.event("interrupted", f"{name}: stopped after step {self.step}/"
                            f"{self.total}; resume with --resume (state in {self.last_path})",
                            signal=name, step=self.step, path=str(self.last_path))
        return TrainResult(self.best_path, self.last_path, self.best_auroc, self.step,
                           self.stop.signum, self.history)

    def finish(self) -> TrainResult:
        warning = threshold_warning(self.history) if self.procs.main else None
        if warning:
            self.progress.log(warning, level="warning")
        self.progress.event("done", best_auroc=self.best_auroc, steps=self.step,
                            paths={"best": str(self.best_path), "last": str(self.last_path)})
        return TrainResult(self.best_path, self.last_path, self.best_auroc, self.step, None,
                           self.history)

    # --- what the checkpoints hold --------------------------------------------------------
    def _run_settings(self) -> dict:
        return {k: getattr(self.opts, k) for k in RUN_KEYS}

    def config(self, extra: dict) -> dict:
        """A checkpoint's config: the model, its input and score, and the training run."""
        cache = self.cache
        summary = {"cases": cache.n_cases, "slices": len(cache),
                   "train_slices": len(self.train_idx), "val_slices": len(self.val_idx),
                   "skipped": len(cache.skipped)}
        return {"model": self.model.config, "input_size": self.opts.size,
                "intensity_window": list(HU_WINDOW), "score": self.voxel_score,
                "threshold": self.threshold,
                "training": {**self._run_settings(), **summary,
                             "steps_per_epoch": self.steps_per_epoch,
                             "world_size": self.procs.world, "device": self.device.type,
                             **extra}}
