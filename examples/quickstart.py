"""Quickstart: an EMA of a causal LM's weights with the Hugging Face `Trainer`, from training to post-hoc EMA.

    pip install ".[examples]"                                       # in a clone of hf-ema (adds datasets)
    python examples/quickstart.py                                   # offline, a few minutes on a laptop CPU
    python examples/quickstart.py --output-dir runs/qs --max-steps 1200 --save-steps 200

The script is written the way you would write your own: swap in your tokenizer, model and data where the comments
say so. It runs offline: the tokenizer is trained here on Python's own help text (`pydoc_data.topics`) and the
model is a small Llama built from a config. It

1. trains with `EMACallback(posthoc=True)`: the EMA is updated after every optimizer step, evaluated beside the raw
   weights (`eval_ema_loss`), picks the best checkpoint (`metric_for_best_model="eval_ema_loss"`) and is written
   to every `checkpoint-N/ema/` and to `OUTPUT_DIR/ema/`;
2. resumes from a checkpoint, as after an interruption: the EMA continues exactly where it was;
3. loads the EMA with `from_pretrained` and `pipeline`;
4. builds the EMA of another width after training (`hf_ema.reconstruct`, EDM2's post-hoc EMA) and a weighted
   merge of the last checkpoints (`hf_ema.merge_checkpoints`, WSM), and compares their eval losses.
"""

from __future__ import annotations

import argparse
from pydoc_data.topics import topics

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
)

import hf_ema
from hf_ema import EMACallback

BLOCK_SIZE = 64  # tokens per training example


def load_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    # With your own model, load its tokenizer instead:
    #     tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


def load_model(tokenizer: PreTrainedTokenizerFast):
    # With your own model: model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=BLOCK_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def load_datasets(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[Dataset, Dataset]:
    # With your own text files: texts = load_dataset("text", data_files="train.txt")["train"]["text"]
    def to_blocks(batch):  # concatenate the documents and cut them into blocks of BLOCK_SIZE tokens
        ids = [token for doc in tokenizer(batch["text"])["input_ids"] for token in [*doc, tokenizer.eos_token_id]]
        return {"input_ids": [ids[i : i + BLOCK_SIZE] for i in range(0, len(ids) - BLOCK_SIZE + 1, BLOCK_SIZE)]}

    blocks = Dataset.from_dict({"text": texts}).map(to_blocks, batched=True, remove_columns=["text"])
    split = blocks.train_test_split(test_size=64, seed=0)
    return split["train"], split["test"]


def make_trainer(model, tokenizer, train_ds, eval_ds, output_dir: str, max_steps: int, save_steps: int):
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",  # an EMA (or a merge) does what a decaying learning rate would
        logging_steps=save_steps,
        eval_strategy="steps",
        eval_steps=save_steps,
        save_steps=save_steps,
        metric_for_best_model="eval_ema_loss",  # the best checkpoint is the one whose EMA evaluates best
        report_to="none",
    )
    callback = EMACallback(decay=0.98, posthoc=True)  # fp32 EMA, plus snapshots for any width after training
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,  # saved into every ema/ folder too
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    return trainer, callback


def eval_loss(folder: str, tokenizer, eval_ds, output_dir: str) -> float:
    """The eval loss of the model saved in `folder` (a checkpoint, an `ema/`, a post-hoc EMA, a merge)."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = TrainingArguments(output_dir=output_dir, per_device_eval_batch_size=32, report_to="none")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, eval_dataset=eval_ds, data_collator=collator).evaluate()["eval_loss"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--save-steps", type=int, default=100, help="checkpoint, evaluation and snapshot interval")
    args = parser.parse_args(argv)
    out, steps, every = args.output_dir, args.max_steps, args.save_steps

    # 1. A tokenizer, a model, a dataset; train with the EMA.
    texts = [topics[key] for key in sorted(topics)]
    tokenizer = load_tokenizer(texts)
    train_ds, eval_ds = load_datasets(tokenizer, texts)
    trainer, callback = make_trainer(load_model(tokenizer), tokenizer, train_ds, eval_ds, out, steps, every)
    trainer.train()  # writes out/checkpoint-N/ema/, out/ema/ and the snapshots in out/ema_posthoc/
    final_ema = callback.ema.full_state_dict()
    evals = [entry for entry in trainer.state.log_history if "eval_ema_loss" in entry]
    for entry in evals:
        print(f"step {entry['step']:>4}: eval loss raw {entry['eval_loss']:.4f}  EMA {entry['eval_ema_loss']:.4f}")
    print(f"best checkpoint by eval_ema_loss: {trainer.state.best_model_checkpoint}")

    # 2. Resume from a checkpoint, as after an interruption: the EMA is restored from checkpoint-N/ema/ and ends
    #    where the uninterrupted run's did.
    resume_from = f"{out}/checkpoint-{steps // 2 // every * every}"
    resumed, resumed_callback = make_trainer(load_model(tokenizer), tokenizer, train_ds, eval_ds, out, steps, every)
    resumed.train(resume_from_checkpoint=resume_from)
    resumed_ema = resumed_callback.ema.full_state_dict()
    exact = all(resumed_ema[name].equal(tensor) for name, tensor in final_ema.items())
    print(f"resumed from {resume_from}: the EMA equals the uninterrupted run's: {exact}")

    # 3. The EMA is a regular model folder.
    ema_model = AutoModelForCausalLM.from_pretrained(f"{out}/ema")
    generator = pipeline("text-generation", model=f"{out}/ema")
    sample = generator("The for statement", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    print(f"EMA ({ema_model.num_parameters():,} parameters): {sample!r}")

    # 4. After training: the EMA of another width from the snapshots, and a WSM merge of the last 3 checkpoints.
    posthoc = hf_ema.reconstruct(out, sigma_rel=0.15, out_dir=f"{out}/ema-sigma_rel-0.15", overwrite=True)
    checkpoints = [f"{out}/checkpoint-{s}" for s in range(steps - 2 * every, steps + 1, every)]
    merged = hf_ema.merge_checkpoints(checkpoints, f"{out}/merged", method="wsm", overwrite=True)
    folders = {
        "raw": f"{out}/checkpoint-{steps}",
        "EMA": f"{out}/ema",
        "post-hoc EMA sigma_rel=0.15": str(posthoc),
        "WSM merge of 3 checkpoints": str(merged),
    }
    losses = {name: eval_loss(folder, tokenizer, eval_ds, out) for name, folder in folders.items()}
    for name, loss in losses.items():
        print(f"eval loss {name:>28}: {loss:.4f}")
    return {
        "trainer": trainer,
        "final_ema": final_ema,
        "resumed_ema": resumed_ema,
        "resume_from": resume_from,
        "resumed_trainer": resumed,
        "sample": sample,
        "posthoc": posthoc,
        "merged": merged,
        "losses": losses,
    }


if __name__ == "__main__":
    main()
