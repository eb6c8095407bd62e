"""Configs of the non-contrastive eigenvalue-dynamics figures (docs/noncontrastive.md): Tian, Chen, Ganguli,
"Understanding self-supervised learning dynamics without contrastive pairs" (ICML 2021).

Commands (each variant has a `_smoke` twin that runs in seconds on a CPU):

  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:all \\
      --workdir runs/nc_dynamics
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:phase \\
      --workdir runs/nc_phase
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:basin \\
      --workdir runs/nc_basin
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:collapse \\
      --workdir runs/nc_collapse
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:invariance \\
      --workdir runs/nc_invariance
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:byol --workdir runs/nc_byol
  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:alignment \\
      --workdir runs/nc_alignment

Overrides: `--config.eta=0.02`, `--config.byol.steps=4000` (under `all`), ...
"""

import ml_collections

from lorank import config_files


def phase(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tau = 1.0  # fixed target eigenvalue (SimSiam: tau = 1)
    c.sigma2 = 0.5  # augmentation variance sigma^2
    c.etas = (0.01, 0.05, 0.1, 0.2)  # weight decays drawn as dp/dt curves (0.2 is past the existence edge 1/6)
    c.traj_eta = 0.05  # weight decay of the simulated trajectories
    c.delta = 0.05  # starts at p*_- (1 +- delta) and p*_+ (1 +- delta)
    c.horizon = 40.0 if smoke else 60.0  # simulated time in units of 1 / eta
    c.num_saves = 60 if smoke else 240  # saves along each trajectory
    c.small_etas = (1e-4, 1e-3, 1e-2) if smoke else (1e-5, 1e-4, 1e-3, 1e-2, 3e-2)  # p*_- vs eta / tau
    c.small_sigma2s = (0.0, 1.0) if smoke else (0.0, 0.5, 1.0, 2.0)  # augmentation variances of that check
    return c


def basin(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tau = 1.0  # fixed target eigenvalue
    c.eta_range = (1e-3, 0.5)  # weight decays, log-spaced
    c.num_eta = 12 if smoke else 60  # grid points in eta
    c.sigma2_range = (0.0, 4.0)  # augmentation variances, linearly spaced
    c.num_sigma2 = 10 if smoke else 50  # grid points in sigma^2
    c.delta = 0.05  # simulated starts at p*_- (1 +- delta) on every grid point with a fixed point
    c.horizon = 40.0 if smoke else 60.0  # simulated time in units of 1 / eta
    c.approx_tol = 0.1  # the region where eta / tau is within this relative error of p*_-
    return c


def collapse(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.d_in = 4 if smoke else 8  # input dimension
    c.d_out = 3 if smoke else 6  # output dimension of W
    c.aug_rank = 2 if smoke else 4  # rank of X' (augmentation covariance; PSD, singular)
    c.num_starts = 8 if smoke else 64  # random starts W(0) ~ N(0, 1 / d_in), vmapped
    c.eta = 0.01  # weight decay
    c.predictor_scale = 0.5  # fixed predictor of the second no-stop-gradient run: N(0, scale^2)
    c.horizon = 300.0 if smoke else 600.0  # simulated time
    c.num_saves = 31 if smoke else 121  # saves
    c.seed = 0  # PRNG seed of X, X', the predictor and the starts
    return c


def invariance(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_starts = 100 if smoke else 1000  # initial conditions, one vmapped program
    c.dim = 2 if smoke else 4  # eigen-directions per start
    c.alpha_p = 2.0  # predictor learning rate relative to W's
    c.eta = 0.05  # weight decay
    c.sigma2 = 0.3  # augmentation variance
    c.beta = 0.5  # EMA rate of BYOL's target
    c.p_range = (-0.2, 1.2)  # p_j(0) ~ U(range)
    c.s_range = (0.0, 1.5)  # s_j(0) ~ U(range)
    c.tau_range = (0.5, 1.5)  # tau_j(0) ~ U(range)
    c.horizon = 40.0 if smoke else 100.0  # simulated time
    c.num_saves = 21 if smoke else 101  # saves
    c.rtol = 1e-10  # solver relative tolerance (float64)
    c.atol = 1e-12  # solver absolute tolerance
    c.seed = 0  # PRNG seed of the starts
    return c


def byol(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dim = 6 if smoke else 8  # d_in = d_out (F and W_p are [dim, dim])
    c.init_scale = 1.0  # W(0), W_p(0) ~ N(0, scale^2 / dim); W_a(0) = W(0)
    c.lr = 0.02 if smoke else 0.01  # SGD step (flow time per step)
    c.steps = 3000 if smoke else 10000  # SGD steps
    c.batch = 256 if smoke else 1024  # fresh Gaussian samples per step
    c.alpha_p = 1.0  # predictor learning rate relative to W's
    c.eta = 0.05  # weight decay on W and W_p
    c.sigma2 = 0.5  # augmentation variance: x' = x + N(0, sigma^2 I)
    c.beta = 1.0  # EMA rate per unit time (BYOL momentum 1 - lr beta)
    c.record_every = 25 if smoke else 50  # steps between saves
    c.align_threshold = 0.05  # the ODE starts at the first save with commutator alignment below this
    c.live_fraction = 0.05  # directions with s_j >= this x max s at the end count as non-collapsed
    c.seed = 0  # PRNG seed of the initialization and the data
    return c


def all_figures(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.phase = phase(smoke)  # the 1-D reduced dynamics: stationary points, stability, trajectories
    c.basin = basin(smoke)  # the collapse threshold p*_- over (eta, sigma^2)
    c.collapse = collapse(smoke)  # no predictor / no stop-gradient: W -> 0
    c.invariance = invariance(smoke)  # s_j = p_j^2 / alpha_p + c_j e^{-2 eta t}
    c.byol = byol(smoke)  # linear BYOL by SGD against the eigenvalue ODE
    c.alignment = byol(smoke)  # the same run: the eigenspace alignment of W_p and F
    return c


VARIANTS = {
    "all": all_figures,
    "phase": phase,
    "basin": basin,
    "collapse": collapse,
    "invariance": invariance,
    "byol": byol,
    "alignment": byol,
}

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {
    "all_smoke": "experiments.noncontrastive_dynamics",
}


def get_config(arg: str = "all") -> ml_collections.ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    name, smoke = config_files.smoke_variant(arg, VARIANTS)
    config = VARIANTS[name](smoke)
    config.figure = name  # which figure(s) experiments.noncontrastive_dynamics draws
    config.write_docs = not smoke  # rewrite docs/noncontrastive.md's blocks and docs/figures/noncontrastive_*.png
    return config
