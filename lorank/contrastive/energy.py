"""Distances, the contrastive covariance C_alpha and the alpha-CL energy E_alpha.

A batch holds N samples seen through two views: `z[i]` and its positive partner
`z_prime[i]`. With pairwise importance `alpha` [N, N] (its diagonal is ignored,
and it is treated as a constant: `stop_gradient`), the alpha-CL energy is

    E_alpha = 1/2 sum_{i != j} alpha_ij (||z_i - z_j||^2 - ||z_i - z_i'||^2),

and the contrastive covariance of two feature batches a, b (with partners a', b') is

    C_alpha[a, b] = sum_{i != j} alpha_ij (a_i - a_j)(b_i - b_j)^T
                    - sum_i r_i (a_i - a_i')(b_i - b_i')^T,   r_i = sum_{j != i} alpha_ij,

so that E_alpha = 1/2 tr C_alpha[z, z]. For a linear map z = W x,
C_alpha[W x] = W X_alpha W^T with X_alpha := C_alpha[x], the contrastive covariance
of the input. With uniform alpha (`uniform_alpha`) and many samples, C_alpha[x]
approaches 2 (V[x] - E V[x | sample]): the variance between samples minus the
variance that augmentation adds.

Two-view batches (`two_view_sq_dists`, `negative_mask`, `two_view_energy`): the losses of
`lorank.contrastive` see z1, z2 [N, D] as 2N anchors f = [z1; z2], the partner of f[i] the other
view of the same sample, with halved squared distances d_i^2 = ||f[i] - f[i']||^2 / 2 and
d_ij^2 = ||f[i] - f[j]||^2 / 2 (on L2-normalized rows d^2 = 1 - cos). The negatives of an anchor are
every other embedding of both views (2N - 2, SimCLR's convention) or the other samples of its own
view (N - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sq_dists(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances.

    Args:
      z1: [N, D]; z2: [M, D].

    Returns:
      [N, M] with entry (i, j) = ||z1_i - z2_j||^2 (clipped at 0 against round-off).
    """
    _check_2d(z1, "z1")
    _check_2d(z2, "z2")
    if z1.shape[1] != z2.shape[1]:
        raise ValueError(f"z1 and z2 need the same feature size, got {z1.shape} and {z2.shape}")
    n1 = jnp.sum(z1 * z1, axis=1)
    n2 = jnp.sum(z2 * z2, axis=1)
    return jnp.maximum(n1[:, None] + n2[None, :] - 2.0 * z1 @ z2.T, 0.0)


def positive_sq_dists(z: jax.Array, z_prime: jax.Array) -> jax.Array:
    """Squared distances between each sample and its positive partner.

    Args:
      z, z_prime: [N, D] two views of the same N samples.

    Returns:
      [N] with entry i = ||z_i - z'_i||^2.
    """
    _check_pair(z, z_prime, "z", "z_prime")
    diff = z - z_prime
    return jnp.sum(diff * diff, axis=1)


def uniform_alpha(n: int) -> jax.Array:
    """Uniform pairwise importance: alpha_ij = 1 / (N (N - 1)) off the diagonal, 0 on it.

    Returns:
      [N, N]; each row sums to 1/N.
    """
    if n < 2:
        raise ValueError(f"a contrastive batch needs at least 2 samples, got n={n}")
    return (1.0 - jnp.eye(n)) / (n * (n - 1))


def contrastive_cov(
    a: jax.Array,
    a_prime: jax.Array,
    alpha: jax.Array | None,
    b: jax.Array | None = None,
    b_prime: jax.Array | None = None,
) -> jax.Array:
    """Contrastive covariance C_alpha[a, b] (C_alpha[a] = C_alpha[a, a] when b is None).

    Args:
      a, a_prime: [N, Da] features of the two views.
      alpha: [N, N] non-negative pairwise importance (diagonal ignored, no gradient), or
        None for `uniform_alpha(N)`, computed in O(N D) instead of O(N^2 D).
      b, b_prime: [N, Db] second features and their partners; default a, a_prime.

    Returns:
      [Da, Db] C_alpha[a, b]; symmetric when b is None.
    """
    _check_pair(a, a_prime, "a", "a_prime")
    if (b is None) != (b_prime is None):
        raise ValueError("pass both b and b_prime, or neither")
    if b is None:
        b, b_prime = a, a_prime
    _check_pair(b, b_prime, "b", "b_prime")
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"a and b need the same batch size, got {a.shape} and {b.shape}")
    da, db = a - a_prime, b - b_prime
    if alpha is None:  # alpha_ij = 1 / (N (N - 1)): pairs give 2 (N sum a b^T - sum a sum b^T)
        pairs = 2.0 * (n * a.T @ b - jnp.outer(a.sum(0), b.sum(0))) / (n * (n - 1))
        return pairs - da.T @ db / n
    alpha = _off_diagonal(alpha, n)
    sym = alpha + alpha.T
    laplacian = jnp.diag(jnp.sum(sym, axis=1)) - sym  # sum_ij alpha_ij (a_i-a_j)(b_i-b_j)^T = a^T L b
    r = jnp.sum(alpha, axis=1)
    return a.T @ (laplacian @ b) - (da * r[:, None]).T @ db


def energy(z: jax.Array, z_prime: jax.Array, alpha: jax.Array | None, *, stop_gradient: bool = True) -> jax.Array:
    """alpha-CL energy E_alpha = 1/2 sum_{i != j} alpha_ij (||z_i - z_j||^2 - ||z_i - z_i'||^2).

    Args:
      z, z_prime: [N, D] representations of the two views.
      alpha: [N, N] pairwise importance (diagonal ignored); None: uniform.
      stop_gradient: treat alpha as a constant (alpha-CL); False lets gradients reach it.

    Returns:
      [] the energy; the max player maximizes it. Equals 1/2 tr C_alpha[z].
    """
    _check_pair(z, z_prime, "z", "z_prime")
    if alpha is None:
        return 0.5 * jnp.trace(contrastive_cov(z, z_prime, None))
    alpha = _off_diagonal(alpha, z.shape[0], stop_gradient=stop_gradient)
    d_neg = sq_dists(z, z)
    d_pos = positive_sq_dists(z, z_prime)
    return 0.5 * jnp.sum(alpha * (d_neg - d_pos[:, None]))


def _off_diagonal(alpha: jax.Array, n: int, *, stop_gradient: bool = True) -> jax.Array:
    """alpha with a zeroed diagonal (and no gradient unless stop_gradient=False); checks its shape."""
    alpha = jnp.asarray(alpha)
    if alpha.shape != (n, n):
        raise ValueError(f"alpha must have shape {(n, n)}, got {alpha.shape}")
    alpha = alpha * (1.0 - jnp.eye(n, dtype=alpha.dtype))
    return jax.lax.stop_gradient(alpha) if stop_gradient else alpha


NEGATIVES = ("both_views", "one_view")


def stack_views(z1: jax.Array, z2: jax.Array, *, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """The 2N anchors f = [z1; z2] and their partners f' = [z2; z1], rows L2-normalized if `normalize`.

    Args:
      z1, z2: [N, D] two views of N samples (N >= 2).

    Returns:
      (f, f_prime), each [2N, D].
    """
    _check_pair(z1, z2, "z1", "z2")
    f = jnp.concatenate([z1, z2], axis=0)
    if normalize:
        f = f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    n = z1.shape[0]
    return f, jnp.roll(f, n, axis=0)


def two_view_sq_dists(z1: jax.Array, z2: jax.Array, *, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """Halved squared distances of the 2N anchors of a two-view batch.

    Args:
      z1, z2: [N, D] two views of N samples.
      normalize: L2-normalize the rows first (then d^2 = 1 - cos).

    Returns:
      (d_pos [2N], d_neg [2N, 2N]): d_pos[i] = ||f_i - f_i'||^2 / 2, d_neg[i, j] = ||f_i - f_j||^2 / 2,
      f = [z1; z2] (`stack_views`).
    """
    f, f_prime = stack_views(z1, z2, normalize=normalize)
    return 0.5 * positive_sq_dists(f, f_prime), 0.5 * sq_dists(f, f)


def negative_mask(n: int, negatives: str = "both_views") -> jax.Array:
    """Which pairs (i, j) of the 2N anchors are negatives: [2N, 2N] bool.

    "both_views": every j other than i and its partner (2N - 2 per row); "one_view": the other
    samples of i's own view (N - 1 per row).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if n < 2:
        raise ValueError(f"a contrastive batch needs at least 2 samples, got n={n}")
    idx = jnp.arange(2 * n)
    same_sample = (idx[:, None] % n) == (idx[None, :] % n)
    if negatives == "both_views":
        return ~same_sample
    return ~same_sample & ((idx[:, None] // n) == (idx[None, :] // n))


def two_view_energy(z1: jax.Array, z2: jax.Array, alpha: jax.Array, *, normalize: bool = True,
                    stop_gradient: bool = True) -> jax.Array:
    """Per-anchor energy of a two-view batch: E_alpha / 2N = 1/(2N) sum_ij alpha_ij (d_ij^2 - d_i^2).

    `energy` of the stacked anchors (`stack_views`), whose 1/2 ||.||^2 is the halved distance d^2.

    Args:
      z1, z2: [N, D] two views.
      alpha: [2N, 2N] pair weights over the anchors (zero off the negatives; diagonal ignored).
      normalize: L2-normalize the rows first.
      stop_gradient: hold alpha fixed (alpha-CL); False differentiates through it.

    Returns:
      [] the energy per anchor; alpha-CL minimizes its negative.
    """
    f, f_prime = stack_views(z1, z2, normalize=normalize)
    return energy(f, f_prime, alpha, stop_gradient=stop_gradient) / f.shape[0]


def _check_2d(x: jax.Array, name: str) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {jnp.shape(x)}")


def _check_pair(x: jax.Array, x_prime: jax.Array, name: str, name_prime: str) -> None:
    _check_2d(x, name)
    if jnp.shape(x) != jnp.shape(x_prime):
        raise ValueError(
            f"{name} and {name_prime} must have the same shape, got {jnp.shape(x)} and "
            f"{jnp.shape(x_prime)}")
    if jnp.shape(x)[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got shape {jnp.shape(x)}")
