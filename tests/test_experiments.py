"""experiments.py and papers/: the two measures (LoRA's φ, DoRA's ΔM and ΔD) against their
definitions and hand-computed cases, the runner's flags and files, and every experiment run at the
test-only "tiny" size (a few steps of train.py's --quick model) with its JSON checked.

Tolerances: φ, ΔM and ΔD are computed in float64; 1e-12 absolute is a few hundred ulps of values
of order 1 after an SVD or a norm (exact in exact arithmetic).
"""
import json
import math
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import experiments
from papers import dora_experiments, lora_experiments, measures, runner
from papers.measures import fitted_line, phi_grid

TOL = dict(rtol=0, atol=1e-12)


def random_matrix(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def orthogonal(k, seed):
    Q, _ = torch.linalg.qr(random_matrix(k, k, seed))
    return Q  # (k, k)


# ------------------------------------------------------------------------------------------- φ

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(12, 20), st.integers(0, 999))


@given(shapes, st.data())
def test_phi_of_a_subspace_with_itself_is_one(shape, data):
    r1, _, k, seed = shape
    A = random_matrix(r1, k, seed)
    i, j = data.draw(st.integers(1, r1)), data.draw(st.integers(1, r1))
    assert math.isclose(experiments.subspace_similarity(A, A, i, j), 1.0, abs_tol=1e-12)


@given(shapes, st.data())
def test_phi_of_orthogonal_subspaces_is_zero(shape, data):
    r1, r2, k, seed = shape
    Q = orthogonal(k, seed)  # rows 0..r1-1 span A1's rows, the next r2 rows A2's
    A1 = random_matrix(r1, r1, seed + 1) @ Q[:r1]  # (r1, k)
    A2 = random_matrix(r2, r2, seed + 2) @ Q[r1:r1 + r2]  # (r2, k)
    i, j = data.draw(st.integers(1, r1)), data.draw(st.integers(1, r2))
    assert abs(experiments.subspace_similarity(A1, A2, i, j)) <= 1e-12


@given(shapes, st.data())
def test_phi_is_symmetric(shape, data):
    r1, r2, k, seed = shape
    A1, A2 = random_matrix(r1, k, seed), random_matrix(r2, k, seed + 1)
    i, j = data.draw(st.integers(1, r1)), data.draw(st.integers(1, r2))
    phi = experiments.subspace_similarity(A1, A2, i, j)
    assert math.isclose(phi, experiments.subspace_similarity(A2, A1, j, i), abs_tol=1e-12)
    assert -1e-12 <= phi <= 1 + 1e-12


@given(shapes, st.data(), st.floats(1e-3, 1e3), st.booleans())
def test_phi_is_invariant_to_rescaling_A(shape, data, scale, negate):
    r1, r2, k, seed = shape
    A1, A2 = random_matrix(r1, k, seed), random_matrix(r2, k, seed + 1)
    i, j = data.draw(st.integers(1, r1)), data.draw(st.integers(1, r2))
    c = -scale if negate else scale
    assert math.isclose(experiments.subspace_similarity(c * A1, A2, i, j),
                        experiments.subspace_similarity(A1, A2, i, j), abs_tol=1e-12)


def test_phi_of_nested_subspaces():
    # A1 spans e0, e1; A2 spans e0, e2 (singular values 3 > 1 fix the order): U_1 of A1 is e0,
    # so φ(i=1, j=1) = 1; with i = j = 2 the shared direction is one of two: φ = 1/2.
    A1 = torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0]])
    A2 = torch.tensor([[3.0, 0, 0, 0], [0, 0, 1, 0]])
    assert math.isclose(experiments.subspace_similarity(A1, A2, 1, 1), 1.0, abs_tol=1e-12)
    assert math.isclose(experiments.subspace_similarity(A1, A2, 2, 2), 0.5, abs_tol=1e-12)
    assert abs(experiments.subspace_similarity(A1, A2, 2, 1) - 1.0) <= 1e-12  # e0 in both
    assert abs(experiments.subspace_similarity(A1[1:], A2, 1, 2)) <= 1e-12  # e1 in neither


@given(shapes)
def test_phi_grid_equals_subspace_similarity_at_every_cell(shape):
    r1, r2, k, seed = shape
    A1, A2 = random_matrix(r1, k, seed), random_matrix(r2, k, seed + 1)
    grid = torch.tensor(phi_grid(A1, A2), dtype=torch.float64)
    expected = torch.tensor([[experiments.subspace_similarity(A1, A2, i, j)
                              for j in range(1, r2 + 1)] for i in range(1, r1 + 1)],
                            dtype=torch.float64)
    torch.testing.assert_close(grid, expected, **TOL)


# ------------------------------------------------------------------------------------ ΔM and ΔD

weights = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 999))


@given(weights, st.floats(0.1, 10))
def test_a_rescaled_weight_changes_magnitude_only(shape, spread):
    out, k, seed = shape
    W0 = random_matrix(out, k, seed)
    scales = 0.1 + spread * torch.rand(out, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)  # (out,), every row its own factor
    dM, dD = experiments.magnitude_direction_change(W0, scales[:, None] * W0)
    assert abs(dD) <= 1e-12
    expected = ((scales - 1).abs() * torch.linalg.vector_norm(W0, dim=1)).mean().item()
    assert math.isclose(dM, expected, rel_tol=1e-12, abs_tol=1e-12)


@given(weights)
def test_a_row_rotated_weight_with_preserved_norms_changes_direction_only(shape):
    out, k, seed = shape
    W0 = random_matrix(out, k, seed)
    W = W0 @ orthogonal(k, seed + 1)  # every row rotated: its norm is kept
    dM, dD = experiments.magnitude_direction_change(W0, W)
    assert abs(dM) <= 1e-12
    cosine = torch.nn.functional.cosine_similarity(W, W0, dim=1)  # (out,): torch's, independent
    assert math.isclose(dD, (1 - cosine).mean().item(), abs_tol=1e-12)
    assert -1e-12 <= dD <= 2 + 1e-12


def test_delta_m_and_d_by_hand():
    # Rows (3, 4) -> (0, 5): norms 5 and 5, cosine 20/25 = 0.8. Rows (1, 0) -> (0, 2): norms 1
    # and 2, cosine 0. ΔM = (0 + 1)/2 = 0.5; ΔD = ((1 - 0.8) + (1 - 0))/2 = 0.6.
    W0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    W = torch.tensor([[0.0, 5.0], [0.0, 2.0]])
    dM, dD = experiments.magnitude_direction_change(W0, W)
    assert math.isclose(dM, 0.5, abs_tol=1e-12)
    assert math.isclose(dD, 0.6, abs_tol=1e-12)


def test_magnitude_direction_change_of_an_unchanged_weight_is_zero():
    W0 = random_matrix(5, 7, 0)
    assert experiments.magnitude_direction_change(W0, W0.clone()) == (0.0, 0.0)


def test_the_fitted_line_of_exact_lines():
    xs = [0.0, 1.0, 2.0, 5.0]
    up = fitted_line(xs, [2 * x + 1 for x in xs])
    down = fitted_line(xs, [-0.5 * x for x in xs])
    assert math.isclose(up["slope"], 2.0, abs_tol=1e-12)
    assert math.isclose(up["correlation"], 1.0, abs_tol=1e-12)
    assert math.isclose(down["slope"], -0.5, abs_tol=1e-12)
    assert math.isclose(down["correlation"], -1.0, abs_tol=1e-12)
    assert fitted_line([1.0, 1.0], [0.0, 3.0]) == dict(correlation=None, slope=None)


def test_the_within_step_fit_removes_the_growth_shared_by_every_layer():
    # At each step, the layer with the larger ΔM has the smaller ΔD (a negative relation), while
    # both grow with the step: pooled, the growth wins; within a step, the relation shows.
    points = [dict(step=t, dM=t + dm, dD=t + dd) for t in (1, 2, 3, 4)
              for dm, dd in ((0.0, 0.1), (0.1, 0.0))]
    assert measures.fit_points(points, within_step=False)["correlation"] > 0.9
    assert math.isclose(measures.fit_points(points, within_step=True)["correlation"],
                        -1.0, abs_tol=1e-12)


# -------------------------------------------------------------------------------------- runner

@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One folder for the module: the tiny base is pretrained once, then reused from its cache."""
    return str(tmp_path_factory.mktemp("experiments"))


def quiet(line):
    pass


def test_a_seed_reproduces_its_run_and_another_seed_differs(out):
    ctx = runner.Context("test", runner.SIZES["tiny"], (0, 1), out, log=quiet)
    options = dict(rank=2, alpha=16.0, targets=("q_proj", "v_proj"))
    first = ctx.finetune("lora", 5, **options)
    again = ctx.finetune("lora", 5, **options)
    other = ctx.finetune("lora", 6, **options)
    assert first.val_loss == again.val_loss
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert other.val_loss != first.val_loss


def test_mean_std_and_its_text():
    stats = runner.mean_std([1.0, 2.0, 3.0])
    assert stats == dict(mean=2.0, std=1.0, values=[1.0, 2.0, 3.0])
    assert runner.pm(stats, 2) == "2.00 ± 1.00"
    assert runner.pm(runner.mean_std([4.0])) == "4.0000 ± -"
    assert runner.mean_std([None, 1.0])["values"] == [1.0]


def test_collect_refuses_a_name_used_twice():
    experiment = experiments.EXPERIMENTS["lora-rank"]
    with pytest.raises(ValueError, match="lora-rank"):
        runner.collect((experiment,), (experiment,))


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown experiment 'nope'"),
    (["lora-rank", "--seeds", "0"], "argument --seeds: must be an int in [1, 100], got 0"),
    (["lora-rank", "--seeds", "two"], "argument --seeds"),
    (["lora-subspace", "--seeds", "1"], "lora-subspace needs at least 2 seeds, got 1"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("experiments.py: ")


def test_an_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["lora-rank", "--out", str(blocker / "below")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and err.count("\n") == 1


def test_list_names_every_experiment(capsys):
    experiments.main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(experiments.EXPERIMENTS)
    assert {"lora-rank", "lora-subspace", "dora-decomposition", "vera-budget"} <= set(
        experiments.EXPERIMENTS)


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_stats(stats, seeds):
    assert len(stats["values"]) == seeds
    assert all(math.isfinite(v) for v in stats["values"])
    assert math.isclose(stats["mean"], sum(stats["values"]) / seeds, rel_tol=1e-12)


def check_common(payload, name, seeds):
    assert payload["experiment"] == name
    assert payload["seeds"] == list(range(seeds))
    assert payload["size"] == "tiny"
    assert payload["claim"] == experiments.EXPERIMENTS[name].claim
    assert payload["table"] == experiments.EXPERIMENTS[name].table(payload["result"])
    assert payload["wall_seconds"] >= 0 and payload["base"]["parameters"] > 0


def test_lora_rank_at_the_tiny_size(out):
    payload = runner.run_experiment(experiments.EXPERIMENTS["lora-rank"], "tiny", range(2), out,
                                    log=quiet)
    assert payload == read(os.path.join(out, "lora-rank.json"))
    check_common(payload, "lora-rank", 2)
    result = payload["result"]
    assert runner.SIZES["tiny"].base.n_embd == 32  # r = 64 is wider than the model: left out
    assert [row["rank"] for row in result["by_rank"]] == [1, 2, 4, 8, 16, 32]
    for row in result["by_rank"]:
        check_stats(row["val_loss"], 2)
    trainable = [row["trainable"] for row in result["by_rank"]]
    assert trainable == [r * trainable[0] for r in (1, 2, 4, 8, 16, 32)]  # r·Σ(in + out)
    assert [row["targets"] for row in result["by_targets"]] == [
        label for label, _ in lora_experiments.BUDGET_SETS]
    for row in result["by_targets"]:
        check_stats(row["val_loss"], 2)
        assert abs(row["trainable"] - result["budget"]) <= result["budget"] / 2


def test_lora_subspace_at_the_tiny_size(out):
    payload = runner.run_experiment(experiments.EXPERIMENTS["lora-subspace"], "tiny", range(2),
                                    out, log=quiet)
    check_common(payload, "lora-subspace", 2)
    result = payload["result"]
    small, large = result["small_rank"], result["large_rank"]
    assert (small, large) == (8, runner.SIZES["tiny"].base.n_embd)  # 64 capped at the width
    for m in ("q_proj", "v_proj"):
        assert set(result[m]["small_vs_large"]) == {"0", "1"}
        for grid in result[m]["small_vs_large"].values():
            assert len(grid) == small and all(len(row) == large for row in grid)
            assert all(-1e-12 <= v <= 1 + 1e-12 for row in grid for v in row)
            assert math.isclose(grid[small - 1][large - 1], 1.0, abs_tol=1e-9)  # whole spaces
        assert len(result[m]["seed_vs_seed"]) == large
    assert result["random_expectation"][0][0] == 1 / result["width"]


def test_dora_decomposition_at_the_tiny_size(out):
    payload = runner.run_experiment(experiments.EXPERIMENTS["dora-decomposition"], "tiny",
                                    range(2), out, log=quiet)
    check_common(payload, "dora-decomposition", 2)
    result = payload["result"]
    steps = runner.SIZES["tiny"].steps
    layers = runner.SIZES["tiny"].base.n_layer
    for method in ("full", "lora", "dora"):
        for points in result["tracked"][method].values():
            assert len(points) == min(steps, dora_experiments.CHECKPOINTS) * layers * 2
            assert all(p["dM"] >= 0 and p["dD"] >= -1e-12 for p in points)
        for m in ("q_proj", "v_proj"):
            assert set(result["fits"][f"{method} {m}"]) == {
                "correlation", "slope", "within_step_correlation", "within_step_slope"}
    assert [row["rank"] for row in result["by_rank"]] == [1, 2, 4, 8]
    for row in result["by_rank"]:
        check_stats(row["lora"], 2)
        check_stats(row["dora"], 2)
        assert row["dora_trainable"] > row["lora_trainable"]  # DoRA adds the magnitudes


def test_vera_budget_at_the_tiny_size(out):
    payload = runner.run_experiment(experiments.EXPERIMENTS["vera-budget"], "tiny", range(2), out,
                                    log=quiet)
    check_common(payload, "vera-budget", 2)
    result = payload["result"]
    rows = result["rows"]
    vera = [row for row in rows if row["method"] == "vera" and row["d_initial"] == 0.1]
    assert [row["rank"] for row in vera] == [16, 32, 64, 128]  # ≤ the widest linear, 4·32
    base = runner.Context("check", runner.SIZES["tiny"], (0,), out, log=quiet).base()
    d_out = sum(m.out_features for m in base.modules() if isinstance(m, torch.nn.Linear)
                and m is not base.lm_head)
    for row in vera:  # L·r + Σ d_out: one λ_d (r) and one λ_b (d_out) per layer
        assert row["trainable"] == result["layers"] * row["rank"] + d_out
    assert sorted(row["d_initial"] for row in rows if row["method"] == "vera"
                  and row["rank"] == 64) == [1e-3, 0.1, 1.0]
    for row in rows:
        check_stats(row["val_loss"], 2)


def test_the_command_writes_json_and_figure_and_notes_a_missing_matplotlib(out, monkeypatch,
                                                                         capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(runner.SIZES, "quick", runner.SIZES["tiny"])
    figures = os.path.join(out, "figures")
    experiments.main(["lora-subspace", "--quick", "--seeds", "2", "--out", out,
                      "--figures", figures])
    printed = capsys.readouterr().out
    assert read(os.path.join(out, "lora-subspace.json"))["table"] in printed
    assert os.path.getsize(os.path.join(figures, "lora-subspace.png")) > 0
    os.remove(os.path.join(figures, "lora-subspace.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    experiments.main(["lora-subspace", "--quick", "--seeds", "2", "--out", out,
                      "--figures", figures])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(figures, "lora-subspace.png"))
    assert os.path.exists(os.path.join(out, "lora-subspace.json"))
