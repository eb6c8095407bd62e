"""Configs of the theory simulators (docs/dynamics.md) and their benchmark.

Commands (each variant has a `_smoke` twin that runs in seconds on a CPU):

  python -m experiments.dynamics_linear_cl --config configs/dynamics.py:linear_cl --workdir runs/linear_cl
  python -m experiments.dynamics_one_layer --config configs/dynamics.py:one_layer --workdir runs/one_layer
  python -m experiments.dynamics_low_rank_grad --config configs/dynamics.py:low_rank_grad --workdir runs/low_rank_grad
  python -m experiments.dynamics_galore_convergence \\
      --config configs/dynamics.py:galore_convergence --workdir runs/galore_convergence
  python -m experiments.bench_dynamics --config configs/dynamics.py:bench --workdir runs/bench_dynamics

Overrides: `--config.steps=200`, `--config.cifar.max_per_class=50`, ...
"""

import ml_collections

from lorank import config_files


def _cifar(max_per_class: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.path = ""  # CIFAR-10 JPEG archive; "" = $LORANK_DATA or ../shared/data/cifar10-jpeg.tar.gz
    c.split = "train"  # archive split to read
    c.max_per_class = max_per_class  # images per class (the subset is cached as npz)
    c.pool = 4  # average-pool factor: 32x32 -> (32 / pool)^2 pixels
    c.grayscale = True  # average the RGB channels before flattening
    return c


def linear_cl(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of data, augmentations and initial weights
    c.num_seeds = 3 if smoke else 8  # random initializations simulated (vmapped)
    c.dims = (16, 12, 8, 4) if smoke else (32, 24, 16, 8)  # widths d_0..d_L of the Gaussian run
    c.hidden = (12, 8, 4) if smoke else (32, 16, 8)  # widths d_1..d_L of the CIFAR run
    c.num_samples = 400 if smoke else 4000  # Gaussian samples (two views each)
    c.aug_strength = 3.0  # variance of the augmentation noise along one direction
    c.aug_floor = 0.05  # isotropic augmentation-noise variance
    c.horizon = 40.0 if smoke else 80.0  # simulated time in units of 1 / lambda_max(X_alpha)
    c.num_saves = 60  # save times along the trajectory
    c.rtol = 1e-6  # solver relative tolerance
    c.atol = 1e-8  # solver absolute tolerance
    c.use_cifar = not smoke  # also run on CIFAR-10 images (skipped if the archive is missing)
    c.cifar = _cifar(20 if smoke else 300)  # CIFAR-10 subset and preprocessing
    c.shift = 2  # CIFAR augmentation: max translation in pixels
    c.brightness = 0.2  # CIFAR augmentation: max relative brightness change
    return c


def one_layer(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of data and initial weights
    c.num_clusters = 6 if smoke else 10  # clusters (local patterns) in the data
    c.dim = 12 if smoke else 20  # input dimension
    c.num_samples = 200 if smoke else 600  # samples (two views each)
    c.scale_range = (1.4, 0.8)  # cluster scales, linearly spaced from first to last
    c.radial = 0.3  # relative spread of a cluster along its center
    c.noise = 0.02  # isotropic noise of the clean samples
    c.aug = 0.02  # augmentation noise of each view
    c.max_nodes = 32 if smoke else 128  # nodes per seed; counts use the first 1, 2, 4, ... nodes
    c.num_seeds = 2 if smoke else 5  # independent sets of initial conditions
    c.activations = ("linear", "relu") if smoke else ("linear", "relu", "leaky_relu", "power")
    c.leaky_slope = 0.1  # negative slope of leaky_relu
    c.power = 3  # exponent of the power activation x^p
    c.horizon = 100.0 if smoke else 300.0  # simulated time in units of 1 / lambda_max(X_alpha)
    c.num_saves = 40 if smoke else 150  # save times along each trajectory
    c.rtol = 1e-5  # solver relative tolerance
    c.atol = 1e-7  # solver absolute tolerance
    c.pattern_threshold = 0.95  # |cos| above which two converged nodes are one pattern
    return c


def low_rank_grad(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of the initial weights
    c.cifar = _cifar(20 if smoke else 200)  # CIFAR-10 subset (N = 10 * max_per_class)
    c.hidden = (32, 32) if smoke else (64, 64)  # hidden widths of the MLPs
    c.activations = ("linear", "relu", "leaky_relu")  # reversible activations
    c.losses = ("l2", "softmax")  # losses
    c.leaky_slope = 0.1  # negative slope of leaky_relu
    c.lr = 0.1  # gradient-descent step (inputs are scaled to lambda_max(X^T X / N) = 1)
    c.steps = 200 if smoke else 4000  # full-batch gradient-descent steps
    c.bound_t0 = 100 if smoke else 2000  # step t0 at which the last layer's bound is evaluated
    c.single_layer_lr_frac = 0.9  # single linear layer: lr = frac / lambda_max(C)
    c.single_layer_steps = 500 if smoke else 8000  # single linear layer: steps
    c.single_layer_pool = 8  # single linear layer: pooling (4x4 gray = 16 inputs)
    c.single_layer_norm_floor = 1e-10  # single linear layer: plot sr(G_t) while ||G_t|| / ||G_0|| > this
    return c


def galore_convergence(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of the problem
    c.m = 16 if smoke else 32  # rows of W (the projected side)
    c.n = 24 if smoke else 48  # columns of W
    c.num_terms = 3 if smoke else 4  # number of (A_i, B_i, C_i) terms
    c.floor = 0.1  # B_i, C_i = Z Z^T / dim + floor I
    c.rank = 4  # GaLore rank r
    c.gaps = (25, 100) if smoke else (50, 200)  # refresh intervals T compared with a fixed P
    c.steps = 400 if smoke else 3000  # optimizer steps
    c.lr_frac = 1.0  # lr = lr_frac / lambda_max(S)
    return c


def bench(smoke: bool) -> ml_collections.ConfigDict:
    c = one_layer(smoke)
    c.num_ics = 10 if smoke else 1000  # initial conditions integrated
    c.activation = "relu"  # activation of the benchmarked dynamics
    c.num_clusters = 8  # clusters in the data
    c.dim = 16  # input dimension
    c.num_samples = 128  # samples (two views each)
    c.horizon = 50.0  # simulated time in units of 1 / lambda_max(X_alpha)
    c.rtol = 1e-6  # relative tolerance, the same for diffrax and SciPy
    c.atol = 1e-8  # absolute tolerance, the same for diffrax and SciPy
    c.solver = "dopri5"  # diffrax solver; SciPy's RK45 is the same Dormand-Prince pair
    c.pcoeff = 0.2  # diffrax PI step-size controller (SciPy's RK45: integral, 0 and 1)
    c.icoeff = 0.3  # ... fewer rejected steps on the discontinuous ReLU field
    c.chunk_size = 125  # initial conditions per vmapped diffrax solve (one after another)
    c.num_saves = 11  # save times compared between the two
    c.agree_tol = 1e-4  # max |w_diffrax - w_scipy| over ICs and save times counted as agreeing
    c.num_reference = 2 if smoke else 20  # ICs also solved with DOP853 at reference_rtol
    c.reference_rtol = 1e-9 if smoke else 1e-12  # tolerances of that reference solution
    c.reference_atol = 1e-11 if smoke else 1e-14
    c.repeats = 1 if smoke else 3  # timing repeats of the compiled diffrax solve (median)
    c.write_docs = not smoke  # rewrite the bench_dynamics section of docs/benchmarks.md
    return c


VARIANTS = {
    "linear_cl": linear_cl,
    "one_layer": one_layer,
    "low_rank_grad": low_rank_grad,
    "galore_convergence": galore_convergence,
    "bench": bench,
}


# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {
    "linear_cl_smoke": "experiments.dynamics_linear_cl",
    "one_layer_smoke": "experiments.dynamics_one_layer",
    "low_rank_grad_smoke": "experiments.dynamics_low_rank_grad",
    "galore_convergence_smoke": "experiments.dynamics_galore_convergence",
    "bench_smoke": "experiments.bench_dynamics",
}


def get_config(arg: str = "linear_cl") -> ml_collections.ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    name, smoke = config_files.smoke_variant(arg, VARIANTS)
    config = VARIANTS[name](smoke)
    config.variant = arg  # the variant name, recorded in metrics.json
    return config
