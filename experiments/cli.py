"""The command line shared by experiment modules.

Flags are defined only when a module runs as `__main__`, so any number of
experiment modules can be imported side by side (tests run them in-process
through their `run(config, workdir, ...)` functions).

    if __name__ == "__main__":
        cli.launch(run, "configs/llama.py:tiny", resumable=True)
"""

from __future__ import annotations

import os
from typing import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags


def launch(run: Callable[..., object], default_config: str, *, resumable: bool = False) -> None:
    """Parses `--config FILE:VARIANT [--config.a.b=v ...] --workdir DIR` and calls `run(config, workdir)`.

    With `resumable`, `--stop_at N` is passed on as `run(..., stop_at=N)`: the run
    stops after step N with a checkpoint and continues when started again.
    """
    config = config_flags.DEFINE_config_file("config", default_config, "Experiment configuration FILE:VARIANT.")
    workdir = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and figures.",
                                  required=True)
    stop_at = flags.DEFINE_integer("stop_at", None, "Stop after this step; rerun to resume.") if resumable else None

    # jaxlib's CPU SVD/QR (GaLore refreshes) call OpenBLAS, whose threads fight XLA's; read at first use.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        cfg: ConfigDict = config.value
        kwargs = {"stop_at": stop_at.value} if stop_at is not None else {}
        run(cfg, workdir.value, **kwargs)

    app.run(main)
