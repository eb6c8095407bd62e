"""Contrastive self-supervised learning: SimCLR with any L_{phi,psi} or alpha-CL loss, and DirectCLR.

    python -m experiments.ssl --config configs/ssl.py:cpu --workdir runs/ssl_cpu
    python -m experiments.ssl --config configs/ssl.py:cpu --config.ssl.loss=r_s --workdir runs/ssl_r_s
    python -m experiments.ssl --config configs/ssl.py:cpu --config.model.projector=none \
        --config.ssl.directclr_dim=16 --workdir runs/ssl_directclr

Trains the loss of `--config.ssl` on the images of `--config.data` with the generic loop; logs the
loss and collapse metrics every step, a linear probe and kNN of the frozen backbone and the
embeddings' singular-value spectra every `train.eval_every` steps; writes metrics.jsonl, spectra.npz,
loss.png, probe.png, spectrum.png, config.json and checkpoints, and resumes from the workdir.
The body is `lorank.train.contrastive.run`.
"""

from experiments import cli
from lorank.train.contrastive import run

if __name__ == "__main__":
    cli.launch(run, "configs/ssl.py:cpu", resumable=True)
