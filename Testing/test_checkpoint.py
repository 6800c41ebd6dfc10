"""Checkpoints: round trip, sidecar, training state, and every refusal on load."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from EmphysemaUADLib.checkpoint import (FORMAT, FORMAT_VERSION, _digest, load_checkpoint,
                                        load_model, save_checkpoint)
from EmphysemaUADLib.errors import InputError
from EmphysemaUADLib.intensity import HU_WINDOW
from EmphysemaUADLib.network import EDLNet


def trained_model(width: int = 4) -> EDLNet:
    """A tiny model after one training forward, so BN running statistics are not defaults."""
    torch.manual_seed(0)
    model = EDLNet(width=width).train()
    with torch.no_grad():
        model(torch.rand(2, 1, 32, 32))
    return model.eval()


def config_of(model: EDLNet, **extra) -> dict:
    return {"model": model.config, "input_size": 32, "training": {"epochs": 1}, **extra}


@pytest.fixture
def saved(tmp_path):
    model = trained_model()
    path = save_checkpoint(tmp_path / "model.pt", model.state_dict(), config_of(model))
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded, config = load_model(path)
    assert not loaded.training
    x = torch.rand(2, 1, 48, 32)
    with torch.inference_mode():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    assert config["model"] == model.config
    assert config["input_size"] == [32, 32]
    assert config["intensity_window"] == list(HU_WINDOW)
    assert config["format_version"] == FORMAT_VERSION and config["format"] == FORMAT
    assert config["training"] == {"epochs": 1}


def test_sidecar_json_holds_the_config_and_no_temp_files_remain(saved):
    _, path = saved
    sidecar = path.with_name("model.json")
    assert json.loads(sidecar.read_text()) == load_checkpoint(path).config
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.pt"]


def test_the_same_weights_give_the_same_bytes(saved, tmp_path):
    """Saving again (another folder, another temporary name) reproduces the file to the
    byte, so re-exporting the bundled model does not change it."""
    model, path = saved
    again = save_checkpoint(tmp_path / "again" / "model.pt", model.state_dict(),
                            config_of(model))
    assert again.read_bytes() == path.read_bytes()


def test_training_state_round_trip(tmp_path):
    model = trained_model()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    model(torch.rand(2, 1, 32, 32))[0].mean().backward()
    optimiser.step()
    state = {"optimizer": optimiser.state_dict(), "epoch": 3, "step": 120,
             "best_metric": np.float64(0.25), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate(),
             "numpy_rng": np.random.default_rng(1).bit_generator.state}
    # A bare model.config is accepted as the model part; extra keys are kept.
    path = save_checkpoint(tmp_path / "last.pt", model.state_dict(),
                           {**model.config}, training_state=state)
    loaded = load_checkpoint(path)
    assert loaded.config["model"] == model.config
    assert loaded.config["input_size"] == [384, 384]
    restored = loaded.training_state
    assert restored["epoch"] == 3 and restored["best_metric"] == 0.25
    assert torch.equal(restored["torch_rng"], state["torch_rng"])
    random.setstate(restored["python_rng"])
    fresh = torch.optim.AdamW(EDLNet(width=4).parameters(), lr=1.0)
    fresh.load_state_dict(restored["optimizer"])
    assert fresh.param_groups[0]["lr"] == 1e-4


def test_no_training_state_loads_as_none(saved):
    assert load_checkpoint(saved[1]).training_state is None


def test_compiled_model_prefixes_are_stripped(tmp_path):
    model = trained_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "m.pt", state, config_of(model))
    assert set(load_checkpoint(path).state_dict) == set(model.state_dict())


def test_save_refuses_what_could_not_be_loaded(tmp_path):
    model = trained_model()
    with pytest.raises(ValueError, match="do not fit"):
        save_checkpoint(tmp_path / "a.pt", model.state_dict(), {"model": {"width": 8}})
    with pytest.raises(ValueError, match=r"numpy.ndarray"):
        save_checkpoint(tmp_path / "b.pt", model.state_dict(), config_of(model),
                        training_state={"rng": np.zeros(3)})
    with pytest.raises(ValueError, match="intensity window"):
        save_checkpoint(tmp_path / "c.pt", model.state_dict(),
                        config_of(model, intensity_window=[-1024, 3071]))
    with pytest.raises(ValueError, match=".json"):
        save_checkpoint(tmp_path / "d.json", model.state_dict(), config_of(model))
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_checkpoint(saved):
    _, path = saved
    other = EDLNet(width=2)
    save_checkpoint(path, other.state_dict(), config_of(other))
    assert load_checkpoint(path).config["model"]["width"] == 2
    assert json.loads(path.with_name("model.json").read_text())["model"]["width"] == 2


def refused(path, *phrases):
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.pt", "not found", "nope.pt")


def test_truncated_file(saved, tmp_path):
    data = saved[1].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.pt", "truncated")


def test_damaged_weights_fail_the_checksum(saved, tmp_path):
    data = bytearray(saved[1].read_bytes())
    at = data.index(b"PK\x03\x04", len(data) // 2)  # damage bytes inside a stored tensor
    data[at - 64:at - 32] = bytes(b ^ 0xFF for b in data[at - 64:at - 32])
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    refused(tmp_path / "bad.pt", "corrupt", "checksum")


def test_other_files_are_not_checkpoints(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    refused(tmp_path / "tensor.pt", "not an EmphysemaUAD checkpoint", "Tensor")
    (tmp_path / "notes.pt").write_text("weights: none\n")
    refused(tmp_path / "notes.pt", "not a PyTorch archive")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)),
                    str(tmp_path / "ct.nii.gz"))
    refused(tmp_path / "ct.nii.gz", "not a PyTorch archive")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(tmp_path / "empty.pt", "not a PyTorch archive")


class Payload:
    """Any class: weights-only loading must refuse to rebuild it."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"format": FORMAT, "object": Payload()}, tmp_path / "code.pt")
    refused(tmp_path / "code.pt", "Python objects", "Payload", "could run code")


def rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_other_format_version(saved):
    _, path = saved
    rewrite(path, format_version=2)
    refused(path, "format version 2", f"version {FORMAT_VERSION} only", "update")


def test_unparsable_config(saved):
    _, path = saved
    rewrite(path, config="{model: 4,")
    refused(path, "config is not valid JSON")


def test_weights_not_matching_the_architecture(saved, tmp_path):
    model, path = saved
    state = model.state_dict()
    wide = EDLNet(width=8).state_dict()
    cases = {"missing": {k: v for k, v in state.items() if k != "head.bias"},
             "unexpected": {**state, "extra.weight": torch.zeros(1)},
             "wrong shape": {**state, "head.weight": wide["head.weight"]}}
    for problem, weights in cases.items():
        rewrite(path, state_dict=weights, state_sha256=_digest(weights))
        refused(path, "do not match the architecture", problem)


def test_invalid_model_config(saved):
    _, path = saved
    config = load_checkpoint(path).config
    config["model"]["width"] = -1
    rewrite(path, config=json.dumps(config))
    refused(path, "model config is invalid", "positive integer")
