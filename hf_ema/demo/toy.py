"""A tiny causal LM, a tokenizer and a corpus that need no network, and a tiny diffusers UNet: for examples, tests
and the demo.

The corpus is the text of `pydoc_data.topics`, which ships with CPython. The tokenizer is a byte-level BPE trained
on it with `tokenizers`; the model is a Llama (or GPT-2) built from a config with random weights.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from ..errors import MissingDependencyError, install_hint

__all__ = [
    "DEMO_EXTRA_PACKAGES",
    "TokenBlocks",
    "corpus_texts",
    "lm_datasets",
    "require_demo_extra",
    "tiny_causal_lm",
    "tiny_unet",
    "train_tokenizer",
]

#: What the `demo` extra installs: only the tiny model's tokenizer needs it.
DEMO_EXTRA_PACKAGES = ("tokenizers",)

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]


def require_demo_extra() -> None:
    """Raise [`MissingDependencyError`], naming the extra to install, unless the packages of the `demo` extra
    (`tokenizers`) import."""
    missing = []
    for name in DEMO_EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"the tiny demo model needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {install_hint('demo')}"
        )


def corpus_texts() -> list[str]:
    """The documents of `pydoc_data.topics` (the Python reference's help topics), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def train_tokenizer(vocab_size: int = 1024, save_dir: str | os.PathLike | None = None):
    """Train a byte-level BPE tokenizer on the bundled corpus and wrap it as a `PreTrainedTokenizerFast`.

    Args:
        vocab_size (`int`, *optional*, defaults to 1024): Vocabulary size.
        save_dir (`str`, *optional*): Also `save_pretrained` the tokenizer there.
    """
    require_demo_extra()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def tiny_causal_lm(
    tokenizer,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised causal LM built from a config (no download).

    Args:
        tokenizer: The tokenizer whose vocabulary and special tokens the model uses.
        arch (`str`, *optional*, defaults to `"llama"`): `"llama"` or `"gpt2"`.
        hidden_size (`int`, *optional*, defaults to 64): Width.
        num_layers (`int`, *optional*, defaults to 2): Depth.
        num_heads (`int`, *optional*, defaults to 4): Attention heads.
        max_positions (`int`, *optional*, defaults to 256): Context length.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): Tie input and output embeddings.
        seed (`int`, *optional*, defaults to 0): Seed of the initialisation.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Parameter dtype.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    config: PretrainedConfig
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **common
        )
    else:
        raise ValueError(f"`arch` must be 'llama' or 'gpt2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def tiny_unet(sample_size: int = 16, seed: int = 0):
    """A two-block diffusers `UNet2DModel` (1 channel, 8 and 16 features) with random weights; its `save_pretrained`
    ignores a `state_dict` argument. Needs `diffusers` (`pip install 'hf-ema[diffusers]'`).

    Args:
        sample_size (`int`, *optional*, defaults to 16): Height and width of its images.
        seed (`int`, *optional*, defaults to 0): Seed of the initial weights.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


@dataclass(eq=False)  # a tensor field: identity, not an elementwise `==`
class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of token ids for causal LM training: a map-style torch dataset the `Trainer` takes as it
    is (its items are `input_ids`, `attention_mask` and `labels`, the labels being the ids; the model shifts them).

    Args:
        input_ids (`torch.Tensor`): `(n_blocks, block_size)` int64 token ids.
    """

    input_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        return f"TokenBlocks(n_blocks={len(self)}, block_size={self.input_ids.shape[1]})"

    def __getitem__(self, index: int | slice) -> dict[str, torch.Tensor]:
        if isinstance(index, str):  # not a `datasets.Dataset`: no column by name
            raise TypeError(f"TokenBlocks is indexed by block position, got {index!r}; the ids are `.input_ids`")
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def select(self, indices) -> TokenBlocks:
        """The blocks at `indices` (e.g. `range(16)`), in that order, as a new `TokenBlocks` (as `datasets`' `select`).

        Args:
            indices (iterable of `int`): Block positions.
        """
        return TokenBlocks(self.input_ids[torch.as_tensor(list(indices), dtype=torch.long)])


def lm_datasets(tokenizer, block_size: int = 64, eval_fraction: float = 0.1, max_train_blocks: int | None = None):
    """Tokenise the bundled corpus into fixed-length blocks for causal LM training, split into train and eval.

    The split is by document (the last `eval_fraction` of documents, in a fixed order), so eval text is unseen.

    Args:
        tokenizer: The tokenizer.
        block_size (`int`, *optional*, defaults to 64): Tokens per example.
        eval_fraction (`float`, *optional*, defaults to 0.1): Fraction of documents held out.
        max_train_blocks (`int`, *optional*): Cap on the number of training blocks.

    Returns:
        `tuple[TokenBlocks, TokenBlocks]`: the train and eval blocks (torch datasets, so the demo needs no `datasets`).
    """
    texts = corpus_texts()
    n_eval = max(1, int(len(texts) * eval_fraction))
    out = []
    for split, docs in (("train", texts[:-n_eval]), ("eval", texts[-n_eval:])):
        ids: list[int] = []
        for doc in docs:
            ids.extend(tokenizer(doc)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        n_blocks = len(ids) // block_size
        if split == "train" and max_train_blocks is not None:
            n_blocks = min(n_blocks, max_train_blocks)
        out.append(
            TokenBlocks(torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size))
        )
    return out[0], out[1]
