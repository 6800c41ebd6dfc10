"""Self-supervised training: samples, schedule, one step, the CLI run with JSON progress,
resume, interrupt by SIGINT, and DDP over two CPU processes."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from EmphysemaUADLib import cli
from EmphysemaUADLib.checkpoint import load_checkpoint, load_model
from EmphysemaUADLib.network import EDLNet
from EmphysemaUADLib.phantom import make_phantom, write_phantom
from EmphysemaUADLib.progress import Progress
from EmphysemaUADLib.training import (AugmentedSlices, EpochBatches, StopFlag, TrainOptions,
                                      augment, compute_loss, lr_factor, scale_lung_density,
                                      threshold_warning, train, train_step)
from EmphysemaUADLib.training_data import SliceCache, build_slice_cache, cases_below

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--size", "64", "--patch-size", "32", "--batch-size", "4",
        "--steps-per-epoch", "2", "--device", "cpu", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    root = tmp_path_factory.mktemp("healthy")
    for seed in (11, 12, 13):
        write_phantom(make_phantom(seed, shape=(12, 64, 64), spacing=(5.0, 4.0, 4.0),
                                   noise=15.0), root / f"case{seed}.nii.gz")
    return root


@pytest.fixture(scope="module")
def cache_dir(healthy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_slice_cache(cases_below(healthy), folder, size=64)
    return folder


def options(healthy, cache_dir, output, **changes) -> TrainOptions:
    base = dict(healthy=[str(healthy)], output=str(output), epochs=2, width=4, batch_size=4,
                size=64, patch_size=32, steps_per_epoch=2, device="cpu",
                cache_dir=str(cache_dir), workers=0)
    return TrainOptions(**{**base, **changes})


def run_cli(args) -> tuple[int, list[dict]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", *map(str, args)])
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


# --- samples and schedule -----------------------------------------------------------------
def test_augment_is_seeded_and_swaps_spacing_on_rotation(cache_dir):
    cache = SliceCache.open(cache_dir)
    hu, lungs = cache.hu[5].astype(np.float32), cache.lungs(5)
    a = augment(hu, lungs, (4.0, 2.0), np.random.default_rng(3), patch_size=32)
    b = augment(hu, lungs, (4.0, 2.0), np.random.default_rng(3), patch_size=32)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == a[1].shape == (32, 32) and a[1].any()  # patch centred on lung
    spacings = {augment(hu, lungs, (4.0, 2.0), np.random.default_rng(s))[2] for s in range(40)}
    assert spacings == {(4.0, 2.0), (2.0, 4.0)}


@pytest.mark.parametrize("factor", [2 / 3, 3 / 2])
def test_lung_density_scaling_keeps_air_vessels_and_order(factor):
    hu = np.linspace(-1100.0, 300.0, 2801, dtype=np.float32)
    out = scale_lung_density(hu, factor)
    assert out.dtype == np.float32
    untouched = (hu <= -1000) | (hu >= -400)  # air, vessels, walls
    np.testing.assert_array_equal(out[untouched], hu[untouched])
    parenchyma = (hu > -1000) & (hu <= -600)  # tissue fraction scaled
    np.testing.assert_allclose(out[parenchyma] + 1000, factor * (hu[parenchyma] + 1000),
                               atol=1e-3)
    assert np.all(np.diff(out) >= 0)  # no two values swap order


def test_dataset_samples_are_deterministic_per_key(cache_dir):
    data = AugmentedSlices(SliceCache.open(cache_dir), seed=5, patch_size=None)
    x, target, mask = data[(0, 3, 7)]
    assert x.shape == target.shape == mask.shape == (1, 64, 64)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    for again, first in zip(data[(0, 3, 7)], (x, target, mask)):
        assert torch.equal(again, first)
    assert not torch.equal(data[(1, 3, 7)][1], target)  # another epoch, another augmentation
    # lesions: only where the mask says, darker than the clean target
    many = [data[(0, p, 7)] for p in range(12)]
    with_lesion = [s for s in many if s[2].sum() > 0]
    assert len(with_lesion) >= 6  # p = 0.9
    for x, target, mask in with_lesion:
        inside = mask.bool()
        assert float((x - target)[inside].mean()) < 0


def test_epoch_batches_share_and_skip():
    indices = np.arange(10, 20)
    one = EpochBatches(indices, 4, steps=5, seed=1)
    full = list(one)
    assert len(full) == 5 and all(len(b) == 4 for b in full)
    flat = [k[2] for b in full for k in b]
    assert set(flat[:10]) == set(indices.tolist())  # a permutation before any repeat
    assert [k[1] for b in full for k in b] == list(range(20))  # positions are unique
    one.set_epoch(0, start=3)
    assert list(one) == full[3:]
    ranks = [EpochBatches(indices, 2, steps=5, seed=1, rank=r, world=2) for r in (0, 1)]
    merged = [a + b for a, b in zip(*ranks)]
    assert merged == full
    one.set_epoch(1)
    assert list(one) != full


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] < 0.01 and lr_factor(0, 5, 0) == pytest.approx(1.0)


def test_threshold_warning_only_for_a_best_epoch_that_flags_nothing():
    def epoch(auroc, dice):
        return {"auroc": auroc, "dice": dice, "threshold": 0.5}

    # the best checkpoint is the first epoch with the highest AUROC: here Dice 0 -> warn
    collapsed = [epoch(0.9, 0.6), epoch(0.997, 0.0), epoch(0.997, 0.8)]
    message = threshold_warning(collapsed)
    assert "AUROC 0.997" in message and "Dice 0.000" in message and "--seed" in message
    assert threshold_warning([epoch(0.9, 0.0), epoch(0.99, 0.5)]) is None
    assert threshold_warning([epoch(None, None)]) is None and threshold_warning([]) is None


def test_one_step_reduces_the_loss_on_a_fixed_batch(cache_dir):
    torch.manual_seed(0)
    data = AugmentedSlices(SliceCache.open(cache_dir), seed=0, patch_size=32)
    batch = [torch.stack(t) for t in zip(*(data[(0, p, p + 4)] for p in range(4)))]
    model = EDLNet(width=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-5)
    cpu = torch.device("cpu")
    for kind in ("mse", "bce"):
        before = train_step(model, optimizer, batch, cpu, 1e-3, kind)
        model.train()
        with torch.no_grad():
            after = compute_loss(model, *batch, kind)
        assert float(after) < float(before), kind


# --- whole runs ---------------------------------------------------------------------------
def test_cli_run_json_progress_and_checkpoints(healthy, cache_dir, tmp_path, capsys):
    code, lines = run_cli([healthy, "--output", tmp_path / "model", "--epochs", "2",
                           "--progress", "json", "--cache-dir", cache_dir, *TINY])
    assert code == 0
    kinds = [e["event"] for e in lines]
    for kind in ("start", "epoch", "step", "validation", "checkpoint", "done"):
        assert kind in kinds, kind
    start = lines[kinds.index("start")]
    assert start["cases"] == 3 and start["params"] > 0 and start["device"] == "cpu"
    steps = [e for e in lines if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and steps[0]["total"] == 4
    assert all(np.isfinite(e["loss"]) and e["lr"] > 0 for e in steps)
    assert {"eta_s"} <= set(steps[-1])
    validations = [e for e in lines if e["event"] == "validation"]
    assert len(validations) == 2 and all(0 <= e["auroc"] <= 1 for e in validations)
    done = lines[-1]
    assert done["event"] == "done" and done["best_auroc"] == max(e["auroc"] for e in validations)
    model, config = load_model(done["paths"]["best"])
    assert config["model"]["width"] == 4 and config["input_size"] == [64, 64]
    assert config["training"]["val_auroc"] == done["best_auroc"]
    assert model(torch.zeros(1, 1, 32, 48))[1].shape == (1, 1, 32, 48)
    last = load_checkpoint(tmp_path / "model" / "last.pt").training_state
    assert last["step"] == 4 and last["epochs_done"] == 2

    # a second run into the same folder must not overwrite it silently
    code, lines = run_cli([healthy, "--output", tmp_path / "model", "--progress", "json",
                           "--cache-dir", cache_dir, *TINY])
    # JSON is for GUIs: the message names the setting; a terminal gets the flag
    assert code == 2 and lines[-1]["event"] == "error" and \
        "continue it with resume" in lines[-1]["message"]
    assert cli.main(["train", str(healthy), "--output", str(tmp_path / "model"),
                     "--cache-dir", str(cache_dir), *TINY]) == 2
    assert "continue it with --resume, or choose another --output folder" in \
        capsys.readouterr().err


def test_error_event_when_no_case_is_usable(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"garbage")
    code, lines = run_cli([tmp_path / "in", "--output", tmp_path / "m", "--progress", "json",
                           *TINY])
    assert code == 2 and lines[-1]["event"] == "error"
    assert "no usable training CT" in lines[-1]["message"]
    assert not (tmp_path / "m" / "last.pt").exists()


@pytest.mark.parametrize("bad, message", [
    (["--patch-size", "40"], "--patch-size must be a multiple of 16"),
    (["--size", "100"], "--size must be a multiple of 16"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be a positive number")])
def test_bad_options_are_input_errors(healthy, tmp_path, capsys, bad, message):
    assert cli.main(["train", str(healthy), "--output", str(tmp_path / "m"), *TINY, *bad]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_resume_reproduces_the_next_step(healthy, cache_dir, tmp_path):
    quiet = Progress("none")
    losses = {}
    train(options(healthy, cache_dir, tmp_path / "a"), quiet,
          on_step=lambda s, loss: losses.setdefault(s, loss))

    stop = StopFlag()

    def interrupt_after_three(step, loss):
        if step == 3:
            stop.request(signal.SIGINT)

    first = train(options(healthy, cache_dir, tmp_path / "b"), quiet, stop=stop,
                  on_step=interrupt_after_three)
    assert first.interrupted_by == signal.SIGINT and first.exit_code == 130 and first.steps == 3
    resumed, stream = {}, io.StringIO()
    result = train(options(healthy, cache_dir, tmp_path / "b", resume=True, epochs=1),
                   Progress("json", stream=stream),
                   on_step=lambda s, loss: resumed.setdefault(s, loss))
    assert list(resumed) == [4] and result.interrupted_by is None
    warning = json.loads(stream.getvalue().splitlines()[0])  # the run's own settings win
    assert warning["level"] == "warning" and "--epochs 1 (run: 2)" in warning["message"]
    assert resumed[4] == pytest.approx(losses[4], abs=1e-6)
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, rtol=0, atol=1e-6)


def test_resume_with_more_epochs_trains_a_finished_run_longer(healthy, cache_dir, tmp_path):
    quiet = Progress("none")
    first = train(options(healthy, cache_dir, tmp_path / "m", epochs=1), quiet)
    assert first.steps == 2
    steps, stream = [], io.StringIO()
    longer = train(options(healthy, cache_dir, tmp_path / "m", resume=True, epochs=2),
                   Progress("json", stream=stream), on_step=lambda s, loss: steps.append(s))
    assert steps == [3, 4] and longer.steps == 4
    assert any("extending the run from 1 to 2 epochs" in line
               for line in stream.getvalue().splitlines())
    state = load_checkpoint(tmp_path / "m" / "last.pt").training_state
    assert state["epochs_done"] == 2 and state["options"]["epochs"] == 2


def test_init_from_starts_with_the_given_network_and_weights(healthy, cache_dir, tmp_path):
    quiet = Progress("none")
    train(options(healthy, cache_dir, tmp_path / "base", width=6), quiet)
    start = load_checkpoint(tmp_path / "base" / "best.pt")
    first = {}

    def weights_before_first_step(step, loss):
        first.setdefault(step, loss)

    stream = io.StringIO()
    # width 4 asked for; the checkpoint's width 6 wins and is reported
    result = train(options(healthy, cache_dir, tmp_path / "tuned", epochs=1,
                           init_from=str(tmp_path / "base" / "best.pt")),
                   Progress("json", stream=stream), on_step=weights_before_first_step)
    assert any("width 6" in json.loads(line).get("message", "")
               for line in stream.getvalue().splitlines())
    tuned = load_checkpoint(result.last_path)
    assert tuned.config["model"]["width"] == 6
    assert tuned.config["training"]["init_from"] == str(tmp_path / "base" / "best.pt")
    # a fine-tune starts from the weights, not from a fresh network: its first loss is the
    # loss of the starting model, below a fresh network's on the same first batch
    fresh = {}
    train(options(healthy, cache_dir, tmp_path / "fresh", epochs=1, width=6), quiet,
          on_step=lambda s, loss: fresh.setdefault(s, loss))
    assert first[1] < fresh[1]
    assert any(not torch.equal(tuned.state_dict[k], v) for k, v in start.state_dict.items())


def test_init_from_a_missing_model_is_an_input_error(healthy, tmp_path, capsys):
    assert cli.main(["train", str(healthy), "--output", str(tmp_path / "m"), *TINY,
                     "--init-from", str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err


def test_stop_flag_signals():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        stop.signum = None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigint_saves_a_resumable_state(healthy, cache_dir, tmp_path):
    model_dir = tmp_path / "model"
    args = [healthy, "--output", model_dir, "--epochs", "3", "--progress", "json",
            "--cache-dir", cache_dir, *TINY]
    process = subprocess.Popen([sys.executable, "-m", "EmphysemaUADLib", "train", *map(str, args)],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for raw in process.stdout:
            lines.append(json.loads(raw))
            if lines[-1]["event"] == "step":
                process.send_signal(signal.SIGINT)
                break
        rest, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    lines += [json.loads(line) for line in rest.splitlines()]
    assert process.returncode == 130, errors
    stopped = [e for e in lines if e["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGINT"
    assert lines[-1]["event"] == "interrupted" and "--resume" in lines[-1]["message"]
    state = load_checkpoint(model_dir / "last.pt").training_state
    assert state["step"] == stopped[0]["step"] < 6
    assert not list(model_dir.glob(".*.tmp"))

    code, lines = run_cli([*args, "--resume"])
    assert code == 0 and lines[-1]["event"] == "done"
    steps = [e["step"] for e in lines if e["event"] == "step"]
    assert steps == list(range(state["step"] + 1, 7))


def test_ddp_two_cpu_processes(healthy, cache_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", "-m", "EmphysemaUADLib", "train", str(healthy), "--output",
         str(tmp_path / "ddp"), "--epochs", "1", "--progress", "json", "--cache-dir",
         str(cache_dir), *TINY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # a rank's own error comes first; the launcher's summary of it last
    assert run.returncode == 0, run.stderr[:3000] + "\n...\n" + run.stderr[-1000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    start = next(e for e in lines if e["event"] == "start")
    assert start["world_size"] == 2
    assert [e["step"] for e in lines if e["event"] == "step"] == [1, 2]  # rank 0 only
    assert sum(e["event"] == "done" for e in lines) == 1
    assert load_checkpoint(tmp_path / "ddp" / "best.pt").config["training"]["world_size"] == 2
    assert time.monotonic() - started < 90
