"""Running the CLI as an install without some packages would: they cannot be imported and
`importlib.util.find_spec` finds none of them (a `None` entry in `sys.modules`), while everything else is the real
environment. Used for what the lighter installs leave out (`bash scripts/demo.sh` has no peft, datasets or
matplotlib)."""

from __future__ import annotations

import sys

_DRIVER = (
    "import runpy, sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['hf-ema', *sys.argv[2:]]\n"
    "runpy.run_module('hf_ema', run_name='__main__', alter_sys=True)\n"
)

#: What `bash scripts/demo.sh` does not install: the `peft`, `plot` and `examples` extras.
NOT_IN_THE_DEMO = ("peft", "datasets", "matplotlib")


def hf_ema_without(packages: tuple[str, ...] | list[str]) -> list[str]:
    """The command line that runs `python -m hf_ema ...` (append the CLI's arguments) with `packages` missing."""
    return [sys.executable, "-c", _DRIVER, ",".join(packages)]
