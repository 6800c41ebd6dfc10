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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .acquisition import KERNELS, NOISE_LEVELS, add_ct_noise, apply_kernel
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import InputError
from .inference import choose_device, score_batch
from .intensity import HU_WINDOW, hu_to_unit
from .lesions import MORPHOLOGIES, random_training_lesions, synthesize_lesions
from .metrics import best_dice, binned
from .network import EDLNet, build_model, count_parameters
from .process import stop_requested
from .progress import Progress
from .training_data import SliceCache, build_slice_cache, find_all_cases

P_FLIP = 0.3  # published: flips and 90-degree rotations, p = 0.3 each
P_ROTATE = 0.3
P_KERNEL = 0.5  # re-filter with a random reconstruction kernel
P_NOISE = 0.5  # add noise of a random level (so a quarter of the samples keep neither)
WARMUP_SHARE = 0.1
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# residual cut-points tried (0.35 HU apart); strictly inside (0, 1) as detection requires
RESIDUAL_EDGES = np.linspace(0.0, 1.0, 4001)[1:-1]


@dataclass
class TrainOptions:
    healthy: list[str]
    output: str
    epochs: int = 100
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
    # per invocation, not part of the run's identity:
    device: str = "auto"
    resume: bool = False
    cache_dir: str | None = None
    workers: int | None = None

    def check(self) -> None:
        for name, flag in (("epochs", "epochs"), ("width", "width"),
                           ("batch_size", "batch-size"), ("max_val_slices", "val-slices")):
            if getattr(self, name) < 1:
                raise InputError(f"--{flag} must be at least 1 (got {getattr(self, name)}).")
        if self.size < 16 or self.size % 16:
            raise InputError(f"--size must be a multiple of 16 (got {self.size}).")
        if self.patch_size is not None and (self.patch_size < 16 or self.patch_size % 16 or
                                            self.patch_size > self.size):
            raise InputError(f"--patch-size must be a multiple of 16 and at most --size "
                             f"{self.size} (got {self.patch_size}).")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise InputError(f"--steps-per-epoch must be at least 1 (got "
                             f"{self.steps_per_epoch}).")
        if self.anomaly_loss not in ("mse", "bce"):
            raise InputError(f"--anomaly-loss must be mse or bce (got {self.anomaly_loss}).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number (got {self.lr}).")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must lie between 0 and 1 (got "
                             f"{self.val_fraction}).")


# What defines a run: on --resume these come from last.pt.
RUN_KEYS = ("epochs", "width", "batch_size", "size", "patch_size", "steps_per_epoch", "seed",
            "val_fraction", "max_val_slices", "anomaly_loss", "lr", "weight_decay", "scrb",
            "gate", "detach_fusion", "reconstruction_only")


# --- samples ------------------------------------------------------------------------------
def augment(hu: np.ndarray, lungs: np.ndarray, spacing, rng, patch_size: int | None = None):
    """A random patch (centred on a lung pixel), flips, 90-degree rotations, then a random
    reconstruction kernel and noise level. Returns (hu float32, lungs, spacing (y, x))."""
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
            if device.type == "cuda":
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


def compute_loss(model, x, target, mask, anomaly_loss: str | None = "mse"):
    """MSE(reconstruction, clean) + anomaly term (MSE of the probability, published, or BCE
    with logits; None: no anomaly term), 1:1; computed in float32 whatever the autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
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
    if device.type == "cuda":
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


def threshold_warning(history: list[dict], min_dice: float = 0.05) -> str | None:
    """A warning when the epoch saved as best.pt ranks lesion voxels but flags almost none at
    its threshold: a run can settle with every lesion probability on one value under 0.5,
    and detect would then find nothing while the AUROC looks fine."""
    validated = [r for r in history if "auroc" in r]
    if not validated:
        return None
    best = max(validated, key=lambda r: selection_score(r["auroc"]))  # first of equals
    if best["auroc"] is None or best["dice"] is None or best["dice"] >= min_dice:
        return None
    return (f"the best model ranks lesion voxels (validation AUROC {best['auroc']:.3f}) but "
            f"flags almost none at its threshold {best['threshold']:g} (validation Dice "
            f"{best['dice']:.3f}), so detect would report no emphysema; retrain with another "
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


def _resumed_options(opts: TrainOptions, saved: dict, progress) -> TrainOptions:
    """The run's saved settings; a warning for those asked for otherwise (a value left at
    its default is not taken as asked for)."""
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    changed = [k for k in RUN_KEYS if getattr(opts, k) not in (saved.get(k), defaults[k])]
    if changed:
        progress.log("resuming with the run's own settings; ignoring "
                     + ", ".join(f"--{k.replace('_', '-')} {getattr(opts, k)} (run: "
                                 f"{saved.get(k)})" for k in changed), "warning")
    values = asdict(opts)
    values.update({k: saved[k] for k in RUN_KEYS if k in saved})
    return TrainOptions(**values)


def train(opts: TrainOptions, progress: Progress | None = None, stop: StopFlag | None = None,
          on_step=None) -> TrainResult:
    """Train (or resume) the run in `opts.output`. `on_step(step, loss)` is called after
    every step with this process's loss (tests use it); `stop` is set by signals unless
    given."""
    opts.check()
    procs = _Processes(opts.device)
    progress = progress if (progress is not None and procs.main) else Progress("none")
    own_signals = stop is None
    stop = stop or StopFlag()
    try:
        return _train(opts, procs, progress, stop, on_step, own_signals)
    finally:
        stop.uninstall()
        procs.close()


def _train(opts, procs: _Processes, progress, stop: StopFlag, on_step,
           own_signals: bool) -> TrainResult:
    out = Path(opts.output)
    last_path, best_path = out / "last.pt", out / "best.pt"
    saved = None
    if opts.resume:
        if not last_path.is_file():
            raise InputError(f"{last_path}: not found; there is no run to resume in {out}.")
        saved = load_checkpoint(last_path)
        opts = _resumed_options(opts, saved.training_state["options"], progress)
    elif last_path.exists():
        raise InputError(f"{out} already holds a training run (last.pt); add --resume to "
                         "continue it, or choose another --output folder.")
    device = procs.device

    cases = find_all_cases(opts.healthy)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else out / "cache"
    if procs.main:
        cache = build_slice_cache(cases, cache_dir, opts.size, progress)
    procs.barrier()
    if not procs.main:  # the cache rank 0 just built
        cache = build_slice_cache(cases, cache_dir, opts.size)
    train_idx, val_idx = cache.split_by_case(opts.val_fraction, opts.seed)
    if cache.n_cases == 1:
        progress.log("only one usable case: validation uses contiguous blocks of its slices, "
                     "which are not independent of the training slices", "warning")
    val = validation_set(cache, val_idx, opts.seed, opts.max_val_slices) if procs.main else None

    torch.manual_seed(opts.seed)
    model = (build_model(saved.config["model"]) if saved else
             EDLNet(width=opts.width, scrb=opts.scrb, gate=opts.gate,
                    detach_fusion=opts.detach_fusion))
    voxel_score = "residual" if opts.reconstruction_only else "anomaly"
    anomaly_loss = None if opts.reconstruction_only else opts.anomaly_loss
    threshold = 0.5  # of the anomaly probability; a residual's comes from validation
    if saved:
        model.load_state_dict(saved.state_dict)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = model
    if procs.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)

    per_step = opts.batch_size * procs.world
    steps_per_epoch = opts.steps_per_epoch or max(1, math.ceil(len(train_idx) / per_step))
    total = opts.epochs * steps_per_epoch
    warmup = (max(1, round(WARMUP_SHARE * opts.epochs)) if opts.epochs > 1 else 0) \
        * steps_per_epoch
    step, epochs_done, best_auroc, best_score, history = 0, 0, None, None, []
    if saved:
        state = saved.training_state
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, epochs_done = state["step"], state["epochs_done"]
        best_auroc, history = state["best_auroc"], list(state["history"])
        best_score = state["best_score"]

    sampler = EpochBatches(train_idx, opts.batch_size, steps_per_epoch, opts.seed,
                           procs.rank, procs.world)
    workers = opts.workers if opts.workers is not None else \
        (min(12, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        AugmentedSlices(cache, opts.seed, opts.patch_size), batch_sampler=sampler,
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        persistent_workers=workers > 0)

    summary = {"cases": cache.n_cases, "slices": len(cache), "train_slices": len(train_idx),
               "val_slices": len(val_idx), "skipped": len(cache.skipped)}

    def config(extra: dict) -> dict:
        return {"model": model.config, "input_size": opts.size,
                "intensity_window": list(HU_WINDOW), "score": voxel_score,
                "threshold": threshold,
                "training": {**{k: getattr(opts, k) for k in RUN_KEYS}, **summary,
                             "steps_per_epoch": steps_per_epoch, "world_size": procs.world,
                             "device": device.type, **extra}}

    def save_last() -> None:
        state = {"options": {k: getattr(opts, k) for k in RUN_KEYS}, "step": step,
                 "epochs_done": epochs_done, "best_auroc": best_auroc,
                 "best_score": best_score, "history": history,
                 "optimizer": _cpu(optimizer.state_dict()), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        save_checkpoint(last_path, _cpu(model.state_dict()),
                        config({"step": step, "epochs_done": epochs_done}), state)
        progress.event("checkpoint", path=str(last_path), best=False)

    def interrupted() -> TrainResult:
        if procs.main:
            save_last()
        name = signal.Signals(stop.signum).name
        progress.event("interrupted", f"{name}: stopped after step {step}/{total}; resume "
                       f"with --resume (state in {last_path})", signal=name, step=step,
                       path=str(last_path))
        return TrainResult(best_path, last_path, best_auroc, step, stop.signum, history)

    progress.event("start", cases=cache.n_cases, slices=len(cache),
                   train_slices=len(train_idx), val_slices=len(val_idx),
                   params=count_parameters(model), device=str(device), world_size=procs.world,
                   epochs=opts.epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                   resumed_at=step if saved else None)
    if own_signals:
        stop.install()
    for epoch in range(epochs_done, opts.epochs):
        progress.event("epoch", epoch=epoch + 1, epochs=opts.epochs)
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        started = time.monotonic()
        for batch in loader:
            lr = opts.lr * lr_factor(step, total, warmup)
            loss = train_step(net, optimizer, batch, device, lr, anomaly_loss)
            step += 1
            if on_step is not None:
                on_step(step, float(loss))
            loss, stopping = procs.agree(loss, stop.is_set())
            progress.step(step, total, loss=round(loss, 6), lr=lr, epoch=epoch + 1)
            if stopping:
                stop.request(stop.signum or signal.SIGTERM)
                return interrupted()
        epochs_done = epoch + 1
        record = {"epoch": epochs_done, "step": step, "seconds": round(time.monotonic() -
                                                                        started, 2)}
        if procs.main:
            auroc, dice, threshold = validate(model, val, device, opts.batch_size,
                                             voxel_score)
            record.update(auroc=auroc, dice=dice, threshold=threshold)
            progress.event("validation", epoch=epochs_done, auroc=auroc, dice=dice,
                           threshold=threshold)
            score = selection_score(auroc)
            if best_score is None or score > best_score:
                best_score, best_auroc = score, auroc
                save_checkpoint(best_path, _cpu(model.state_dict()),
                                config({"epoch": epochs_done, "step": step, "val_auroc": auroc,
                                        "val_dice": dice}))
                progress.event("checkpoint", path=str(best_path), best=True)
            history.append(record)
            save_last()
        procs.barrier()
        _, stopping = procs.agree(torch.zeros((), device=device), stop.is_set())
        if stopping:
            stop.request(stop.signum or signal.SIGTERM)
            return interrupted()
    warning = threshold_warning(history) if procs.main else None
    if warning:
        progress.log(warning, level="warning")
    progress.event("done", best_auroc=best_auroc, steps=step,
                   paths={"best": str(best_path), "last": str(last_path)})
    return TrainResult(best_path, last_path, best_auroc, step, None, history)
