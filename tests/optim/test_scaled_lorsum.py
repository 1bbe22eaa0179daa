"""ScaledLoRSum in float64 against oracles formed in the test: with ``metric_power = 0`` it is
LoRSum; two Jacobi steps (with momentum) match the scaled closed form with the metric recomputed
from the data; the metric averages of a constant batch; Shampoo statistics against a dense ``G``;
independence of the LoRA scale; micro-batch accumulation; descent; state shapes; bitwise
save/load/continue; non-finite steps; and every documented error."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lorsum
from lorsum import GradientCapture, LoRSum, pair_param_groups
from lorsum.optim.scaled_lorsum import ScaledLoRSum
from tests import reference as ref
from tests.utils import generator, regression_batch, tiny_lora_model

N_IN, N_OUT, RANK = 10, 8, 2  # the adapted layer: rows are kept while N (m + n) <= m n, N <= 4
FOLDS = {4: "rows", 16: "dense"}  # window size -> the capture's form


def _model(*, seed: int, alpha: float = float(RANK)) -> nn.Sequential:
    """``Linear(10, 8)`` with a rank-2 adapter (``s = alpha / 2``), tanh, a frozen ``Linear(8, 3)``.

    Every weight comes from a local generator; ``B`` is random so every closed form is exercised.
    """
    model = nn.Sequential(nn.Linear(N_IN, N_OUT), nn.Tanh(), nn.Linear(N_OUT, 3)).double()
    lorsum.add_lora(model, ["0"], rank=RANK, alpha=alpha)
    g = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for p in model[2].parameters():
        p.requires_grad_(False)
    return model


def _batch(rows: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    return (
        torch.randn(rows, N_IN, generator=g, dtype=torch.float64),
        torch.randn(rows, 3, generator=g, dtype=torch.float64),
    )


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def _capture_statistics(kwargs: dict) -> str | None:
    return kwargs.get("metric_form", "diagonal") if kwargs.get("metric", "kfac") == "kfac" else None


def _optimizer(model: nn.Module, **kwargs):
    """The adapter's pairs, its capture (with the statistics the metric needs) and the optimizer."""
    pairs = lorsum.lora_pairs(model)
    capture = GradientCapture(pairs, statistics=_capture_statistics(kwargs))
    return pairs, capture, ScaledLoRSum(pair_param_groups(pairs), capture=capture, **kwargs)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def _rows_in_w_units(model, x, y):
    """``(S = ∂L/∂Y (N, m), X (N, n))`` of layer 0 by autograd, never through the capture."""
    layer = model[0]
    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    Y = (x @ W.T + b + layer.scaling * (x @ A.T) @ B.T).requires_grad_()
    (S,) = torch.autograd.grad((model[2](torch.tanh(Y)) - y).square().mean(), Y)
    return S, x


def _statistics(metric, form, S, X):
    """This batch's ``(c_out, c_in)`` as the docstring defines them (mean loss: ``a = N``)."""
    N = X.shape[0]
    if metric == "kfac":
        out, inn = N * S.T @ S, X.T @ X / N
    else:
        G = S.T @ X
        out, inn = N * G @ G.T, N * G.T @ G
    return (out.diagonal(), inn.diagonal()) if form == "diagonal" else (out, inn)


def _metric(average, beta2, t, delta):
    """``(C_t / (1 − β2^t) + δ)^{1/2}`` as a dense matrix, by the oracle's own square root."""
    C = ref.as_matrix(average / (1 - beta2**t), average.shape[0])
    return ref.sqrtm(C + delta * torch.eye(C.shape[0], dtype=torch.float64))


def _scaled_jacobi(B, A, D, M_out, M_in, lr, s, damping):
    """Spec §3.4 with lorsum's units: step ``η/s`` on ``B A``, ``λ = damping · η / s``."""
    lam, eye = damping * lr / s, torch.eye(A.shape[0], dtype=torch.float64)
    step = lr / s
    A1 = A - step * torch.linalg.solve(
        B.T @ M_out @ B + lam * eye, B.T @ D @ torch.linalg.inv(M_in)
    )
    B1 = (
        B
        - step
        * torch.linalg.solve(A @ M_in @ A.T + lam * eye, (torch.linalg.solve(M_out, D) @ A.T).T).T
    )
    return B1, A1


@pytest.mark.parametrize("rows", sorted(FOLDS), ids=FOLDS.values())
@pytest.mark.parametrize(("metric", "form"), [
    ("kfac", "diagonal"), ("kfac", "dense"), ("shampoo", "diagonal"), ("shampoo", "dense"),
])  # fmt: skip
def test_two_jacobi_steps_match_the_scaled_closed_form_with_momentum(metric, form, rows):
    lr, damping, delta, (beta1, beta2) = 0.1, 0.05, 1e-3, (0.9, 0.8)
    model = _model(seed=1, alpha=4.0)  # s = 2: the capture's rows carry it, the oracle does not
    s = model[0].scaling
    (pair,), capture, opt = _optimizer(
        model, lr=lr, num_iters=0, damping=damping, metric=metric, metric_form=form,
        metric_damping=delta, metric_power=0.5, betas=(beta1, beta2),
    )  # fmt: skip
    averages = [torch.zeros(N_OUT, N_OUT).double(), torch.zeros(N_IN, N_IN).double()]
    V = torch.zeros(N_OUT, N_IN, dtype=torch.float64)  # the momentum, V_0 = 0
    for t, seed in ((1, 2), (2, 3)):
        x, y = _batch(rows, seed=seed)
        S, X = _rows_in_w_units(model, x, y)
        G = S.T @ X
        stats = [ref.as_matrix(c, c.shape[0]) for c in _statistics(metric, form, S, X)]
        averages = [beta2 * avg + (1 - beta2) * c for avg, c in zip(averages, stats, strict=True)]
        if form == "diagonal":  # the diagonal metric is the power of the diagonal average
            averages = [torch.diag(avg.diagonal()) for avg in averages]
        M_out, M_in = (_metric(avg, beta2, t, delta) for avg in averages)
        D = ((1 - beta1) * G + beta1 * V) / (1 - beta1**t)
        B1, A1 = _scaled_jacobi(pair.B.detach(), pair.A.detach(), D, M_out, M_in, lr, s, damping)

        opt.zero_grad()
        _loss(model, x, y).backward()
        assert (capture.peek(pair.B).dense is None) == (FOLDS[rows] == "rows")
        opt.step()
        assert ref.rel_err(pair.A, A1) <= 1e-10, (t, ref.rel_err(pair.A, A1))
        assert ref.rel_err(pair.B, B1) <= 1e-10, (t, ref.rel_err(pair.B, B1))
        # The momentum is the Jacobi fit of V_t = β1 V_{t-1} + (1 − β1) G_t at rank r', raw.
        V_B, V_A = opt.state[pair.B]["momentum_buffer"], opt.state[pair.A]["momentum_buffer"]
        if t == 1:  # from V_B = 0 the A-solve keeps the starting subspace, the B-solve projects
            lam_V, eye = damping * lr, torch.eye(RANK, dtype=torch.float64)
            expected = (1 - beta1) * G @ V_A.T @ torch.linalg.inv(V_A @ V_A.T + lam_V * eye)
            assert ref.rel_err(V_B, expected) <= 1e-10
        V = V_B @ V_A
    capture.remove()


def test_the_first_step_from_b_zero_moves_b_only():
    # Spec D.26 with bias correction: A stays, B⁺ = −(η/s) M_out⁻¹ G Aᵀ (A M_in Aᵀ + λI)⁻¹.
    lr, damping, delta = 0.1, 0.05, 1e-3
    model = _model(seed=4, alpha=4.0)
    with torch.no_grad():
        model[0].lora_B.weight.zero_()
    (pair,), capture, opt = _optimizer(
        model, lr=lr, num_iters=0, damping=damping, metric_damping=delta, metric_power=0.5
    )
    x, y = _batch(16, seed=5)
    S, X = _rows_in_w_units(model, x, y)
    c_out, c_in = _statistics("kfac", "diagonal", S, X)
    M_out, M_in = torch.diag((c_out + delta).sqrt()), torch.diag((c_in + delta).sqrt())
    A = pair.A.detach().clone()
    lam, eye = damping * lr / model[0].scaling, torch.eye(RANK, dtype=torch.float64)
    gram = A @ M_in @ A.T + lam * eye
    B1 = (
        -(lr / model[0].scaling)
        * torch.linalg.solve(gram, (torch.linalg.solve(M_out, S.T @ X) @ A.T).T).T
    )
    _train(model, opt, [(x, y)])
    assert ref.rel_err(pair.A, A) <= 1e-12
    assert ref.rel_err(pair.B, B1) <= 1e-10
    capture.remove()


@pytest.mark.parametrize("num_iters", [0, 2])
@pytest.mark.parametrize(("metric", "form"), [("kfac", "diagonal"), ("shampoo", "dense")])
def test_metric_power_zero_without_momentum_is_lorsum(metric, form, num_iters):
    hparams = {"lr": 0.2, "num_iters": num_iters, "damping": 0.03, "weight_decay": 0.1}
    scaled_model, plain_model = _model(seed=6), _model(seed=6)
    (scaled_pair,), scaled_capture, scaled = _optimizer(
        scaled_model, metric=metric, metric_form=form, metric_power=0.0, betas=(0.0, 0.9),
        **hparams,
    )  # fmt: skip
    (plain_pair,) = lorsum.lora_pairs(plain_model)
    plain_capture = GradientCapture([plain_pair])
    plain = LoRSum(pair_param_groups([plain_pair]), capture=plain_capture, **hparams)
    for seed in (7, 8, 9):
        batch = [_batch(16, seed=seed)]
        _train(scaled_model, scaled, batch)
        _train(plain_model, plain, batch)
        for mine, theirs in ((scaled_pair.A, plain_pair.A), (scaled_pair.B, plain_pair.B)):
            assert ref.rel_err(mine, theirs) <= 1e-12, ref.rel_err(mine, theirs)
    assert "momentum_buffer" not in scaled.state[scaled_pair.B]  # β1 = 0: no buffer at all
    scaled_capture.remove()
    plain_capture.remove()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("form", ["diagonal", "dense"])
def test_constant_batch_averages_are_the_batch_statistic_once_bias_corrected(form, reduction):
    # Spec D.25 for a zero-started average: lr = 0 keeps the model, hence the batch, constant.
    beta2, steps, rows = 0.7, 5, 16
    model = _model(seed=10)
    (pair,), capture, opt = _optimizer(
        model, lr=0.0, metric_form=form, betas=(0.9, beta2), loss_reduction=reduction
    )
    x, y = _batch(rows, seed=11)
    c_out, c_in = _statistics("kfac", form, *_rows_in_w_units(model, x, y))
    if reduction == "sum":  # the output side's row scale a is 1/N instead of N
        c_out = c_out / rows**2
    _train(model, opt, [(x, y)] * steps)
    weight = 1 - beta2**steps  # Σ_k (1 − β2) β2^(t−k): what bias correction divides out
    assert ref.rel_err(opt.state[pair.B]["metric_out_avg"], weight * c_out) <= 1e-12
    assert ref.rel_err(opt.state[pair.A]["metric_in_avg"], weight * c_in) <= 1e-12
    assert int(opt.state[pair.B]["step"]) == steps
    capture.remove()


@pytest.mark.parametrize("rows", sorted(FOLDS), ids=FOLDS.values())
@pytest.mark.parametrize("form", ["diagonal", "dense"])
def test_shampoo_statistics_are_those_of_the_dense_gradient(form, rows):
    beta2 = 0.9
    model = _model(seed=12, alpha=6.0)  # s = 3
    (pair,), capture, opt = _optimizer(
        model, lr=0.0, metric="shampoo", metric_form=form, betas=(0.9, beta2)
    )
    x, y = _batch(rows, seed=13)
    S, X = _rows_in_w_units(model, x, y)
    G = S.T @ X  # ∂L/∂W, formed here and only here
    out, inn = rows * G @ G.T, rows * G.T @ G
    if form == "diagonal":
        out, inn = out.diagonal(), inn.diagonal()
    _train(model, opt, [(x, y)])
    assert ref.rel_err(opt.state[pair.B]["metric_out_avg"], (1 - beta2) * out) <= 1e-12
    assert ref.rel_err(opt.state[pair.A]["metric_in_avg"], (1 - beta2) * inn) <= 1e-12
    capture.remove()


@pytest.mark.parametrize("hparams", [
    {"num_iters": 1, "betas": (0.9, 0.9)},
    {"num_iters": 0, "metric": "shampoo", "metric_form": "dense", "weight_decay": 0.1},
    {"num_iters": 2, "metric_form": "dense", "metric_power": 1.0, "loss_reduction": "sum"},
])  # fmt: skip
def test_the_step_does_not_depend_on_the_lora_scale(hparams):
    products = []
    for alpha in (2.0, 8.0):  # s = 1 and s = 4, factors divided by √s: the same W
        model = _model(seed=14, alpha=alpha)
        with torch.no_grad():
            for p in (model[0].lora_A.weight, model[0].lora_B.weight):
                p.div_(model[0].scaling ** 0.5)
        _, capture, opt = _optimizer(model, lr=0.1, damping=0.02, **hparams)
        _train(model, opt, [_batch(16, seed=seed) for seed in (15, 16, 17)])
        layer = model[0]
        products.append(layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)
        capture.remove()
    assert ref.rel_err(products[1], products[0]) <= 1e-10


@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
def test_four_accumulated_micro_batches_equal_one_batch(metric):
    x, y = _batch(16, seed=18)
    results = []
    for micro_batches in (1, 4):
        model = _model(seed=19)
        (pair,), capture, opt = _optimizer(model, lr=0.1, metric=metric)
        for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
            (_loss(model, xb, yb) / micro_batches).backward()
        opt.step()
        results.append([pair.A.detach().clone(), pair.B.detach().clone()])
        results[-1] += [opt.state[pair.B]["metric_out_avg"], opt.state[pair.A]["metric_in_avg"]]
        capture.remove()
    for one, four in zip(*results, strict=True):
        assert ref.rel_err(four, one) <= 1e-12


@pytest.mark.parametrize("hparams", [
    {}, {"metric_form": "dense"}, {"metric": "shampoo"}, {"metric": "shampoo", "num_iters": 0},
])  # fmt: skip
def test_training_goes_downhill(hparams):
    model, pairs = tiny_lora_model(seed=20)
    x, y = regression_batch(seed=21)
    with GradientCapture(pairs, statistics=_capture_statistics(hparams)) as capture:
        opt = ScaledLoRSum(pair_param_groups(pairs), lr=0.3, capture=capture, **hparams)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(("form", "out_shape", "in_shape"), [
    ("diagonal", (N_OUT,), (N_IN,)), ("dense", (N_OUT, N_OUT), (N_IN, N_IN)),
])  # fmt: skip
def test_state_has_the_documented_shapes(form, out_shape, in_shape):
    model = _model(seed=22)
    (pair,), capture, opt = _optimizer(model, lr=0.1, metric_form=form, momentum_rank=1)
    _train(model, opt, [_batch(8, seed=23)])
    state_A, state_B = opt.state[pair.A], opt.state[pair.B]
    assert state_B["metric_out_avg"].shape == out_shape
    assert state_A["metric_in_avg"].shape == in_shape
    assert state_B["momentum_buffer"].shape == (N_OUT, 1)
    assert state_A["momentum_buffer"].shape == (1, N_IN)
    assert state_B["metric_out_avg"].dtype == state_A["metric_in_avg"].dtype == torch.float64
    step = state_B["step"]
    assert step.shape == ()
    assert step.dtype == torch.float32
    assert step.device.type == "cpu"
    assert int(state_B["skipped_steps"]) == 0
    assert set(state_A) == {"metric_in_avg", "momentum_buffer"}
    capture.remove()


@pytest.mark.parametrize("hparams", [{}, {"metric": "shampoo", "metric_form": "dense"}])
def test_save_load_continue_is_bitwise_equal_to_an_uninterrupted_run(hparams):
    batches = [_batch(8, seed=seed) for seed in range(24, 29)]
    model = _model(seed=29)
    _, capture, opt = _optimizer(model, lr=0.1, **hparams)
    _train(model, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    capture.remove()

    model = _model(seed=29)
    _, capture, opt = _optimizer(model, lr=0.1, **hparams)
    _train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    capture.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=30)  # another init: everything must come from the checkpoint
    _, capture, resumed_opt = _optimizer(resumed, lr=0.1, **hparams)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_opt, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted, strict=True))
    capture.remove()


def test_a_non_finite_step_leaves_factors_metric_and_momentum_untouched():
    model = _model(seed=31)
    (pair,), capture, opt = _optimizer(model, lr=0.1)
    _train(model, opt, [_batch(8, seed=32)])
    state = [pair.A, pair.B, *opt.state[pair.A].values(), *opt.state[pair.B].values()]
    before = [t.detach().clone() for t in state]
    x, y = _batch(8, seed=33)
    x[0, 0] = float("nan")
    _train(model, opt, [(x, y)])
    after = [pair.A, pair.B, *opt.state[pair.A].values(), *opt.state[pair.B].values()]
    names = ["A", "B", *opt.state[pair.A], *opt.state[pair.B]]
    for name, old, new in zip(names, before, after, strict=True):
        if name not in ("step", "skipped_steps"):
            assert torch.equal(old, new), name
    assert int(opt.state[pair.B]["skipped_steps"]) == 1
    capture.remove()


@pytest.mark.parametrize(("hparams", "match"), [
    ({"lr": -0.1}, r"Invalid lr: -0.1"),
    ({"num_iters": -1}, r"Invalid num_iters: -1"),
    ({"damping": -1.0}, r"Invalid damping: -1.0"),
    ({"metric": "fisher"}, r"Invalid metric: 'fisher'"),
    ({"metric_form": "lowrank"}, r"Invalid metric_form: 'lowrank'"),
    ({"loss_reduction": "batchmean"}, r"Invalid loss_reduction: 'batchmean'"),
    ({"metric_power": 1.5}, r"Invalid metric_power: 1.5"),
    ({"metric_damping": -1e-3}, r"Invalid metric_damping: -0.001"),
    ({"metric_damping": 0.0}, r"Invalid metric_damping: 0.0 \(must be > 0 when metric_power"),
    ({"betas": (1.0, 0.99)}, r"Invalid betas: \(1.0, 0.99\)"),
    ({"betas": (0.9,)}, r"Invalid betas: \(0.9,\)"),
    ({"bias_correction": "yes"}, r"Invalid bias_correction: 'yes'"),
    ({"momentum_rank": 0}, r"Invalid momentum_rank: 0"),
    ({"compute_dtype": "float16"}, r"invalid compute_dtype 'float16'"),
])  # fmt: skip
def test_invalid_hyperparameters_raise_with_the_offending_value(hparams, match):
    pairs = lorsum.lora_pairs(_model(seed=34))
    with (
        GradientCapture(pairs, statistics="diagonal") as capture,
        pytest.raises(ValueError, match=match),
    ):
        ScaledLoRSum(pair_param_groups(pairs), capture=capture, **hparams)


def test_metric_power_zero_needs_no_metric_damping():
    pairs = lorsum.lora_pairs(_model(seed=35))
    with GradientCapture(pairs, statistics="diagonal") as capture:
        ScaledLoRSum(pair_param_groups(pairs), capture=capture, metric_power=0.0, metric_damping=0)


@pytest.mark.parametrize(("statistics", "hparams", "match"), [
    (None, {}, r"metric 'kfac' with metric_form 'diagonal' needs GradientCapture\(pairs, "
               r"statistics='diagonal'\), but the capture records statistics=None"),
    ("dense", {}, r"needs .*statistics='diagonal'.*records statistics='dense'"),
    ("diagonal", {"metric_form": "dense"}, r"needs .*statistics='dense'.*records "
                                           r"statistics='diagonal'"),
])  # fmt: skip
def test_a_capture_without_the_kfac_statistics_is_refused(statistics, hparams, match):
    pairs = lorsum.lora_pairs(_model(seed=36))
    with (
        GradientCapture(pairs, statistics=statistics) as capture,
        pytest.raises(ValueError, match=match),
    ):
        ScaledLoRSum(pair_param_groups(pairs), capture=capture, **hparams)


def test_shampoo_needs_no_capture_statistics():
    model = _model(seed=37)
    pairs = lorsum.lora_pairs(model)
    with GradientCapture(pairs) as capture:
        opt = ScaledLoRSum(pair_param_groups(pairs), capture=capture, metric="shampoo")
        _train(model, opt, [_batch(8, seed=38)])
    assert int(opt.state[pairs[0].B]["step"]) == 1


def test_a_metric_form_changed_after_construction_is_refused_at_the_step():
    model = _model(seed=39)
    _, capture, opt = _optimizer(model, lr=0.1)
    opt.param_groups[0]["metric_form"] = "dense"  # the capture still records diagonals
    with pytest.raises(ValueError, match=r"needs the capture's 'output_grad_gram'"):
        _train(model, opt, [_batch(8, seed=40)])
    capture.remove()


def test_no_capture_is_refused():
    pairs = lorsum.lora_pairs(_model(seed=41))
    with pytest.raises(ValueError, match=r"ScaledLoRSum steps with the full gradient"):
        ScaledLoRSum(pair_param_groups(pairs))
