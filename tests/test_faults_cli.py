"""Faults as a user hits them, through the real `hf-ema` CLI (`python -m hf_ema ...` in a subprocess) on a real run
trained here: no command destroys its inputs or a folder hf-ema did not write, every bad input ends in exactly one
`hf-ema <command>: error: ...` line and exit code 2, and `hf-ema push` never hangs or touches the network without a
token.

The network is never reached: pushes go to a local TCP server on 127.0.0.1 (`HF_ENDPOINT`), or run offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _app_page import free_port
from _missing_packages import NOT_IN_THE_DEMO, hf_ema_without

from hf_ema.utils.paths import MARKER_NAME

pytestmark = pytest.mark.slow

#: Bound of any one CLI call here; the silent-endpoint push must end well inside it.
CLI_TIMEOUT = 180


def hf_ema(
    *args: str,
    env: dict[str, str | None] | None = None,
    timeout: float = CLI_TIMEOUT,
    without: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run `python -m hf_ema ARGS` as a user would (offline unless `env` says otherwise; a `None` value unsets),
    in an install without the packages `without` names."""
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    full_env = {key: value for key, value in merged.items() if value is not None}
    cli = hf_ema_without(without) if without else [sys.executable, "-m", "hf_ema"]
    return subprocess.run([*cli, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line, `hf-ema <command>: error: ...`, containing every needle."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"hf-ema {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, tokenizer, lm_data):
    """A real Trainer run of the tiny Llama with EMACallback and post-hoc snapshots: checkpoints 4 and 8 (each with
    `ema/`), `ema_posthoc/step-N/` every 2 steps, losses logged, the final model saved. Read-only: tests that change
    it work on a copy."""
    from _trainer_args import cpu_args
    from transformers import Trainer

    from hf_ema import EMACallback, PostHocConfig
    from hf_ema.demo.toy import tiny_causal_lm

    run = tmp_path_factory.mktemp("faults") / "run"
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    args = cpu_args(run, max_steps=8, save_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    callback = EMACallback(decay=0.7, eval_ema=False, posthoc=PostHocConfig(snapshot_every=2))
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_data[0], processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()
    trainer.save_model(str(run))
    return run


@pytest.fixture
def run_copy(posthoc_run, tmp_path):
    """A private copy of the run (same folder name), for tests that try to damage it."""
    copy = tmp_path / "run"
    shutil.copytree(posthoc_run, copy)
    return copy


# ---------------------------------------------------------------------- never destroy inputs or foreign folders


@pytest.mark.parametrize(
    "out, relation",
    [(".", "contains"), ("checkpoint-8", "is"), ("checkpoint-8/ema", "lies inside")],
    ids=["run-folder", "an-input", "inside-an-input"],
)
def test_merge_into_its_inputs_is_refused(run_copy, out, relation):
    before = tree_hashes(run_copy)
    target = run_copy / out
    proc = hf_ema(
        "merge", str(run_copy / "checkpoint-4"), str(run_copy / "checkpoint-8"), "--out", str(target), "--overwrite"
    )
    assert_one_line_error(proc, "merge", f"`--out` `{target}` {relation} the input")
    assert tree_hashes(run_copy) == before


@pytest.mark.parametrize(
    "out, relation",
    [(".", "contains"), ("ema", "is"), ("ema_posthoc/step-000000008", "lies inside")],
    ids=["run-folder", "ema", "inside-snapshots"],
)
def test_posthoc_into_its_inputs_is_refused(run_copy, out, relation):
    before = tree_hashes(run_copy)
    target = run_copy / out
    proc = hf_ema("posthoc", str(run_copy), "--sigma-rel", "0.08", "--out", str(target), "--overwrite")
    assert_one_line_error(proc, "posthoc", f"`--out` `{target}`", relation)
    assert tree_hashes(run_copy) == before


def test_overwrite_never_replaces_a_foreign_folder_or_a_run(posthoc_run, tmp_path):
    inputs = [str(posthoc_run / "checkpoint-4"), str(posthoc_run / "checkpoint-8")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not hf-ema's")
    proc = hf_ema("merge", *inputs, "--out", str(foreign), "--overwrite")
    assert_one_line_error(proc, "merge", f"`{foreign}`", "was not written by hf-ema")
    assert (foreign / "notes.txt").read_text() == "not hf-ema's"

    other_run = tmp_path / "other-run"
    shutil.copytree(posthoc_run, other_run)
    before = tree_hashes(other_run)
    proc = hf_ema("demo", "--output-dir", str(other_run), "--force", "--no-serve")
    assert_one_line_error(proc, "demo", f"`--output-dir` `{other_run}` is a training run folder")
    assert tree_hashes(other_run) == before


def test_overwrite_replaces_an_hf_ema_output(posthoc_run, tmp_path):
    inputs = [str(posthoc_run / "checkpoint-4"), str(posthoc_run / "checkpoint-8"), "--no-progress"]
    out = tmp_path / "merged"
    assert hf_ema("merge", *inputs, "--out", str(out)).returncode == 0
    assert (out / MARKER_NAME).is_file() and (out / "model.safetensors").is_file()
    # The refusal names the flag to use, not the library's `overwrite=True`.
    assert_one_line_error(hf_ema("merge", *inputs, "--out", str(out)), "merge", "exists; pass --overwrite")
    (out / "model.safetensors").unlink()
    proc = hf_ema("merge", *inputs, "--out", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and (out / MARKER_NAME).is_file()


def test_library_errors_name_the_library_argument(posthoc_run, tmp_path):
    from hf_ema import ConfigError, merge_checkpoints

    inputs = [posthoc_run / "checkpoint-4", posthoc_run / "checkpoint-8"]
    merge_checkpoints(inputs, tmp_path / "m", progress=False)
    with pytest.raises(ConfigError, match=r"`output_dir` .* exists; pass overwrite=True to replace it"):
        merge_checkpoints(inputs, tmp_path / "m", progress=False)
    with pytest.raises(ConfigError, match="contains the input"):
        merge_checkpoints(inputs, posthoc_run, overwrite=True, progress=False)


def test_swap_at_end_never_replaces_a_foreign_raw_folder(tmp_path, tokenizer, lm_data):
    """Library path (no CLI): `EMACallback(swap_at_end=True)` refuses to replace a `raw/` it did not write, and
    replaces its own."""
    from _trainer_args import cpu_args
    from transformers import Trainer

    from hf_ema import EMACallback
    from hf_ema.demo.toy import tiny_causal_lm
    from hf_ema.utils.output import OutputFolderError

    def train(out: Path) -> None:
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
        args = cpu_args(out, max_steps=2, save_strategy="no", per_device_train_batch_size=4)
        callback = EMACallback(decay=0.5, eval_ema=False, swap_at_end=True)
        Trainer(model=model, args=args, train_dataset=lm_data[0], callbacks=[callback]).train()

    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    (run / "raw" / "notes.txt").write_text("user file")
    with pytest.raises(OutputFolderError, match="was not written by hf-ema"):
        train(run)
    assert sorted(p.name for p in (run / "raw").iterdir()) == ["notes.txt"]

    (run / "raw" / "notes.txt").unlink()
    train(run)  # an empty raw/ is hf-ema's to fill
    assert (run / "raw" / MARKER_NAME).is_file() and (run / "raw" / "model.safetensors").is_file()
    train(run)  # and its own raw/ is replaced
    assert (run / "raw" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- one-line errors for bad files and flags


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 16)


def _huge_header(path: Path) -> None:
    # A header length of 2**60 bytes: a reader that trusted it would try to allocate it.
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + data[8:])


CORRUPTIONS = {"truncated": _truncate, "garbage": _garbage, "huge-header": _huge_header}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_merge_corrupt_safetensors(run_copy, tmp_path, corruption):
    bad = run_copy / "checkpoint-4" / "model.safetensors"
    CORRUPTIONS[corruption](bad)
    out = tmp_path / "merged"
    proc = hf_ema("merge", str(run_copy / "checkpoint-4"), str(run_copy / "checkpoint-8"), "--out", str(out))
    assert_one_line_error(proc, "merge", f"`{bad}`")
    assert not out.exists()


def test_posthoc_corrupt_snapshot(run_copy, tmp_path):
    bad = run_copy / "ema_posthoc" / "step-000000004" / "sigma_rel-0.1" / "model.safetensors"
    _truncate(bad)
    out = tmp_path / "ema-0.08"
    proc = hf_ema("posthoc", str(run_copy), "--sigma-rel", "0.08", "--out", str(out))
    assert_one_line_error(proc, "posthoc", f"`{bad}` is truncated")
    assert not out.exists()


def test_push_corrupt_safetensors_fails_before_the_network(run_copy):
    bad = run_copy / "ema" / "model.safetensors"
    _huge_header(bad)
    with SilentServer() as server:
        proc = hf_ema(
            "push", str(run_copy), "--repo-id", "user/x", "--token", "fake", env={**server.env, "HF_HUB_OFFLINE": "0"}
        )
        assert_one_line_error(proc, "push", f"`{bad}`", "header length")
        assert server.connections == 0


def test_serve_corrupt_safetensors(run_copy):
    pytest.importorskip("gradio")
    bad = run_copy / "ema" / "model.safetensors"
    _garbage(bad)
    proc = hf_ema("serve", str(run_copy), "--port", str(free_port()))
    assert_one_line_error(proc, "serve", f"`{bad}`")


def baseless_lora_checkpoint(tmp_path: Path) -> Path:
    """A LoRA checkpoint (with `ema/`) whose adapter names no base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ema import ModelEMA, save_ema

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    model.save_pretrained(checkpoint)  # a model built from a config: `base_model_name_or_path` is empty
    save_ema(ModelEMA(model, decay=0.9), checkpoint / "ema")
    return checkpoint


def test_serve_lora_without_a_base_model_names_the_flag_once(tmp_path):
    """A LoRA checkpoint whose adapter names no base model: `hf-ema serve` says to pass `--base-model`, once."""
    pytest.importorskip("gradio")
    proc = hf_ema("serve", str(baseless_lora_checkpoint(tmp_path)), "--port", str(free_port()))
    line = assert_one_line_error(proc, "serve", "names no base model", "pass `--base-model`")
    assert line.count("--base-model") == 1, line


def test_what_the_demo_install_leaves_out_is_named_in_one_line(posthoc_run, tmp_path):
    """peft and matplotlib are extras (`bash scripts/demo.sh` installs neither): a command that needs one names it
    and the extra that installs it, in one line, before it writes anything."""
    pytest.importorskip("gradio")
    hint = "install hf-ema's `{0}` extra (pip install '.[{0}]' in a clone of hf-ema)"
    out = tmp_path / "lora-demo"
    proc = hf_ema("demo", "--lora", "--no-serve", "--output-dir", str(out), without=NOT_IN_THE_DEMO)
    assert_one_line_error(proc, "demo", "`--lora` needs peft, which is not installed", hint.format("peft"))
    assert not out.exists()
    png = tmp_path / "loss.png"
    proc = hf_ema("plot", str(posthoc_run), "--out", str(png), without=NOT_IN_THE_DEMO)
    assert_one_line_error(proc, "plot", "`hf-ema plot` needs matplotlib", hint.format("plot"))
    assert not png.exists()
    checkpoint = baseless_lora_checkpoint(tmp_path)
    proc = hf_ema("serve", str(checkpoint), "--port", str(free_port()), without=NOT_IN_THE_DEMO)
    assert_one_line_error(proc, "serve", f"the adapter run `{checkpoint}` needs peft", hint.format("peft"))


def test_merge_out_is_a_file_and_plot_out_is_a_folder(posthoc_run, tmp_path):
    a_file = tmp_path / "weights.bin"
    a_file.write_text("user data")
    proc = hf_ema("merge", str(posthoc_run / "checkpoint-4"), str(posthoc_run / "checkpoint-8"), "--out", str(a_file))
    assert_one_line_error(proc, "merge", f"`--out` `{a_file}` is a file")
    assert a_file.read_text() == "user data"

    folder = tmp_path / "plots"
    folder.mkdir()
    proc = hf_ema("plot", str(posthoc_run), "--out", str(folder))
    assert_one_line_error(proc, "plot", f"`--out` `{folder}` is a folder")
    assert not any(folder.iterdir())


# ---------------------------------------------------------------------- push: token first, every call bounded


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def connections(self) -> int:
        return len(self.accepted)

    @property
    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url}

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)  # held open, never read from or written to

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def hub_env(tmp_path):
    """Online mode, no token anywhere (an empty HF_HOME, no token variable)."""
    env: dict[str, str | None] = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE"):
        env[name] = None
    return env


def test_push_without_token_fails_before_any_network_call(posthoc_run, hub_env):
    with SilentServer() as server:
        proc = hf_ema("push", str(posthoc_run), "--repo-id", "user/x", env={**hub_env, **server.env})
        assert_one_line_error(proc, "push", "needs a Hugging Face token", "`--token`", "HF_TOKEN")
        assert server.connections == 0


def test_push_to_a_silent_endpoint_ends_with_a_clear_error(posthoc_run, hub_env):
    """The endpoint accepts the connection and never answers: the default timeout ends the push within 60 s."""
    with SilentServer() as server:
        start = time.monotonic()
        proc = hf_ema(
            "push", str(posthoc_run), "--repo-id", "user/x", "--token", "fake", env={**hub_env, **server.env}
        )
        elapsed = time.monotonic() - start
        assert_one_line_error(proc, "push", f"the Hub at {server.url} did not answer within 30 s", "`--timeout`")
        assert server.connections >= 1
    assert elapsed < 60, elapsed


def test_push_unreachable_or_offline(posthoc_run, hub_env):
    port = free_port()  # nothing listens there: the connection is refused
    proc = hf_ema(
        "push",
        str(posthoc_run),
        "--repo-id",
        "user/x",
        "--token",
        "fake",
        env={**hub_env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
    )
    assert_one_line_error(proc, "push", f"could not reach the Hub at http://127.0.0.1:{port}")

    proc = hf_ema("push", str(posthoc_run), "--repo-id", "user/x", "--token", "fake", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "push", "HF_HUB_OFFLINE is set")


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--repo-id", "bad id!!"], ["`--repo-id` must be a Hub repository id like `user/my-model`, got 'bad id!!'"]),
        (["--repo-id", "user/a--b"], ["got 'user/a--b'", "Cannot have -- or .."]),
        (["--repo-id", "a/b/c"], ["got 'a/b/c'", "'repo_name' or 'namespace/repo_name'"]),
        (
            ["--repo-id", "user/x", "--subfolder", "ema/.git"],
            ["`--subfolder` must be a folder the Hub accepts", "'.git/'"],
        ),
    ],
    ids=["characters", "double-dash", "three-parts", "git-subfolder"],
)
def test_push_names_the_hub_refuses_fail_before_the_network(posthoc_run, hub_env, flags, needles):
    """huggingface_hub's own checks of the repository id and the folder in it: one line, exit 2, no connection."""
    with SilentServer() as server:
        proc = hf_ema("push", str(posthoc_run), *flags, "--token", "fake", env={**hub_env, **server.env})
        assert_one_line_error(proc, "push", *needles)
        assert server.connections == 0
