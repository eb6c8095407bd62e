"""Non-contrastive self-supervised learning: BYOL / SimSiam with MLP, linear, DirectPred or DirectCopy predictors.

    python -m experiments.noncontrastive --config configs/noncontrastive.py:cpu --workdir runs/nc_cpu
    python -m experiments.noncontrastive --config configs/noncontrastive.py:cpu --config.ssl.predictor=none \
        --workdir runs/nc_no_predictor

Trains the method of `--config.ssl` on the images of `--config.data` with the generic loop;
logs the loss and the collapse metrics (per-dimension std and effective rank of the normalized
projections) every step, a linear probe and kNN of the frozen backbone (and the linear
predictor's eigenspace alignment with F) every `train.eval_every` steps; writes metrics.jsonl,
loss.png, probe.png, alignment.png, config.json and checkpoints, and resumes from the workdir.
The body is `lorank.train.noncontrastive.run`.
"""

from experiments import cli
from lorank.train.noncontrastive import run

if __name__ == "__main__":
    cli.launch(run, "configs/noncontrastive.py:cpu", resumable=True)
