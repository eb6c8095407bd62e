"""JoMA's hierarchical generators: the stochastic binary latent tree (Theorem 5) and the public code's
deterministic composition tree (Table 1's data)."""

import itertools

import jax
import numpy as np
import pytest

from lorank.data import synthetic as sy

KEY = jax.random.key(0)


# ----- the stochastic latent tree -----------------------------------------------------------------

def test_latent_tree_bad_input():
    with pytest.raises(ValueError, match="tree height must be an integer >= 1, got 0"):
        sy.latent_tree(2, 0)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        sy.latent_tree(1, 3)
    with pytest.raises(ValueError, match=r"rho must be a number in \[-1, 1\], got 1.5"):
        sy.latent_tree(2, 3, rho=1.5)
    with pytest.raises(ValueError, match="branching must be an integer >= 2"):
        sy.latent_tree(2, 3, branching=1)
    with pytest.raises(ValueError, match="levels_up must be >= 1"):
        sy.cooccurrence_closed_form(0, 0.5)


def test_latent_tree_structure_and_channels():
    tree = sy.latent_tree(3, 3, rho=0.6, branching=3, seed=2)
    assert tree.num_leaves == 27 and [tree.level_size(s) for s in range(4)] == [1, 3, 9, 27]
    assert tree.root_codes.shape == (3, 3) and np.all(tree.root_codes.sum(0) == 1)  # half of D = 3, rounded down
    n = 30000
    labels, levels = sy.sample_latent_tree(KEY, tree, n)
    labels, levels = np.asarray(labels), [np.asarray(a) for a in levels]
    assert labels.shape == (n,) and set(np.unique(labels)) == {0, 1, 2}
    assert [a.shape for a in levels] == [(n, 3), (n, 9), (n, 27)] and all(a.dtype == bool for a in levels)
    # each child copies its parent with probability (1 + rho) / 2 = 0.8
    copied = [levels[0] == tree.root_codes[labels]]
    copied += [levels[s] == np.repeat(levels[s - 1], 3, axis=1) for s in (1, 2)]
    for c in copied:
        assert abs(c.mean() - 0.8) < 4 * np.sqrt(0.16 / c.size)
    assert sy.lca_height(tree, 0, 0) == 0 and sy.lca_height(tree, 0, 2) == 1 and sy.lca_height(tree, 0, 3) == 2
    assert sy.lca_height(tree, 0, 9) == 3 and sy.lca_height(tree, 26, 24) == 1


def _empirical(leaves, token, given):
    rows = leaves[:, given]
    return leaves[rows, token].mean(), rows.sum()


def test_cooccurrence_matches_the_closed_form_within_sampling_error():
    """Height L = 4, rho = 1 - 1/L, D = 2 (each child of the root is sent a 1 by one
    of the two root values): for every H, the
    empirical P(y_l = 1 | y_m = 1) of the sampled leaves vs (1 + rho^(2H)) / 2 (binary LCA) and the root's
    average over its values (H = L), both computed here."""
    height = 4
    tree = sy.latent_tree(2, height, seed=0)
    assert tree.rho == pytest.approx(0.75)
    codes = tree.root_codes
    assert sorted(codes[:, 0].tolist()) == [0, 1] and sorted(codes[:, 1].tolist()) == [0, 1]
    _, levels = sy.sample_latent_tree(jax.random.key(3), tree, 60000)
    leaves = np.asarray(levels[-1])
    assert abs(leaves.mean() - 0.5) < 0.01
    rho = 0.75
    for token in range(1, 16):
        up = sy.lca_height(tree, token, 0)
        if up < height:
            ref = (1 + rho ** (2 * up)) / 2
        else:  # P(y = 1 | y_0 = c) = 1/2 + rho^L (code - 1/2) on each side of the root
            pl = 0.5 + rho**height * (codes[:, 1] - 0.5)
            pm = 0.5 + rho**height * (codes[:, 0] - 0.5)
            ref = (pl * pm).mean() / pm.mean()
        emp, count = _empirical(leaves, token, 0)
        assert abs(emp - ref) < 4.5 * np.sqrt(ref * (1 - ref) / count), (token, up, emp, ref)
        assert sy.tree_cooccurrence(tree, token, 0) == pytest.approx(ref, abs=1e-12)
        if up < height:
            assert sy.cooccurrence_closed_form(up, rho) == pytest.approx(ref, abs=1e-12)
    # about 1 - H / L when rho = 1 - 1/L: exactly 1 - H/L + H(2H - 1) / (2 L^2) - ... for small H / L
    big = 100
    h = np.arange(1, 6)
    gap = sy.cooccurrence_closed_form(h, 1 - 1 / big) - (1 - h / big)
    assert np.all(gap > 0) and np.all(gap <= (h / big) ** 2)


def test_cooccurrence_of_unbalanced_root_codes():
    """D = 3: the root's children are 1 with probability 1/2 - rho/6, so the LCA marginals are not 1/2 and
    tree_cooccurrence departs from (1 + rho^(2H)) / 2; sampling agrees with the exact value."""
    tree = sy.latent_tree(3, 3, rho=0.8, seed=5)
    _, levels = sy.sample_latent_tree(jax.random.key(4), tree, 60000)
    leaves = np.asarray(levels[-1])
    for token, given in ((1, 0), (2, 0), (5, 4), (4, 0)):
        ref = sy.tree_cooccurrence(tree, token, given)
        emp, count = _empirical(leaves, token, given)
        assert abs(emp - ref) < 4.5 * np.sqrt(ref * (1 - ref) / count)
    # an explicit check of the binary-LCA formula with marginal pi of the LCA (token 1 and 0: H = 1, LCA on level 2)
    pi = 0.5 + 0.8**2 * (tree.root_codes[:, 0].mean() - 0.5)
    p1, p0 = 0.9, 0.1
    want = (pi * p1**2 + (1 - pi) * p0**2) / (pi * p1 + (1 - pi) * p0)
    assert sy.tree_cooccurrence(tree, 1, 0) == pytest.approx(want)


def test_tokens_to_sequences():
    present = np.array([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    out = np.asarray(sy.tokens_to_sequences(present, 6, 9))
    np.testing.assert_array_equal(out, [[9, 9, 9, 9, 0, 2], [9] * 6, [9, 9, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="seq_len must be an integer >= 4"):
        sy.tokens_to_sequences(present, 3, 9)


# ----- the deterministic composition tree ---------------------------------------------------------

def test_composition_tree_bad_input():
    with pytest.raises(ValueError, match="tree height must be >= 1"):
        sy.composition_tree(100, 30, [], [])
    with pytest.raises(ValueError, match=r"combinations\[1\]=11 is larger than the level below it \(10 latents\)"):
        sy.composition_tree(100, 30, [10, 5], [2, 11])
    with pytest.raises(ValueError, match="unique subsets of size 2 do not exist among 4 latents"):
        sy.composition_tree(5, 30, [7], [2])
    with pytest.raises(ValueError, match="one entry per level"):
        sy.composition_tree(100, 30, [10, 5], [2])
    with pytest.raises(ValueError, match="seq_len=5 cannot hold a class with"):
        sy.composition_tree(100, 5, [10, 5], [3, 3])


@pytest.mark.parametrize("levels, combinations", [([10, 20, 10], [2, 2, 2]), ([20, 30, 20], [3, 3, 3])])
def test_composition_tree_structure_and_sequences(levels, combinations):
    """Table 1's settings: M = 100 tokens (99 real + padding), L = 30."""
    tree = sy.composition_tree(100, 30, levels, combinations, seed=1)
    assert tree.level_sizes == (99, *levels) and tree.num_classes == levels[-1]
    below = 99
    for s, (children, n, c) in enumerate(zip(tree.children, levels, combinations)):
        assert children.shape == (n, c)
        assert np.all(np.diff(children, axis=1) > 0) and children.min() >= 0 and children.max() < below
        assert len({tuple(r) for r in children.tolist()}) == n  # unique subsets
        np.testing.assert_array_equal(tree.membership(s + 1).sum(1), c)
        below = n
    n = 64
    tokens, labels, active = sy.sample_composition_tree(KEY, tree, n)
    tokens, labels, active = np.asarray(tokens), np.asarray(labels), [np.asarray(a) for a in active]
    assert tokens.shape == (n, 30) and [a.shape for a in active] == [(n, k) for k in levels]
    np.testing.assert_array_equal(active[-1], np.eye(levels[-1], dtype=bool)[labels])

    def reach(label):  # the union of subsets, level by level down, in plain Python
        sets = [{label}]
        for children in reversed(tree.children):
            sets.append(set(itertools.chain.from_iterable(children[a] for a in sets[-1])))
        return sets[::-1]  # tokens, level 1, ..., level S

    for row in range(n):
        sets = reach(int(labels[row]))
        want = sorted(sets[0])
        np.testing.assert_array_equal(tokens[row, 30 - len(want):], want)
        assert np.all(tokens[row, : 30 - len(want)] == 99)
        for s in range(len(levels)):
            assert set(np.flatnonzero(active[s][row]).tolist()) == sets[s + 1]
