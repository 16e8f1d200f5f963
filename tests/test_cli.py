"""The `hf-ema` console script: version, help, env, demo, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from hf_ema import __version__
from hf_ema.cli import main


def test_version_and_help(capsys):
    out = subprocess.run([sys.executable, "-m", "hf_ema", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"hf-ema {__version__}"
    assert main([]) == 2
    assert "<command>" in capsys.readouterr().out


#: What a bug report needs from `hf-ema env`.
_REPORTED = {"torch", "transformers", "accelerate", "peft", "huggingface_hub", "safetensors", "gradio", "datasets"}


def test_env_is_complete_and_imports_nothing_heavy():
    """`hf-ema env` names every package a bug report needs (versions from the installed metadata, "not installed"
    otherwise), the OS and the compiler; it builds the whole CLI and answers without importing torch, transformers or
    any other package it reports on, so it is fast and works when one of them is broken."""
    import importlib.metadata
    import json
    import platform

    from hf_ema.commands.env import PACKAGES
    from hf_ema.engine.native import compiler

    code = (
        "import contextlib, io, json, sys\n"
        "from hf_ema.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = main(['env'])\n"
        "print(json.dumps([code, out.getvalue(), sorted(sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    code, out, modules = json.loads(proc.stdout)
    assert code == 0
    rows = dict(line[2:].split(": ", 1) for line in out.splitlines())
    for name in sorted(_REPORTED):
        assert name in PACKAGES
        assert rows[name] == importlib.metadata.version(name), name
    assert rows["hf-ema"] == __version__
    assert rows["OS"] == f"{platform.platform()} ({platform.machine()})"
    assert rows["C compiler (native CPU kernel)"].startswith(compiler() or "none: ")
    heavy = {"torch", "transformers", "accelerate", "peft", "huggingface_hub", "safetensors", "numpy", "gradio"}
    assert not heavy & {m.split(".")[0] for m in modules}, sorted(heavy & {m.split(".")[0] for m in modules})


def test_importing_hf_ema_does_not_import_gradio():
    code = "import sys, hf_ema, hf_ema.cli; print('gradio' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_package_metadata():
    import hf_ema

    assert hf_ema.__all__ == sorted(hf_ema.__all__)
    for name in hf_ema.__all__:
        assert hasattr(hf_ema, name), name


def test_demo_without_the_demo_extra_names_it(tmp_path, monkeypatch, capsys):
    """Without `tokenizers` (the `demo` extra), `hf-ema demo` says which extra to install, before writing anything."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    out = tmp_path / "tiny"
    assert main(["demo", "--no-serve", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "hf-ema demo: error: the tiny demo model needs tokenizers, which is not installed: install hf-ema's `demo` "
        "extra (pip install '.[demo]' in a clone of hf-ema)"
    )
    assert not out.exists()


def test_every_public_name_is_in_the_api_reference():
    """docs/reference/api.md documents every name of `hf_ema.__all__` (mkdocstrings renders them from docstrings)."""
    import re
    from pathlib import Path

    import hf_ema

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: hf_ema\.(\w+)$", page, re.M))
    assert set(hf_ema.__all__) - {"__version__"} <= documented, sorted(set(hf_ema.__all__) - documented)


def test_wheel_installs_only_the_hf_ema_namespace(tmp_path):
    """`pip install hf-ema` adds no top-level module but `hf_ema`: the app (`serve/` in the repository) ships as
    `hf_ema.app`, found by the CLI through the `hf_ema.apps` entry point."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("hf_ema-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"hf_ema", f"hf_ema-{__version__}.dist-info"}, top_level
    assert "hf_ema/app/launch.py" in names and "hf_ema/app/app.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"hf_ema-{__version__}.dist-info/entry_points.txt").decode()
    assert "[hf_ema.apps]" in entry_points and "serve = hf_ema.app.launch" in entry_points
