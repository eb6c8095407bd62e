"""experiments.grad_rank's bookkeeping: the smallest matrix dimension per layer kind, the table's rows."""

import pathlib

import pytest

from experiments import grad_rank
from lorank import config_files

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "grad_rank.py"


def test_smallest_dimension_per_kind_is_the_hand_count():
    config = config_files.load(CONFIG, "smoke").pretrain
    config.model.intermediate_size = 16  # MLP kernels 32 x 16 and 16 x 32; attention 32 x 32; vocab 256 x 32
    assert grad_rank.kind_min_dims(config) == {"attention": 32, "mlp": 16, "embedding": 32, "lm_head": 32}


def test_table_rows_are_the_evaluations_that_hold_the_probe_in_the_docs_order():
    records = [{"step": 0, "eval_loss": 5.0, "grad_stable_rank/mlp": 1.5, "grad_stable_rank/attention": 1.2},
               {"step": 1, "loss": 4.0},
               {"step": 2, "eval_loss": 4.5, "grad_stable_rank/mlp": 2.5, "grad_stable_rank/attention": 3.0}]
    kinds, rows = grad_rank.rank_table(records)
    assert kinds == ["attention", "mlp"]
    assert rows == [(0, {"attention": 1.2, "mlp": 1.5}), (2, {"attention": 3.0, "mlp": 2.5})]
    body = grad_rank.docs_body(kinds, rows, {"attention": 10, "mlp": 5})
    assert "| 2 | 3.00 | 2.50 |" in body and "largest mean stable rank is 3.00: at most 50.0%" in body


def test_the_probe_must_be_on():
    config = config_files.load(CONFIG, "smoke")
    config.pretrain.analysis.grad_rank = False
    with pytest.raises(ValueError, match="pretrain.analysis.grad_rank=False"):
        grad_rank.run(config, "/nonexistent/never-written")
