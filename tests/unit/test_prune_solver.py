"""OSSCAR solver and baselines against brute force and direct formulas on tiny problems."""

import itertools

import pytest
import torch

from slm_cli.prune.solver import (
    METHODS,
    InputStats,
    SolverOptions,
    _ActiveSet,
    damped_gram,
    group_columns,
    least_squares_refit,
    objective,
    osscar,
    relative_error,
    schur_downdate,
)

RIDGE = 1e-2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on a shared CPU
    (measured here: 0.6 s with 1 thread vs 10 s with 2 under load); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_problem(seed: int, d: int, d_out: int = 4, tokens: int = 60):
    """X with strongly correlated columns (mixing matrix), random dense W."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5 + torch.eye(d, dtype=torch.float64)
    X = Z @ A
    W = torch.randn(d, d_out, generator=g, dtype=torch.float64)
    return X, InputStats(gram=X.T @ X, abs_sum=X.abs().sum(0), count=tokens), W


def brute_force(stats, W, group_size, keep, subsets=None):
    """Best objective over every kept subset, each with its least-squares refit."""
    G = damped_gram(stats.gram, RIDGE)
    n = W.shape[0] // group_size
    best = float("inf")
    for S in subsets or itertools.combinations(range(n), keep):
        cols = group_columns(torch.tensor(S), group_size)
        best = min(best, objective(G, W, cols, least_squares_refit(G, W, cols)))
    return best


def test_objective_matches_direct_residual():
    X, stats, W = correlated_problem(0, 8)
    cols = torch.tensor([1, 4, 6])
    W_hat = torch.randn(3, W.shape[1], dtype=torch.float64)
    full = torch.zeros_like(W)
    full[cols] = W_hat
    direct = 0.5 * ((X @ full - X @ W) ** 2).sum()
    assert objective(stats.gram, W, cols, W_hat) == pytest.approx(float(direct), rel=1e-10)
    rel = ((X @ full - X @ W) ** 2).sum() / ((X @ W) ** 2).sum()
    assert relative_error(stats.gram, W, cols, W_hat) == pytest.approx(float(rel), rel=1e-10)


def test_schur_downdate_equals_direct_inverse():
    _, stats, _ = correlated_problem(1, 12)
    G = damped_gram(stats.gram, RIDGE)
    K = torch.linalg.inv(G)
    drop = torch.tensor([2, 3, 7])
    K_new, keep = schur_downdate(K, drop)
    direct = torch.linalg.inv(G[keep][:, keep])
    assert keep.tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    assert torch.allclose(K_new, direct, atol=1e-8, rtol=0)


def test_active_set_updates_stay_least_squares_optimal():
    """After Schur removals and a block-inverse add, W_hat and K equal a fresh solve on the kept
    columns and are exactly zero on the pruned ones."""
    _, stats, W = correlated_problem(2, 12)
    G = damped_gram(stats.gram, RIDGE)
    state = _ActiveSet(G, W, group_size=2)
    state.remove([0, 3])
    state.remove([2])
    state.add(3)
    cols = state.cols()
    assert state.groups.tolist() == [1, 3, 4, 5]
    assert torch.allclose(state.W_hat[cols], least_squares_refit(G, W, cols), atol=1e-8, rtol=0)
    assert torch.allclose(state.K[cols][:, cols], torch.linalg.inv(G[cols][:, cols]), atol=1e-8, rtol=0)
    pruned = torch.tensor([0, 1, 4, 5])
    assert not state.W_hat[pruned].any() and not state.K[pruned].any() and not state.K[:, pruned].any()


@pytest.mark.parametrize("group_size", [1, 2])
def test_osscar_matches_brute_force_and_improves_on_greedy(group_size):
    """30 seeded problems x keep 4..6 of 10 groups: never worse than greedy, mostly optimal."""
    hits = total = 0
    greedy_hits = 0
    for seed in range(30):
        keep = 4 + seed % 3
        _, stats, W = correlated_problem(seed, 10 * group_size)
        sel = osscar(stats, W, group_size=group_size, keep=keep, options=SolverOptions(ridge=RIDGE))
        best = brute_force(stats, W, group_size, keep)
        assert sel.kept.numel() == keep and torch.equal(sel.kept, torch.sort(sel.kept).values)
        assert sel.objective_final <= sel.objective_greedy * (1 + 1e-12)
        assert sel.objective_final >= best * (1 - 1e-9)
        hits += sel.objective_final <= best * (1 + 1e-9)
        greedy_hits += sel.objective_greedy <= best * (1 + 1e-9)
        total += 1
    print(f"group_size={group_size}: optimum found {hits}/{total} (greedy alone {greedy_hits}/{total})")
    # Required: at least 75% optimal (seen: 24/30 and 26/30; greedy alone 18/30 and 16/30).
    assert hits >= 0.75 * total
    assert hits > greedy_hits


def test_buckets_keep_equal_counts_and_match_constrained_brute_force():
    _, stats, W = correlated_problem(3, 12)
    sel = osscar(stats, W, group_size=1, keep=6, buckets=3)
    assert [int((sel.kept // 4 == b).sum()) for b in range(3)] == [2, 2, 2]
    pairs = [list(itertools.combinations(range(4 * b, 4 * b + 4), 2)) for b in range(3)]
    subsets = [a + b + c for a, b, c in itertools.product(*pairs)]
    assert sel.objective_final == pytest.approx(brute_force(stats, W, 1, 6, subsets), rel=1e-9)


def test_refit_lowers_error_vs_keeping_dense_rows():
    _, stats, W = correlated_problem(4, 10)
    sel = osscar(stats, W, group_size=1, keep=5)
    cols = group_columns(sel.kept, 1)
    before = relative_error(stats.gram, W, cols, W[cols])
    after = relative_error(stats.gram, W, cols, sel.weight)
    assert after < before


def test_baselines_pick_by_their_scores_and_do_not_refit():
    _, stats, W = correlated_problem(5, 12)
    W[3] *= 100  # one group with a huge weight norm: magnitude must keep it
    stats.abs_sum[7] *= 100  # one column with huge mean |x|: activation must keep it
    mag = METHODS["magnitude"](stats, W, group_size=1, keep=3)
    act = METHODS["activation"](stats, W, group_size=1, keep=3)
    assert 3 in mag.kept.tolist() and 7 in act.kept.tolist()
    assert torch.equal(mag.weight, W[mag.kept])
    col_norm = stats.gram.diagonal().sqrt()
    expected = torch.topk((W.abs() * col_norm[:, None]).sum(1), 3).indices.sort().values
    assert torch.equal(METHODS["wanda_sp"](stats, W, group_size=1, keep=3).kept, expected)


def test_osscar_beats_baselines_on_objective():
    _, stats, W = correlated_problem(6, 16)
    results = {name: fn(stats, W, group_size=2, keep=4).objective_final for name, fn in METHODS.items()}
    assert all(results["osscar"] <= value for value in results.values())


@pytest.mark.parametrize("keep,buckets", [(0, 1), (11, 1), (3, 2)])
def test_impossible_targets_raise(keep, buckets):
    _, stats, W = correlated_problem(7, 10)
    with pytest.raises(ValueError, match="keep="):
        osscar(stats, W, group_size=1, keep=keep, buckets=buckets)


def test_many_removals_use_few_steps_and_stay_exact_least_squares():
    _, stats, W = correlated_problem(8, 40)
    sel = osscar(stats, W, group_size=1, keep=10, options=SolverOptions(greedy_steps=4))
    G = damped_gram(stats.gram, RIDGE)
    cols = group_columns(sel.kept, 1)
    assert torch.allclose(sel.weight, least_squares_refit(G, W, cols))
    assert sel.objective_final == pytest.approx(objective(G, W, cols, sel.weight))


def test_a_target_output_is_reconstructed_by_direct_ridge_least_squares():
    """With cross = X^T Y the refit solves min ||X_S W_S - Y||^2 + ridge m ||W_S - W_S(dense)||^2
    directly (checked against the normal equations built from X and Y), and reproduces the dense
    weights' problem exactly when Y = X W."""
    X, stats, W = correlated_problem(6, 8, tokens=80)
    g = torch.Generator().manual_seed(9)
    Y = X @ W + 0.5 * torch.randn(X.shape[0], W.shape[1], generator=g, dtype=torch.float64)
    targeted = InputStats(stats.gram, stats.abs_sum, stats.count, cross=X.T @ Y, target_sq=float((Y ** 2).sum()))
    sel = osscar(targeted, W, group_size=2, keep=2, options=SolverOptions(ridge=RIDGE))
    cols = group_columns(sel.kept, 2)
    m = RIDGE * stats.gram.diagonal().mean()
    Xs = X[:, cols]
    direct = torch.linalg.solve(Xs.T @ Xs + m * torch.eye(len(cols), dtype=X.dtype), Xs.T @ Y + m * W[cols])
    torch.testing.assert_close(sel.weight, direct)
    # exhaustive: no other kept pair fits Y better (4 choose 2 subsets)
    best = min(
        float(((X[:, c] @ torch.linalg.solve(X[:, c].T @ X[:, c] + m * torch.eye(4, dtype=X.dtype),
                                            X[:, c].T @ Y + m * W[c]) - Y) ** 2).sum()
              + m * ((torch.linalg.solve(X[:, c].T @ X[:, c] + m * torch.eye(4, dtype=X.dtype),
                                         X[:, c].T @ Y + m * W[c]) - W[c]) ** 2).sum())
        for c in (group_columns(torch.tensor(S), 2) for S in itertools.combinations(range(4), 2))
    )
    fit = float(((Xs @ sel.weight - Y) ** 2).sum() + m * ((sel.weight - W[cols]) ** 2).sum())
    assert fit == pytest.approx(best, rel=1e-9)
    own = InputStats(stats.gram, stats.abs_sum, stats.count, cross=stats.gram @ W, target_sq=0.0)
    plain, same = osscar(stats, W, group_size=1, keep=4), osscar(own, W, group_size=1, keep=4)
    assert torch.equal(plain.kept, same.kept)
    torch.testing.assert_close(plain.weight, same.weight)
