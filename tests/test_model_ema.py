"""ModelEMA: the update against the textbook formula, swapping, state round trips, tensor selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ema import CheckpointError, ConfigError, EMAConfig, ModelEMA


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)  # float buffers (running stats) and an int buffer (num_batches_tracked)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _train_steps(model, steps, seed=0):
    """Yield after each optimizer step of a small regression."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        yield


def _float_state(model):
    return {k: v.detach().double().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


@pytest.mark.parametrize(
    "cfg",
    [
        EMAConfig(decay=0.9),
        EMAConfig(decay=0.8, update_every=3),
        EMAConfig(decay=0.9, start_step=4),
        EMAConfig(half_life=3, warmup=True, power=0.75),
        EMAConfig(sigma_rel=0.1),
        EMAConfig(sigma_rel=0.1, update_every=2),
    ],
    ids=["decay", "update_every", "start_step", "warmup", "sigma_rel", "sigma_rel_every2"],
)
def test_update_matches_reference(cfg):
    torch.manual_seed(0)
    model = Net()
    ema = ModelEMA(model, cfg)
    ref = _float_state(model)
    for step, _ in enumerate(_train_steps(model, 12), start=1):
        ema.update()
        cur = _float_state(model)
        # The reference, written from the definitions in the docs rather than from EMAConfig.decay_at.
        if step <= cfg.start_step:
            ref = cur
            continue
        t = step - cfg.start_step
        if t % cfg.update_every:
            continue
        k = cfg.update_every
        if cfg.sigma_rel is not None:
            beta = (1 - k / t) ** (cfg.gamma + 1)
        elif cfg.warmup:
            base = 0.5 ** (1 / cfg.half_life)
            beta = min(base, 1 - (1 + (t - 1) / cfg.inv_gamma) ** -cfg.power) ** k
        else:
            beta = cfg.decay**k
        ref = {n: beta * ref[n] + (1 - beta) * cur[n] for n in ref}
    got = ema.state_dict()["tensors"]
    for name, value in ref.items():
        assert torch.allclose(got[name].double(), value, atol=1e-6, rtol=0), name
    # The integer buffer is copied, not averaged.
    assert torch.equal(got["bn.num_batches_tracked"], model.bn.num_batches_tracked)
    assert got["fc1.weight"].dtype == torch.float32


def test_swapped_restores_raw_weights_even_on_exception():
    model = Net()
    ema = ModelEMA(model, decay=0.5)
    for _ in _train_steps(model, 3):
        ema.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema_vals = {k: v.clone() for k, v in ema.state_dict()["tensors"].items()}
    with pytest.raises(RuntimeError, match="boom"), ema.swapped() as m:
        assert m is model
        for name, value in ema_vals.items():
            assert torch.equal(model.state_dict()[name], value), name
        raise RuntimeError("boom")
    for name, value in raw.items():
        assert torch.equal(model.state_dict()[name], value), name
    # And the EMA itself survived the round trip bit for bit.
    for name, value in ema.state_dict()["tensors"].items():
        assert torch.equal(value, ema_vals[name]), name


def test_swapped_with_bf16_model_keeps_fp32_ema():
    model = Net().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update()
    before = ema.shadow[0].clone()
    raw = model.fc1.weight.detach().clone()
    with ema.swapped():
        assert torch.equal(model.fc1.weight, before.to(torch.bfloat16))
    assert torch.equal(model.fc1.weight, raw)
    assert torch.equal(ema.shadow[0], before) and ema.shadow[0].dtype == torch.float32


def test_copy_to_and_state_dict_round_trip():
    model = Net()
    ema = ModelEMA(model, decay=0.7)
    for _ in _train_steps(model, 5):
        ema.update()
    state = ema.state_dict()
    other = Net()
    ema2 = ModelEMA(other, decay=0.7)
    ema2.load_state_dict(state)
    assert ema2.step == 5 and ema2.num_updates == 5
    for a, b in zip(ema.shadow, ema2.shadow):
        assert torch.equal(a, b)
    ema.copy_to(other)
    assert torch.equal(other.fc2.bias, ema.shadow[ema.names.index("fc2.bias")])


def test_named_tensors_pairs_each_ema_tensor_with_its_weight():
    """Each EMA tensor comes with its name, the model's own tensor (the same storage) and its kind: the float
    parameters and running statistics averaged, the integer batch counter copied."""
    from hf_ema import TensorKind

    model = Net()
    ema = ModelEMA(model, decay=0.5)
    for _ in _train_steps(model, 2):
        ema.update()
    tensors = list(ema.named_tensors())
    model_state = model.state_dict(keep_vars=True)
    assert sorted(t.name for t in tensors) == sorted(model_state)  # every tensor once
    for t in tensors:
        assert t.live.data_ptr() == model_state[t.name].data_ptr() and t.live.shape == model_state[t.name].shape
        expected = TensorKind.AVERAGED if model_state[t.name].is_floating_point() else TensorKind.COPIED
        assert t.kind is expected and t.averaged == (expected is TensorKind.AVERAGED)
    assert [t.name for t in tensors if not t.averaged] == ["bn.num_batches_tracked"] == [tensors[-1].name]
    assert torch.equal(dict((t.name, t.ema) for t in tensors)["bn.num_batches_tracked"], torch.tensor(2))
    assert [t.name for t in ema.named_tensors(include_copied=False)] == [t.name for t in tensors if t.averaged]


def test_copy_to_another_model_without_a_tensor_names_it():
    ema = ModelEMA(Net())
    other = nn.Sequential()
    other.fc1 = nn.Linear(6, 8)
    with pytest.raises(
        CheckpointError, match=r"`model` lacks 7 EMA tensors, e.g. \['bn.weight', 'bn.bias', 'fc2.weight'\]"
    ):
        ema.copy_to(other)


def test_load_state_dict_rejects_mismatch():
    ema = ModelEMA(Net())
    state = ema.state_dict()
    state["tensors"] = dict(state["tensors"])
    state["tensors"]["fc1.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="'fc1.weight' has shape"):
        ema.load_state_dict(state)
    del state["tensors"]["fc1.weight"]
    with pytest.raises(CheckpointError, match="lacks 1 of"):
        ema.load_state_dict(state)


def test_selection_include_exclude_and_trainable_only():
    model = Net()
    model.fc1.weight.requires_grad_(False)
    ema = ModelEMA(model, include=[r"^fc"], exclude=[r"bias$"])
    assert ema.names == ["fc1.weight", "fc2.weight"]
    ema = ModelEMA(model, trainable_only=True)
    assert "fc1.weight" not in ema.names and "bn.running_mean" not in ema.names
    with pytest.raises(ConfigError, match="`include` pattern 'nothing_here' matches no tensor"):
        ModelEMA(model, include=["nothing_here"])
    with pytest.raises(ConfigError, match="no tensor left to average"):
        ModelEMA(model, include=["fc1"], exclude=["fc1"])


def test_tied_weights_averaged_once(tiny_model):
    ema = ModelEMA(tiny_model)
    assert "model.embed_tokens.weight" in ema.names
    assert "lm_head.weight" not in ema.names
    assert ema.selection.aliases["model.embed_tokens.weight"] == ["lm_head.weight"]


def test_update_every_skips_and_reports():
    model = Net()
    ema = ModelEMA(model, decay=0.9, update_every=2)
    changed = [ema.update() for _ in range(4)]
    assert changed == [False, True, False, True]
    assert ema.num_updates == 2


def test_swapped_is_reentrant_and_update_inside_is_refused():
    from hf_ema import StateError

    model = Net()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update()
    raw = model.fc1.weight.detach().clone()
    with ema.swapped():
        in_ema = model.fc1.weight.detach().clone()
        with ema.swapped():  # nested: still the EMA, not the raw weights swapped back
            assert torch.equal(model.fc1.weight, in_ema)
        assert torch.equal(model.fc1.weight, in_ema)
        with pytest.raises(StateError, match="inside `swapped\\(\\)`"):
            ema.update()
    assert torch.equal(model.fc1.weight, raw) and not ema.is_swapped
