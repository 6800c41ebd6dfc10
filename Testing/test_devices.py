"""The Device line: GPU name and free memory from nvidia-smi (a real subprocess of a stand-in
nvidia-smi here: the test machine has no GPU), and what each choice will run on."""
from __future__ import annotations

import sys

import pytest

from EmphysemaUADLib import devices
from EmphysemaUADLib.devices import Gpu, describe, nvidia_gpus, parse_nvidia_smi

SMI_OUTPUT = ("0, NVIDIA H100 80GB HBM3, 79250, 81559\n"
              "1, NVIDIA RTX A6000, 1024, 49140\n"
              "garbage line\n")


def test_parse_nvidia_smi():
    gpus = parse_nvidia_smi(SMI_OUTPUT)
    assert gpus == [Gpu(0, "NVIDIA H100 80GB HBM3", 79250.0, 81559.0),
                    Gpu(1, "NVIDIA RTX A6000", 1024.0, 49140.0)]
    assert gpus[0].describe() == "GPU 0: NVIDIA H100 80GB HBM3, 77.4 of 79.6 GiB free"
    assert parse_nvidia_smi("0, Tesla, PCIe, 100, 200") == [Gpu(0, "Tesla, PCIe", 100, 200)]
    assert parse_nvidia_smi("") == []


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for nvidia-smi")
def test_nvidia_smi_is_asked_for_name_and_free_memory(tmp_path, monkeypatch):
    asked = tmp_path / "asked"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho \"$@\" > {asked}\nprintf '{SMI_OUTPUT}'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus = nvidia_gpus()
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA RTX A6000"]
    assert asked.read_text().split() == devices.NVIDIA_SMI_QUERY
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert nvidia_gpus() is None  # a broken driver: no GPUs known, no exception
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert nvidia_gpus() is None


def test_descriptions(monkeypatch):
    h100 = parse_nvidia_smi(SMI_OUTPUT)
    assert describe("auto", h100, True) == \
        "GPU 0: NVIDIA H100 80GB HBM3, 77.4 of 79.6 GiB free (+1 more)."
    assert describe("cuda", h100[:1], True) == "GPU 0: NVIDIA H100 80GB HBM3, 77.4 of 79.6 GiB free."
    assert describe("cpu", h100, True).startswith("CPU (chosen)")
    with monkeypatch.context() as m:
        m.setattr(devices, "torch_sees_cuda", lambda: None)  # no torch in Slicer yet
        assert "PyTorch is not installed" in describe("auto", [], None)
    assert "cannot use it" in describe("auto", h100, False)  # CPU build of torch on a GPU box
    assert "runs on the CPU" in describe("auto", [], False)
    assert "'cuda' will fail" in describe("cuda", [], False)
    assert "name and free memory unknown" in describe("auto", [], True)


def test_this_machine_is_described():
    text = describe("auto")  # real lookups: no GPU and a CPU torch here
    assert text.endswith(".") and len(text) > 20
