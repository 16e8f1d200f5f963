"""`plot_run` / `load_history` / `hf-ema plot` on a real short Trainer run (hf_ema.tools.plotting)."""

from __future__ import annotations

import json
import shutil

import pytest
from _trainer_args import cpu_args
from transformers import Trainer

from hf_ema import CheckpointError, EMACallback
from hf_ema.cli import main
from hf_ema.tools.plotting import STABILITY_KEYS, find_trainer_state, load_history, plot_run, run_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, lm_data):
    from hf_ema.demo.toy import tiny_causal_lm

    train_ds, eval_ds = lm_data
    out = tmp_path_factory.mktemp("plot") / "run"
    args = cpu_args(
        out,
        max_steps=8,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=4,
    )
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    callback = EMACallback(decay=0.8, start_step=2, stability_metrics={"sample_size": 256, "momentum": 0.2})
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds.select(range(32)), callbacks=[callback]
    )
    trainer.train()
    return out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.trainer
def test_load_history_reads_the_logged_series(run_dir):
    history = load_history(run_dir)
    assert history.source == run_dir / "checkpoint-8" / "trainer_state.json"
    state = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())
    for key in ("eval_loss", "eval_ema_loss", "eval_ema_is_raw", "loss", "ema_rel_distance", "ema_osc_frac"):
        logged = [(e["step"], e[key]) for e in state["log_history"] if key in e]
        s = history.series[key]
        assert list(zip(s.steps, s.values)) == logged and logged
    assert ("eval_loss", "eval_ema_loss") in history.pairs
    assert history.series["eval_ema_is_raw"].values[0] == 1.0  # step 2 = start_step
    # A checkpoint folder reads its own file; an ema/ folder its checkpoint's.
    assert load_history(run_dir / "checkpoint-4").global_step == 4
    assert load_history(run_dir / "checkpoint-4" / "ema").global_step == 4


@pytest.mark.trainer
def test_find_trainer_state_prefers_most_advanced(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    stale = json.loads((copy / "checkpoint-4" / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps(stale))
    assert find_trainer_state(copy) == copy / "checkpoint-8" / "trainer_state.json"
    stale["global_step"] = 8
    (copy / "trainer_state.json").write_text(json.dumps(stale))
    assert find_trainer_state(copy) == copy / "trainer_state.json"  # ties go to the run folder's own file


def _curves(fig) -> dict[str, list[tuple[float, float]]]:
    """Each labelled curve of the figure, as matplotlib holds it: `(x, y)` points by label."""
    return {
        line.get_label(): [(float(x), float(y)) for x, y in zip(*line.get_data())]
        for ax in fig.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


@pytest.mark.trainer
def test_plot_curves_are_the_logged_values(run_dir):
    """Every curve of the plot holds exactly the values the Trainer logged (read from `trainer_state.json` here,
    not through `load_history`); the points before the EMA started are the hollow ones."""
    state = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())

    def logged(key):
        return [(float(e["step"]), float(e[key])) for e in state["log_history"] if key in e]

    curves = _curves(run_figure(run_dir))
    assert curves["eval_loss (raw)"] == logged("eval_loss") and len(logged("eval_loss")) == 4
    assert curves["eval_ema_loss (EMA)"] == logged("eval_ema_loss")
    assert curves["train loss (raw)"] == logged("loss")
    stability = [k for k in STABILITY_KEYS if logged(k)]
    assert "ema_rel_distance" in stability and "ema_osc_frac" in stability
    for key in stability:
        assert curves[key] == logged(key), key
    not_started = {step for step, flag in logged("eval_ema_is_raw") if flag == 1.0}
    assert not_started == {2.0}  # start_step=2: the EMA copied the weights up to step 2
    ema = dict(logged("eval_ema_loss"))
    assert curves["EMA not started (= raw)"] == [(s, ema[s]) for s in sorted(not_started)]


@pytest.mark.trainer
def test_plot_run_and_cli_write_the_figure(run_dir, tmp_path):
    path = plot_run(run_dir, tmp_path / "a" / "plot.png")
    width, height = _png_size(path)
    fig = run_figure(run_dir)
    # The PNG is the figure: its size in pixels (two panels: losses and stability).
    assert (width, height) == tuple(round(v) for v in fig.get_size_inches() * fig.dpi) and height > 600
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "cli.png")]) == 0
    assert _png_size(tmp_path / "cli.png") == (width, height)
    default = plot_run(run_dir / "checkpoint-4")
    assert default == run_dir / "checkpoint-4" / "ema_eval.png" and default.is_file()


@pytest.mark.trainer
def test_plot_of_an_ema_folder_never_writes_into_it(run_dir, tmp_path, capsys):
    """`hf-ema plot run/ema` plots the run's history beside `ema/`, not inside it (an `ema/` folder is loaded and
    uploaded as a whole); an explicit `--out` inside it is one line, exit 2, before anything is drawn."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = sorted(p.name for p in (copy / "ema").iterdir())
    assert main(["plot", str(copy / "ema")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {copy / 'ema_eval.png'}"
    assert (copy / "ema_eval.png").is_file()
    assert main(["plot", str(copy / "checkpoint-4" / "ema")]) == 0
    assert (copy / "checkpoint-4" / "ema_eval.png").is_file()
    inside = copy / "ema" / "plots" / "loss.png"
    assert main(["plot", str(copy), "--out", str(inside)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-ema plot: error: `--out` `{inside}` lies inside the EMA folder")
    assert sorted(p.name for p in (copy / "ema").iterdir()) == before


def test_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_history(tmp_path)
    with pytest.raises(CheckpointError, match="must be a folder"):
        plot_run(tmp_path / "missing")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": []}))
    with pytest.raises(CheckpointError, match="no loss"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "hf-ema plot: error" in capsys.readouterr().err


def test_loss_curves_fall_back_to_the_eval_then_the_training_loss(tmp_path):
    """Without an (eval_loss, eval_ema_loss) pair the curves are `eval_loss` alone, else the training loss; a run
    with neither has none, and `plot_run` refuses it (the rule the app's plot and `plot_run` share)."""

    def history_of(*entries: dict):
        (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": list(entries)}))
        return load_history(tmp_path)

    curves = history_of({"step": 2, "loss": 3.5, "eval_loss": 3.25}, {"step": 4, "eval_loss": 3.0}).loss_curves()
    assert [(name, s.steps, s.values) for name, s in curves] == [("eval_loss", [2, 4], [3.25, 3.0])]
    curves = history_of({"step": 2, "loss": 3.5}, {"step": 4, "loss": 3.0}).loss_curves()
    assert [(name, s.steps, s.values) for name, s in curves] == [("loss (train)", [2, 4], [3.5, 3.0])]
    assert history_of({"step": 2, "grad_norm": 1.0}).loss_curves() == []
    with pytest.raises(CheckpointError, match="no loss"):
        plot_run(tmp_path)
