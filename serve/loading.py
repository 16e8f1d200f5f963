"""Finding the checkpoints in a folder (or a Hub repo) and loading their raw and EMA models side by side.

Usable without Gradio: [`find_checkpoints`] lists what a path holds, [`load_pair`] loads one checkpoint's raw and EMA
models (for a PEFT checkpoint: the base model once, both adapters on it), [`CheckpointCatalog`] keeps a few loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_ema import read_ema_state
from hf_ema.errors import CheckpointError, ConfigError, ConfigTypeError, require_extra
from hf_ema.utils.jsonio import read_json
from hf_ema.utils.paths import (
    ADAPTER_CONFIG_NAME,
    EMA_DIRNAME,
    STATE_NAME,
    WEIGHT_NAMES,
    checkpoint_step,
    list_checkpoints,
)
from hf_ema.weighted_sum import check_safetensors_file

from .cache import BoundedCache, K, V

__all__ = [
    "LOAD_LOCK",
    "CheckpointCatalog",
    "CheckpointRef",
    "ModelPair",
    "find_checkpoints",
    "load_once",
    "load_pair",
]

logger = logging.getLogger(__name__)

#: Adapter names of the two PEFT adapters loaded on the one base model.
RAW, EMA = "raw", "ema"

#: Held around every model load in the app, whatever thread asks: the catalog's checkpoints, the variants' models and
#: adapters, and the reconstructions and merges that build them. transformers' `from_pretrained` is not thread-safe:
#: two loads in two threads can leave `PreTrainedModel.tie_weights` replaced by the no-op of its `no_tie_weights()`
#: context for good, after which every load in the process fails with "Cannot copy out of meta tensor". Reentrant, so
#: a load may call another (a variant's load asks the catalog for its checkpoint).
LOAD_LOCK = threading.RLock()


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to serve: where its raw weights are; its EMA is in the `ema/` subfolder.

    Args:
        label (`str`): Name shown in the checkpoint picker (`"checkpoint-300"`, `"final"`, or the repo id).
        location (`str`): A local folder, or a Hub repo id when `is_local` is `False`.
        is_local (`bool`, *optional*, defaults to `True`): Whether `location` is a local folder.
        step (`int`, *optional*): The training step, when known.
    """

    label: str
    location: str
    is_local: bool = True
    step: int | None = None

    @property
    def ema_location(self) -> str:
        """The EMA folder (local) or the repo id whose `ema/` subfolder holds the EMA (Hub)."""
        return str(Path(self.location) / EMA_DIRNAME) if self.is_local else self.location

    @property
    def ema_subfolder(self) -> str | None:
        """`"ema"` for a Hub repo (passed to `from_pretrained(..., subfolder=...)`), `None` for a local folder."""
        return None if self.is_local else EMA_DIRNAME


def _has_raw_weights(folder: Path) -> bool:
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        return True
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_NAMES)


def has_raw_weights(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds loadable weights: a model (`config.json` and weights) or a PEFT adapter.

    Args:
        folder (`str` or `os.PathLike`): The folder.
    """
    return _has_raw_weights(Path(folder))


def _has_ema(folder: Path) -> bool:
    return (folder / EMA_DIRNAME / STATE_NAME).is_file()


def _looks_like_repo_id(path: str) -> bool:
    # A path-like string that does not exist is a typo, not a repo id ("runs/tiny" is both: folders win).
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def find_checkpoints(path: str | os.PathLike) -> list[CheckpointRef]:
    """List the servable checkpoints at `path`, oldest first.

    `path` may be one checkpoint (`checkpoint-N/`, or any `save_pretrained` folder with an `ema/` beside the
    weights), a training output folder (every `checkpoint-N/` with an `ema/`, then the folder itself as `"final"`
    when `trainer.save_model()` wrote raw weights there), or a Hub repo id whose `ema/` subfolder holds the EMA
    (used when no local folder of that name exists).

    Args:
        path (`str` or `os.PathLike`): The folder or repo id.

    Returns:
        `list[CheckpointRef]`: at least one entry.

    Raises:
        `CheckpointError`: if `path` is a file, a folder without weights or checkpoints, or weights without `ema/`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigTypeError(f"`path` must be a folder or a Hub repo id, got {path!r}")
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if _looks_like_repo_id(text):
            return [CheckpointRef(label=text, location=text, is_local=False)]
        raise CheckpointError(f"`path` {text!r} is neither an existing folder nor a Hub repo id")
    if not folder.is_dir():
        raise CheckpointError(f"`path` {text!r} is a file; pass a checkpoint folder or a training output folder")
    folder = folder.resolve()

    children = list_checkpoints(folder)
    refs = []
    for child in children:
        if _has_raw_weights(child) and _has_ema(child):
            refs.append(CheckpointRef(label=child.name, location=str(child), step=checkpoint_step(child)))
    if _has_raw_weights(folder) and _has_ema(folder):
        # The run folder itself, when `trainer.save_model()` wrote the final raw weights there.
        own_step = checkpoint_step(folder)
        step = own_step if own_step is not None else _ema_step(folder)
        label = folder.name if own_step is not None or not refs else "final"
        refs.append(CheckpointRef(label=label, location=str(folder), step=step))
    if refs:
        return refs

    if _has_raw_weights(folder):
        raise CheckpointError(
            f"`path` {text!r} holds model weights but no `{EMA_DIRNAME}/` folder with {STATE_NAME}; "
            "was it trained with hf_ema.EMACallback?"
        )
    if children:
        raise CheckpointError(
            f"`path` {text!r} holds {len(children)} checkpoint-N folders but none has both weights and an "
            f"`{EMA_DIRNAME}/` folder; was it trained with hf_ema.EMACallback?"
        )
    raise CheckpointError(
        f"`path` {text!r} is not a checkpoint folder: no config.json with weights, no {ADAPTER_CONFIG_NAME}, "
        "no checkpoint-N/ subfolders"
    )


def _ema_step(folder: Path) -> int | None:
    try:
        return int(read_ema_state(folder / EMA_DIRNAME)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError, OSError):
        return None


def ema_info(ref: CheckpointRef) -> dict[str, Any]:
    """The EMA's `ema_state.json` (step, decay, config...) for `ref`; `{}` when a Hub repo has none or is offline.

    Args:
        ref (`CheckpointRef`): The checkpoint.
    """
    if ref.is_local:
        return read_ema_state(ref.ema_location)  # a missing, unreadable or damaged file: one CheckpointError
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(ref.location, STATE_NAME, subfolder=EMA_DIRNAME)
    except Exception as err:  # offline, private or no such file: the page just shows less
        logger.warning("no %s/%s in %s: %s", EMA_DIRNAME, STATE_NAME, ref.location, err)
        return {}
    return read_json(path)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelPair:
    """A checkpoint's raw and EMA models, ready to generate, plus what the page shows about them.

    For a PEFT checkpoint both names map to the same `PeftModel` holding two adapters, `"raw"` and `"ema"` (and the
    other variants' adapters the app loads on it); its `lock` is held while adapters are loaded or switched.

    Args:
        ref (`CheckpointRef`): Where the models came from.
        tokenizer: The tokenizer.
        models (`dict[str, torch.nn.Module]`): `"raw"` and `"ema"` models.
        is_peft (`bool`, *optional*, defaults to `False`): Whether both are adapters on one `PeftModel`.
        info (`dict`, *optional*): The EMA's `ema_state.json`.
    """

    ref: CheckpointRef
    tokenizer: Any
    models: dict[str, torch.nn.Module]
    is_peft: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        """The device the models run on."""
        return next(self.models[RAW].parameters()).device

    @property
    def context_length(self) -> int | None:
        """The models' maximum sequence length, when their config states one."""
        config = self.models[RAW].config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a generation (from the generation config, else the tokenizer)."""
        gen = getattr(self.models[RAW], "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    @property
    def lock(self) -> threading.Lock:
        """Held while a PEFT model's adapters change (loaded, switched) or run through peft's own batching."""
        return self._lock


def _read_adapter_config(ref: CheckpointRef) -> dict[str, Any] | None:
    if ref.is_local:
        path = Path(ref.location) / ADAPTER_CONFIG_NAME
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(ref.location, ADAPTER_CONFIG_NAME))
        except EntryNotFoundError as err:
            if not isinstance(err, LocalEntryNotFoundError):  # the repo is there but is no PEFT adapter
                return None
            raise CheckpointError(
                f"`path` {ref.location!r} is not a local folder and could not be read from the Hub "
                f"(offline, or no cached copy): {err}"
            ) from err
        except Exception as err:  # offline, no such repo, no access: one clear line
            raise CheckpointError(
                f"`path` {ref.location!r} is not a local folder and could not be read from the Hub: "
                f"{type(err).__name__}: {err}"
            ) from err
    try:
        return read_json(path)
    except OSError as err:
        raise CheckpointError(f"could not read {path}: {err}") from None


def load_once(cache: BoundedCache[K, V], key: K, load: Callable[[], V]) -> V:
    """`cache`'s entry for `key`, loaded by `load()` under [`LOAD_LOCK`] when it is missing.

    The process-wide lock is always taken before the cache's own per-key lock, so two loads can never wait for each
    other in the opposite order.

    Args:
        cache (`BoundedCache`): Where the loaded object is kept.
        key (`Hashable`): Its key.
        load (`Callable`): Loads it.
    """
    value = cache.get(key)
    if value is not None:
        return value
    with LOAD_LOCK:
        return cache.get_or_build(key, load)


def _check_weight_files(ref: CheckpointRef, is_adapter: bool) -> None:
    """A truncated or garbled weights file: one clear error before anything loads."""
    if not ref.is_local:
        return
    kind = "adapter" if is_adapter else "model"
    for what, folder in ((f"raw {kind}", ref.location), (f"EMA {kind}", ref.ema_location)):
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                check_safetensors_file(path)
            except CheckpointError as err:
                raise CheckpointError(f"could not load the {what} from `{folder}`: {err}") from None


def checked_load(what: str, where: str | os.PathLike, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, with any failure (corrupt, truncated or unreadable files, a device that refuses the
    weights) as one `CheckpointError` line naming `what` and `where`.

    Args:
        what (`str`): What is loaded, e.g. `"EMA model"`.
        where (`str` or `os.PathLike`): The folder or repo id it is loaded from.
        fn (`Callable`): The loading call.
        *args, **kwargs: Its arguments.
    """
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"could not load the {what} from `{where}`: {type(err).__name__}: {err}") from err


def _load_models(
    ref: CheckpointRef, adapter_config: dict[str, Any] | None, base_id: str | None, device: str, **load_kwargs: Any
) -> dict[str, torch.nn.Module]:
    """The raw and EMA models (for PEFT: both names on one `PeftModel`), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    ema_sub = {"subfolder": ref.ema_subfolder} if ref.ema_subfolder else {}
    if adapter_config is None:
        load = AutoModelForCausalLM.from_pretrained
        raw = checked_load("raw model", ref.location, load, ref.location, **load_kwargs)
        ema = checked_load("EMA model", ref.ema_location, load, ref.ema_location, **load_kwargs, **ema_sub)
        raw = checked_load("raw model", ref.location, lambda: raw.to(device).eval())
        ema = checked_load("EMA model", ref.ema_location, lambda: ema.to(device).eval())
        return {RAW: raw, EMA: ema}
    require_extra("peft", "peft", f"the adapter run `{ref.location}`")
    from peft import PeftModel

    if not base_id:
        raise CheckpointError(
            f"the adapter in `{ref.location}` names no base model (`base_model_name_or_path` is empty); "
            "pass `base_model`, the base model's folder or Hub repo id"
        )
    base = checked_load("base model", base_id, AutoModelForCausalLM.from_pretrained, base_id, **load_kwargs)
    peft_model = checked_load(
        "raw adapter", ref.location, PeftModel.from_pretrained, base, ref.location, adapter_name=RAW
    )
    checked_load(
        "EMA adapter", ref.ema_location, peft_model.load_adapter, ref.ema_location, adapter_name=EMA, **ema_sub
    )
    peft_model = checked_load("adapters", ref.location, lambda: peft_model.to(device).eval())
    return {RAW: peft_model, EMA: peft_model}


def _load_tokenizer(ref: CheckpointRef, base_id: str | None, trust_remote_code: bool):
    """The tokenizer, from the first place that has one: the checkpoint, its `ema/`, the base model of an adapter."""
    from transformers import AutoTokenizer

    sources = [(ref.location, {}), (ref.ema_location, {"subfolder": ref.ema_subfolder} if ref.ema_subfolder else {})]
    if base_id:
        sources.append((base_id, {}))
    errors = []
    for source, extra in sources:
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        except Exception as err:  # try the next place a tokenizer may be saved
            errors.append(f"{source}: {type(err).__name__}")
    raise CheckpointError(f"no loadable tokenizer for `{ref.location}` (tried {'; '.join(errors)})")


def load_pair(
    ref: CheckpointRef,
    *,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> ModelPair:
    """Load a checkpoint's raw model and its EMA (for PEFT: the base model once, and both adapters on it), holding
    [`LOAD_LOCK`] while the models load.

    Args:
        ref (`CheckpointRef`): The checkpoint, from [`find_checkpoints`].
        base_model (`str`, *optional*): For a PEFT checkpoint, the base model's folder or repo id; defaults to the
            adapter's `base_model_name_or_path`.
        trust_remote_code (`bool`, *optional*, defaults to `False`): Allow custom modelling code from the checkpoint.
        device (`str`, *optional*): Where to run; CUDA when available, else CPU.
        dtype (`torch.dtype`, *optional*): Parameter dtype; defaults to the checkpoint's.

    Returns:
        `ModelPair`: both models in eval mode.

    Raises:
        `CheckpointError`: when a weights, config or tokenizer file cannot be read.
    """
    device = device or _default_device()
    info = ema_info(ref)
    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    adapter_config = _read_adapter_config(ref)
    base_id = None
    if adapter_config is not None:
        base_id = str(base_model or adapter_config.get("base_model_name_or_path") or "") or None
    _check_weight_files(ref, is_adapter=adapter_config is not None)
    with LOAD_LOCK:
        models = _load_models(ref, adapter_config, base_id, device, **load_kwargs)
        tokenizer = _load_tokenizer(ref, base_id, trust_remote_code)
    return ModelPair(ref=ref, tokenizer=tokenizer, models=models, is_peft=adapter_config is not None, info=info)


class CheckpointCatalog:
    """The checkpoints found at a path, loaded on demand and kept (at most `max_loaded` at a time).

    Args:
        path (`str` or `os.PathLike`): A checkpoint folder, a training output folder or a Hub repo id.
        max_loaded (`int`, *optional*, defaults to 2): How many checkpoints stay in memory.
        **load_kwargs: Passed to [`load_pair`] (`base_model`, `trust_remote_code`, `device`, `dtype`).
    """

    def __init__(self, path: str | os.PathLike, max_loaded: int = 2, **load_kwargs: Any) -> None:
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise ConfigError(f"`max_loaded` must be an int >= 1, got {max_loaded!r}")
        self.path = os.fspath(path)
        self.refs = find_checkpoints(path)
        self.max_loaded = max_loaded
        self.load_kwargs = load_kwargs
        self._loaded: BoundedCache[str, ModelPair] = BoundedCache(max_loaded, name="max_loaded")

    @property
    def labels(self) -> list[str]:
        """The checkpoint labels, oldest first."""
        return [ref.label for ref in self.refs]

    @property
    def default_label(self) -> str:
        """The newest checkpoint (the final model when there is one)."""
        return self.refs[-1].label

    def ref(self, label: str | None = None) -> CheckpointRef:
        """The checkpoint called `label` (default: the newest).

        Args:
            label (`str`, *optional*): A label from [`CheckpointCatalog.labels`].
        """
        label = self.default_label if label is None else label
        for ref in self.refs:
            if ref.label == label:
                return ref
        raise ConfigError(f"`checkpoint` must be one of {self.labels!r}, got {label!r}")

    def get(self, label: str | None = None) -> ModelPair:
        """The loaded models of checkpoint `label` (default: the newest), loading them on first use.

        Args:
            label (`str`, *optional*): A label from [`CheckpointCatalog.labels`].
        """
        ref = self.ref(label)

        def load() -> ModelPair:
            logger.info("loading %s", ref.location)
            return load_pair(ref, **self.load_kwargs)

        return load_once(self._loaded, ref.label, load)
