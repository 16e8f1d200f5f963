"""serve.loading: finding checkpoints, loading raw + EMA (full and LoRA), start-up errors (library and CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ema.errors import CheckpointError, ConfigError, ConfigTypeError
from serve.loading import EMA, RAW, CheckpointCatalog, CheckpointRef, find_checkpoints, load_pair

REPO = Path(__file__).resolve().parents[1]


def test_find_checkpoints_in_run_folder(full_run):
    refs = find_checkpoints(full_run)
    assert [r.label for r in refs] == ["checkpoint-4", "checkpoint-8", "final"]
    assert [r.step for r in refs] == [4, 8, 8]
    assert all(r.is_local for r in refs)
    assert refs[0].location == str((full_run / "checkpoint-4").resolve())
    assert refs[0].ema_location == str((full_run / "checkpoint-4" / "ema").resolve())
    assert refs[0].ema_subfolder is None


def test_find_checkpoints_single_checkpoint(full_run):
    refs = find_checkpoints(full_run / "checkpoint-4")
    assert [(r.label, r.step) for r in refs] == [("checkpoint-4", 4)]


def test_run_folder_without_final_model_lists_checkpoints_only(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint-8", run / "checkpoint-8")
    shutil.copytree(full_run / "ema", run / "ema")  # final EMA but no final raw weights (no save_model)
    assert [r.label for r in find_checkpoints(run)] == ["checkpoint-8"]


def test_folder_without_ema_is_rejected(full_run, tmp_path):
    folder = tmp_path / "no_ema"
    shutil.copytree(full_run / "checkpoint-4", folder, ignore=shutil.ignore_patterns("ema"))
    with pytest.raises(CheckpointError, match=r"no `ema/` folder.*EMACallback"):
        find_checkpoints(folder)
    run = tmp_path / "run_no_ema"
    shutil.copytree(folder, run / "checkpoint-4")
    with pytest.raises(CheckpointError, match=r"1 checkpoint-N folders but none has"):
        find_checkpoints(run)


def test_non_checkpoint_folder_and_file_are_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        find_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        find_checkpoints(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub repo id"):
        find_checkpoints(str(tmp_path / "missing"))
    with pytest.raises(ConfigTypeError, match="`path`"):
        find_checkpoints(3)


@pytest.mark.parametrize("repo_id", ["someone/some-model", "gpt2", "org/model.v2"])
def test_hub_repo_id_resolution(repo_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    (ref,) = find_checkpoints(repo_id)
    assert ref == CheckpointRef(label=repo_id, location=repo_id, is_local=False)
    # The EMA is `from_pretrained(repo, subfolder="ema")`.
    assert (ref.ema_location, ref.ema_subfolder) == (repo_id, "ema")


@pytest.mark.parametrize("path", ["./someone/model", "a/b/c", "~/x/y", "bad repo/id", "-x-/y"])
def test_paths_that_are_not_repo_ids(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub repo id"):
        find_checkpoints(path)


def test_local_folder_wins_over_repo_id(full_run, tmp_path, monkeypatch):
    shutil.copytree(full_run / "checkpoint-8", tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    (ref,) = find_checkpoints("org/name")
    assert ref.is_local and ref.location == str((tmp_path / "org" / "name").resolve())


def test_load_pair_full_model(full_run):
    ref = find_checkpoints(full_run / "checkpoint-8")[0]
    pair = load_pair(ref, device="cpu")
    assert not pair.is_peft and pair.models[RAW] is not pair.models[EMA]
    raw_file = load_file(str(full_run / "checkpoint-8" / "model.safetensors"))
    ema_file = load_file(str(full_run / "checkpoint-8" / "ema" / "model.safetensors"))
    raw_state, ema_state = pair.models[RAW].state_dict(), pair.models[EMA].state_dict()
    differ = 0
    for key, value in ema_file.items():
        torch.testing.assert_close(ema_state[key], value, rtol=0, atol=0)
        torch.testing.assert_close(raw_state[key], raw_file[key], rtol=0, atol=0)
        differ += not torch.equal(value, raw_file[key])
    assert differ > 0
    info = json.loads((full_run / "checkpoint-8" / "ema" / "ema_state.json").read_text())
    assert pair.info["step"] == info["step"] == 8
    assert pair.info["config"]["decay"] == 0.7
    assert pair.context_length == 256 and pair.eos_token_ids == {pair.tokenizer.eos_token_id}


def _lora_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters() if f"lora_A.{adapter}." in n}


def test_load_pair_lora_loads_base_once_with_both_adapters(lora_run):
    ref = find_checkpoints(lora_run / "checkpoint-8")[0]
    pair = load_pair(ref, device="cpu")
    assert pair.is_peft and pair.models[RAW] is pair.models[EMA]
    model = pair.models[RAW]
    assert set(model.peft_config) == {"raw", "ema"}
    # Reference: the adapter files themselves (adapter keys without the adapter name); the EMA's fp32 adapter file
    # holds the EMA exactly.
    raw_file = load_file(str(lora_run / "checkpoint-8" / "adapter_model.safetensors"))
    ema_file = load_file(str(lora_run / "checkpoint-8" / "ema" / "adapter_model.safetensors"))
    raw_loaded, ema_loaded = _lora_weights(model, "raw"), _lora_weights(model, "ema")
    assert len(raw_loaded) == 4  # q_proj and v_proj lora_A in 2 layers
    for name, tensor in raw_loaded.items():
        torch.testing.assert_close(tensor, raw_file[name], rtol=0, atol=0)
        torch.testing.assert_close(ema_loaded[name], ema_file[name], rtol=0, atol=0)
        assert not torch.equal(tensor, ema_loaded[name])
    # The base weights are the saved base model's, shared by both adapters.
    base = load_file(str(lora_run / "base_model" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.get_base_model().state_dict()[key], base[key], rtol=0, atol=0)


def test_lora_without_base_model_needs_base_model_argument(lora_run, tmp_path):
    ckpt = tmp_path / "checkpoint-8"
    shutil.copytree(lora_run / "checkpoint-8", ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    (ref,) = find_checkpoints(ckpt)
    with pytest.raises(CheckpointError, match="names no base model.*pass `base_model`"):
        load_pair(ref, device="cpu")
    pair = load_pair(ref, base_model=str(lora_run / "base_model"), device="cpu")
    assert pair.is_peft
    # The command line names its own flag, once.
    result = _serve_cli(ckpt)
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("hf-ema serve: error:")]
    assert "pass `--base-model`, the base model's folder or Hub repo id" in line and line.count("base-model") == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_weights_raise_checkpoint_error(full_run, tmp_path, damage):
    ckpt = tmp_path / "checkpoint-8"
    shutil.copytree(full_run / "checkpoint-8", ckpt)
    weights = ckpt / "ema" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    (ref,) = find_checkpoints(ckpt)
    with pytest.raises(CheckpointError, match=r"could not load the EMA model from `.*ema`"):
        load_pair(ref, device="cpu")


def test_catalog_loads_on_demand_and_keeps_max_loaded(full_run):
    catalog = CheckpointCatalog(full_run, max_loaded=1, device="cpu")
    assert catalog.labels == ["checkpoint-4", "checkpoint-8", "final"]
    assert catalog.default_label == "final"
    first = catalog.get("checkpoint-4")
    assert catalog.get("checkpoint-4") is first
    assert first.info["step"] == 4
    catalog.get()  # the final model evicts checkpoint-4
    assert catalog.get("checkpoint-4") is not first
    with pytest.raises(ConfigError, match="`checkpoint` must be one of"):
        catalog.get("checkpoint-99")
    with pytest.raises(ConfigError, match="`max_loaded`"):
        CheckpointCatalog(full_run, max_loaded=0)


def _serve_cli(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    # `python -m serve` from the clone: the same code path as `hf-ema serve`.
    return subprocess.run(
        [sys.executable, "-m", "serve", str(path), "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_reports_bad_folders_in_one_line(full_run, tmp_path):
    no_ema = tmp_path / "no_ema"
    shutil.copytree(full_run / "checkpoint-4", no_ema, ignore=shutil.ignore_patterns("ema"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(full_run / "checkpoint-4", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, message in [
        (no_ema, "no `ema/` folder"),
        (empty, "is not a checkpoint folder"),
        (corrupt, "could not load the raw model"),
    ]:
        result = _serve_cli(path)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("hf-ema serve: error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_hub_repo_offline_fails_with_one_clear_error(monkeypatch, tmp_path):
    # No network here (HF_HUB_OFFLINE=1 from conftest): the Hub path must fail as a CheckpointError, not a traceback.
    monkeypatch.chdir(tmp_path)
    (ref,) = find_checkpoints("someone/some-model")
    with pytest.raises(CheckpointError, match="'someone/some-model' is not a local folder and could not be read"):
        load_pair(ref, device="cpu")
