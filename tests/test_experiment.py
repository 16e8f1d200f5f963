"""A shortened run of `examples/experiments/constant_lr_vs_decay.py` (1 seed, 8 steps), so the script cannot rot.

The numbers it reports are checked against losses computed here independently: each model is loaded with
`from_pretrained` (or rebuilt from a weighted average of checkpoint tensors done here) and its next-token
cross-entropy is computed by hand on the same eval blocks.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "experiments" / "constant_lr_vs_decay.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("constant_lr_vs_decay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_run(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    assert experiment.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def _loss(rows, method, step, seed=0):
    hits = [
        float(r["eval_loss"])
        for r in rows
        if r["method"] == method and int(r["step"]) == step and int(r["seed"]) == seed
    ]
    assert len(hits) == 1, (method, step, hits)
    return hits[0]


@pytest.fixture(scope="module")
def eval_tokens(experiment):
    """The eval blocks the quick run uses, rebuilt here from the corpus: evenly spaced `round(i * n / 8)`."""
    from hf_ema.demo.toy import lm_datasets, train_tokenizer

    quick = experiment.QUICK
    tok = train_tokenizer(vocab_size=quick["vocab_size"])
    _, eval_ds = lm_datasets(tok, block_size=quick["block_size"])
    n, k = len(eval_ds), quick["eval_blocks"]
    return eval_ds.select([round(i * n / k) for i in range(k)]).input_ids


def _cross_entropy(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _from_pretrained(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _weighted_model(folders, weights):
    """`sum_i weights[i] * checkpoint_i`, computed here from the safetensors files, in the newest one's model."""
    states = [load_file(str(Path(f) / "model.safetensors")) for f in folders]
    merged = {k: sum(w * s[k].double() for w, s in zip(weights, states)).float() for k in states[0]}
    model = _from_pretrained(folders[-1])
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def test_outputs_written(quick_run, experiment):
    out, rows = quick_run
    cfg = experiment.ExperimentConfig(**experiment.QUICK)
    table = (out / "constant_lr_vs_decay.md").read_text(encoding="utf-8")
    assert "| cosine decay to 0 (raw) |" in table and "### Summary" in table
    assert (out / "images" / "constant_lr_vs_decay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rows) == len(experiment.plan_evaluations(cfg, out / "seed-0"))
    methods = {r["method"] for r in rows}
    expected = {"cosine", "constant", "ema-0.9", "ema-0.5", "bema"}
    expected |= {f"merge-{s}-k{k}" for s in cfg.merge_schedules for k in cfg.merge_windows}
    expected |= {f"posthoc-{s:g}" for s in cfg.posthoc_sigma_rels}
    assert expected <= methods
    assert all(math.isfinite(float(r["eval_loss"])) for r in rows)
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["config"]["steps"] == 8 and meta["wall_s"] > 0


def test_losses_match_independent_evaluation(quick_run, eval_tokens):
    out, rows = quick_run
    run = out / "seed-0" / "constant"
    # Raw checkpoints of both runs, and the EMA folders (`ema/` from EMACallback, `ema-0.5/` from the extra one).
    for method, step, folder in [
        ("constant", 8, run / "checkpoint-8"),
        ("cosine", 8, out / "seed-0" / "cosine" / "checkpoint-8"),
        ("ema-0.9", 8, run / "checkpoint-8" / "ema"),
        ("ema-0.5", 6, run / "checkpoint-6" / "ema-0.5"),
        ("bema", 8, run / "checkpoint-8" / "ema-bema"),
    ]:
        assert _loss(rows, method, step) == pytest.approx(
            _cross_entropy(_from_pretrained(folder), eval_tokens), abs=1e-4
        )


def test_merges_match_weighted_averages(quick_run, eval_tokens):
    out, rows = quick_run
    window = [out / "seed-0" / "constant" / f"checkpoint-{s}" for s in (4, 6, 8)]
    mean = _weighted_model(window, [1 / 3] * 3)
    assert _loss(rows, "merge-mean-k3", 8) == pytest.approx(_cross_entropy(mean, eval_tokens), abs=1e-4)
    # WSM 1-sqrt over 3 checkpoints: multipliers w_j = 1 - sqrt((j + 1) / 3), weights c = [1 - w0, w0 - w1, w1].
    w0, w1 = 1 - math.sqrt(1 / 3), 1 - math.sqrt(2 / 3)
    wsm = _weighted_model(window, [1 - w0, w0 - w1, w1])
    assert _loss(rows, "merge-1-sqrt-k3", 8) == pytest.approx(_cross_entropy(wsm, eval_tokens), abs=1e-4)
    # The 1-sqrt merge is a different model from the mean, so the two numbers must differ.
    assert _loss(rows, "merge-1-sqrt-k3", 8) != _loss(rows, "merge-mean-k3", 8)


def test_runs_share_seed_and_schedules_differ(quick_run):
    out, rows = quick_run
    # Same initialisation and batches, same warmup: identical until the warmup ends (step 2), where the EMAs also
    # still copy the weights (start_step = warmup).
    assert (
        _loss(rows, "cosine", 2) == _loss(rows, "constant", 2) == _loss(rows, "ema-0.9", 2) == _loss(rows, "bema", 2)
    )
    assert _loss(rows, "cosine", 8) != _loss(rows, "constant", 8)
    lrs = {}
    for run in ("cosine", "constant"):
        state = json.loads((out / "seed-0" / run / "checkpoint-8" / "trainer_state.json").read_text())
        lrs[run] = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert lrs["constant"][-1] == pytest.approx(5e-3)
    assert lrs["cosine"][-1] < 0.5 * lrs["constant"][-1]


def test_render_only_redraws_same_table(quick_run, experiment, tmp_path):
    out, _ = quick_run
    assert experiment.main(["--render-only", "--out", str(out), "--report-dir", str(tmp_path)]) == 0
    assert (tmp_path / "constant_lr_vs_decay.md").read_text() == (out / "constant_lr_vs_decay.md").read_text()
    assert (tmp_path / "images" / "constant_lr_vs_decay.png").is_file()
