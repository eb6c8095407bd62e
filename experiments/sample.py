"""Generate text from the newest checkpoint of a pretraining run.

    python -m experiments.sample --workdir runs/tiny --prompt "ROMEO:" --length 300
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from lorank.data import tokenizers
from lorank.train import lm, pretrain


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_params(workdir: str, *, warn=_stderr):
    """(config, model, full-rank params) of the newest intact checkpoint in `workdir` (`pretrain.load_run`)."""
    return pretrain.load_run(workdir, warn=warn)


def sample(workdir: str, prompt: str, length: int, *, temperature: float = 0.8, top_k: int = 0,
           seed: int = 0) -> str:
    """The prompt followed by `length` generated tokens, decoded with the run's tokenizer."""
    config, model, params = load_params(workdir)
    tokenizer = tokenizers.make_tokenizer(config.data.get("tokenizer", "byte"))
    out = lm.generate(model, params, tokenizer.encode(prompt), length, key=jax.random.key(seed),
                      temperature=temperature, top_k=top_k)
    return tokenizer.decode(out)


def main():
    workdir = flags.DEFINE_string("workdir", None, "Workdir of a pretraining run.", required=True)
    prompt = flags.DEFINE_string("prompt", "ROMEO:", "Text to continue.")
    length = flags.DEFINE_integer("length", 300, "Tokens to generate.")
    temperature = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
    top_k = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0: all.")
    seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")

    def _main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        print(sample(workdir.value, prompt.value, length.value, temperature=temperature.value,
                     top_k=top_k.value, seed=seed.value))

    app.run(_main)


if __name__ == "__main__":
    main()
