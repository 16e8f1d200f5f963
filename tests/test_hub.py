"""Tests of `hf_ema.tools.hub`: `hf-ema push` / `push_ema` and `Trainer(push_to_hub=True)` with `EMACallback`.

The Hub cannot be reached from here, so `huggingface_hub` is pointed at a stand-in Hub: the local HTTP server of
`tests/_hub_server.py` (`FakeHub`, through the `fake_hub` fixture), which keeps the committed files in memory.
Everything above HTTP is the real `huggingface_hub` / `transformers` code. `test_real_hub_push` runs against the
real Hub only when `HF_TOKEN` is set.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from _hub_server import fake_hub_fixture  # noqa: F401  (the `fake_hub` fixture)
from _trainer_args import cpu_args
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from hf_ema import EMACallback, push_ema
from hf_ema.cli import main
from hf_ema.errors import CheckpointError, ConfigError

#: The Trainer's commits for 4 steps saved every 2 with `hub_strategy="checkpoint"`, then `trainer.push_to_hub()`.
CHECKPOINT_PUSHES = [
    "Training in progress, step 2",
    "Training in progress, step 2, checkpoint",
    "Training in progress, step 4",
    "Training in progress, step 4, checkpoint",
    "End of training",
]


def _train(tmp_path, tokenizer, lm_data, model, steps=4, save_steps=4, callbacks=(), **args):
    from transformers import Trainer

    train_ds, eval_ds = lm_data
    targs = cpu_args(
        tmp_path / "run",
        max_steps=steps,
        save_steps=save_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        eval_strategy="steps",
        eval_steps=save_steps,
        logging_steps=1,
        **args,
    )
    callback = EMACallback(decay=0.9)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds.select(range(16)),
        processing_class=tokenizer,
        callbacks=[callback, *callbacks],
    )
    trainer.train()
    return trainer, callback


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match is not None, card[:200]
    return yaml.safe_load(match.group(1))


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.trainer
def test_cli_push_checkpoint_subfolder(fake_hub, tmp_path, tokenizer, lm_data, tiny_model):
    from transformers import AutoModelForCausalLM

    trainer, callback = _train(tmp_path, tokenizer, lm_data, tiny_model)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-4"
    # The raw and EMA eval losses the Trainer logged at step 4 (EMACallback(eval_ema=True) logs `eval_ema_loss`).
    logged = next(e for e in trainer.state.log_history if e.get("step") == 4 and "eval_loss" in e)
    raw_loss, ema_loss = logged["eval_loss"], logged["eval_ema_loss"]
    assert raw_loss != ema_loss

    rc = main(["push", str(checkpoint), "--repo-id", "user/tiny-ema", "--token", "fake-token"])
    assert rc == 0
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo"] == "user/tiny-ema" and commit["revision"] == "main"
    assert commit["summary"] == "Upload EMA weights (step 4) with hf-ema"

    local = _local_files(checkpoint / "ema")
    assert {"model.safetensors", "config.json", "ema_state.json", "ema_config.json", "tokenizer.json"} <= set(local)
    expected_paths = {f"ema/{name}" for name in local} | {"ema/README.md", "README.md"}
    assert set(commit["files"]) == expected_paths
    for name, content in local.items():
        assert commit["files"][f"ema/{name}"] == content, name

    card = commit["files"]["ema/README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and {"ema", "hf-ema"} <= set(meta["tags"])
    assert "exponential moving average (EMA)" in card
    assert "| EMA horizon | `decay=0.9` per optimizer step |" in card
    assert "| Decay of the last update | 0.9 |" in card
    assert "| Step (optimizer steps) | 4 |" in card
    assert f"| loss | {raw_loss:.6g} | {ema_loss:.6g} |" in card
    assert "Measured at step 4 (from `trainer_state.json`)." in card
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-ema", subfolder="ema")' in card
    root = commit["files"]["README.md"].decode()
    assert root.count("<!-- hf-ema:start -->") == 1 and f"| loss | {raw_loss:.6g} | {ema_loss:.6g} |" in root

    # The pushed EMA loads from the (stand-in) Hub with `subfolder="ema"` and holds the callback's EMA.
    model = AutoModelForCausalLM.from_pretrained("user/tiny-ema", subfolder="ema")
    ema_state = callback.ema.full_state_dict(dtype="ema")
    for name, tensor in model.state_dict().items():
        if name in ema_state:
            torch.testing.assert_close(tensor, ema_state[name], rtol=0, atol=0)


@pytest.mark.trainer
def test_push_as_main_and_revision_update_existing_card(fake_hub, tmp_path, tokenizer, lm_data, tiny_model):
    trainer, _ = _train(tmp_path, tokenizer, lm_data, tiny_model)
    run_dir = Path(trainer.args.output_dir)
    # An existing repo with a hand-written card: the push keeps it and adds (then replaces) one EMA section.
    from huggingface_hub import HfApi

    api = HfApi(token="fake-token")
    api.create_repo("org/model")
    api.upload_file(
        path_or_fileobj=b"---\nlicense: mit\ntags:\n- llama\n---\n\n# My model\n\nHand-written text.\n",
        path_in_repo="README.md",
        repo_id="org/model",
    )
    url = push_ema(run_dir, "org/model", as_main=True, token="fake-token")
    assert url.startswith(f"{fake_hub.url}/org/model/commit/")
    url = push_ema(run_dir / "ema", "org/model", as_main=True, token="fake-token", commit_message="again")
    commit = fake_hub.commits[-1]
    assert commit["summary"] == "again"
    local = _local_files(run_dir / "ema")
    assert set(commit["files"]) == set(local) | {"README.md"}
    card = commit["files"]["README.md"].decode()
    meta = _front_matter(card)
    assert meta["license"] == "mit" and meta["tags"] == ["llama", "ema", "hf-ema"]
    assert "Hand-written text." in card and card.count("<!-- hf-ema:start -->") == 1
    assert "This repository's main weights are an **exponential moving average (EMA)**" in card
    assert 'AutoModelForCausalLM.from_pretrained("org/model")' in card
    # The run folder holds no trainer_state.json, but checkpoint-4 (the EMA's step) does.
    assert "from `checkpoint-4/trainer_state.json`" in card

    push_ema(run_dir, "org/model", subfolder="ema-0.9", revision="ema-branch", private=True, token="fake-token")
    commit = fake_hub.commits[-1]
    assert commit["revision"] == "ema-branch"
    assert set(commit["files"]) == {f"ema-0.9/{n}" for n in local} | {"ema-0.9/README.md", "README.md"}
    assert set(fake_hub.repos["org/model"]["branches"]) == {"main", "ema-branch"}
    # The branch's card started from main's card: still one EMA section, now pointing at the subfolder.
    branch_card = commit["files"]["README.md"].decode()
    assert branch_card.count("<!-- hf-ema:start -->") == 1 and "Hand-written text." in branch_card
    assert 'subfolder="ema-0.9"' in branch_card


@pytest.mark.trainer
def test_trainer_push_to_hub_carries_ema(fake_hub, tmp_path, tokenizer, lm_data, tiny_model):
    from transformers import AutoModelForCausalLM, TrainerCallback

    class RecordWeights(TrainerCallback):
        """Raw weights at the start and after every optimizer step, for an EMA computed independently below."""

        def __init__(self):
            self.weights = []

        def _record(self, model):
            self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self._record(model)

    recorder = RecordWeights()
    saves = []
    original_save = EMACallback.save

    def counting_save(self, folder, *args, **kwargs):
        saves.append(Path(folder))
        return original_save(self, folder, *args, **kwargs)

    # Instrumentation only (the real `save` runs): checks that `on_save` does not write `ema/` a second time.
    EMACallback.save = counting_save
    try:
        trainer, callback = _train(
            tmp_path,
            tokenizer,
            lm_data,
            tiny_model,
            steps=4,
            save_steps=2,
            callbacks=[recorder],
            push_to_hub=True,
            hub_model_id="user/trainer-ema",
            hub_token="fake-token",
            hub_strategy="checkpoint",
            hub_always_push=True,  # push every checkpoint (else a push still running skips the next one)
        )
        trainer.push_to_hub()
    finally:
        EMACallback.save = original_save

    out = Path(trainer.args.output_dir)
    assert saves == [out / "checkpoint-2" / "ema", out / "checkpoint-4" / "ema"]
    assert [c["summary"] for c in fake_hub.commits] == CHECKPOINT_PUSHES
    ema_files = {"model.safetensors", "config.json", "generation_config.json", "ema_state.json", "ema_config.json"}
    ema_files |= {"tokenizer.json", "tokenizer_config.json", "README.md"}

    # Independent EMA of the recorded raw weights: ema_0 = w_0, ema_t = 0.9 ema_{t-1} + 0.1 w_t.
    reference = [dict(recorder.weights[0])]
    for weights in recorder.weights[1:]:
        reference.append({n: 0.9 * reference[-1][n] + 0.1 * w for n, w in weights.items()})

    for index, step in enumerate((2, 4)):
        for prefix, commit in (
            ("ema/", fake_hub.commits[2 * index]),
            ("last-checkpoint/ema/", fake_hub.commits[2 * index + 1]),
        ):
            files = commit["files"]
            assert {prefix + f for f in ema_files} <= set(files), (step, prefix, sorted(files))
            assert json.loads(files[prefix + "ema_state.json"])["step"] == step
            assert "exponential moving average (EMA)" in files[prefix + "README.md"].decode()
            pushed = load_safetensors(files[prefix + "model.safetensors"])
            assert (
                files[prefix + "model.safetensors"]
                == (out / f"checkpoint-{step}" / "ema" / "model.safetensors").read_bytes()
            )
            for name, tensor in pushed.items():
                torch.testing.assert_close(tensor, reference[step][name], rtol=1e-6, atol=1e-6)
            raw = load_file(str(out / f"checkpoint-{step}" / "model.safetensors"))
            assert any(not torch.equal(raw[n], pushed[n]) for n in pushed)
        # The checkpoint push also uploaded the raw weights at the root, as the Trainer does.
        assert "model.safetensors" in fake_hub.commits[2 * index]["files"]
        assert "last-checkpoint/model.safetensors" in fake_hub.commits[2 * index + 1]["files"]

    final = fake_hub.commits[-1]["files"]
    assert {"README.md", "model.safetensors", "config.json"} | {f"ema/{f}" for f in ema_files} <= set(final)
    assert not any(p.startswith(("checkpoint-", "last-checkpoint/")) for p in final)
    card = final["ema/README.md"].decode()
    logged = next(e for e in trainer.state.log_history if e.get("step") == 4 and "eval_loss" in e)
    assert f"| loss | {logged['eval_loss']:.6g} | {logged['eval_ema_loss']:.6g} |" in card
    assert json.loads(final["ema/ema_state.json"])["step"] == 4

    model = AutoModelForCausalLM.from_pretrained("user/trainer-ema", subfolder="ema")
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(tensor.detach(), reference[4][name], rtol=1e-6, atol=1e-6)


@pytest.mark.multiprocess
def test_trainer_push_under_ddp_carries_each_checkpoints_ema(fake_hub, tmp_path):
    """2 processes (torchrun, gloo), DDP-sharded EMA: every checkpoint push carries the EMA of that checkpoint, gathered
    from both ranks before the upload (not the previous checkpoint's), and the final push the final EMA."""
    import sys

    dist_dir = Path(__file__).resolve().parent / "dist"
    sys.path.insert(0, str(dist_dir))
    from common import DECAY
    from launch import torchrun

    out = tmp_path / "ddp"
    torchrun(
        "trainer_push_worker.py",
        str(out),
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache")},
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["layout"] for r in ranks] == ["ddp_sharded"] * 2  # the EMA really was split across the ranks

    raw = load_file(str(out / "raw_weights.safetensors"))
    steps = sorted({int(k.split("/", 1)[0]) for k in raw})
    weights = [{k.split("/", 1)[1]: v for k, v in raw.items() if k.startswith(f"{s}/")} for s in steps]
    assert steps == [0, 1, 2, 3, 4]
    reference = [weights[0]]
    for w in weights[1:]:
        reference.append({n: DECAY * reference[-1][n] + (1 - DECAY) * t for n, t in w.items()})

    assert [c["summary"] for c in fake_hub.commits] == CHECKPOINT_PUSHES
    pushes = [(2, "ema/", 0), (2, "last-checkpoint/ema/", 1), (4, "ema/", 2), (4, "last-checkpoint/ema/", 3)]
    pushes.append((4, "ema/", 4))
    run = out / "run"
    for step, prefix, index in pushes:
        files = fake_hub.commits[index]["files"]
        assert json.loads(files[prefix + "ema_state.json"])["step"] == step, (index, prefix)
        assert "exponential moving average (EMA)" in files[prefix + "README.md"].decode()
        assert (
            files[prefix + "model.safetensors"]
            == (run / f"checkpoint-{step}" / "ema" / "model.safetensors").read_bytes()
        )
        pushed = load_safetensors(files[prefix + "model.safetensors"])
        common = set(pushed) & set(reference[step])
        assert len(common) == len(reference[step])
        for name in common:
            torch.testing.assert_close(pushed[name], reference[step][name], rtol=1e-6, atol=1e-6)
        assert any(not torch.equal(pushed[n], weights[step][n]) for n in common)  # an EMA, not the raw weights


@pytest.mark.trainer
def test_trainer_push_peft_adapter(fake_hub, tmp_path, tokenizer, lm_data, tiny_model):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_ema.demo.toy import tiny_causal_lm

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer, callback = _train(
        tmp_path, tokenizer, lm_data, model, push_to_hub=True, hub_model_id="user/lora-ema", hub_token="fake-token"
    )
    trainer.push_to_hub()
    files = fake_hub.commits[-1]["files"]
    assert {"ema/adapter_config.json", "ema/adapter_model.safetensors", "ema/README.md"} <= set(files)
    assert _front_matter(files["ema/README.md"].decode())["library_name"] == "peft"
    assert 'PeftModel.from_pretrained(base, "user/lora-ema", subfolder="ema")' in files["ema/README.md"].decode()

    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    loaded = PeftModel.from_pretrained(base, "user/lora-ema", subfolder="ema")
    loaded_lora = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    with callback.ema.swapped() as ema_model:
        ema_lora = {n: p.detach().clone() for n, p in ema_model.named_parameters() if "lora_" in n}
    raw_lora = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert set(loaded_lora) == set(ema_lora) and len(ema_lora) == 8
    for name in ema_lora:
        torch.testing.assert_close(loaded_lora[name], ema_lora[name], rtol=0, atol=0)
    assert any(not torch.equal(raw_lora[n], ema_lora[n]) for n in ema_lora)


def test_eval_metrics_from_log_history():
    from hf_ema.tools.model_card import eval_metrics_from_log_history

    history = [
        {"loss": 3.0, "step": 2},
        {"eval_loss": 2.5, "eval_ema_loss": 2.5, "eval_ema_is_raw": 1.0, "eval_runtime": 0.1, "step": 2},
        {"eval_loss": 2.0, "eval_accuracy": 0.5, "step": 4},
        {"eval_ema_loss": 1.9, "eval_ema_accuracy": 0.6, "step": 4},
        {"eval_loss": 1.5, "eval_ema_loss": 1.4, "step": 6},
        {"eval_loss": 1.2, "step": 8},
    ]
    # Steps after the EMA's are ignored; the latest step with EMA metrics wins; split entries are merged.
    assert eval_metrics_from_log_history(history, step=5) == {
        "step": 4,
        "metrics": {"loss": {"raw": 2.0, "ema": 1.9}, "accuracy": {"raw": 0.5, "ema": 0.6}},
        "ema_is_raw": False,
    }
    assert eval_metrics_from_log_history(history)["step"] == 6
    # With a dict of eval datasets: `eval_<name>_loss` pairs with `eval_<name>_ema_loss`.
    named = [
        {"eval_val_loss": 1.0, "eval_val_ema_loss": 0.9, "eval_val_ema_is_raw": 0.0, "eval_val_runtime": 1, "step": 1}
    ]
    assert eval_metrics_from_log_history(named) == {
        "step": 1,
        "metrics": {"val_loss": {"raw": 1.0, "ema": 0.9}},
        "ema_is_raw": False,
    }
    assert eval_metrics_from_log_history(history, step=3)["ema_is_raw"] is True
    assert eval_metrics_from_log_history(history[:1]) == {}


def test_push_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="`path` must be an hf-ema `ema/` folder"):
        push_ema(tmp_path, "user/x")
    (tmp_path / "ema").mkdir()
    (tmp_path / "ema" / "ema_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot be combined with subfolder='other'"):
        push_ema(tmp_path, "user/x", subfolder="other", as_main=True)
    with pytest.raises(ConfigError, match="`subfolder` must be a relative folder"):
        push_ema(tmp_path, "user/x", subfolder="../up")
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "user/x"]) == 2
    assert "hf-ema push: error: `path` must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["push", str(tmp_path), "--repo-id", "user/x", "--subfolder", "a", "--as-main"])


@pytest.mark.hub
@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN and network access to the real Hub")
def test_real_hub_push(tmp_path, tokenizer, lm_data, tiny_model, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    trainer, _ = _train(tmp_path, tokenizer, lm_data, tiny_model)
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/hf-ema-test-{uuid.uuid4().hex[:8]}"
    try:
        push_ema(Path(trainer.args.output_dir) / "checkpoint-4", repo_id, private=True)
        files = set(api.list_repo_files(repo_id))
        assert {"README.md", "ema/README.md", "ema/model.safetensors", "ema/config.json"} <= files
        card = Path(api.hf_hub_download(repo_id, "ema/README.md", cache_dir=tmp_path / "cache")).read_text()
        assert "exponential moving average (EMA)" in card and "| Step (optimizer steps) | 4 |" in card
    finally:
        api.delete_repo(repo_id, missing_ok=True)
