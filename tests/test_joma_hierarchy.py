"""JoMA's Table 1 (experiments.joma_hierarchy): the latent-matching score against NumPy float64, the exactness of
the deduplicated composition batch, which tensors are the hidden units, the optimizer and the table's cells."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import joma_hierarchy as jh
from lorank import config_files
from lorank.data import synthetic as sy
from lorank.models import attention as am

CONFIG = config_files.load_module("configs/joma_hierarchy.py")


def reference_corr(latents, hidden, centered=True):
    """[A, K] float64: np.corrcoef per pair (or the raw cosine); 0 where a column is constant (all zero)."""
    x, y = np.asarray(latents, np.float64), np.asarray(hidden, np.float64)
    out = np.zeros((x.shape[1], y.shape[1]))
    for a in range(x.shape[1]):
        for k in range(y.shape[1]):
            u, v = x[:, a], y[:, k]
            if centered:
                if np.ptp(u) == 0 or np.ptp(v) == 0:
                    continue
                out[a, k] = np.corrcoef(u, v)[0, 1]
            elif np.any(u) and np.any(v):
                out[a, k] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    return out


def _latents_and_units(n=400, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.random((n, 5)) < np.array([0.5, 0.2, 0.8, 0.0, 1.0])  # the last two never vary
    hidden = np.maximum(rng.normal(size=(n, 7)), 0).astype(np.float32)
    hidden[:, 0] = latents[:, 0]  # equals latent 0
    hidden[:, 1] = 3.0 * latents[:, 1] + 0.5  # an affine copy of latent 1
    hidden[:, 2] = np.float32(3.14159)  # constant non-zero (a unit maxed at an all-padding prefix)
    hidden[:, 3] = 0.0  # dead
    hidden[:, 4] = latents[:, 2] + 0.3 * rng.normal(size=n)  # a noisy copy of latent 2
    return latents, hidden


@pytest.mark.parametrize("centered", [True, False])
def test_correlation_matrix_matches_numpy_float64(centered):
    latents, hidden = _latents_and_units()
    got = np.asarray(jh.correlation_matrix(latents, hidden, centered=centered))
    np.testing.assert_allclose(got, reference_corr(latents, hidden, centered), atol=2e-6)


def test_best_match_finds_the_unit_equal_to_a_latent_and_random_units_score_near_zero():
    latents, hidden = _latents_and_units(n=1280)
    best, unit = (np.asarray(a) for a in jh.best_match(latents, hidden))
    np.testing.assert_allclose(best[:2], 1.0, atol=1e-5)
    assert unit[:2].tolist() == [0, 1]
    assert unit[2] == 4 and 0.75 < best[2] < 0.85  # 0.4 / sqrt(0.4^2 + 0.3^2) = 0.8: the noisy copy
    assert best[3] == 0.0 and best[4] == 0.0  # never / always on: no correlation
    # a constant non-zero column gives exactly 0 in float32 (its mean is not its value, but its shifted mean is)
    assert np.all(np.asarray(jh.correlation_matrix(latents, hidden))[:, 2:4] == 0.0)
    rng = np.random.default_rng(1)
    noise_best, _ = jh.best_match(latents[:, :3], rng.normal(size=(1280, 1)))
    assert np.all(np.abs(np.asarray(noise_best)) < 4 / np.sqrt(1280))


def test_layer_scores_all_latents_and_varying_ones():
    latents, hidden = _latents_and_units(n=1280)
    best = reference_corr(latents, hidden).max(1)
    got = jh.layer_scores(latents, hidden)
    np.testing.assert_allclose(float(got["all"]), best.mean(), atol=2e-6)
    np.testing.assert_allclose(float(got["varying"]), best[:3].mean(), atol=2e-6)
    assert int(got["num_varying"]) == 3
    assert np.isnan(float(jh.layer_scores(np.ones((10, 2), bool), hidden[:10])["varying"]))
    # jit-able, and the same under jit
    np.testing.assert_allclose(float(jax.jit(jh.layer_scores)(latents, hidden)["all"]), float(got["all"]), atol=1e-6)
    with pytest.raises(ValueError, match="must share N"):
        jh.correlation_matrix(latents, hidden[:10])


def _tree():
    return sy.composition_tree(100, 30, [10, 20, 10], [2, 2, 2], seed=3)


def test_class_sequences_are_the_sampled_sequences():
    tree = _tree()
    seqs = jh.class_sequences(tree)
    tokens, labels, _ = sy.sample_composition_tree(jax.random.key(0), tree, 300)
    np.testing.assert_array_equal(seqs[np.asarray(labels)], np.asarray(tokens))
    assert len({tuple(s) for s in seqs.tolist()}) == tree.num_classes  # classes differ


def _model(vocab=100, tokens=100, seq_len=30, width=16, layers=2):
    c = CONFIG.get_config("table_smoke")
    c.model.width, c.model.num_layers = width, layers
    return jh.build_model(c, vocab, tokens, seq_len)


def test_deduplicated_batch_gives_the_loss_and_gradient_of_the_full_batch():
    model = _model()
    params = nn.unbox(am.init_params(model, jax.random.key(0), 30))
    seqs = jnp.asarray(jh.class_sequences(_tree()))
    loss_fn = jh.class_loss(model, 10)
    key = jax.random.key(5)
    full = jh.composition_batch(seqs, key, 128, dedupe=False)
    dedup = jh.composition_batch(seqs, key, 128, dedupe=True)
    assert full[0].shape == (128, 30) and dedup[0].shape == (10, 30)
    np.testing.assert_allclose(float(dedup[2].sum()), 1.0, atol=1e-6)
    (l1, g1), (l2, g2) = (jax.value_and_grad(loss_fn)(params, *b) for b in (full, dedup))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_hidden_units_are_the_relu_of_the_first_mlp_layer_after_the_post_ln_attention():
    model = _model(layers=2)
    params = nn.unbox(am.init_params(model, jax.random.key(1), 30))
    tokens = jnp.asarray(jh.class_sequences(_tree()))
    logits, hidden = jh.mlp_hidden(model, params, tokens)
    cfg = model.cfg
    assert len(hidden) == 2 and hidden[0].shape == (10, 30, 400) and cfg.mlp_hidden == 400
    # by hand: embedding (scaled), attention, residual + LayerNorm, then up and ReLU
    p = params["layers_0"]
    x = params["embed"]["embedding"][tokens] * np.sqrt(cfg.width)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": p["attn_norm"]},
                                                       x + am.SelfAttention(cfg).apply({"params": p["attn"]}, x))
    manual = jax.nn.relu(x @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
    np.testing.assert_allclose(np.asarray(hidden[0]), np.asarray(manual), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply({"params": params}, tokens)), atol=1e-6)
    class_logits, pooled = jh.pooled_hidden(model, params, tokens, 10)
    assert class_logits.shape == (10, 10)
    np.testing.assert_allclose(np.asarray(pooled[1]), np.asarray(hidden[1]).max(1))


def test_latent_batch_with_traced_root_codes_matches_the_generator():
    trees = [sy.latent_tree(10, 3, branching=3, seed=s) for s in (1, 2)]
    keys = jax.random.split(jax.random.key(0), 2)
    codes = jnp.asarray(np.stack([t.root_codes.astype(bool) for t in trees]))
    batched = jax.jit(jax.vmap(lambda c, k: jh.latent_batch(c, k, 64, trees[0], 30)))(codes, keys)
    for i, tree in enumerate(trees):
        labels, levels = sy.sample_latent_tree(keys[i], tree, 64)
        np.testing.assert_array_equal(np.asarray(batched[1][i]), np.asarray(labels))
        np.testing.assert_array_equal(np.asarray(batched[0][i]),
                                      np.asarray(sy.tokens_to_sequences(levels[-1], 30, 27)))


def test_adam_with_l2_and_adamw_first_steps():
    c = CONFIG.get_config("table")
    c.optim.lr, c.optim.weight_decay = 0.1, 0.5
    p, g = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.1, -0.4])
    coupled = jh.optimizer(c.optim)
    u, _ = coupled.update(g, coupled.init(p), p)
    g2 = np.asarray(g) + 0.5 * np.asarray(p)  # torch.optim.Adam: the decay joins the gradient, then Adam
    np.testing.assert_allclose(np.asarray(u), -0.1 * g2 / (np.abs(g2) + 1e-8), rtol=1e-5)
    c.optim.decoupled = True
    adamw = jh.optimizer(c.optim)
    u, _ = adamw.update(g, adamw.init(p), p)
    np.testing.assert_allclose(np.asarray(u), -0.1 * (np.sign(g) + 0.5 * np.asarray(p)), rtol=1e-5, atol=1e-6)


def test_table_cells_and_groups():
    cells, skipped = jh.table_cells(CONFIG.get_config("table"))
    assert not skipped
    assert [c.generator for c in cells].count("composition") == 8 and [c.generator for c in cells].count("latent") == 2
    assert len({c.group for c in cells}) == 4
    c = CONFIG.get_config("table_smoke")
    c.composition.levels = ((10, 20), (10, 50))  # 50 pairs do not exist among 10 latents
    cells, skipped = jh.table_cells(c)
    assert len(cells) == 2 and len(skipped) == 1 and "45 do" in skipped[0]


def test_latent_groups_match_block_s_with_the_level_s_above_the_leaves():
    c = CONFIG.get_config("table_smoke")
    c.num_seeds, c.metric.num_samples = 1, 64
    group = jh.build_group(c, [jh.Cell("latent", 10)])
    level0, level1, root = group.eval_latents[0]
    assert level0.shape == (64, 9) and level1.shape == (64, 3) and root.shape == (64, 10)
    np.testing.assert_array_equal(root.argmax(1), group.eval_labels[0])
    assert group.eval_tokens.shape == (1, 64, 30) and group.model.cfg.mlp_hidden == 4 * 28


def test_bad_configs_are_refused_before_compute(tmp_path):
    c = CONFIG.get_config("table_smoke")
    c.train.every = 7
    with pytest.raises(ValueError, match="multiple of train.every=7"):
        jh.run(c, str(tmp_path))
    c = CONFIG.get_config("table_smoke")
    c.metric.levels = 4
    with pytest.raises(ValueError, match="metric.levels"):
        jh.run(c, str(tmp_path))
    c = CONFIG.get_config("table_smoke")
    c.composition.combinations = ((2, 2),)
    with pytest.raises(ValueError, match="one size per level"):
        jh.run(c, str(tmp_path))
    with pytest.raises(ValueError, match="unknown variant"):
        CONFIG.get_config("tabel")
    assert not any(tmp_path.iterdir())


def test_descendant_count_reference_matches_the_channel_algebra():
    """Level right above the leaves: a Bernoulli(1/2) parent, 3 children through channels of correlation rho, so
    corr(parent, sum of children) = 3 rho / sqrt(3 + 6 rho^2); with rho = 1 the children copy it (1)."""
    for rho, expected in ((2 / 3, 2.0 / np.sqrt(3 + 6 * 4 / 9)), (1.0, 1.0)):
        tree = sy.latent_tree(10, 3, branching=3, rho=rho, seed=0)
        _, levels = sy.sample_latent_tree(jax.random.key(0), tree, 20000)
        got = jh.descendant_count_score(np.asarray(levels[1]), np.asarray(levels[2]))
        np.testing.assert_allclose(got, expected, atol=0.01)


def test_rerun_keeps_the_groups_done_and_refuses_other_seeds(tmp_path):
    c = CONFIG.get_config("table_smoke")
    c.latent.num_classes, c.train.steps, c.train.every, c.metric.num_samples = (), 20, 20, 64
    first = jh.run(c, str(tmp_path), log=lambda s: None)
    lines = []
    again = jh.run(c, str(tmp_path), log=lines.append)
    assert any("kept from" in line for line in lines)
    assert again["cells"] == first["cells"]
    assert (tmp_path / "joma_table1.png").exists() and (tmp_path / jh.RESULTS_FILE).exists()
    c.seed = 7
    with pytest.raises(ValueError, match="seed=1, not 7"):
        jh.run(c, str(tmp_path))
