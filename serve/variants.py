"""The weight variants a pane can show, and building them on demand from a run's files.

A variant is one of: the checkpoint's raw weights, its EMA, a post-hoc EMA of any `sigma_rel` reconstructed from the
run's `ema_posthoc/` snapshots (`hf_ema.reconstruct`), a merge of the last `k` checkpoints (`hf_ema.merge_checkpoints`,
mean or WSM), or another checkpoint's EMA. [`VariantStore`] builds each once (reconstructions and merges are written
to the app's own cache folder, never into the run), keeps the loaded weights, and runs a request's variants together
(see `serve.batching`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hf_ema import CheckpointError, ConfigError, ConfigTypeError, merge_checkpoints, reconstruct
from hf_ema.posthoc import RECIPE_NAME as POSTHOC_RECIPE_NAME
from hf_ema.tools import MERGE_RECIPE_NAME
from hf_ema.utils.jsonio import read_json
from hf_ema.utils.paths import POSTHOC_DIRNAME, checkpoint_step, list_checkpoints, posthoc_step

from .batching import SingleVariant, VariantBatch, make_adapter_batch, make_variant_batch
from .cache import BoundedCache
from .loading import EMA, RAW, CheckpointCatalog, CheckpointRef, ModelPair, checked_load, has_raw_weights

__all__ = [
    "KINDS",
    "MAX_PANES",
    "MERGE_METHODS",
    "Variant",
    "VariantSpec",
    "VariantStore",
]

logger = logging.getLogger(__name__)

#: Variant kinds, with the name the page shows for each.
KINDS = {
    "raw": "raw weights",
    "ema": "EMA",
    "posthoc": "post-hoc EMA (any sigma_rel)",
    "merge": "merge of the last k checkpoints",
    "checkpoint_ema": "another checkpoint's EMA",
}
MERGE_METHODS = ("mean", "wsm")
MAX_PANES = 4
#: Adapter batches kept per store (each holds only its adapters' stacked low-rank weights; the base is shared).
_MAX_ADAPTER_BATCHES = 16
_SPEC_RE = re.compile(
    r"^(?:posthoc:(?P<sigma>[^:]+)|merge:(?P<method>[a-z]+):(?P<k>[^:]+)|ema@(?P<ckpt>.+)|(?P<kind>raw|ema))$"
)
#: The placeholder shown in publish commands.
REPO_PLACEHOLDER = "<user>/<model>"


def _as_number(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"`{name}` must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class VariantSpec:
    """What one pane shows; validated when built.

    Args:
        kind (`str`): One of [`KINDS`]: `"raw"`, `"ema"`, `"posthoc"`, `"merge"` or `"checkpoint_ema"`.
        sigma_rel (`float`, *optional*): The post-hoc EMA's relative width (`kind="posthoc"`); its range is checked
            by `hf_ema.reconstruct`.
        k (`int`, *optional*): How many of the newest checkpoints to merge (`kind="merge"`), at least 2.
        method (`str`, *optional*): `"mean"` or `"wsm"` (`kind="merge"`; defaults to `"mean"`).
        checkpoint (`str`, *optional*): The checkpoint whose EMA to show (`kind="checkpoint_ema"`).
    """

    kind: str
    sigma_rel: float | None = None
    k: int | None = None
    method: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "posthoc":
            if self.sigma_rel is None:
                raise ConfigError("`sigma_rel` must be given for a post-hoc EMA, got None")
            object.__setattr__(self, "sigma_rel", _as_number("sigma_rel", self.sigma_rel))
        if self.kind == "merge":
            k = _as_number("k", self.k) if self.k is not None else None
            if k is None or not k.is_integer() or k < 2:
                raise ConfigError(f"`k` (checkpoints to merge) must be a whole number >= 2, got {self.k!r}")
            object.__setattr__(self, "k", int(k))
            method = self.method or "mean"
            if method not in MERGE_METHODS:
                raise ConfigError(f"`method` must be one of {list(MERGE_METHODS)}, got {self.method!r}")
            object.__setattr__(self, "method", method)
        if self.kind == "checkpoint_ema" and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise ConfigError(f"`checkpoint` must name the checkpoint whose EMA to show, got {self.checkpoint!r}")

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """A spec from its short form: `raw`, `ema`, `posthoc:0.15`, `merge:mean:3`, `merge:wsm:4`, `ema@checkpoint-8`.

        Args:
            text (`str`): The short form.
        """
        if not isinstance(text, str):
            raise ConfigTypeError(f"`variant` must be a string such as 'posthoc:0.15', got {text!r}")
        match = _SPEC_RE.match(text.strip())
        if match is None:
            raise ConfigError(
                "`variant` must be raw, ema, posthoc:SIGMA_REL, merge:mean:K, merge:wsm:K or ema@CHECKPOINT, "
                f"got {text!r}"
            )
        if match["kind"]:
            return cls(match["kind"])
        if match["sigma"] is not None:
            return cls("posthoc", sigma_rel=_as_number("sigma_rel", match["sigma"]))
        if match["method"] is not None:
            return cls("merge", k=_as_number("k", match["k"]), method=match["method"])
        return cls("checkpoint_ema", checkpoint=match["ckpt"])

    def __str__(self) -> str:
        if self.kind == "posthoc":
            return f"posthoc:{self.sigma_rel:g}"
        if self.kind == "merge":
            return f"merge:{self.method}:{self.k}"
        if self.kind == "checkpoint_ema":
            return f"ema@{self.checkpoint}"
        return self.kind


@dataclass
class Variant:
    """A built variant: where its weights are, how to make them yourself, and the loaded model or adapter.

    Args:
        spec (`VariantSpec`): What was asked for.
        label (`str`): A short title for the pane.
        folder (`str`): The weights' folder (local path, or a Hub repo id).
        command (`str`): The shell command that produces (or publishes) these weights.
        note (`str`): Anything worth knowing (the post-hoc fit error, merge weights...).
        model (`nn.Module`, *optional*): The full model (non-PEFT checkpoints).
        adapter (`str`, *optional*): The adapter's name on the checkpoint's `PeftModel` (PEFT checkpoints).
    """

    spec: VariantSpec
    label: str
    folder: str
    command: str
    note: str = ""
    model: nn.Module | None = None
    adapter: str | None = None


def run_folder(ref: CheckpointRef) -> Path | None:
    """The training output folder of a local checkpoint (the parent of a `checkpoint-N/`), else `None`.

    Args:
        ref (`CheckpointRef`): The checkpoint.
    """
    if not ref.is_local:
        return None
    folder = Path(ref.location)
    return folder.parent if checkpoint_step(folder) is not None else folder


def snapshot_steps(run: Path | None) -> list[int]:
    """The steps of the post-hoc EMA snapshots in `run/ema_posthoc/` (empty when there are none).

    Args:
        run (`Path`, *optional*): The run folder.
    """
    if run is None or not (run / POSTHOC_DIRNAME).is_dir():
        return []
    found = (posthoc_step(child) for child in (run / POSTHOC_DIRNAME).iterdir() if child.is_dir())
    return sorted(step for step in found if step is not None)


def snapshot_note(ref: CheckpointRef) -> str:
    """One line for the page: which post-hoc snapshots the run has, or how to get them.

    Args:
        ref (`CheckpointRef`): The checkpoint shown.
    """
    run = run_folder(ref)
    steps = snapshot_steps(run)
    if steps:
        return (
            f"Post-hoc EMA: {len(steps)} snapshots (steps {steps[0]}–{steps[-1]}) in `{run / POSTHOC_DIRNAME}`: "
            "any `sigma_rel` can be reconstructed."
        )
    where = f"`{run}`" if run is not None else f"`{ref.location}` (a Hub repo)"
    return (
        f"Post-hoc EMA: {where} has no `{POSTHOC_DIRNAME}/` snapshots, so no other EMA width can be reconstructed. "
        "Train with `EMACallback(posthoc=True)` to keep them."
    )


def _quote(path: str | Path) -> str:
    return shlex.quote(str(path))


def _checkpoint_folders(run: Path, up_to: int | None) -> list[tuple[int, Path]]:
    found = [(checkpoint_step(child), child) for child in list_checkpoints(run) if has_raw_weights(child)]
    return [(step, child) for step, child in found if step is not None and (up_to is None or step <= up_to)]


def _recipe(folder: Path, name: str) -> dict[str, Any]:
    """The recipe `reconstruct` or `merge_checkpoints` wrote beside the weights (`{}` when it cannot be read: the
    pane then shows no note)."""
    try:
        recipe = read_json(folder / name)
    except (OSError, CheckpointError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _posthoc_note(recipe: dict[str, Any]) -> str:
    try:
        note = (
            f"reconstructed from {len(recipe['snapshots'])} snapshots at step {recipe['step']}; "
            f"profile fit error {recipe['relative_profile_error']:.1%}"
        )
    except (KeyError, TypeError, ValueError):
        return ""
    if recipe["relative_profile_error"] > 0.05:
        note += " (a poor fit: the snapshots' widths are far from this one)"
    return note


def _merge_note(recipe: dict[str, Any]) -> str:
    try:
        return "weights " + ", ".join(
            f"{Path(c['path']).name} {c['weight']:.3f}" for c in recipe.get("checkpoints", [])
        )
    except (KeyError, TypeError, ValueError):
        return ""


class VariantStore:
    """Builds, caches and runs the variants of a catalog's checkpoints.

    Reconstructed and merged weights go to `cache_dir` (a temporary folder removed at exit when not given), keyed by
    what produced them, so asking twice builds once. Full models are kept in memory up to `max_models`, stacked
    batches (`serve.batching`) up to `max_batches`. PEFT variants are loaded as extra adapters on the checkpoint's
    `PeftModel`.

    Args:
        catalog (`CheckpointCatalog`): The checkpoints.
        cache_dir (`str` or `os.PathLike`, *optional*): Where to write reconstructions and merges.
        max_models (`int`, *optional*, defaults to 6): Extra full models kept loaded.
        max_batches (`int`, *optional*, defaults to 2): Stacked variant batches kept.
    """

    def __init__(self, catalog: CheckpointCatalog, cache_dir=None, max_models: int = 6, max_batches: int = 2) -> None:
        if not isinstance(catalog, CheckpointCatalog):
            raise ConfigTypeError(f"`catalog` must be a CheckpointCatalog, got {type(catalog).__name__}")
        self.catalog = catalog
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="hf_ema_serve_variants_")
            atexit.register(shutil.rmtree, cache_dir, True)  # made here, removed here
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._folders: BoundedCache[str, Path] = BoundedCache(10**6, name="folders")
        self._models: BoundedCache[str, nn.Module] = BoundedCache(max_models, name="max_models")
        # Built batches keep their models alive (the value holds them), so no other model can take one of the ids
        # that key them while they are kept.
        self._batches: BoundedCache[tuple, tuple[Any, VariantBatch]] = BoundedCache(max_batches, name="max_batches")
        self._adapter_batches: BoundedCache[tuple, tuple[Any, VariantBatch]] = BoundedCache(_MAX_ADAPTER_BATCHES)

    # ------------------------------------------------------------------------------------------------ building
    def _cached_folder(self, key: str, build: Callable[[Path], Any]) -> Path:
        """`cache_dir/<digest>`, built by `build(folder)` the first time (one builder at a time per key)."""
        folder = self.cache_dir / hashlib.sha1(key.encode()).hexdigest()[:16]

        def make() -> Path:
            if not folder.is_dir():
                build(folder)
            return folder

        return self._folders.get_or_build(folder.name, make)

    def _load_full(self, folder: str, pair: ModelPair, subfolder: str | None = None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        def load() -> nn.Module:
            kwargs = {k: v for k, v in self.catalog.load_kwargs.items() if k in ("dtype", "trust_remote_code")}
            if subfolder:
                kwargs["subfolder"] = subfolder
            model = checked_load("weights", folder, AutoModelForCausalLM.from_pretrained, folder, **kwargs)
            return checked_load("weights", folder, lambda: model.to(pair.device).eval())

        return self._models.get_or_build(f"{folder}::{subfolder}", load)

    def _load_adapter(self, folder: str, pair: ModelPair, subfolder: str | None = None) -> str:
        peft_model = pair.models[RAW]
        name = "v_" + hashlib.sha1(f"{folder}::{subfolder}".encode()).hexdigest()[:12]
        with pair.lock:
            if name not in peft_model.peft_config:
                kwargs = {"subfolder": subfolder} if subfolder else {}
                checked_load("adapter", folder, peft_model.load_adapter, folder, adapter_name=name, **kwargs)
                peft_model.eval()
        return name

    def _attach(self, variant: Variant, pair: ModelPair, folder: str, subfolder: str | None = None) -> Variant:
        if pair.is_peft:
            variant.adapter = self._load_adapter(folder, pair, subfolder)
        else:
            variant.model = self._load_full(folder, pair, subfolder)
        return variant

    def resolve(self, checkpoint: str | None, spec: VariantSpec) -> Variant:
        """Build `spec` for `checkpoint` (reconstructing or merging on first use) and load it.

        Args:
            checkpoint (`str`, *optional*): A catalog label (default: the newest).
            spec (`VariantSpec`): The variant.

        Raises:
            `ConfigError` or `CheckpointError`: with one line saying what is wrong (no snapshots, a `sigma_rel`
            outside the valid range, checkpoints that do not hold the same model...).
        """
        if not isinstance(spec, VariantSpec):
            raise ConfigTypeError(f"`spec` must be a VariantSpec, got {type(spec).__name__}")
        ref = self.catalog.ref(checkpoint)
        pair = self.catalog.get(ref.label)
        own = {"raw": RAW, "ema": EMA}.get(spec.kind)
        if spec.kind == "checkpoint_ema" and spec.checkpoint == ref.label:
            own = EMA
        if own is not None:  # the checkpoint's own raw or EMA weights, loaded with it
            return self._own(ref, pair, spec, own)
        if spec.kind == "checkpoint_ema":
            other = self.catalog.ref(spec.checkpoint)
            variant = Variant(spec, f"EMA · {other.label}", other.ema_location, self._push_command(other))
            return self._attach(
                variant, pair, other.ema_location if other.is_local else other.location, other.ema_subfolder
            )
        if spec.kind == "posthoc":
            return self._posthoc(ref, pair, spec)
        return self._merge(ref, pair, spec)

    def _own(self, ref: CheckpointRef, pair: ModelPair, spec: VariantSpec, which: str) -> Variant:
        if which == RAW:
            variant = Variant(spec, f"raw · {ref.label}", ref.location, self._raw_command(ref))
        else:
            variant = Variant(spec, f"EMA · {ref.label}", ref.ema_location, self._push_command(ref))
        if pair.is_peft:
            variant.adapter = which
        else:
            variant.model = pair.models[which]
        return variant

    def _local_run(self, ref: CheckpointRef, what: str) -> Path:
        run = run_folder(ref)
        if run is None:
            raise CheckpointError(f"{what} needs the run's files on this machine; `{ref.location}` is a Hub repo")
        return run

    def _posthoc(self, ref: CheckpointRef, pair: ModelPair, spec: VariantSpec) -> Variant:
        run = self._local_run(ref, "a post-hoc EMA")
        step = ref.step if checkpoint_step(ref.location) is not None else None
        key = f"posthoc::{run}::{spec.sigma_rel!r}::{step}"

        def build(folder: Path) -> None:
            logger.info("reconstructing the post-hoc EMA sigma_rel=%g of %s", spec.sigma_rel, run)
            reconstruct(run, sigma_rel=spec.sigma_rel, out_dir=folder, step=step, progress=True)

        folder = self._cached_folder(key, build)
        out = run / (f"ema-sigma_rel-{spec.sigma_rel:g}" + (f"-step-{step}" if step is not None else ""))
        command = f"hf-ema posthoc {_quote(run)} --sigma-rel {spec.sigma_rel:g}"
        command += (f" --step {step}" if step is not None else "") + f" --out {_quote(out)}"
        note = _posthoc_note(_recipe(folder, POSTHOC_RECIPE_NAME))
        variant = Variant(spec, f"post-hoc EMA σ_rel={spec.sigma_rel:g} · {ref.label}", str(folder), command, note)
        return self._attach(variant, pair, str(folder))

    def _merge(self, ref: CheckpointRef, pair: ModelPair, spec: VariantSpec) -> Variant:
        run = self._local_run(ref, "a merge of checkpoints")
        step = ref.step if checkpoint_step(ref.location) is not None else None
        available = _checkpoint_folders(run, step)
        if spec.k > len(available):
            upto = f" up to step {step}" if step is not None else ""
            raise ConfigError(
                f"`k` must be at most {len(available)} (the checkpoint-N folders{upto} in `{run}`), got {spec.k}"
            )
        chosen = [path for _, path in available[-spec.k :]]
        key = f"merge::{spec.method}::" + "::".join(str(p) for p in chosen)

        def build(folder: Path) -> None:
            logger.info("merging %d checkpoints of %s (%s)", len(chosen), run, spec.method)
            merge_checkpoints([str(p) for p in chosen], folder, method=spec.method, progress=True)

        folder = self._cached_folder(key, build)
        out = run / f"merged-{spec.method}-last{spec.k}"
        command = "hf-ema merge " + " ".join(_quote(p) for p in chosen)
        command += f" --method {spec.method} --out {_quote(out)}"
        note = _merge_note(_recipe(folder, MERGE_RECIPE_NAME))
        name = "mean" if spec.method == "mean" else "WSM"
        variant = Variant(spec, f"{name} of the last {spec.k} checkpoints · {ref.label}", str(folder), command, note)
        return self._attach(variant, pair, str(folder))

    @staticmethod
    def _raw_command(ref: CheckpointRef) -> str:
        if not ref.is_local:
            return f"# the raw weights of the Hub repo {ref.location}"
        return f"# the checkpoint's own raw weights: {_quote(ref.location)}"

    @staticmethod
    def _push_command(ref: CheckpointRef) -> str:
        if not ref.is_local:
            return f"# already on the Hub: {ref.location} (subfolder {ref.ema_subfolder})"
        return f"hf-ema push {_quote(ref.location)} --repo-id {REPO_PLACEHOLDER}"

    # ----------------------------------------------------------------------------------------------- running
    def batch(self, checkpoint: str | None, variants: Sequence[Variant]) -> VariantBatch:
        """The variants as one [`VariantBatch`]: one stacked model (adapters or full models), built once and kept.

        Args:
            checkpoint (`str`, *optional*): The catalog label the variants were resolved for.
            variants (`Sequence[Variant]`): From [`VariantStore.resolve`].
        """
        pair = self.catalog.get(checkpoint)
        if not variants:
            raise ConfigError("`variants` must hold at least one variant, got none")
        if pair.is_peft:
            # Adapters are never unloaded and their names stand for their files, so the model and the names key the
            # batch. A stacked adapter batch holds only the adapters' low-rank weights: many are kept.
            peft_model, names = pair.models[RAW], [v.adapter for v in variants]
            key = (id(peft_model), *names)
            build = lambda: (peft_model, make_adapter_batch(peft_model, names, lock=pair.lock))  # noqa: E731
            return self._adapter_batches.get_or_build(key, build)[1]
        models = [v.model for v in variants]
        if len(models) == 1:
            return SingleVariant(models[0])
        return self._batches.get_or_build(tuple(map(id, models)), lambda: (models, make_variant_batch(models)))[1]
