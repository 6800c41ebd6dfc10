"""scripts/export_default_model.py: what the shipped model's config says about its origin."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export_default_model",
                                               ROOT / "scripts" / "export_default_model.py")
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)


def _config(init_from):
    return {"model": {"width": 16}, "training": {"seed": 0, "init_from": init_from}}


def test_a_start_model_inside_the_repository_is_named_relative_to_it():
    start = ROOT / "output" / "default-model" / "start.pt"
    config = export._without_machine_paths(_config(str(start)))
    assert config["training"] == {"seed": 0, "init_from": "output/default-model/start.pt"}
    assert config["model"] == {"width": 16}


def test_other_start_models_are_left_as_given(tmp_path):
    for given in (str(tmp_path / "start.pt"), "output/default-model/start.pt", None):
        assert export._without_machine_paths(_config(given)) == _config(given)
    assert export._without_machine_paths({"model": {}}) == {"model": {}}
