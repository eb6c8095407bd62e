"""Fine-tune a pretrained LLaMA-style model with any method of the pretraining experiment.

    python -m experiments.finetune --config configs/finetune.py:tiny --workdir runs/ft_tiny
    python -m experiments.finetune --config configs/finetune.py:tiny --config.optim.name=lora --workdir runs/ft_lora
    python -m experiments.finetune --config configs/finetune.py:sft --config.init.path=/ckpt/llama \
        --config.data.train_file=/data/sft.jsonl --config.export.hf_path=/ckpt/llama-sft --workdir runs/sft

Starts from a lorank run (`--config.init.source=lorank --config.init.path=WORKDIR`, e.g. the
main job's) or a Hugging Face LLaMA checkpoint (`--config.init.source=hf`); trains with
`--config.optim.name` (adamw, adamw8bit, sgd, galore, galore8bit, galore_adafactor, lora, relora;
`--config.optim.update_schedule=per_layer` where the method allows); evaluates the held-out loss
and perplexity (and eval_loss/retain on another corpus); writes metrics.jsonl, loss.png,
config.json and checkpoints to the workdir, resumes there, ends with a sample and, with
`--config.export.hf_path`, a Hugging Face checkpoint. The body is `lorank.train.finetune.run`.
"""

from experiments import cli
from lorank.train.finetune import run

if __name__ == "__main__":
    cli.launch(run, "configs/finetune.py:tiny", resumable=True)
