"""Training dynamics as jit-compiled simulators, one module per theory.

solve.py          the one wrapper over diffrax: solve(field, y0, t1, ...)
linear_cl.py      deep linear contrastive learning is PCA of X_alpha
one_layer.py      one-layer nonlinear contrastive dynamics dw/dt = P_w^perp A(w) w
low_rank_grad.py  low-rank gradients of reversible networks; GaLore on sum A - B W C
scan_snap.py      the 1-layer transformer's (Y, Z) dynamics of Scan&Snap and its closed forms
joma.py           JoMA: the joint MLP/attention block, Theorem 1's invariants, the ODEs of Theorems 2-4
directpred.py     non-contrastive linear dynamics: collapse without predictor / stop-gradient, the
                  eigenvalue ODEs and their invariance, the reduced 1-D dynamics, DirectPred / DirectCopy
"""
