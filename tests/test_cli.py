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


def test_env_lists_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- hf-ema: {__version__}" in out and "- torch: " in out
    from hf_ema.engine.native import compiler

    assert f"- C compiler (native CPU kernel): {compiler() or 'none'}" in out


def test_importing_hf_ema_does_not_import_gradio():
    code = "import sys, hf_ema, hf_ema.cli; print('gradio' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_package_metadata():
    import hf_ema

    assert hf_ema.__all__ == sorted(hf_ema.__all__)
    for name in hf_ema.__all__:
        assert hasattr(hf_ema, name), name
