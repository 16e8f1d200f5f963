"""torchrun worker: `Trainer(push_to_hub=True)` + DDP on CPU (gloo) with the DDP-sharded EMA, pushing every checkpoint.

Usage: `HF_ENDPOINT=<stand-in Hub> torchrun --nproc_per_node 2 tests/dist/trainer_push_worker.py OUT_DIR`. Trains 4
steps, saving and pushing at steps 2 and 4 (`hub_strategy="checkpoint"`), then `trainer.push_to_hub()`. Rank 0
records the raw weights at the start and after every optimizer step in `OUT_DIR/raw_weights.safetensors` (keys
`"<step>/<name>"`), so that `tests/test_hub.py` can check each pushed EMA against an EMA it computes itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DECAY  # noqa: E402
from trainer_ddp_worker import dataset, training_args  # noqa: E402

from hf_ema import EMACallback  # noqa: E402


class RecordWeights(TrainerCallback):
    def __init__(self):
        self.weights: dict[str, torch.Tensor] = {}

    def _record(self, step, model):
        for name, param in model.named_parameters():
            self.weights[f"{step}/{name}"] = param.detach().clone().contiguous()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state.global_step, model)


def main() -> None:
    from accelerate import PartialState
    from transformers import Trainer

    from common import build_model

    out = Path(sys.argv[1])
    state = PartialState()  # the Trainer would set up the process group the same way
    args = training_args(
        out / "run",
        eval_strategy="no",
        push_to_hub=True,
        hub_model_id="user/ddp-ema",
        hub_token="fake-token",
        hub_strategy="checkpoint",
        hub_always_push=True,  # push every checkpoint (else a push still running skips the next one)
    )
    callback = EMACallback(decay=DECAY)
    recorder = RecordWeights()
    trainer = Trainer(
        model=build_model(seed=0),
        args=args,
        train_dataset=dataset(),
        callbacks=[callback, recorder],
    )
    trainer.train()
    trainer.push_to_hub()
    if state.is_main_process:
        save_file(recorder.weights, str(out / "raw_weights.safetensors"))
    info = {"layout": callback.ema.layout.kind, "ema_bytes": callback.ema.num_bytes()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(info))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
    # Tear the process group down before the interpreter exits: gloo's threads destroyed at exit can abort the
    # process ("terminate called without an active exception") after every check has passed.
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
