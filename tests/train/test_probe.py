"""Frozen-backbone evaluation: linear probe (separable blobs, random labels, l2 chosen on validation
only), kNN against a NumPy float64 brute force, standardization, feature extraction, embedding
spectrum and effective rank, and the loop evaluator."""

import jax.numpy as jnp
import numpy as np
import pytest

from lorank.train import loop
from lorank.train import mesh as mesh_lib
from lorank.train import probe as P


def blobs(rng, n, means, scale=1.0):
    y = rng.integers(0, len(means), n).astype(np.int32)
    return (means[y] + scale * rng.normal(size=(n, means.shape[1]))).astype(np.float32), y


def test_probe_separates_blobs_and_is_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 8)) * 3
    tx, ty = blobs(rng, 300, means)
    sx, sy = blobs(rng, 300, means)
    result = P.linear_probe(tx, ty, sx, sy, num_classes=4, steps=60)
    assert result["test_acc"] > 0.95 and result["val_acc"] > 0.95
    assert result["best_l2"] in P.L2_GRID and len(result["val_accs"]) == len(P.L2_GRID)
    # random labels: nothing to learn, the test accuracy is at chance (1/4)
    noise = P.linear_probe(tx, rng.integers(0, 4, 300).astype(np.int32), sx, rng.integers(0, 4, 300).astype(np.int32),
                           num_classes=4, steps=60)
    assert abs(noise["test_acc"] - 0.25) < 0.1


def test_l2_is_chosen_on_validation_only():
    """A test set favouring the strongest l2 (pure-noise features, every label the majority class)
    changes the test accuracy but neither the choice nor the validation scores."""
    rng = np.random.default_rng(1)
    n, d = 200, 6
    ty = (rng.random(n) < 0.3).astype(np.int32)  # 70% class 0
    tx = (rng.normal(size=(n, d)) + 2.0 * ty[:, None] * np.eye(d)[0]).astype(np.float32)
    grid = (1e-4, 100.0)  # l2 = 100 pins W at ~0: the probe predicts the majority class
    kw = dict(num_classes=2, l2_grid=grid, steps=40)
    fair_x = (rng.normal(size=(n, d)) + 2.0 * ty[:, None] * np.eye(d)[0]).astype(np.float32)
    fair = P.linear_probe(tx, ty, fair_x, ty, **kw)
    biased_x, biased_y = rng.normal(size=(n, d)).astype(np.float32), np.zeros(n, np.int32)
    biased = P.linear_probe(tx, ty, biased_x, biased_y, **kw)
    per_l2 = [P.linear_probe(tx, ty, biased_x, biased_y, **{**kw, "l2_grid": (l2,)})["test_acc"] for l2 in grid]
    assert per_l2[1] > per_l2[0]  # the biased test set would pick l2 = 100 ...
    assert fair["best_l2"] == biased["best_l2"] == 1e-4  # ... validation picks 1e-4 either way
    assert fair["val_accs"] == biased["val_accs"] and fair["val_accs"][0] > fair["val_accs"][1]
    assert biased["test_acc"] == per_l2[0] and fair["test_acc"] != biased["test_acc"]


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes, weighted):
    """NumPy float64 brute force."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    preds = []
    for row in q.astype(np.float64) @ a.T.astype(np.float64):
        top = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in top:
            votes[train_y[i]] += np.exp(row[i] / temperature) if weighted else 1.0
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("k,weighted", [(15, True), (8, False), (1, True)])
def test_knn_matches_numpy_brute_force(k, weighted):
    rng = np.random.default_rng(2)
    means = rng.normal(size=(5, 6))
    tx, ty = blobs(rng, 120, means, scale=1.5)
    sx, sy = blobs(rng, 37, means, scale=1.5)
    pred = P.knn_predict(tx, ty, sx, k=k, temperature=0.1, num_classes=5, weighted=weighted, batch_size=16)
    np.testing.assert_array_equal(pred, knn_reference(tx, ty, sx, k, 0.1, 5, weighted))
    assert P.knn_accuracy(tx, ty, sx, sy, k=k, num_classes=5, weighted=weighted, batch_size=16) == np.mean(pred == sy)


def test_knn_and_probe_refuse_bad_arguments():
    x, y = np.ones((10, 3), np.float32), np.zeros(10, np.int32)
    with pytest.raises(ValueError, match="k must"):
        P.knn_predict(x, y, x, k=11, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        P.knn_predict(x, y, x, k=2, temperature=0.0, num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        P.knn_predict(x, y + 2, x, k=2, num_classes=2)
    with pytest.raises(ValueError, match="val_fraction"):
        P.linear_probe(x, y, x, y, num_classes=2, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"l2_grid\[1\]"):
        P.linear_probe(x, y, x, y, num_classes=2, l2_grid=(1e-3, -1.0))
    with pytest.raises(ValueError, match=r"\(10, 4\)"):
        P.linear_probe(x, y, np.ones((10, 4)), y, num_classes=2)


def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(3)
    train, other = rng.normal(3.0, 2.0, size=(50, 4)), rng.normal(size=(7, 4))
    train[:, 2] = 5.0  # a constant column is only centered
    s_train, s_other = P.standardize(train, other)
    np.testing.assert_allclose(s_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s_train.std(0), [1, 1, 0, 1], atol=1e-5)
    std = np.where(train.std(0) < 1e-6, 1.0, train.std(0))
    np.testing.assert_allclose(s_other, (other - train.mean(0)) / std, rtol=1e-5, atol=1e-5)


def test_extract_features_batches_and_pads():
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    w = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    feats = P.extract_features(lambda b: jnp.tanh(b @ w), x, batch_size=3)
    assert feats.shape == (7, 2) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, np.tanh(x @ w), rtol=1e-5)


def test_effective_rank_of_isotropic_and_rank_one_embeddings():
    rng = np.random.default_rng(4)
    iso = rng.normal(size=(4000, 16))
    assert 15.0 < float(P.embedding_effective_rank(iso)) <= 16.0
    one = rng.normal(size=(500, 1)) * rng.normal(size=(1, 16))
    np.testing.assert_allclose(float(P.embedding_effective_rank(one)), 1.0, atol=1e-3)
    s = np.asarray(P.embedding_spectrum(one))
    assert s.shape == (16,) and s[1] < 1e-3 * s[0]
    spec = np.asarray(P.embedding_spectrum(iso))
    np.testing.assert_allclose(float(P.effective_rank(spec)), float(P.embedding_effective_rank(iso)), rtol=1e-5)
    np.testing.assert_allclose(float(P.effective_rank(np.ones(5))), 5.0, rtol=1e-5)
    p = spec / spec.sum()
    np.testing.assert_allclose(float(P.effective_rank(spec)), np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(16,\)"):
        P.embedding_spectrum(np.ones(16))


def test_probe_evaluator_reports_every_metric():
    rng = np.random.default_rng(5)
    means = rng.normal(size=(3, 12)) * 3
    train_x, train_y = blobs(rng, 96, means)
    test_x, test_y = blobs(rng, 40, means)
    images = lambda x: x.reshape(-1, 2, 2, 3)  # noqa: E731
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    params = {"w": jnp.eye(12)}

    def features_fn(params, extra, imgs):
        return imgs.reshape(imgs.shape[0], -1) @ params["w"] * extra["scale"]

    ev = P.probe_evaluator(features_fn, images(train_x), train_y, images(test_x), test_y, num_classes=3, every=5,
                           knn_k=(20, 5), batch_size=16, probe_steps=40)
    assert isinstance(ev, loop.Evaluator) and ev.every == 5
    state = loop.TrainState(jnp.zeros((), jnp.int32), params, {}, {"scale": jnp.float32(2.0)},
                            jnp.zeros((), jnp.int32))
    results = ev.make(mesh)(state)
    assert set(results) == {"probe/linear_acc", "probe/knn20_acc", "probe/knn5_acc", "probe/effective_rank"}
    assert results["probe/linear_acc"] > 0.9 and results["probe/knn20_acc"] > 0.9
    assert results["probe/knn20_acc"] == P.knn_accuracy(train_x, train_y, test_x, test_y, k=20, num_classes=3)
    np.testing.assert_allclose(results["probe/effective_rank"], float(P.embedding_effective_rank(test_x)), rtol=1e-4)
    with pytest.raises(ValueError, match="knn_k"):
        P.probe_evaluator(features_fn, images(train_x), train_y, images(test_x), test_y, num_classes=3, every=5,
                          knn_k=(200,))
