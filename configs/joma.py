"""Configs of the JoMA figures (docs/joma.md): Theorem 1 along real training, the ODEs of Theorems 2-4 and of
K > 1 nodes, and the hierarchical latent tree of Theorem 5.

Commands (each variant has a `_smoke` twin that runs in seconds on a CPU):

  python -m experiments.joma --config configs/joma.py:all --workdir runs/joma
  python -m experiments.joma --config configs/joma.py:invariants --workdir runs/joma_invariants
  python -m experiments.joma --config configs/joma.py:linear --workdir runs/joma_linear
  python -m experiments.joma --config configs/joma.py:nonlinear --workdir runs/joma_nonlinear
  python -m experiments.joma --config configs/joma.py:nodes --workdir runs/joma_nodes
  python -m experiments.joma --config configs/joma.py:hierarchy --workdir runs/joma_hierarchy

The paper's settings (Tian, Wang, Zhang, Chen, Du, ICLR 2024 and its public code): the toy of Fig. 2-3 has
20 contextual tokens (10 with a Gaussian bump per class, 10 of shared noise), 20 classes, d = 30,
U = [I; 0], softmax attention at temperature 0.5, a linear layer of 20 nodes as the classifier, SGD lr 0.1
on z and W for 2,000 full-batch steps from N(0, 0.01^2); Fig. 4 integrates dv = (mu - v) softmax(v^2 / 3)
by Euler steps of 0.02 for 5,000 iterations from v = 0.05 with mu = sorted(1 + 3 U(0, 1)) over 10 components.

Overrides: `--config.steps=500`, `--config.temperatures=(0.5,)`, ...
"""

import ml_collections

from lorank import config_files


def invariants(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_classes = 20  # classes = sequences = MLP nodes (the identity classifier)
    c.num_distinct = 10  # contextual tokens with a Gaussian bump per class
    c.num_common = 10  # contextual tokens of shared U(0, 1/2) noise
    c.bump_width = 30.0  # the bump exp(-(l - center)^2 / width)
    c.d = 30  # embedding dimension (U = [I; 0])
    c.temperatures = (0.5,) if smoke else (0.5, 1.0)  # softmax temperatures T, one run each
    c.steps = 2000  # full-batch SGD steps
    c.eta_z = 0.1  # attention learning rate
    c.eta_w = 0.1  # MLP learning rate
    c.init_scale = 0.01  # std of the N(0, scale^2) init of z and W
    c.record_every = 10  # steps between saves
    c.shown_tokens = (0, 3, 6, 15)  # tokens whose z(t) and prediction the figure draws
    # the exact forms: linear and exp attention, tanh nodes, a trained linear classifier
    c.exact_classes = 8  # classes of the smaller problem
    c.exact_distinct = 6  # its bump tokens
    c.exact_common = 4  # its noise tokens
    c.exact_nodes = 5  # its MLP nodes
    c.exact_d = 14  # its embedding dimension (random orthonormal U)
    c.exact_temperature = 0.5  # its temperature
    c.exact_steps = 100 if smoke else 400  # SGD steps of the discrete identity
    c.exact_rates = (0.4, 0.2)  # (eta_z, eta_w) of the SGD runs (ratio 2)
    c.exact_scale = 0.3  # init std of the smaller problem
    c.flow_t1 = 100.0  # horizon of the gradient flow (equal rates 0.5)
    c.flow_attentions = ("exp",) if smoke else ("exp", "linear")  # attention variants integrated as a flow
    c.seed = 0  # PRNG seed
    return c


def linear(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_tokens = 8 if smoke else 12  # M, components of v
    c.delta_scale = 0.5  # Delta ~ N(0, scale^2)
    c.xbar_range = (0.5, 1.5)  # token weights of A ~ U(range)
    c.init_scales = (0.0, 0.2)  # v(0) ~ N(0, scale^2): one trajectory each (0: from zero)
    c.scale = 2.0  # s of exp(v^2 / s)
    c.t1 = 2000.0  # horizon
    c.num_saves = 61 if smoke else 201  # saves, 0 then geometric
    c.seed = 0  # PRNG seed
    return c


def nonlinear(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # the public code's Fig. 4: softmax(v^2 / 3), mu = sorted(1 + 3 U(0, 1))
    c.code_components = 10  # components of v
    c.code_scale = 3.0  # s of exp(v^2 / s)
    c.code_t1 = 100.0  # horizon (5,000 Euler steps of 0.02)
    c.v0 = 0.05  # v(0), every component
    # the theory's exp(v^2 / 2): fitted convergence rates
    c.rate_mu = (1.0, 2.0)  # mu = linspace(range) over rate_components
    c.rate_components = 10  # components of v (as many as code_components: one compiled program)
    c.rate_t1 = 3000.0  # horizon
    c.rate_window = (1e-5, 1e-3)  # relative gaps |mu - v| / mu the fits use
    c.num_saves = 801  # saves (geometric after 0 for the rates)
    c.seed = 0  # PRNG seed of mu
    return c


def nodes(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_tokens = 8 if smoke else 12  # M, rows of V
    c.num_nodes = 4 if smoke else 6  # K, columns of V
    c.delta_scale = 0.3  # Delta ~ N(0, scale^2) [M, K]
    c.init_scale = 0.05  # V(0) ~ N(0, scale^2) for the random starts
    c.num_starts = 3 if smoke else 16  # random starts (plus V(0) = 0)
    c.t1 = 3000.0  # horizon
    c.num_saves = 41 if smoke else 121  # saves, 0 then geometric
    # e_l = sum_k V_lk^2 / 2 ("sum", Theorem 1 with K nodes) and the literal diag(exp(V∘V/2) 1) ("sum_of_exp")
    c.exponents = ("sum",) if smoke else ("sum", "sum_of_exp")  # node exponents, one run each
    c.seed = 0  # PRNG seed
    return c


def hierarchy(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_classes = 2  # D, values of the root
    c.height = 4 if smoke else 5  # L, levels below the root (2^L leaves = tokens)
    c.rho = 0.0  # channel correlation; 0: 1 - 1/L
    c.num_samples = 20000 if smoke else 200000  # sampled sequences
    # the public code's deterministic tree (Table 1's data)
    c.comp_tokens = 100  # M including the padding token
    c.comp_seq_len = 30  # L, tokens per sequence
    c.comp_levels = (10, 20, 10)  # latents per level, bottom up (the last = classes)
    c.comp_combinations = (2, 2, 2)  # subset size per level
    c.comp_samples = 1280  # sampled sequences
    c.seed = 0  # PRNG seed
    return c


def all_figures(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.invariants = invariants(smoke)  # Theorem 1 along real training (Fig. 2-3)
    c.linear = linear(smoke)  # Theorem 2
    c.nonlinear = nonlinear(smoke)  # Theorems 3-4 (Fig. 4)
    c.nodes = nodes(smoke)  # K > 1 nodes: the stable rank of V(t)
    c.hierarchy = hierarchy(smoke)  # Theorem 5
    return c


VARIANTS = {
    "all": all_figures,
    "invariants": invariants,
    "linear": linear,
    "nonlinear": nonlinear,
    "nodes": nodes,
    "hierarchy": hierarchy,
}

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {
    "all_smoke": "experiments.joma",
}


def get_config(arg: str = "all") -> ml_collections.ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    name, smoke = config_files.smoke_variant(arg, VARIANTS)
    config = VARIANTS[name](smoke)
    config.figure = name  # which figure(s) experiments.joma draws
    config.write_docs = not smoke  # rewrite docs/joma.md's blocks and docs/figures/joma_*.png
    return config
