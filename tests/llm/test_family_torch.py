"""The robust family in torch (drdpo_theory.llm.family) against the exact numpy objectives.

On a log-linear "model" (h_i = beta (theta - theta_ref) . u_i in torch, float64), the torch loss of
every member equals the numpy objective of drdpo_theory.solvers.family at theta, and its autograd
gradient (detached multipliers, Danskin) equals the objective's central finite-difference
gradient. Then each member trains the tiny Llama through `drdpo align`.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from drdpo_theory.data import PreferenceData  # noqa: E402
from drdpo_theory.llm.family import family_multipliers, flip_loss  # noqa: E402
from drdpo_theory.llm.objectives import LossConfig  # noqa: E402
from drdpo_theory.solvers import family as F  # noqa: E402

pytestmark = pytest.mark.llm

VALUE_RTOL, VALUE_ATOL = 1e-12, 1e-12  # same float64 formula
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-8  # central differences, step 1e-6 (kinks of CVaR/group avoided by the seed)

N, D, BETA = 40, 4, 0.7
MEMBERS = {
    "chi2dpo": (dict(rho=0.3), lambda th, data: F.chi2dpo_objective(th, data, BETA, 0.3)),
    "cvardpo": (dict(alpha=0.35), lambda th, data: F.cvardpo_objective(th, data, BETA, 0.35)),
    "groupdpo": (dict(), None),
    "dr_dpo": (dict(beta_prime=0.5), lambda th, data: F.dr_dpo_objective(th, data, BETA, 0.5)),
    "rdpo": (dict(eps=0.2), lambda th, data: F.rdpo_objective(th, data, BETA, 0.2)),
    "cdpo": (dict(eps=0.2), lambda th, data: F.cdpo_objective(th, data, BETA, 0.2)),
}


def _instance(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, 2, size=N)
    w = rng.uniform(0.2, 2.0, size=N)
    groups = rng.integers(0, 3, size=N)
    data = PreferenceData(x=x, y=y, weights=w / w.sum(), theta_ref=rng.normal(size=D) * 0.1)
    theta = rng.normal(size=D)
    return data, theta, groups


def _torch_loss(theta_t, data, method, kw, groups):
    u = torch.as_tensor((2.0 * data.y - 1.0)[:, None] * data.x)
    h = BETA * (u @ (theta_t - torch.as_tensor(data.theta_ref)))  # (N,)
    v = torch.as_tensor(data.weights * N)  # mean-1 nominal weights, as the trainer passes them
    if method in ("rdpo", "cdpo"):
        return (v * flip_loss(h, method, kw["eps"])).mean()
    l = torch.nn.functional.softplus(-h)
    m, value, _ = family_multipliers(l, method, weights=v, gather=False,
                                     groups=torch.as_tensor(groups) if method == "groupdpo" else None, **kw)
    sur = (m * l).mean()
    return sur + (value - sur).detach()


@pytest.mark.parametrize("method", list(MEMBERS))
def test_torch_member_equals_numpy_objective_value_and_gradient(method):
    data, theta, groups = _instance()
    kw, objective = MEMBERS[method]
    if method == "groupdpo":
        def objective(th, d):
            return F.groupdpo_objective(th, d, BETA, groups)
    th = torch.tensor(theta, requires_grad=True)
    loss = _torch_loss(th, data, method, kw, groups)
    loss.backward()
    np.testing.assert_allclose(float(loss.detach()), objective(theta, data), rtol=VALUE_RTOL, atol=VALUE_ATOL)
    step = 1e-6
    fd = np.array([(objective(theta + step * e, data) - objective(theta - step * e, data)) / (2 * step)
                   for e in np.eye(D)])
    np.testing.assert_allclose(th.grad.numpy(), fd, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_member_limits_are_dpo():
    l = torch.tensor([0.3, 1.2, 0.7, 0.1], dtype=torch.float64)
    for method, kw in (("chi2dpo", dict(rho=0.0)), ("cvardpo", dict(alpha=1.0))):
        m, value, _ = family_multipliers(l, method, gather=False, **kw)
        np.testing.assert_allclose(m.numpy(), np.ones(4), rtol=0, atol=1e-12)
        np.testing.assert_allclose(value, float(l.mean()), rtol=1e-12)
    h = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    dpo = torch.nn.functional.softplus(-h)
    for method in ("rdpo", "cdpo"):
        np.testing.assert_allclose(flip_loss(h, method, 0.0).numpy(), dpo.numpy(), rtol=1e-14)
    # rDPO's closed form l(h) - eps h / (1 - 2 eps)
    np.testing.assert_allclose(flip_loss(h, "rdpo", 0.2).numpy(), (dpo - 0.2 * h / 0.6).numpy(), rtol=1e-12)


def test_bad_member_settings_are_refused():
    with pytest.raises(ValueError, match="chi2dpo' needs the chi2 radius"):
        LossConfig(method="chi2dpo")
    with pytest.raises(ValueError, match="alpha in"):
        LossConfig(method="cvardpo", alpha=0.0)
    with pytest.raises(ValueError, match="eps in"):
        LossConfig(method="rdpo", eps=0.5)
    with pytest.raises(ValueError, match="needs integer group labels"):
        family_multipliers(torch.ones(3), "groupdpo", gather=False)


@pytest.mark.parametrize("method, flags", [
    ("chi2dpo", ["--rho", "0.5"]), ("cvardpo", ["--alpha", "0.5"]), ("groupdpo", []),
    ("rdpo", ["--eps", "0.1"]), ("cdpo", ["--eps", "0.1"]), ("dr_dpo", ["--beta-prime", "0.5"]),
])
def test_every_member_trains_the_tiny_model(tmp_path, method, flags):
    from drdpo_theory.llm.cli import register

    parser = argparse.ArgumentParser(prog="drdpo")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "O"
    args = parser.parse_args(["align", "--model", "tiny-random", "--method", method, *flags, "--data", "toy",
                              "--output", str(out), "--max-steps", "3", "--no-progress", "--no-export"])
    assert args.func(args) == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_align_refuses_a_flag_of_another_member(tmp_path, capsys):
    from drdpo_theory.llm.cli import register

    parser = argparse.ArgumentParser(prog="drdpo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["align", "--model", "tiny-random", "--method", "dpo", "--alpha", "0.5", "--data", "toy",
                              "--output", str(tmp_path / "O")])
    assert args.func(args) == 2
    assert "--alpha applies to cvardpo only" in capsys.readouterr().err
