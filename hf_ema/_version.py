"""The version of hf-ema: one place, read by `hf_ema.__version__`, the files hf-ema writes and the packaging
(`[tool.setuptools.dynamic]` in pyproject.toml)."""

__version__ = "0.1.0"
