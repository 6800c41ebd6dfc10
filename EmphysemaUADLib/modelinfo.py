"""What the Slicer module needs to know about a model without importing torch: where the
bundled model is, the config saved beside a checkpoint (`<stem>.json`, written by
`checkpoint.save_checkpoint`), which threshold a detection uses, and a one-line summary of
what the model was trained on and how well it did (from that config and the model card).

Importing torch inside Slicer's own process costs seconds and memory and blocks reinstalling
torch (the PyTorch extension avoids it for that reason), so nothing here imports it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "edlnet_default.pt"
DEFAULT_THRESHOLD = 0.5
MODEL_CARD_NAME = "MODEL_CARD.md"
NOT_A_DEVICE = "Research use, not a medical device."


def default_model_path() -> Path:
    """The bundled model: Resources/Models in a source checkout or Slicer install, or the
    package data of a pip install."""
    source_tree = Path(__file__).resolve().parents[1] / "Resources" / "Models"
    if (source_tree / DEFAULT_MODEL_NAME).is_file():
        return source_tree / DEFAULT_MODEL_NAME
    from importlib.resources import files
    try:
        return Path(str(files("EmphysemaUADLib.models") / DEFAULT_MODEL_NAME))
    except ModuleNotFoundError:
        # no pip install (e.g. inside Slicer) and no bundled model: the path where it would
        # be, so that loading says which file is missing
        return source_tree / DEFAULT_MODEL_NAME


def model_config(model_path) -> dict | None:
    """The config saved beside a checkpoint (`<stem>.json`); None when there is none or it
    does not parse (the checkpoint itself still holds it: the worker reads that one)."""
    if not model_path:
        return None
    path = Path(model_path)
    try:
        config = json.loads(path.with_name(path.stem + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def model_threshold(config: dict | None) -> float | None:
    value = (config or {}).get("threshold")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def site_correct_hu(config: dict | None) -> bool | None:
    """Whether a site threshold was set on scans with a shifted HU scale corrected (None: the
    model has no site threshold). Detection must read scans the same way for the threshold
    to hold; site models written before the choice was recorded were set on corrected
    scans, the default."""
    site = (config or {}).get("site_threshold")
    if not isinstance(site, dict):
        return None
    return bool(site.get("correct_hu", True))


def _threshold_source(config: dict | None) -> str:
    """How a model's threshold was set, when `site-threshold` set it."""
    site = (config or {}).get("site_threshold")
    if not isinstance(site, dict) or not site.get("scans"):
        return ""
    scans = site["scans"]
    scale = "" if site_correct_hu(config) else ", HU scale as stored"
    return f", set from {scans} healthy scan{'s' if scans != 1 else ''} of this site{scale}"


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold a detection uses: `value` is what to hand to `detect --threshold`
    (None: the model's own, read from the checkpoint by the worker); `text` says which
    applies, for the panel."""

    value: float | None
    text: str


def threshold_choice(use_model: bool, user_threshold: float,
                     config: dict | None) -> ThresholdChoice:
    """The model's threshold unless the user chose their own (`use_model` False)."""
    model = model_threshold(config)
    if use_model:
        if model is None:
            return ThresholdChoice(None, "Threshold: the model's own (stored in its "
                                         "checkpoint).")
        return ThresholdChoice(None, f"Threshold: {model:.2f}, the model's own"
                                     f"{_threshold_source(config)}.")
    own = f"Threshold: {float(user_threshold):.2f}, chosen here"
    return ThresholdChoice(float(user_threshold),
                           own + (f" (the model's: {model:.2f})." if model is not None
                                  else "."))


def model_card_path(model_path) -> Path | None:
    """The model card beside a model (the bundled model has one)."""
    if not model_path:
        return None
    card = Path(model_path).with_name(MODEL_CARD_NAME)
    return card if card.is_file() else None


def card_rows(text: str) -> dict[str, str]:
    """The `| key | value |` rows of a model card, keys as written."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == 2 and cells[0] and \
                not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[1]
    return rows


def model_summary(model_path, config: dict | None = None) -> str:
    """One short line: what the model was trained on, its measured quality (the card's rows
    whose key says "real", e.g. a real-data Dice, else the validation AUROC on synthetic
    lesions) and that it is for research. Read from the config and the model card, never
    written here, so a retrained model or a regenerated card shows its own numbers."""
    config = model_config(model_path) if config is None else config
    training = (config or {}).get("training") or {}
    parts = []
    cases = training.get("cases")
    parts.append(f"Trained on {cases} healthy CTs" if cases else "Trained on healthy CTs")
    card = model_card_path(model_path)
    rows = card_rows(card.read_text(encoding="utf-8")) if card else {}
    real = [f"{key}: {value}" for key, value in rows.items()
            if re.search(r"\breal\b", key, re.IGNORECASE)]
    if real:
        parts.append("; ".join(real))
    elif isinstance(training.get("val_auroc"), (int, float)):
        parts.append(f"validation AUROC {training['val_auroc']:.3f} on synthetic lesions")
    return ", ".join(parts) + ". " + NOT_A_DEVICE
