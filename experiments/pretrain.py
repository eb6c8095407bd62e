"""Pretrain a LLaMA-style model with any method of the GaLore paper's comparisons.

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir runs/tiny
    python -m experiments.pretrain --config configs/llama.py:tiny --config.optim.name=galore --workdir runs/galore

`--config.optim.name` picks the method (`lorank.train.methods.METHODS`: adamw,
adamw8bit, sgd, galore, galore8bit, galore_adafactor, lowrank, lora, relora);
`--config.optim.update_schedule=per_layer` updates each layer as soon as its gradient
exists (`lorank.train.per_layer`, the GaLore paper's per-layer weight updates).
Prints the parameter counts and progress, writes metrics.jsonl, loss.png (and
grad_stable_rank.png with --config.analysis.grad_rank=True), config.json and
orbax checkpoints to the workdir, resumes from the newest intact checkpoint there, and
ends with a sample from the trained (for LoRA: merged) model. The body is
`lorank.train.pretrain.run`.
"""

from experiments import cli
from lorank.train.pretrain import run

if __name__ == "__main__":
    cli.launch(run, "configs/llama.py:tiny", resumable=True)
