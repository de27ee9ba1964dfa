"""Layer-wise structured pruning: the OSSCAR solver and score baselines.

The problem, for one linear layer y = x W (W is d x d_out, i.e. ``down_proj.weight.T`` or
``o_proj.weight.T``) whose d input columns are cut into n equal groups (one MLP neuron = 1
column; one attention head = head_dim contiguous columns; one KV group = n_rep * head_dim):

    minimise  f(W_hat) = 1/2 ||X W_hat - X W||^2      over W_hat with only k groups of rows nonzero.

Everything depends on the calibration inputs X only through the Gram matrix H = X^T X, since
1/2 ||X D||^2 = 1/2 tr(D^T H D).  We damp it, G = H + ridge * mean(diag H) * I, so that it is
positive definite even with few tokens or dead neurons; G is the matrix the solver minimises with.

Least squares on a kept set S.  For fixed S the best weights solve G_SS W_hat_S = (G W)_S.  With
K = (G_SS)^-1, removing a subset R of S (the rest is T = S \\ R) costs

    delta f = 1/2 tr(W_hat_R^T [K_RR]^-1 W_hat_R)                       (the OBS / OSSCAR cost)

and the new optimum and inverse follow from the Schur complement, no re-inversion needed:

    W_hat_T <- W_hat_T - K_TR [K_RR]^-1 W_hat_R,      (G_TT)^-1 = K_TT - K_TR [K_RR]^-1 K_RT.

Adding a pruned group j back is the reverse (a block-inverse "grow"): with B = K G_Sj,
Schur_j = G_jj - G_jS B and residual r_j = (G W)_j - G_jS W_hat_S, the objective falls by
1/2 tr(r_j^T Schur_j^-1 r_j).

OSSCAR = (1) greedy backward removal with those costs, (2) local search by swaps (add the pruned
group j, then drop the cheapest kept one; accept when the objective falls), (3) a final
least-squares refit of the kept weights.  Baselines (``magnitude``, ``activation``, ``wanda_sp``)
rank groups by a score and keep the original weights (no refit).

Buckets: with ``buckets=b`` the n groups are split into b equal contiguous blocks and exactly
k / b groups are kept in each (e.g. "the same number of query heads inside every KV group").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Calibration statistics of one linear layer's inputs, accumulated over tokens.

    gram: (d, d) H = sum over tokens of x x^T (float32 or float64).
    abs_sum: (d,) sum over tokens of |x|, for the ``activation`` baseline.
    count: number of tokens accumulated.
    cross: optional (d, d_out) C = sum over tokens of x y^T, where y is the output the layer should
        reproduce (e.g. the dense model's); None means y = x W, the layer's own dense output.
    target_sq: ||Y||^2 over the tokens, with ``cross`` (for relative errors).
    """

    gram: Tensor
    abs_sum: Tensor
    count: int
    cross: Tensor | None = None
    target_sq: float | None = None

    @property
    def abs_mean(self) -> Tensor:
        """Mean |x| per input column."""
        return self.abs_sum / max(self.count, 1)


@dataclass
class SolverOptions:
    """Knobs of the OSSCAR solver (baselines ignore all but nothing; they need none).

    ridge: damping G = H + ridge * mean(diag H) * I.
    greedy_steps: at most this many Schur downdates in the greedy phase; each step removes
        ceil(still_to_remove / steps_left) groups, so when at most ``greedy_steps`` groups must go
        the greedy is exact one-at-a-time, otherwise the lowest-cost groups of a step go together.
    local_search_iters: at most this many accepted swaps.
    swap_candidates: per swap iteration, the pruned groups with the largest add-back gain that
        are tried; for each the best drop is found exactly (all pruned groups when fewer).
    float64_max_dim: solve in float64 when d <= this, else float32 (memory on wide MLPs).
    """

    ridge: float = 1e-2
    greedy_steps: int = 64
    local_search_iters: int = 16
    swap_candidates: int = 32
    float64_max_dim: int = 8192


@dataclass
class Selection:
    """What a method chose for one layer.

    kept: sorted indices of the kept groups (long).
    weight: (len(kept) * group_size, d_out) weight rows for the kept columns, in ``kept`` order
        (the refit for OSSCAR, the untouched dense rows for the baselines).
    objective_greedy / objective_final: 1/2 tr(D^T G D) with D = W_hat - W, G the damped Gram,
        after the greedy phase and after local search + refit (equal for baselines).
    swaps: local-search swaps accepted.
    """

    kept: Tensor
    weight: Tensor
    objective_greedy: float
    objective_final: float
    swaps: int = 0


def damped_gram(gram: Tensor, ridge: float) -> Tensor:
    """G = H + ridge * mean(diag H) * I: positive definite, scale-free damping."""
    d = gram.shape[0]
    mean_diag = gram.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise ValueError(
            "calibration Gram matrix is empty or not finite (no tokens reached this layer?): "
            "give calibration batches with real tokens"
        )
    return gram + (ridge * mean_diag) * torch.eye(d, dtype=gram.dtype, device=gram.device)


def group_columns(groups: Tensor, group_size: int) -> Tensor:
    """Input-column indices of ``groups`` (group g = columns g*group_size ... +group_size-1)."""
    groups = torch.as_tensor(groups, dtype=torch.long)
    offsets = torch.arange(group_size, device=groups.device)
    return (groups[:, None] * group_size + offsets[None, :]).reshape(-1)


def least_squares_refit(G: Tensor, W: Tensor, cols: Tensor) -> Tensor:
    """argmin over W_hat supported on ``cols`` of 1/2 tr((W_hat - W)^T G (W_hat - W)).

    Normal equations G_SS W_hat_S = (G W)_S, solved by Cholesky.
    """
    rhs = (G[cols] @ W)
    chol = torch.linalg.cholesky(G[cols][:, cols])
    return torch.cholesky_solve(rhs, chol)


def objective(G: Tensor, W: Tensor, cols: Tensor, W_hat_S: Tensor) -> float:
    """1/2 tr(D^T G D), D = W_hat - W, W_hat = W_hat_S on ``cols`` and zero elsewhere."""
    D = -W.clone()
    D[cols] += W_hat_S
    return 0.5 * float((D * (G @ D)).sum())


def relative_error(H: Tensor, W: Tensor, cols: Tensor, W_hat_S: Tensor) -> float:
    """||X W_hat - X W||^2 / ||X W||^2 computed from the undamped Gram H = X^T X."""
    D = -W.clone()
    D[cols] += W_hat_S
    num = (D * (H @ D)).sum()
    den = (W * (H @ W)).sum()
    return float(num / den.clamp_min(torch.finfo(den.dtype).tiny))


def schur_downdate(K: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of G restricted to the rows/columns that stay, from K = G^-1 alone.

    (G_TT)^-1 = K_TT - K_TD [K_DD]^-1 K_DT  (rank-|D| update, no re-inversion).
    Returns the new inverse and the kept positions ``T`` (in their original order).
    """
    mask = torch.ones(K.shape[0], dtype=torch.bool, device=K.device)
    mask[drop] = False
    keep = mask.nonzero().squeeze(1)
    K_td = K[keep][:, drop]
    K_dd = K[drop][:, drop]
    K_new = K[keep][:, keep] - K_td @ torch.linalg.solve(K_dd, K_td.T)
    return 0.5 * (K_new + K_new.T), keep


def _diag_blocks(K: Tensor, group_size: int) -> Tensor:
    """(n, gs, gs) diagonal blocks of an (n*gs, n*gs) matrix."""
    n = K.shape[0] // group_size
    idx = torch.arange(n, device=K.device)
    return K.reshape(n, group_size, n, group_size)[idx, :, idx, :]


def _block_quadratic(blocks: Tensor, V: Tensor) -> Tensor:
    """1/2 tr(V_g^T blocks_g^-1 V_g) for every group g; V is (n, gs, d_out)."""
    if blocks.shape[-1] == 1:
        # Single columns (MLP neurons): a division; batched LAPACK calls on 1x1 blocks are slow.
        return 0.5 * (V[:, 0, :] ** 2).sum(dim=1) / blocks[:, 0, 0]
    return 0.5 * (V * (torch.linalg.inv(blocks) @ V)).sum(dim=(1, 2))


def _pick_within_quota(order: Tensor, bucket_of: Tensor, room: Tensor, count: int) -> list[int]:
    """First ``count`` entries of ``order`` such that no bucket gives more than ``room[b]``."""
    room, bucket_list = room.tolist(), bucket_of.tolist()
    picked = []
    for a in order.tolist():
        b = bucket_list[a]
        if room[b] > 0:
            picked.append(a)
            room[b] -= 1
            if len(picked) == count:
                break
    return picked


class _ActiveSet:
    """Kept groups S, with K = (G_SS)^-1 and the least-squares W_hat_S kept at full size.

    K is d x d with (G_SS)^-1 in the rows/columns of S and zeros elsewhere; W_hat is d x d_out with
    zero rows outside S.  Removing a set D is then one in-place rank-|D| update
    K <- K - K[:, D] K_DD^-1 K[D, :], which also zeroes D's rows and columns: no index copies of K.
    """

    def __init__(self, G: Tensor, W: Tensor, group_size: int):
        self.G, self.gs = G, group_size
        self.GW = G @ W
        self.n = G.shape[0] // group_size
        self.active = torch.ones(self.n, dtype=torch.bool, device=G.device)
        # Full set: W_hat = W is optimal (objective 0), K = G^-1.  cholesky_solve against I is
        # much faster than cholesky_inverse on CPU builds of torch.
        chol, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise ValueError(
                "damped Gram matrix is not positive definite (too few calibration tokens for this "
                "width with ridge this small): raise prune.ridge (1e-2 is the usual value) or add data"
            )
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        self.K = torch.cholesky_solve(eye, chol)
        self.W_hat = W.clone()

    @property
    def groups(self) -> Tensor:
        return self.active.nonzero().squeeze(1)

    def cols(self) -> Tensor:
        return group_columns(self.groups, self.gs)

    def removal_costs(self) -> Tensor:
        """OBS cost of dropping each group alone (inf for groups already pruned)."""
        blocks = _diag_blocks(self.K, self.gs)
        blocks[~self.active] = torch.eye(self.gs, dtype=blocks.dtype, device=blocks.device)
        cost = _block_quadratic(blocks, self.W_hat.reshape(self.n, self.gs, -1))
        return torch.where(self.active, cost, torch.full_like(cost, math.inf))

    def remove(self, groups: list[int]) -> None:
        """Drop ``groups`` jointly (exact rank-|D| Schur downdate of K and W_hat)."""
        drop = group_columns(torch.tensor(groups, device=self.K.device), self.gs)
        K_d = self.K[:, drop]  # a copy: safe to update K in place below
        K_dd = K_d[drop]
        # addmm_ updates in place without materialising the d x d product (half the memory traffic)
        self.W_hat.addmm_(K_d, torch.linalg.solve(K_dd, self.W_hat[drop]), alpha=-1)
        self.K.addmm_(K_d, torch.linalg.solve(K_dd, K_d.T), alpha=-1)
        # Exact zeros (not float residue) outside S keep later masks and sums clean.
        self.K[drop] = 0
        self.K[:, drop] = 0
        self.W_hat[drop] = 0
        self.active[torch.tensor(groups, device=self.active.device)] = False

    def add_gains(self, pruned: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For every pruned group j: gain of adding it back, and the pieces to do so.

        Returns (gain (p,), B (p, d, gs) = K G_:j (zero outside S), Schur^-1 (p, gs, gs),
        y (p, gs, d_out) = Schur_j^-1 r_j, the least-squares rows of j once added).
        """
        gs, d = self.gs, self.K.shape[0]
        p = pruned.numel()
        cols_p = group_columns(pruned, gs)
        G_p = self.G[:, cols_p]  # (d, p*gs)
        B = (self.K @ G_p).reshape(d, p, gs)
        G_pp = _diag_blocks(G_p[cols_p], gs)
        # G_jS B_S = G[c_j, :] B because B is zero outside S.
        schur = G_pp - torch.einsum("dpa,dpb->pab", G_p.reshape(d, p, gs), B)
        schur = 0.5 * (schur + schur.transpose(1, 2))
        resid = (self.GW[cols_p] - G_p.T @ self.W_hat).reshape(p, gs, -1)
        schur_inv = torch.linalg.inv(schur)
        y = schur_inv @ resid
        gain = 0.5 * (resid * y).sum(dim=(1, 2))
        return gain, B.permute(1, 0, 2), schur_inv, y

    def add(self, group: int) -> None:
        """Add one pruned group back (block-inverse grow of K, least-squares update of W_hat)."""
        _, B, schur_inv, y = self.add_gains(torch.tensor([group], device=self.K.device))
        B, schur_inv, y = B[0], schur_inv[0], y[0]
        cols = group_columns(torch.tensor([group], device=self.K.device), self.gs)
        BS = B @ schur_inv
        self.K += BS @ B.T
        self.K[:, cols] = -BS
        self.K[cols] = -BS.T
        self.K[cols[:, None], cols] = schur_inv
        self.K = 0.5 * (self.K + self.K.T)
        self.W_hat -= B @ y
        self.W_hat[cols] = y
        self.active[group] = True


def _best_swap(state: _ActiveSet, bucket_of: Tensor, candidates: int) -> tuple[float, int, int]:
    """Best (delta objective, group to add, group to drop) over the top candidates.

    For a fixed added group j, f(S + j - i) = f(S) - gain_j + cost_i(S + j), so the best drop
    after adding j is the cheapest removal in the grown set: the swap value is exact.
    """
    pruned = (~state.active).nonzero().squeeze(1)
    if pruned.numel() == 0:
        return 0.0, -1, -1
    gain, B, schur_inv, y = state.add_gains(pruned)
    order = torch.argsort(gain, descending=True)[:candidates]
    if state.gs == 1:
        cost = _swap_drop_costs_single(state, B[order, :, 0], schur_inv[order, 0, 0], y[order, 0, :])
    else:
        cost = torch.stack([_swap_drop_costs_block(state, B[c], schur_inv[c], y[c]) for c in order.tolist()])
    allowed = state.active[None, :] & (bucket_of[None, :] == bucket_of[pruned[order]][:, None])
    cost = torch.where(allowed, cost, torch.full_like(cost, math.inf))
    drop_cost, drop = cost.min(dim=1)
    delta = drop_cost - gain[order]
    best = int(torch.argmin(delta))
    if float(delta[best]) >= 0:
        return 0.0, -1, -1
    return float(delta[best]), int(pruned[order[best]]), int(drop[best])


def _swap_drop_costs_block(state: _ActiveSet, B: Tensor, schur_inv: Tensor, y: Tensor) -> Tensor:
    """Removal cost of every group after adding the pruned group with pieces (B, Schur^-1, y).

    Grown inverse blocks K_ii + B_i Schur^-1 B_i^T, grown rows W_hat_i - B_i y.
    """
    gs, n = state.gs, state.n
    Bg = B.reshape(n, gs, gs)
    K_grown = _diag_blocks(state.K, gs) + Bg @ schur_inv @ Bg.transpose(1, 2)
    K_grown[~state.active] = torch.eye(gs, dtype=K_grown.dtype, device=K_grown.device)
    return _block_quadratic(K_grown, state.W_hat.reshape(n, gs, -1) - Bg @ y)


def _swap_drop_costs_single(state: _ActiveSet, B: Tensor, schur_inv: Tensor, y: Tensor) -> Tensor:
    """The same for single-column groups, all C candidates at once without forming W_hat - b y:

    cost_ic = 1/2 ||W_hat_i - b_ci y_c||^2 / (K_ii + b_ci^2 s_c)
            = 1/2 (||W_hat_i||^2 - 2 b_ci <W_hat_i, y_c> + b_ci^2 ||y_c||^2) / (K_ii + b_ci^2 s_c).
    B: (C, d), schur_inv: (C,), y: (C, d_out).  Returns (C, d).
    """
    w2 = (state.W_hat ** 2).sum(dim=1)
    wy = (state.W_hat @ y.T).T  # (C, d)
    y2 = (y ** 2).sum(dim=1)
    num = w2[None, :] - 2 * B * wy + B ** 2 * y2[:, None]
    den = state.K.diagonal()[None, :] + B ** 2 * schur_inv[:, None]
    den = torch.where(state.active[None, :], den, torch.ones_like(den))
    return 0.5 * num.clamp_min(0) / den


def target_weights(G: Tensor, W: Tensor, stats: InputStats) -> Tensor:
    """The full-width least-squares weights the solver reconstructs: W itself without ``stats.cross``.

    With a target Y (cross C = X^T Y), minimising 1/2 ||X W_hat - Y||^2 + 1/2 ridge m ||W_hat - W||^2
    (m = mean diag H; the damping pulls toward the dense W) equals, up to a constant,
    1/2 tr((W_hat - W_0)^T G (W_hat - W_0)) with G W_0 = C + ridge m W. So the solver runs unchanged
    on W_0 instead of W: its costs, swaps and refit are all measured from the unconstrained optimum.
    """
    if stats.cross is None:
        return W
    damping = (G.diagonal() - stats.gram.diagonal().to(G.dtype))[:, None]  # ridge * m on every row
    rhs = stats.cross.to(G.dtype) + damping * W
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(G))


def _check_problem(W: Tensor, gram: Tensor, group_size: int, keep: int, buckets: int) -> int:
    d = W.shape[0]
    if gram.shape != (d, d):
        raise ValueError(f"Gram matrix shape {tuple(gram.shape)} does not match weight input dim {d}")
    if group_size < 1 or d % group_size:
        raise ValueError(f"input dim {d} is not a multiple of group_size={group_size}")
    n = d // group_size
    if buckets < 1 or n % buckets:
        raise ValueError(f"{n} groups cannot be split into buckets={buckets} equal blocks")
    if not 1 <= keep <= n or keep % buckets:
        raise ValueError(
            f"keep={keep} groups is impossible: need 1 <= keep <= {n} and a multiple of buckets={buckets}"
        )
    return n


def _solver_dtype(d: int, options: SolverOptions) -> torch.dtype:
    return torch.float64 if d <= options.float64_max_dim else torch.float32


def osscar(
    stats: InputStats,
    W: Tensor,
    *,
    group_size: int,
    keep: int,
    buckets: int = 1,
    options: SolverOptions | None = None,
) -> Selection:
    """OSSCAR: greedy backward removal, swap local search, least-squares refit (see module doc)."""
    options = options or SolverOptions()
    n = _check_problem(W, stats.gram, group_size, keep, buckets)
    dtype = _solver_dtype(W.shape[0], options)
    G = damped_gram(stats.gram.to(dtype), options.ridge)
    Wd = target_weights(G, W.to(dtype), stats)
    per_bucket = n // buckets
    bucket_of = torch.arange(n, device=G.device) // per_bucket
    quota = keep // buckets

    state = _ActiveSet(G, Wd, group_size)
    to_remove, steps_left = n - keep, max(options.greedy_steps, 1)
    while to_remove > 0:
        step = math.ceil(to_remove / steps_left)
        costs = state.removal_costs()
        room = torch.bincount(bucket_of[state.active], minlength=buckets) - quota
        order = torch.argsort(costs)[: int(state.active.sum())]  # pruned groups cost inf: last
        picked = _pick_within_quota(order, bucket_of, room, step)
        state.remove(picked)
        to_remove -= len(picked)
        steps_left = max(steps_left - 1, 1)

    objective_greedy = objective(G, Wd, state.cols(), state.W_hat[state.cols()])
    current, swaps = objective_greedy, 0
    for _ in range(options.local_search_iters):
        delta, add_group, drop_group = _best_swap(state, bucket_of, options.swap_candidates)
        # Accept only clear improvements so float noise cannot make the search cycle.
        if add_group < 0 or delta >= -1e-10 * max(current, 1e-30):
            break
        state.add(add_group)
        state.remove([drop_group])
        current += delta
        swaps += 1

    kept = torch.sort(state.groups).values
    cols = group_columns(kept, group_size)
    weight = least_squares_refit(G, Wd, cols)
    return Selection(
        kept=kept.cpu(),
        weight=weight.to(W.dtype),
        objective_greedy=objective_greedy,
        objective_final=objective(G, Wd, cols, weight),
        swaps=swaps,
    )


def _top_per_bucket(scores: Tensor, keep: int, buckets: int) -> Tensor:
    """Indices of the ``keep / buckets`` highest scores inside each bucket, sorted."""
    per_bucket = scores.numel() // buckets
    top = torch.topk(scores.reshape(buckets, per_bucket), keep // buckets, dim=1).indices
    top = top + torch.arange(buckets, device=scores.device)[:, None] * per_bucket
    return torch.sort(top.reshape(-1)).values


def _score_selection(
    scores: Tensor, stats: InputStats, W: Tensor, group_size: int, keep: int, buckets: int,
    options: SolverOptions | None,
) -> Selection:
    """Keep the top-scored groups with their original weights (no refit)."""
    options = options or SolverOptions()
    kept = _top_per_bucket(scores, keep, buckets)
    cols = group_columns(kept, group_size).to(W.device)
    dtype = _solver_dtype(W.shape[0], options)
    G = damped_gram(stats.gram.to(dtype), options.ridge)
    obj = objective(G, W.to(dtype), cols, W[cols].to(dtype))
    return Selection(kept=kept.cpu(), weight=W[cols].clone(), objective_greedy=obj, objective_final=obj)


def magnitude(stats, W, *, group_size, keep, buckets=1, options=None) -> Selection:
    """Keep the groups with the largest weight norm ||W_g||_F (rows of W = d x d_out)."""
    n = _check_problem(W, stats.gram, group_size, keep, buckets)
    scores = W.float().reshape(n, -1).norm(dim=1)
    return _score_selection(scores, stats, W, group_size, keep, buckets, options)


def activation(stats, W, *, group_size, keep, buckets=1, options=None) -> Selection:
    """Keep the groups whose inputs have the largest mean |x| (summed over the group's columns)."""
    n = _check_problem(W, stats.gram, group_size, keep, buckets)
    scores = stats.abs_mean.float().reshape(n, group_size).sum(dim=1)
    return _score_selection(scores, stats, W, group_size, keep, buckets, options)


def wanda_sp(stats, W, *, group_size, keep, buckets=1, options=None) -> Selection:
    """Wanda-sp: score_g = sum over the group's columns c and outputs o of |W_co| * ||X_c||.

    ||X_c|| = sqrt(H_cc), the l2 norm of input column c over calibration tokens.
    """
    n = _check_problem(W, stats.gram, group_size, keep, buckets)
    col_norm = stats.gram.diagonal().float().clamp_min(0).sqrt()
    scores = (W.float().abs() * col_norm[:, None]).reshape(n, -1).sum(dim=1)
    return _score_selection(scores, stats, W, group_size, keep, buckets, options)


Method = Callable[..., Selection]

REFITTING = frozenset({"osscar"})
"""Methods that refit the kept weights (and so use ``InputStats.cross``); the others keep W's rows."""

METHODS: dict[str, Method] = {
    "osscar": osscar,
    "magnitude": magnitude,
    "activation": activation,
    "wanda_sp": wanda_sp,
}
