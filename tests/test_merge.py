"""Checkpoint merging: weights (mean, EMA, WSM), the merged values, WSM decay emulation, loading, errors, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _trainer_args import cpu_args
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from hf_ema import CheckpointError, ConfigError, EMACallback, ema_weights, merge_checkpoints, wsm_weights
from hf_ema.cli import main as cli_main
from hf_ema.demo.toy import tiny_causal_lm
from hf_ema.tools.merge import decay_multipliers

# ---------------------------------------------------------------------- pure weights


def test_wsm_weights_reference_values():
    # The weights the WSM paper gives for 5 checkpoints, oldest first (Tian et al. 2025, arXiv 2507.17634).
    assert wsm_weights(5, "cosine") == pytest.approx([0.0955, 0.25, 0.3090, 0.25, 0.0955], abs=1e-3)
    assert wsm_weights(5, "1-sqrt") == pytest.approx([0.447, 0.185, 0.142, 0.120, 0.106], abs=1e-3)
    # A linear decay is exactly the uniform mean.
    assert wsm_weights(7, "linear") == pytest.approx([1 / 7] * 7, abs=1e-12)
    # The decay shapes written out here, not read from hf_ema: the merge must scale the update between checkpoints
    # j and j + 1 by f((j + 1) / n), i.e. the merge weights after checkpoint j must sum to it (WSM's merge/decay
    # duality), and be a convex combination.
    shapes = {
        "linear": lambda x: 1 - x,
        "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
        "1-sqrt": lambda x: 1 - math.sqrt(x),
    }
    square = lambda x: (1 - x) ** 2  # noqa: E731
    for n in (2, 3, 9):
        for schedule, f in [*shapes.items(), (square, square)]:
            c = wsm_weights(n, schedule)
            expected = [f((j + 1) / n) for j in range(n - 1)]
            assert [sum(c[j + 1 :]) for j in range(n - 1)] == pytest.approx(expected, abs=1e-12)
            assert decay_multipliers(n, schedule) == pytest.approx(expected, abs=1e-12)
            assert min(c) >= 0


def test_ema_weights_follow_the_recurrence():
    n, decay = 6, 0.7
    # Run ema = decay * ema + (1 - decay) * theta_i on one-hot "checkpoints": the result holds each weight.
    basis = torch.eye(n, dtype=torch.float64)
    ema = basis[0].clone()
    for i in range(1, n):
        ema = decay * ema + (1 - decay) * basis[i]
    assert ema_weights(n, decay) == pytest.approx(ema.tolist(), abs=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wsm_weights(1, "cosine"), "n_checkpoints"),
        (lambda: wsm_weights(4, "exp"), "schedule"),
        (lambda: wsm_weights(4, lambda x: x), "non-increasing"),
        (lambda: wsm_weights(4, lambda x: 2.0), r"\[0, 1\]"),
        (lambda: ema_weights(4, 1.0), "ema_decay"),
    ],
)
def test_weight_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# ---------------------------------------------------------------------- WSM decay emulation on a toy linear model


def _save_toy(model: nn.Module, folder):
    folder.mkdir(parents=True)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "toy-linear"}))


def _toy_train(model, batches, lr, multipliers=None, every=None, save_to=None, quadratic=False):
    """SGD (no momentum) on a loss linear in the weights (or quadratic); optionally save every `every` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, (x, y) in enumerate(batches):
        if multipliers is not None:
            for group in opt.param_groups:
                group["lr"] = lr * multipliers[step]
        out = model(x)
        loss = ((out - y) ** 2).mean() if quadratic else (out * y).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if save_to is not None and (step + 1) % every == 0:
            _save_toy(model, save_to / f"checkpoint-{step + 1}")
    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine", "1-sqrt", lambda x: math.exp(-3 * x) * (1 - x)])
def test_wsm_equals_lr_decay_exactly_for_linear_loss(tmp_path, schedule):
    """With a loss linear in the weights, each SGD update does not depend on the weights, so merging the checkpoints
    of a constant-LR run with WSM weights must give exactly the weights of a run whose LR is decayed by w_j over
    the segment between checkpoints j and j+1."""
    torch.manual_seed(0)
    n_ckpt, every, lr = 5, 3, 0.05
    batches = [
        (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
        for _ in range(every * (n_ckpt - 1))
    ]
    start = nn.Linear(8, 3).double()
    _save_toy(start, tmp_path / "checkpoint-0")  # theta_0, the start of the merge window
    constant = nn.Linear(8, 3).double()
    constant.load_state_dict(start.state_dict())
    _toy_train(constant, batches, lr, every=every, save_to=tmp_path)

    w = decay_multipliers(n_ckpt, schedule)
    multipliers = [w[s // every] for s in range(len(batches))]
    decayed = nn.Linear(8, 3).double()
    decayed.load_state_dict(start.state_dict())
    _toy_train(decayed, batches, lr, multipliers=multipliers)

    folders = [tmp_path / f"checkpoint-{every * i}" for i in range(n_ckpt)]
    out = merge_checkpoints(folders, tmp_path / "merged", method="wsm", schedule=schedule, progress=False)
    merged = load_file(str(out / "model.safetensors"))
    for name, value in decayed.state_dict().items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-12)
    # And the merge really is a decay, not the last checkpoint.
    last = load_file(str(folders[-1] / "model.safetensors"))
    assert not torch.allclose(merged["weight"], last["weight"], atol=1e-3)


def test_wsm_is_first_order_for_quadratic_loss(tmp_path):
    """On a quadratic loss the updates depend on the weights: the merge matches the decayed run to first order, so
    halving the learning rate divides the gap (relative to the distance travelled) by about 2."""
    torch.manual_seed(1)
    n_ckpt, every = 5, 4
    batches = [
        (torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64))
        for _ in range(every * (n_ckpt - 1))
    ]
    init = nn.Linear(8, 3).double().state_dict()
    gaps = []
    for lr in (0.02, 0.01):
        root = tmp_path / f"lr{lr}"
        model = nn.Linear(8, 3).double()
        model.load_state_dict(init)
        _save_toy(model, root / "checkpoint-0")
        _toy_train(model, batches, lr, every=every, save_to=root, quadratic=True)
        w = decay_multipliers(n_ckpt, "cosine")
        decayed = nn.Linear(8, 3).double()
        decayed.load_state_dict(init)
        _toy_train(decayed, batches, lr, multipliers=[w[s // every] for s in range(len(batches))], quadratic=True)
        out = merge_checkpoints(
            [root / f"checkpoint-{every * i}" for i in range(n_ckpt)],
            root / "merged",
            method="wsm",
            schedule="cosine",
            progress=False,
        )
        merged = load_file(str(out / "model.safetensors"))["weight"]
        travelled = (decayed.weight.detach() - init["weight"]).norm()
        gaps.append(((merged - decayed.weight.detach()).norm() / travelled).item())
    assert gaps[0] < 0.05
    assert 1.6 < gaps[0] / gaps[1] < 2.5, gaps


# ---------------------------------------------------------------------- real Trainer checkpoints


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokenizer, lm_data):
    out = tmp_path_factory.mktemp("merge_full_run")
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    args = cpu_args(
        out,
        max_steps=10,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=lm_data[0],
        processing_class=tokenizer,
        callbacks=[EMACallback(decay=0.8, eval_ema=False)],
    ).train()
    return out


def _ckpts(run):
    return [run / f"checkpoint-{s}" for s in (2, 4, 6, 8, 10)]


def _reference_sum(folders, coefficients, sub=""):
    """sum_i c_i * theta_i in float64, read with load_file (independent of the streaming code)."""
    states = [load_file(str(f / sub / "model.safetensors")) for f in folders]
    return {k: sum(c * s[k].double() for c, s in zip(coefficients, states)) for k in states[0]}


def _wsm_reference(n, f):
    w = [f((j + 1) / n) for j in range(n - 1)]
    return [1 - w[0]] + [w[i - 1] - w[i] for i in range(1, n - 1)] + [w[-1]]


@pytest.mark.parametrize(
    "kwargs, reference",
    [
        ({}, lambda n: [1 / n] * n),
        (
            {"method": "ema", "ema_decay": 0.6},
            lambda n: [0.6 ** (n - 1)] + [0.4 * 0.6 ** (n - 1 - i) for i in range(1, n)],
        ),
        (
            {"method": "wsm", "schedule": "cosine"},
            lambda n: _wsm_reference(n, lambda x: 0.5 * (1 + math.cos(math.pi * x))),
        ),
        ({"method": "wsm"}, lambda n: _wsm_reference(n, lambda x: 1 - math.sqrt(x))),
        ({"method": "wsm", "schedule": "linear"}, lambda n: [1 / n] * n),
        ({"weights": [1, 0, 2, 0, 1]}, lambda n: [0.25, 0, 0.5, 0, 0.25]),
    ],
    ids=["mean", "ema", "wsm-cosine", "wsm-1-sqrt", "wsm-linear", "explicit"],
)
@pytest.mark.trainer
def test_merge_equals_weighted_average(full_run, tmp_path, kwargs, reference):
    folders = _ckpts(full_run)
    out = merge_checkpoints(folders, tmp_path / "merged", progress=False, **kwargs)
    merged = load_file(str(out / "model.safetensors"))
    expected = _reference_sum(folders, reference(len(folders)))
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name].double(), value, rtol=0, atol=1e-6)
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert [c["weight"] for c in recipe["checkpoints"]] == pytest.approx(reference(len(folders)), abs=1e-12)
    assert [c["step"] for c in recipe["checkpoints"]] == [2, 4, 6, 8, 10]


@pytest.mark.trainer
def test_merged_model_loads_and_glob_order_is_sorted(full_run, tmp_path):
    # A shell glob sorts checkpoint-10 before checkpoint-2: the merge orders by step anyway.
    folders = sorted(_ckpts(full_run), key=lambda p: p.name)
    assert folders[0].name == "checkpoint-10"
    out = merge_checkpoints(folders, tmp_path / "merged", method="wsm", schedule="cosine", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    expected = _reference_sum(_ckpts(full_run), wsm_weights(5, "cosine"))
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)
    assert tok("def f(x):")["input_ids"]
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert recipe["method"] == "wsm" and recipe["schedule"] == "cosine" and recipe["kind"] == "model"
    assert recipe["decay_multipliers"] == pytest.approx(decay_multipliers(5, "cosine"))


@pytest.mark.trainer
def test_merge_ema_subfolders_via_cli(full_run, tmp_path, capsys):
    out = tmp_path / "merged-ema"
    argv = ["merge", *map(str, _ckpts(full_run)[2:]), "--out", str(out), "--method", "wsm", "--schedule", "1-sqrt"]
    assert cli_main([*argv, "--ema", "--no-progress"]) == 0
    assert "merged 3 checkpoints (wsm)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = _reference_sum(_ckpts(full_run)[2:], wsm_weights(3, "1-sqrt"), sub="ema")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=0, atol=1e-6)
    # Existing output is refused without --overwrite (one-line error, exit code 2).
    assert cli_main([*argv, "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.trainer
def test_merge_sharded_checkpoints(full_run, tmp_path):
    folders = []
    for step in (4, 6, 8):
        model = AutoModelForCausalLM.from_pretrained(full_run / f"checkpoint-{step}")
        folder = tmp_path / f"sharded-{step}"
        model.save_pretrained(folder, max_shard_size="20KB")
        folders.append(folder)
    assert (folders[0] / "model.safetensors.index.json").is_file()
    out = merge_checkpoints(folders, tmp_path / "merged", sort_by_step=False, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = _reference_sum([full_run / f"checkpoint-{s}" for s in (4, 6, 8)], [1 / 3] * 3)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- PEFT adapters


@pytest.mark.trainer
def test_merge_lora_adapters(tmp_path, tokenizer, lm_data):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = cpu_args(
        tmp_path / "run",
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
    )
    Trainer(
        model=model, args=args, train_dataset=lm_data[0], callbacks=[EMACallback(decay=0.8, eval_ema=False)]
    ).train()
    folders = [tmp_path / "run" / f"checkpoint-{s}" for s in (2, 4, 6)]
    for use_ema in (False, True):
        out = merge_checkpoints(folders, tmp_path / f"merged-{use_ema}", method="ema", use_ema=use_ema, progress=False)
        assert (out / "adapter_config.json").is_file()
        sub = "ema" if use_ema else ""
        states = [load_file(str(f / sub / "adapter_model.safetensors")) for f in folders]
        c = ema_weights(3, 0.5)
        merged = load_file(str(out / "adapter_model.safetensors"))
        for name in states[0]:
            torch.testing.assert_close(
                merged[name].double(), sum(ci * s[name].double() for ci, s in zip(c, states)), rtol=0, atol=1e-6
            )
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
        lora = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
        assert lora and json.loads((out / "merge_recipe.json").read_text())["kind"] == "adapter"
        name = next(k for k in merged if "lora_A" in k)
        loaded_name = next(k for k in lora if k.replace(".default", "") == name)
        torch.testing.assert_close(lora[loaded_name], merged[name])


# ---------------------------------------------------------------------- errors before anything is written


def _save_tiny(tokenizer, folder, **kwargs):
    tiny_causal_lm(tokenizer, num_heads=4, **{"hidden_size": 32, "num_layers": 2, **kwargs}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "other, match",
    [
        ({"hidden_size": 48}, "shape"),
        ({"num_layers": 3}, "different tensors"),
        ({"dtype": torch.bfloat16}, "dtype"),
        ({"arch": "gpt2"}, "model_type"),
    ],
)
def test_mismatched_checkpoints_fail_before_writing(tmp_path, tokenizer, other, match):
    a = _save_tiny(tokenizer, tmp_path / "a")
    b = _save_tiny(tokenizer, tmp_path / "b", seed=1, **other)
    with pytest.raises(CheckpointError, match=match):
        merge_checkpoints([a, b], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_argument_errors(tmp_path, tokenizer):
    a = _save_tiny(tokenizer, tmp_path / "a")
    b = _save_tiny(tokenizer, tmp_path / "b", seed=1)
    with pytest.raises(ConfigError, match="at least 2"):
        merge_checkpoints([a], tmp_path / "out")
    with pytest.raises(ConfigError, match="more than once"):
        merge_checkpoints([a, a], tmp_path / "out")
    with pytest.raises(ConfigError, match="schedule"):
        merge_checkpoints([a, b], tmp_path / "out", schedule="cosine")
    with pytest.raises(ConfigError, match="weights"):
        merge_checkpoints([a, b], tmp_path / "out", weights=[1.0])
    with pytest.raises(CheckpointError, match="ema/"):
        merge_checkpoints([a, b], tmp_path / "out", use_ema=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_checkpoints([a, tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no safetensors"):
        merge_checkpoints([a, tmp_path / "bin"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_configs_of_different_models_are_refused_unless_allowed(tmp_path, tokenizer, capsys):
    """Two Llamas with 4 and 2 attention heads have the same tensor names and shapes, yet are different models:
    the merge is refused in one line naming the differences and the flag (library and CLI), and allowed with it."""
    from hf_ema import ConfigMismatchError

    a, b = tmp_path / "a", tmp_path / "b"
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(a)
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1).save_pretrained(b)
    weights_a, weights_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert {k: v.shape for k, v in weights_a.items()} == {k: v.shape for k, v in weights_b.items()}
    with pytest.raises(ConfigMismatchError) as info:
        merge_checkpoints([a, b], tmp_path / "out", progress=False)
    message = str(info.value)
    assert "\n" not in message and f"`{a}` does not match `{b}`" in message
    assert "num_attention_heads 4 vs 2" in message and "allow_config_mismatch=True" in message
    assert not (tmp_path / "out").exists()
    capsys.readouterr()  # what saving the models printed
    assert cli_main(["merge", str(a), str(b), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-ema merge: error: ") and "--allow-config-mismatch" in err
    assert not (tmp_path / "out").exists()

    merged = merge_checkpoints([a, b], tmp_path / "out", progress=False, allow_config_mismatch=True)
    out = load_file(str(merged / "model.safetensors"))
    for name, value in out.items():
        assert torch.equal(value, (weights_a[name] + weights_b[name]) / 2), name
    assert json.loads((merged / "config.json").read_text())["num_attention_heads"] == 2  # the newest's config
    flag = ["--allow-config-mismatch", "--no-progress", "--overwrite"]
    assert cli_main(["merge", str(a), str(b), "--out", str(tmp_path / "out"), *flag]) == 0
