"""Sub-commands of the `hf-ema` CLI, one module each (see `hf_ema.cli.COMMAND_MODULES`)."""
