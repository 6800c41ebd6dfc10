"""EDLNet: shapes, the published parameter counts, gradients (and the published detach bug)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from EmphysemaUADLib.network import EDLNet, build_model, count_parameters


def meta_count(**settings) -> int:
    # Parameters are counted without allocating or running the 30 M model.
    with torch.device("meta"):
        return count_parameters(EDLNet(**settings))


def grad_parameters(model: EDLNet, x: torch.Tensor) -> dict[str, int]:
    """Sizes of the parameters that get a non-zero gradient from one loss on x."""
    recon, logit = model(x)
    (recon.square().mean() + logit.square().mean()).backward()
    return {name: p.numel() for name, p in model.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 64, 48), (3, 1, 96, 128)])
def test_outputs_have_the_input_size(shape):
    model = EDLNet(width=4).eval()
    with torch.inference_mode():
        recon, logit = model(torch.rand(shape))
    assert recon.shape == logit.shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(recon).all() and torch.isfinite(logit).all()


def test_two_input_channels():
    recon, logit = EDLNet(width=2, in_channels=2).eval()(torch.rand(1, 2, 32, 32))
    assert recon.shape == logit.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("size", [(60, 64), (64, 40), (8, 8)])
def test_size_not_a_multiple_of_16_is_refused(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        EDLNet(width=2)(torch.rand(1, 1, *size))


def test_published_parameter_counts_at_width_64():
    with_scrb = meta_count(width=64)
    without = meta_count(width=64, scrb=False)
    assert abs(with_scrb - 30.2e6) / 30.2e6 < 0.02, with_scrb
    assert abs(without - 40.4e6) / 40.4e6 < 0.02, without


def test_switches_change_the_parameter_count():
    full = meta_count(width=8)
    assert meta_count(width=8, scrb=False) > full  # the plain 16w bottleneck is the heavier
    assert meta_count(width=8, gate=False) < full  # only the gates' 1x1 convs go
    assert meta_count(width=8, detach_fusion=True) == full


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = EDLNet(width=4).train()
    trained = grad_parameters(model, torch.rand(2, 1, 64, 64))
    untrained = [n for n, _ in model.named_parameters() if n not in trained]
    assert untrained == []


def test_detached_fusion_leaves_most_weights_untrained():
    torch.manual_seed(0)
    model = EDLNet(width=4, detach_fusion=True).train()
    trained = grad_parameters(model, torch.rand(2, 1, 64, 64))
    # Only the first encoder block, the last up-step's gate and convs and the head learn.
    blocks = {".".join(name.split(".")[:2]) for name in trained}
    assert blocks <= {"down.0", "ups.3", "head.weight", "head.bias"}, blocks
    assert not any(n.startswith("ups.3.up.") for n in trained)
    assert sum(trained.values()) < 0.05 * count_parameters(model)


def test_detached_fusion_at_width_64_trains_the_published_quarter_million():
    # A 16x16 input keeps this 30 M-parameter forward cheap.
    torch.manual_seed(0)
    model = EDLNet(width=64, detach_fusion=True).train()
    trained = sum(grad_parameters(model, torch.rand(2, 1, 16, 16)).values())
    assert 0.24e6 < trained < 0.28e6, trained  # published: ~0.26 M of 30.2 M


def test_one_optimiser_step_reduces_the_loss():
    # Loss as published: MSE(reconstruction, clean) + MSE(sigmoid(anomaly logit), mask).
    torch.manual_seed(0)
    model = EDLNet(width=4).train()
    clean = torch.rand(4, 1, 32, 32)
    mask = (torch.rand(4, 1, 32, 32) > 0.8).float()
    x = torch.where(mask > 0, torch.zeros_like(clean), clean)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        recon, logit = model(x)
        return F.mse_loss(recon, clean) + F.mse_loss(torch.sigmoid(logit), mask)

    before = loss()
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_config_round_trip_and_refusals():
    model = EDLNet(width=4, scrb=False, gate=False)
    config = model.config
    assert config == {"architecture": "EDLNet", "width": 4, "in_channels": 1, "scrb": False,
                      "gate": False, "detach_fusion": False}
    rebuilt = build_model(config)
    assert rebuilt.config == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
    for bad, message in (({**config, "depth": 5}, "unknown EDLNet setting"),
                         ({**config, "architecture": "UNet"}, "unknown architecture"),
                         ({**config, "width": 0}, "positive integer"),
                         ({**config, "width": 4.0}, "positive integer"),
                         ({**config, "scrb": "yes"}, "true or false")):
        with pytest.raises(ValueError, match=message):
            build_model(bad)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = EDLNet(width=4).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        plain = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(plain, cl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_traces_as_one_graph():
    # fullgraph=True fails on any graph break; the eager backend keeps this fast.
    model = EDLNet(width=2).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            torch.testing.assert_close(a, b)
