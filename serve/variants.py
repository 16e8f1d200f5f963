"""The weight variants a pane can show, and building them on demand from a run's files.

A variant is one of: the checkpoint's raw weights, its EMA, the plain EMA under a bias-corrected (BEMA) EMA's
correction (`hf_ema.write_plain_ema`), a post-hoc EMA of any `sigma_rel` reconstructed from the
run's `ema_posthoc/` snapshots (`hf_ema.reconstruct`), a merge of the last `k` checkpoints (`hf_ema.merge_checkpoints`,
mean or WSM), or another checkpoint's EMA. [`VariantStore`] builds each once (reconstructions and merges are written
to the app's own cache folder, never into the run), keeps the loaded weights, and runs a request's variants together
(see `serve.batching`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hf_ema import (
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    merge_checkpoints,
    read_ema_state,
    reconstruct,
    write_plain_ema,
)
from hf_ema.posthoc import RECIPE_NAME as POSTHOC_RECIPE_NAME
from hf_ema.posthoc import describe_snapshots, list_snapshots
from hf_ema.tools import MERGE_RECIPE_NAME
from hf_ema.utils.jsonio import read_json
from hf_ema.utils.paths import (
    MARKER_NAME,
    POSTHOC_DIRNAME,
    checkpoint_step,
    is_ema_folder,
    list_checkpoints,
    posthoc_step,
)
from hf_ema.utils.safetensors_files import parse_size
from hf_ema.utils.validation import check_size

from .batching import SingleVariant, VariantBatch, make_adapter_batch, make_variant_batch
from .cache import BoundedCache
from .loading import (
    EMA,
    LOAD_LOCK,
    RAW,
    CheckpointCatalog,
    CheckpointRef,
    ModelPair,
    checked_load,
    has_raw_weights,
    load_once,
)
from .specs import VariantSpec

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_CACHE_VARIANTS",
    "Variant",
    "VariantStore",
    "is_bema",
    "run_folder",
    "snapshot_note",
    "snapshot_steps",
]

logger = logging.getLogger(__name__)

#: Post-hoc reconstructions and merges kept on disk by default: at most this many folders ...
DEFAULT_CACHE_VARIANTS = 8
#: ... holding at most this much (the least recently used folder is removed first).
DEFAULT_CACHE_SIZE = "20GB"
#: The app's temporary folders start with this (all removed at exit).
TEMP_PREFIX = "hf_ema_serve_"
_DIGEST_RE = re.compile(r"[0-9a-f]{16}")
#: Adapter batches kept per store (each holds only its adapters' stacked low-rank weights; the base is shared).
_MAX_ADAPTER_BATCHES = 16
#: The placeholder shown in publish commands.
REPO_PLACEHOLDER = "<user>/<model>"


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


def is_bema(ref: CheckpointRef) -> bool:
    """Whether a local checkpoint's EMA is bias-corrected (BEMA): its `ema/` holds the corrected weights, and its
    plain EMA can be shown beside them (the `ema_plain` variant).

    Args:
        ref (`CheckpointRef`): The checkpoint.
    """
    if not ref.is_local or not is_ema_folder(ref.ema_location):
        return False
    try:
        config = read_ema_state(ref.ema_location).get("config") or {}
    except CheckpointError:  # a damaged state: the page says so elsewhere
        return False
    return isinstance(config.get("bema"), dict)


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
    snapshots = list_snapshots(run) if run is not None and snapshot_steps(run) else []
    if snapshots:
        described = describe_snapshots((s.step, s.sigma_rel) for s in snapshots)
        return f"Post-hoc EMA: {described} in `{run / POSTHOC_DIRNAME}`: any `sigma_rel` can be reconstructed."
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


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _remove_folder(name: str, folder: Path) -> None:
    logger.info("removing the cached variant %s (the cache is full)", folder)
    shutil.rmtree(folder, ignore_errors=True)


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
        used = describe_snapshots((entry["step"], entry["sigma_rel"]) for entry in recipe["snapshots"])
        note = f"reconstructed at step {recipe['step']} from {used}; profile fit error {recipe['relative_profile_error']:.1%}"
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

    Reconstructed and merged weights go to `cache_dir`, one folder per recipe, so asking twice builds once. The
    folders kept there are bounded by count and by bytes: the least recently used folder is removed first (the one
    just built is always kept). A temporary `cache_dir` (the default) is removed at exit; a `cache_dir` you name is
    kept, and the folders an earlier app left in it are used again. Every model load, reconstruction and merge holds
    `serve.loading.LOAD_LOCK`. Full models are kept in memory up to `max_models`, stacked batches
    (`serve.batching`) up to `max_batches`; PEFT variants are loaded as extra adapters on the checkpoint's
    `PeftModel`.

    Args:
        catalog (`CheckpointCatalog`): The checkpoints.
        cache_dir (`str` or `os.PathLike`, *optional*): Where to write reconstructions and merges (kept at exit);
            a temporary folder, removed at exit, when not given.
        max_cached_variants (`int`, *optional*, defaults to `DEFAULT_CACHE_VARIANTS` (8)): Built folders kept.
        max_cache_size (`int` or `str`, *optional*, defaults to `DEFAULT_CACHE_SIZE` (`"20GB"`)): The most the
            built folders may hold, in bytes or as a size such as `"5GB"`.
        max_models (`int`, *optional*, defaults to 6): Extra full models kept loaded.
        max_batches (`int`, *optional*, defaults to 2): Stacked variant batches kept.
    """

    def __init__(
        self,
        catalog: CheckpointCatalog,
        cache_dir: str | os.PathLike | None = None,
        *,
        max_cached_variants: int = DEFAULT_CACHE_VARIANTS,
        max_cache_size: int | str = DEFAULT_CACHE_SIZE,
        max_models: int = 6,
        max_batches: int = 2,
    ) -> None:
        if not isinstance(catalog, CheckpointCatalog):
            raise ConfigTypeError(f"`catalog` must be a CheckpointCatalog, got {type(catalog).__name__}")
        check_size("max_cache_size", max_cache_size)
        self.catalog = catalog
        self._folders: BoundedCache[str, Path] = BoundedCache(
            max_cached_variants,
            max_bytes=parse_size(max_cache_size),
            size=_folder_bytes,
            on_evict=_remove_folder,
            name="max_cached_variants",
        )
        self.keep_cache = cache_dir is not None
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "variants_")
            atexit.register(shutil.rmtree, cache_dir, True)  # made here, removed here
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_folders()
        self._models: BoundedCache[str, nn.Module] = BoundedCache(max_models, name="max_models")
        # Built batches keep their models alive (the value holds them), so no other model can take one of the ids
        # that key them while they are kept.
        self._batches: BoundedCache[tuple, tuple[Any, VariantBatch]] = BoundedCache(max_batches, name="max_batches")
        self._adapter_batches: BoundedCache[tuple, tuple[Any, VariantBatch]] = BoundedCache(_MAX_ADAPTER_BATCHES)

    @property
    def cached_folders(self) -> list[Path]:
        """The built folders kept in `cache_dir`, least recently used first."""
        return [self.cache_dir / name for name in self._folders.keys()]  # noqa: SIM118 (not a dict)

    def _adopt_folders(self) -> None:
        """The folders an earlier app built in a named `cache_dir` (its digest names, hf-ema's output marker), oldest
        first, within the bounds."""
        found = [
            child
            for child in self.cache_dir.iterdir()
            if _DIGEST_RE.fullmatch(child.name) and child.is_dir() and (child / MARKER_NAME).is_file()
        ]
        for folder in sorted(found, key=lambda f: f.stat().st_mtime):
            self._folders.put(folder.name, folder)

    # ------------------------------------------------------------------------------------------------ building
    def _cached_folder(self, key: str, build: Callable[[Path], Any]) -> Path:
        """`cache_dir/<digest>`, built by `build(folder)` the first time (under `LOAD_LOCK`: reconstructing and merging
        load weights too). Call it holding `LOAD_LOCK` until the folder is loaded: no other build evicts it meanwhile.
        """
        folder = self.cache_dir / hashlib.sha1(key.encode()).hexdigest()[:16]

        def make() -> Path:
            if not folder.is_dir():
                build(folder)
            return folder

        return load_once(self._folders, folder.name, make)

    def _load_full(self, folder: str, pair: ModelPair, subfolder: str | None = None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        def load() -> nn.Module:
            kwargs = {k: v for k, v in self.catalog.load_kwargs.items() if k in ("dtype", "trust_remote_code")}
            if subfolder:
                kwargs["subfolder"] = subfolder
            model = checked_load("weights", folder, AutoModelForCausalLM.from_pretrained, folder, **kwargs)
            return checked_load("weights", folder, lambda: model.to(pair.device).eval())

        return load_once(self._models, f"{folder}::{subfolder}", load)

    def _load_adapter(self, folder: str, pair: ModelPair, subfolder: str | None = None) -> str:
        peft_model = pair.models[RAW]
        name = "v_" + hashlib.sha1(f"{folder}::{subfolder}".encode()).hexdigest()[:12]
        with LOAD_LOCK, pair.lock:
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
        if spec.kind == "ema_plain":
            return self._plain(ref, pair, spec)
        return self._merge(ref, pair, spec)

    def _own(self, ref: CheckpointRef, pair: ModelPair, spec: VariantSpec, which: str) -> Variant:
        if which == RAW:
            variant = Variant(spec, f"raw · {ref.label}", ref.location, self._raw_command(ref))
        else:
            name = "BEMA" if is_bema(ref) else "EMA"
            variant = Variant(spec, f"{name} · {ref.label}", ref.ema_location, self._push_command(ref))
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

        out = run / (f"ema-sigma_rel-{spec.sigma_rel:g}" + (f"-step-{step}" if step is not None else ""))
        command = f"hf-ema posthoc {_quote(run)} --sigma-rel {spec.sigma_rel:g}"
        command += (f" --step {step}" if step is not None else "") + f" --out {_quote(out)}"
        with LOAD_LOCK:
            folder = self._cached_folder(key, build)
            note = _posthoc_note(_recipe(folder, POSTHOC_RECIPE_NAME))
            variant = Variant(spec, f"post-hoc EMA σ_rel={spec.sigma_rel:g} · {ref.label}", str(folder), command, note)
            return self._attach(variant, pair, str(folder))

    def _plain(self, ref: CheckpointRef, pair: ModelPair, spec: VariantSpec) -> Variant:
        # BEMA's `ema/` holds the corrected weights; its plain EMA is in `ema_state.safetensors`, written out here.
        self._local_run(ref, "the plain EMA of a BEMA run")
        source = ref.ema_location

        def build(folder: Path) -> None:
            write_plain_ema(source, folder)

        command = f"python -c 'import hf_ema; hf_ema.write_plain_ema({source!r}, \"plain-ema\")'"
        with LOAD_LOCK:
            folder = self._cached_folder(f"plain::{source}", build)
            variant = Variant(spec, f"plain EMA (BEMA uncorrected) · {ref.label}", str(folder), command)
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

        out = run / f"merged-{spec.method}-last{spec.k}"
        command = "hf-ema merge " + " ".join(_quote(p) for p in chosen)
        command += f" --method {spec.method} --out {_quote(out)}"
        name = "mean" if spec.method == "mean" else "WSM"
        label = f"{name} of the last {spec.k} checkpoints · {ref.label}"
        with LOAD_LOCK:
            folder = self._cached_folder(key, build)
            variant = Variant(spec, label, str(folder), command, _merge_note(_recipe(folder, MERGE_RECIPE_NAME)))
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
