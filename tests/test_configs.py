"""Every config file: documented fields, a smoke variant that runs, and CLI errors for unknown fields."""

import ast
import math
import importlib
import pathlib
import subprocess
import sys

import pytest

from lorank import config_files
from lorank.data.images import cifar10_archive

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


load = config_files.load_module


def smoke_runs():
    for path in CONFIG_FILES:
        for variant, experiment in load(path).SMOKE_VARIANTS.items():
            yield pytest.param(path, variant, experiment, id=f"{path.stem}:{variant}")


def test_every_config_file_declares_a_smoke_variant():
    assert CONFIG_FILES
    for path in CONFIG_FILES:
        module = load(path)
        assert module.SMOKE_VARIANTS, f"{path.name} has no smoke variant"
        assert "python -m experiments." in module.__doc__, f"{path.name}'s docstring lacks the command"


def test_every_config_field_has_a_comment():
    """Each `c.section.field = value` assignment of a config file's `_base*` and `*_section` builders carries a
    trailing comment."""
    for path in CONFIG_FILES:
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and (node.name.startswith("_base") or node.name.endswith("_section")):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Attribute) \
                            and not isinstance(stmt.value, ast.Call):
                        line = source[stmt.lineno - 1]
                        assert "#" in line, f"{path.name}:{stmt.lineno} has no comment: {line.strip()}"


def missing_data(config) -> str | None:
    """Why `config` cannot run here: the CIFAR-10 archive it reads is absent (None if nothing is missing)."""
    if "cifar" not in config or not config.get("use_cifar", True):
        return None
    archive = cifar10_archive(config.cifar.path)
    return None if archive.exists() else f"CIFAR-10 archive {archive} not found; set LORANK_DATA"


def _pretrain(out):
    return {"final_eval_loss": (out["final_eval_loss"], 3.5, 5.3), "steps": (out["steps"], 12, 12)}


def _grad_rank(out):
    checks = {"evaluations at steps 0, 4, 8, 12": (float(out["steps"] == [0, 4, 8, 12]), 1, 1),
              "final_eval_loss": (out["final_eval_loss"], 3.5, 5.3)}
    for kind, ranks in out["stable_rank"].items():
        checks[f"{kind}: smallest dimension (32 in the smoke model)"] = (out["min_dims"][kind], 32, 32)
        checks[f"{kind}: stable rank in [1, 32]"] = (float(all(1 - 1e-4 <= r <= 32 for r in ranks)), 1, 1)
    checks["four layer kinds"] = (len(out["stable_rank"]), 4, 4)
    return checks


def _bench_pretrain(out):
    checks = {}
    for name, m in out["methods"].items():
        start = m["eval_curve"][0][1]
        checks[f"{name} eval loss drop"] = (start - m["final_eval_loss"], 0.2, 2.0)
    galore, adamw = out["methods"]["galore"], out["methods"]["adamw"]
    checks["galore / adamw state bytes"] = (galore["optimizer_state_bytes"] / adamw["optimizer_state_bytes"], 0.3, 0.9)
    return checks


def _memory(out):
    rows = {r["update"]: r for r in out["rows"]}
    joint, layered = rows["global_clip"]["compiled"], rows["per_layer"]["compiled"]
    return {"per-layer / joint peak": (layered["peak"] / joint["peak"], 0.2, 0.99),
            "argument bytes >= params + state": (
                joint["argument"] - rows["global_clip"]["param_bytes"] - rows["global_clip"]["optimizer_state_bytes"],
                0, 1e9)}


def _linear_cl(out):
    g = out["Gaussian"]  # Theorem: the flow converges to the rank-one, aligned PCA solution
    return {"objective / lambda_max": (g["final_objective_over_lambda_max_min"], 0.99, 1.001),
            "sigma_2 / sigma_1": (g["final_sv_ratio_max"], 0.0, 1e-3),
            "layer alignment": (g["final_alignment_min"], 0.99, 1.0 + 1e-6),
            "input alignment": (g["final_input_alignment_min"], 0.99, 1.0 + 1e-6)}


def _one_layer(out):
    relu, linear = out["relu"], out["linear"]
    return {"linear patterns (32 nodes)": (linear["patterns_mean"]["32"], 1, 1),
            "relu patterns (32 nodes)": (relu["patterns_mean"]["32"], 3, 32),
            "relu patterns grow with nodes": (relu["patterns_mean"]["32"] - relu["patterns_mean"]["1"], 1, 32),
            "relu fixed points are top eigenvectors": (relu["fixed_point_cos_min"], 0.999, 1.0 + 1e-6),
            "relu nodes at a cluster center": (relu["nodes_at_a_cluster_center"], 0.9, 1.0)}


def _galore_convergence(out):
    return {"bound holds every step": (float(out["bound_holds_every_step"]), 1, 1),
            "fixed projection stalls (relative gap)": (out["relative_gap_final"]["fixed"], 0.1, 1.0),
            "refreshed projection converges (relative gap)": (out["relative_gap_final"]["T=25"], 0.0, 0.01)}


def _low_rank_grad(out):
    runs = {k: v for k, v in out.items() if isinstance(v, dict) and "sr_max" in v}
    checks = {f"{k} gradient stable rank": (max(v["sr_max"]), 1.0, 10.0) for k, v in runs.items()}
    checks.update({f"{k} loss falls": (v["loss_initial"] - v["loss_final"], 0.1, 10.0) for k, v in runs.items()})
    return checks


def _bench_dynamics(out):
    return {"ICs within tolerance of SciPy": (out["fraction_within_tol"], 0.8, 1.0),
            "largest difference at t1": (out["max_abs_diff_at_t1"], 0.0, 1e-4)}


def _bench_nanogpt(out):
    (ours,) = out["ours"]
    phases = ours["phases"]
    checks = {"our validation loss (below ln 256 after 12 steps)": (ours["val_loss"], 3.0, 5.4),
              "our steps": (ours["steps"], 12, 12),
              "start-up < first step < whole run": (float(0 < phases["startup_s"] < phases["to_first_step_s"]
                                                          < ours["wall_s"]), 1, 1),
              "sample starts with the prompt": (float(ours["sample"].startswith("ROMEO:")), 1, 1),
              "float32 matmul GFLOP/s": (out["peak_after"]["1024x1024x1024"], 1.0, 1e5)}
    if out["nanogpt_skipped"]:  # no torch or no nanoGPT checkout here: our half alone, and why
        checks["no nanoGPT result when skipped"] = (float(out["nanogpt"] == [] and "time_ratio" not in out), 1, 1)
    else:
        (ng,) = out["nanogpt"]
        checks["nanoGPT validation loss (below ln 65 after 8 iterations)"] = (ng["val_loss"], 3.0, 4.3)
        checks["time ratio is ours / nanoGPT"] = (out["time_ratio"] * ng["wall_s"] / ours["wall_s"], 0.999, 1.001)
    return checks


# The headline numbers of every smoke run: name -> (value, low, high), checked to lie in [low, high].
def _scan_snap(out):
    small = out["syn_small"]
    slow, fast = small["eta_y=1,eta_z=1"], small["eta_y=10,eta_z=1"]
    chi = out["chi"]
    table = out["b"]["table"]  # rows: ratio, T, B simulated, closed form, ratio, C0, spread or gap
    population = [row for row in table if row[1] == "inf"]
    return {
        "Fig. 4: common-token mass of c_0 after training (0.645 at the start)": (slow["common_mass_end"], 0.25, 0.55),
        "Fig. 4: eta_Y = 10 keeps more common mass than eta_Y = 1": (
            fast["common_mass_end"] - slow["common_mass_end"], 0.05, 0.4),
        "Fig. 4: top / bottom distinct token mass after training (10 at the start)": (
            slow["distinct_top_over_bottom_end"], 12.0, 300.0),
        "Fig. 3: saves inside Theorem 3's bounds, worst eta_Y": (min(v["bounds_hold_fraction"] for v in chi.values()
                                                                   if isinstance(v, dict)), 1.0, 1.0),
        "Fig. 3: max relative error of r = r(0) chi": (max(v["relative_gain_max_rel_error"] for v in chi.values()
                                                          if isinstance(v, dict)), 0.0, 0.02),
        "Fig. 8: largest h* - h in units of 2 eta_Y / M": (max(v["max_gap_over_2eta_over_m"] for v in out["h"].values()
                                                             if isinstance(v, dict)), 0.05, 1.0),
        "Fig. 8: simulated decoder vs h*": (out["h"]["simulated_max_abs_error"], 0.0, 1e-5),
        "Fig. 9: B_n at eta_Z / eta_Y = 0.01": (population[-1][2], 0.01, 0.05),
        "Fig. 9: Theorem 2's spread shrinks with eta_Z / eta_Y": (population[0][6] - population[-1][6], 0.05, 1.0),
        "Fig. 6: cells where the largest eta_Z lowers the entropy": (
            out["syn_medium"]["eta_z_lowers_entropy_fraction"], 1.0, 1.0),
        "Fig. 6: entropy of the data's own c_n": (out["syn_medium"]["uniform_attention_entropy"], 2.1, 2.2),
    }


def _bench_scan_snap(out):
    return {"runs": (out["runs"], 4, 4), "loop and sweep entropies agree": (out["max_entropy_difference"], 0, 1e-4),
            "speedup is a positive ratio": (out["speedup"], 0.05, 1e4)}


def _scan_snap_text_train(out):
    first, last = out["initial_entropy"], out["final_entropy"]
    return {"measurements at steps 0, 50, 100, 150, 200": (float(out["steps"] == [0, 50, 100, 150, 200]), 1, 1),
            "initial lowest-layer entropy / uniform (near-uniform attention at init)": (
                first[0] / out["uniform_entropy"], 0.95, 1.0 + 1e-6),
            "lowest-layer entropy drop, nats": (first[0] - last[0], 0.15, 2.0),
            "lowest-layer 90%-mass support falls": (out["initial_support"][0] - out["final_support"][0], 1.0, 15.0),
            "held-out loss drop, nats/token": (out["initial_eval_loss"] - out["final_eval_loss"], 1.5, 4.0),
            "final train loss below initial": (out["initial_train_loss"] - out["final_train_loss"], 1.5, 4.0),
            "entropies in [0, uniform]": (float(all(0 <= e <= out["uniform_entropy"] + 1e-5
                                                    for curve in out["entropy"] for e in curve)), 1, 1),
            "no skipped steps": (out["skipped"], 0, 0)}


def _scan_snap_text_one_layer(out):
    return {**_scan_snap_text_train(out), "one layer": (len(out["entropy"]), 1, 1)}


def _scan_snap_text_three_layer(out):
    return {**_scan_snap_text_train(out), "three layers": (len(out["entropy"]), 3, 3)}


def _scan_snap_text_lr_sweep(out):
    per_lr = out["per_lr"]
    lr5 = per_lr["5.0"]
    return {"learning rates swept": (len(out["lrs"]), 3, 3),
            "seeds per lr": (len(lr5["nonfinite_steps"]), 2, 2),
            "lr 5: lowest-layer entropy drop (median over seeds), nats": (
                lr5["initial_entropy_median"][0] - lr5["final_entropy_median"][0], 0.1, 2.0),
            "lr 1 keeps more entropy than lr 5": (
                per_lr["1.0"]["final_entropy_median"][0] - lr5["final_entropy_median"][0], 0.05, 2.0),
            "lr 1 and 5: held-out loss falls": (min(per_lr[k]["initial_eval_loss_median"]
                                                    - per_lr[k]["final_eval_loss_median"] for k in ("1.0", "5.0")),
                                                0.5, 4.0)}


def _joma(out):
    toy, exact = out["invariants"]["T=0.5"], out["invariants"]["exact"]
    zero = out["linear"]["starts"]["init_scale=0"]
    nonlinear, nodes, tree = out["nonlinear"], out["nodes"]["sum"], out["hierarchy"]
    return {
        "Theorem 1 (softmax toy): min over training of NC(z, z_hat)": (toy["corr_min"], 0.99, 1.0),
        "Theorem 1 (softmax toy): max |z(T) - z(0)|": (toy["z_change_max"], 1.0, 10.0),
        "Theorem 1 (softmax toy): NC gain of the second term at the end": (
            toy["corr_end"] - toy["corr_term1_end"], 1e-3, 0.1),
        "Theorem 1 (exp): SGD's discrete identity": (exact["exp"]["sgd_residual_max"], 0.0, 1e-4),
        "Theorem 1 (linear): SGD's discrete identity": (exact["linear"]["sgd_residual_max"], 0.0, 1e-4),
        "Theorem 1 (exp): gap without the per-step squares": (exact["exp"]["sgd_without_squares_max"], 1e-4, 1e3),
        "Theorem 1 (exp): gradient flow error": (exact["exp"]["flow_error_max"], 0.0, 1e-4),
        "Theorem 1 (exp): gradient flow moved z": (exact["exp"]["flow_change_max"], 0.5, 10.0),
        "stable rank of V at the end of the toy run (5.2 at the start)": (toy["stable_rank_end"], 1.0, 1.2),
        "Theorem 2: deviation of erf(v/sqrt 2)/Delta from sqrt(2/pi) tau": (zero["invariant_max_deviation"], 0.0, 1e-4),
        "Theorem 2: spread of erf(v/2)/Delta (not conserved)": (zero["spread_erf_half"], 0.05, 10.0),
        "Theorem 2: the salient token is the largest |Delta|": (
            float(zero["salient_token"] == zero["largest_abs_delta"]), 1, 1),
        "Theorem 2: |v| of the salient token at the end": (zero["salient_final_abs_v"], 30.0, 1e6),
        "Theorem 2: the others at their predicted limits": (zero["others_max_abs_error_to_limit"], 0.0, 1e-3),
        "Theorem 2: attention entropy at the end (sparse)": (zero["entropy_end"], 0.0, 1e-3),
        "Theorems 3-4: fitted rate ratios vs exp(mu_j^2/2) / exp(mu_k^2/2)": (
            nonlinear["ratio_max_rel_error"], 0.0, 0.02),
        "Theorems 3-4: entropy fall (public code's setting)": (nonlinear["code_bounce"]["fall"], 0.5, 2.3),
        "Theorems 3-4: entropy bounce back (public code's setting)": (nonlinear["code_bounce"]["rise"], 0.2, 1.0),
        "K > 1: stable rank of V from 0, first save": (nodes["zero_start_first"], 1.5, 4.0),
        "K > 1: largest stable rank at the end": (nodes["end_max"], 0.999, 1.01),
        "K > 1: stable rank from V(0) = 0 never rises": (float(nodes["zero_start_never_rises"]), 1, 1),
        "Theorem 5: P(y_l = 1 | y_m = 1) at H = 1 ((1 + 0.75^2) / 2 = 0.78125)": (
            tree["by_h"]["1"]["empirical_mean"], 0.77, 0.79),
        "Theorem 5: largest |z| of a pair against the exact co-occurrence": (tree["max_abs_z"], 0.0, 5.5),
        "composition tree: level sizes [99, 10, 20, 10]": (
            float(tree["composition"]["level_sizes"] == [99, 10, 20, 10]), 1, 1),
    }


def _joma_text(out, depths, steps, loss_drop, up_fall):
    """Shared checks of the JoMA real-text smoke runs (width 32, 32 bytes, Adam 1e-4)."""
    checks = {f"depths {depths}": (float(out["depths"] == list(depths)), 1, 1),
              f"measurements at steps {steps}": (float(all(r["steps"] == list(steps) for r in out["runs"])), 1, 1)}
    for s, r in zip(out["summaries"], out["runs"]):
        d = s["depth"]
        checks[f"depth {d}: layers measured"] = (float(len(r["entropy"]) == len(r["up_srank"]) == d), 1, 1)
        checks[f"depth {d}: held-out loss drop, nats/token (Adam 1e-4)"] = (
            s["initial_eval_loss"] - s["final_eval_loss"], *loss_drop)
        checks[f"depth {d}: no skipped steps"] = (s["skipped"], 0, 0)
        checks[f"depth {d}: stable ranks in [1, 32]"] = (
            float(all(1 - 1e-4 <= v <= 32 for name in ("up_srank", "down_srank") for c in r[name] for v in c)), 1, 1)
        checks[f"depth {d}: entropies in [0, uniform]"] = (
            float(all(0 <= v <= out["uniform_entropy"] + 1e-5 for c in r["entropy"] for v in c)), 1, 1)
        for i, layer in enumerate(s["layers"]):
            e, up = layer["entropy"], layer["up_srank"]
            checks[f"depth {d} layer {i}: initial entropy / uniform (near-uniform attention at init)"] = (
                e["start"] / out["uniform_entropy"], 0.95, 1.0 + 1e-6)
            # a 32 x 32 kernel of i.i.d. U(+-1/sqrt(32)) entries: stable rank about 9 (n/4 as n grows)
            checks[f"depth {d} layer {i}: initial up-kernel stable rank"] = (up["start"], 7.5, 11.0)
    first = out["summaries"][0]["layers"][0]["up_srank"]
    checks["depth 1: up-kernel stable rank falls"] = (first["start"] - first["end"], *up_fall)
    return checks


def _joma_text_layers(out):
    return _joma_text(out, (1, 2), (0, 25, 50, 75, 100, 125, 150), (0.5, 1.2), (0.03, 0.5))


def _joma_text_one_layer_long(out):
    checks = _joma_text(out, (1,), (0, 50, 100, 150, 200, 250, 300), (1.0, 1.8), (0.2, 1.5))
    e = out["summaries"][0]["layers"][0]["entropy"]
    checks["depth 1: entropy falls, nats"] = (e["start"] - e["end"], 0.02, 0.3)
    return checks


def _joma_hierarchy(out):
    comp = out["cells"]["composition C=10 levels=[10, 20] comb=2"]
    latent = out["cells"]["latent D=10"]
    return {
        "two cells": (len(out["cells"]), 2, 2),
        "evaluations at steps 0, 20, 40": (float(comp["steps"] == [0, 20, 40]), 1, 1),
        "composition: level-0 score": (comp["score"][0]["mean"], 0.8, 1.0),
        "composition: level-1 score": (comp["score"][1]["mean"], 0.3, 0.7),
        "composition: held-out loss drop": (comp["init_eval_loss"]["mean"] - comp["eval_loss"]["mean"], 0.1, 1.5),
        "latent tree: level-0 score": (latent["score"][0]["mean"], 0.5, 0.85),
        "latent tree: leaf-count reference above the units": (
            latent["reference"][0]["mean"] - latent["score"][0]["mean"], 0.0, 0.5),
        "latent tree: latents per level": (float(latent["num_latents"][:2] == [9, 3]), 1, 1),
    }


def _finetune(out):
    return {"held-out loss drop from the start": (out["initial_eval_loss"] - out["final_eval_loss"], 0.2, 2.0),
            "perplexity = exp(loss)": (out["eval_perplexity"] / math.exp(out["final_eval_loss"]), 0.9999, 1.0001),
            "retained Shakespeare loss": (out["eval_loss/retain"], 3.0, 5.6), "steps": (out["steps"], 16, 16)}


def _bench_finetune(out):
    checks = {f"{key}: held-out loss drop": (r["eval_curve"][0][1] - r["final_eval_loss"], 0.2, 2.0)
              for key, r in out["runs"].items()}
    checks["start: held-out Python loss of the pretrained smoke model"] = (out["start"]["eval_loss"], 4.0, 5.6)
    checks["galore:4 / adamw optimizer state"] = (out["runs"]["galore:4"]["optimizer_state_bytes"]
                                                  / out["runs"]["adamw"]["optimizer_state_bytes"], 0.3, 0.95)
    checks["lora:4 trainable / adamw trainable"] = (out["runs"]["lora:4"]["trainable_params"]
                                                    / out["runs"]["adamw"]["trainable_params"], 0.2, 0.95)
    checks["claims checked"] = (len(out["checks"]), 2, 2)
    return checks


def _noncontrastive(out):
    return {"final loss (2 - 2 cos, from about 1.7)": (out["loss"], 0.2, 1.3),
            "collapse std (1/sqrt(16) = 0.25 spread, 0 collapsed)": (out["collapse_std"], 0.02, 0.25),
            "linear probe accuracy (10 classes)": (out["probe/linear_acc"], 0.1, 0.6),
            "random-network probe accuracy": (out["random_network"]["probe/linear_acc"], 0.1, 0.6),
            "DirectPred's W_p commutes with F": (out["align/commutator"], 0.0, 1e-4), "steps": (out["steps"], 24, 24)}


def _bench_noncontrastive(out):
    v = out["variants"]
    return {"no predictor / DirectPred collapse std": (v["no_predictor"]["collapse_std"]
                                                      / v["directpred"]["collapse_std"], 0.1, 0.9),
            "no predictor collapses (check)": (float(out["checks"]["no_predictor collapses (std < 0.25 / sqrt(d))"]),
                                               1, 1),
            "DirectPred probe accuracy": (v["directpred"]["probe/linear_acc"], 0.1, 0.6),
            "checks made": (len(out["checks"]), 2, 2)}


def _ssl(out):
    random = out["random_network"]
    return {"linear probe gain over the untrained network": (out["probe/linear_acc"] - random["probe/linear_acc"],
                                                             0.01, 0.3),
            "kNN k=20 gain over the untrained network": (out["probe/knn20_acc"] - random["probe/knn20_acc"], 0.01, 0.3),
            "final loss (tau NT-Xent, from tau log(2N - 1) = 2.42)": (out["loss"], 1.5, 2.3),
            "feature effective rank (of 32)": (out["spectrum/feature_erank"], 5.0, 32.0),
            "steps": (out["steps"], 160, 160)}


def _bench_ssl(out):
    v, random = out["variants"], out["random_network"]["probe/linear_acc"]
    return {"direct linear-probe gain over the random network": (v["direct"]["probe/linear_acc"] - random, 0.0, 0.3),
            "directclr linear-probe gain over the random network": (v["directclr"]["probe/linear_acc"] - random,
                                                                    0.0, 0.3),
            "raw-pixel linear probe (10 classes)": (out["raw_pixels"]["probe/linear_acc"], 0.12, 0.4),
            "directclr has no projection spectrum": (float("spectrum/projection_erank" in v["directclr"]), 0, 0),
            "directclr d0 (a quarter of 32 features)": (out["directclr_dim"], 8, 8),
            "checks made": (len(out["checks"]), 2, 2)}


HEADLINES = {
    "llama:smoke": _pretrain,
    "bench_nanogpt:smoke": _bench_nanogpt,
    "bench_pretrain:smoke": _bench_pretrain,
    "grad_rank:smoke": _grad_rank,
    "memory:smoke": _memory,
    "dynamics:linear_cl_smoke": _linear_cl,
    "dynamics:one_layer_smoke": _one_layer,
    "dynamics:galore_convergence_smoke": _galore_convergence,
    "dynamics:low_rank_grad_smoke": _low_rank_grad,
    "dynamics:bench_smoke": _bench_dynamics,
    "scan_snap:all_smoke": _scan_snap,
    "scan_snap:bench_smoke": _bench_scan_snap,
    "scan_snap_text:one_layer_smoke": _scan_snap_text_one_layer,
    "scan_snap_text:three_layer_smoke": _scan_snap_text_three_layer,
    "scan_snap_text:lr_sweep_smoke": _scan_snap_text_lr_sweep,
    "joma:all_smoke": _joma,
    "joma_text:layers_smoke": _joma_text_layers,
    "joma_text:one_layer_long_smoke": _joma_text_one_layer_long,
    "joma_hierarchy:table_smoke": _joma_hierarchy,
    "finetune:smoke": _finetune,
    "bench_finetune:smoke": _bench_finetune,
    "noncontrastive:smoke": _noncontrastive,
    "bench_noncontrastive:smoke": _bench_noncontrastive,
    "ssl:smoke": _ssl,
    "bench_ssl:smoke": _bench_ssl,
    "noncontrastive_dynamics:all_smoke": lambda out: {
        "phase: simulated starts end at the predicted stationary point": (
            out["phase"]["simulated_agree_fraction"], 1.0, 1.0),
        "phase: |p*_- / (eta / tau) - 1| at eta = 1e-4": (out["phase"]["approx_rel_error_smallest_eta"], 0.0, 1e-3),
        "basin: p*_-(1 + 5%) reaches p*_+": (out["basin"]["above_to_p_plus_fraction"], 1.0, 1.0),
        "basin: p*_-(1 - 5%) collapses": (out["basin"]["below_to_zero_fraction"], 1.0, 1.0),
        "basin: past tau^2 = 4 eta (1 + sigma^2) every start collapses": (
            out["basin"]["beyond_edge_collapse_fraction"], 1.0, 1.0),
        "basin: p*_- within 10% of eta / tau at eta = 1e-3": (
            out["basin"]["approx_rel_error_at_smallest_eta"], 0.0, 0.1),
        "collapse: ODE vs expm(-H t) closed form": (out["collapse"]["closed_form_max_abs_error"], 0.0, 1e-6),
        "collapse: largest ||W(t1)|| / ||W(0)|| (e^{-eta t1} = 0.0498)": (
            out["collapse"]["final_norm_ratio_max"], 0.0, 0.05),
        "invariance: max |s - p^2 / alpha_p - c e^{-2 eta t}|": (out["invariance"]["residual_max"], 0.0, 1e-5),
        "invariance: the trajectories moved": (out["invariance"]["s_change_max"], 0.1, 10.0),
        "byol: ODE vs SGD, max |s_ode - s| / max s": (out["byol"]["s_error_over_top_max"], 0.0, 0.08),
        "byol: ODE vs SGD, max |p_ode - p| / |p| (non-collapsed)": (out["byol"]["p_rel_error_live_max"], 0.0, 0.05),
        "byol: non-collapsed directions end at p*_+": (out["byol"]["final_p_live_rel_error_to_p_plus"], 0.0, 0.05),
        "byol: some directions survive, some collapse": (out["byol"]["live_directions"], 2, 5),
        "alignment: ||[F, W_p]|| / (||F|| ||W_p||) at the start": (out["alignment"]["alignment_start"], 0.2, 1.5),
        "alignment: ... at the end": (out["alignment"]["alignment_end"], 0.0, 0.01),
        "alignment: balance follows e^{-2 eta t} under SGD": (out["alignment"]["balance_rel_deviation_max"], 0.0, 0.1),
    },
}


def test_every_smoke_variant_has_headline_checks():
    assert {p.id for p in smoke_runs()} == set(HEADLINES)


@pytest.mark.parametrize("path, variant, experiment", list(smoke_runs()))
def test_smoke_variant_runs_and_its_headline_numbers_lie_in_range(path, variant, experiment, tmp_path):
    config = load(path).get_config(variant)
    reason = missing_data(config)
    if reason:
        pytest.skip(reason)
    out = importlib.import_module(experiment).run(config, str(tmp_path))
    assert any(tmp_path.iterdir()), f"{experiment} wrote nothing to its workdir"
    for name, (value, low, high) in HEADLINES[f"{path.stem}:{variant}"](out).items():
        assert low <= value <= high, f"{path.stem}:{variant}: {name} = {value}, expected in [{low}, {high}]"


def test_unknown_config_field_on_the_command_line_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--config", "configs/llama.py:smoke",
         "--config.train.stepz=3", "--workdir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
