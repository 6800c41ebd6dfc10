"""Checkpoints: one torch file of tensors and plain values, plus a readable JSON sidecar.

The file holds {"format", "format_version", "config" (a JSON string), "state_dict",
"training_state" (optional)}. Loading goes through `torch.load(weights_only=True)` only, so
a checkpoint can never run code; whatever it holds beyond tensors and plain Python values
(dict, list, tuple, str, int, float, bool, None) is refused at save time already.
Both files are written to a temporary name in the target folder and then renamed, so a
crash never leaves a half-written checkpoint under the final name.

The config holds: "format", "format_version", "model" (EDLNet.config), "input_size"
([H, W] of the training slices), "intensity_window" (HU mapped to [0, 1]), "training" (a
summary dict, may be empty) and whatever else the caller adds (e.g. "threshold").
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, write_text_atomic
from .errors import InputError
from .intensity import HU_WINDOW
from .network import EDLNet, build_model

FORMAT = "emphysema-uad-checkpoint"
FORMAT_VERSION = 1
DEFAULT_INPUT_SIZE = (384, 384)
# Prefixes that torch.compile and DistributedDataParallel put in front of parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class Checkpoint:
    config: dict
    state_dict: dict
    training_state: dict | None


def _plain(value, where: str):
    """`value` with numpy scalars turned into Python ones; ValueError on anything that
    weights-only loading would refuse."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        for key in value:
            if type(key) not in (str, int):
                raise ValueError(f"{where} has a key of type {type(key).__name__}; "
                                 f"use str or int keys")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__name__}; a "
                     f"checkpoint holds only tensors and plain Python values (convert it)")


def _digest(state: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: torch does not check the archive's CRCs,
    so damage inside the weights would otherwise load silently."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _full_config(config: dict) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    # A bare EDLNet.config is accepted as the model part.
    full = {"model": config} if "architecture" in config else dict(config)
    if "model" not in full:
        raise ValueError("config needs a 'model' entry (EDLNet.config)")
    with torch.device("meta"):  # validates and fills in defaults without allocating weights
        full["model"] = build_model(full["model"]).config
    size = full.get("input_size", DEFAULT_INPUT_SIZE)
    full["input_size"] = [int(size)] * 2 if np.ndim(size) == 0 else [int(s) for s in size]
    window = [float(v) for v in full.get("intensity_window", HU_WINDOW)]
    if window != list(HU_WINDOW):
        raise ValueError(f"intensity window {window} differs from the one inference applies, "
                         f"{list(HU_WINDOW)}")
    full["intensity_window"] = window
    full.setdefault("training", {})
    full["format"] = FORMAT
    full["format_version"] = FORMAT_VERSION
    return full


def _architecture_mismatch(model_config: dict, state_dict: dict) -> str | None:
    """What keeps `state_dict` from loading into the model of `model_config`, or None."""
    with torch.device("meta"):
        expected = build_model(model_config).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} instead of {tuple(v.shape)}"
              for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {name} ({', '.join(items[:3])}{more})")
    return "; ".join(problems) or None


def save_checkpoint(path, model_state: dict, config: dict,
                    training_state: dict | None = None) -> Path:
    """Write the checkpoint at `path` and its config at `<stem>.json` beside it; returns
    `path`. ValueError if the weights do not fit config["model"] or something is not plain."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: a checkpoint must not end in .json (the sidecar does)")
    full = _full_config(config)
    state = {}
    for key, tensor in model_state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"model_state[{key!r}] is not a tensor")
        state[key] = tensor.detach().cpu().contiguous()
    mismatch = _architecture_mismatch(full["model"], state)
    if mismatch:
        raise ValueError(f"the weights do not fit the model config: {mismatch}")
    try:
        config_json = json.dumps(full, indent=2, default=_json_value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the config cannot be written as JSON: {exc}") from exc
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_json,
               "state_dict": state, "state_sha256": _digest(state)}
    if training_state is not None:
        payload["training_state"] = _plain(training_state, "training_state")
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    write_text_atomic(path.with_name(path.stem + ".json"), config_json + "\n")
    return path


def model_file(path) -> Path:
    """The checkpoint a path names: a file, or the folder `train` wrote (its best.pt)."""
    path = Path(path)
    if path.is_dir():
        if (path / "best.pt").is_file():
            return path / "best.pt"
        raise InputError(f"{path}: is a folder without best.pt; pass a checkpoint file (the "
                         "best.pt that `train` writes into its output folder).")
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    return path


def load_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Read and check a checkpoint; InputError with a one-line reason when it is unusable."""
    path = model_file(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an EmphysemaUAD checkpoint: it is not a PyTorch "
                         f"archive (another kind of file, or a truncated copy)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise InputError(f"cannot read the model file {path}: {exc.strerror or exc}") from exc
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({culprit.group(1)})" if culprit else ""
        raise InputError(f"{path} is not an EmphysemaUAD checkpoint: it holds Python "
                         f"objects{what} beside tensors, which are refused because loading "
                         f"them could run code") from exc
    except Exception as exc:  # torch raises several types for a damaged archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path} is a damaged or foreign archive, not a readable "
                         f"checkpoint ({first[:120]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = type(payload).__name__ if not isinstance(payload, dict) else "dict"
        raise InputError(f"{path} is a PyTorch file ({what}) but not an EmphysemaUAD "
                         f"checkpoint (no format marker {FORMAT!r})")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        advice = ("update EmphysemaUAD" if isinstance(version, int) and version > FORMAT_VERSION
                  else "re-save it with this version")
        raise InputError(f"{path} is checkpoint format version {version}; this EmphysemaUAD "
                         f"reads version {FORMAT_VERSION} only ({advice})")
    try:
        config = json.loads(payload.get("config"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: the checkpoint's config is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"{path}: the checkpoint's config has no 'model' section")
    window = config.get("intensity_window", list(HU_WINDOW))
    if window != list(HU_WINDOW):
        raise InputError(f"{path}: the model was trained with HU window {window}, but this "
                         f"version applies {list(HU_WINDOW)}")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise InputError(f"{path}: the checkpoint has no valid state_dict of tensors")
    if payload.get("state_sha256") != _digest(state):
        raise InputError(f"{path} is a corrupt checkpoint: its weights fail the checksum")
    try:
        mismatch = _architecture_mismatch(config["model"], state)
    except ValueError as exc:
        raise InputError(f"{path}: the checkpoint's model config is invalid: {exc}") from exc
    if mismatch:
        raise InputError(f"{path}: the weights do not match the architecture in its config: "
                         f"{mismatch}")
    training = payload.get("training_state")
    if training is not None and not isinstance(training, dict):
        raise InputError(f"{path}: the checkpoint's training_state is not a mapping")
    return Checkpoint(config, state, training)


def load_model(path, device="cpu") -> tuple[EDLNet, dict]:
    """The checkpoint's model, in eval mode on `device`, and its config."""
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint.config["model"])
    model.load_state_dict(checkpoint.state_dict)
    return model.to(device).eval(), checkpoint.config
