"""Every private API of an upstream library that hf-ema relies on, one module per upstream, each behind a version
check that fails with one clear [`UpstreamChangedError`] when the upstream no longer provides it.

Nothing outside this package touches a private attribute of torch, transformers, accelerate or DeepSpeed.
"""

from ._guard import UpstreamChangedError, require_version, version_of

__all__ = ["UpstreamChangedError", "require_version", "version_of"]
