"""`python -m serve PATH [...]`: the same as `hf-ema serve PATH [...]`, from a clone."""

import sys

from hf_ema.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
