"""The robust family in torch (drdpo_theory.llm.family) against the exact numpy objectives; groupdpo EG weights.

On a log-linear "model" (h_i = beta (theta - theta_ref) . u_i in torch, float64), the torch loss of
every member equals the numpy objective of drdpo_theory.solvers.family at theta, and its autograd
gradient (detached multipliers, Danskin) equals the objective's central finite-difference
gradient. Then each member trains the tiny Llama through `drdpo align`.

groupdpo's online exponentiated-gradient group weights (GroupEGState) follow a direct numpy
rewrite of the update over several batches; `drdpo align` checkpoints them and a resumed run
equals the uninterrupted one bit for bit; two gloo ranks, each with part of every batch, hold the
single-process q; `--group-weights worst` is the batch's exact worst group.
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


# --------------------------------------------------------------------------- groupdpo: online EG group weights


def _eg_reference(q, l, v, g, labels, step):
    """Ramesh et al.'s exponentiated-gradient step, written out directly (numpy, no log domain).

    Returns the new q (over ``labels``) and the batch loss sum_{g present} q_g L_g / sum_{g present} q_g.
    """
    p = v / v.sum()
    new = q.copy()
    losses, present = {}, []
    for k, lab in enumerate(labels):
        mask = (g == lab) & (p > 0)
        if mask.any():
            losses[k] = float(np.sum(p[mask] * l[mask]) / np.sum(p[mask]))
            present.append(k)
            new[k] = q[k] * np.exp(step * losses[k])
    new = new / new.sum()
    value = sum(new[k] * losses[k] for k in present) / sum(new[k] for k in present)
    return new, value


def test_group_eg_update_equals_a_numpy_reimplementation_over_several_steps():
    from drdpo_theory.llm.family import GroupEGState

    rng = np.random.default_rng(3)
    labels = np.array([-1, 2, 5, 7])
    data_groups = rng.choice(labels, size=50)
    data_w = rng.uniform(0.5, 2.0, size=50)
    for init in ("uniform", "proportional"):
        state = GroupEGState.from_data(data_groups, data_w, step=0.7, init=init)
        if init == "uniform":
            q = np.full(4, 0.25)
        else:
            q = np.array([data_w[data_groups == lab].sum() for lab in labels]) / data_w.sum()
        np.testing.assert_allclose(state.q, q, rtol=1e-15)
        for step in range(8):
            b = 10
            l = rng.exponential(1.0, size=b)
            v = rng.uniform(0.0, 2.0, size=b)
            v[0] = 0.0  # a pair of weight 0 counts for nothing
            g = rng.choice(labels[:3] if step % 3 == 0 else labels, size=b)  # some batches miss group 7
            q, value = _eg_reference(q, l, v, g, labels, 0.7)
            lt = torch.tensor(l, requires_grad=True)
            m, got, info = family_multipliers(lt, "groupdpo", groups=torch.as_tensor(g), weights=torch.as_tensor(v),
                                              gather=False, group_weights="eg", group_state=state)
            np.testing.assert_allclose(state.q, q, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(got, value, rtol=1e-12)
            np.testing.assert_allclose(float((m * lt.detach()).mean()), value, rtol=1e-12)  # the surrogate's value
            assert float(m[0]) == 0.0
            assert info["q_max"] == state.q.max() and info["q_7"] == state.q[3]
            (m * lt).mean().backward()  # gradient: q_g p_i / P_g per pair (q detached)
            p = v / v.sum()
            pres = [k for k, lab in enumerate(labels) if np.any((g == lab) & (p > 0))]
            qsum = sum(q[k] for k in pres)
            want = np.array([q[np.searchsorted(labels, gi)] / qsum * pi / p[g == gi].sum() for gi, pi in zip(g, p)])
            np.testing.assert_allclose(lt.grad.numpy(), want, rtol=1e-12, atol=1e-15)
        assert state.updates == 8
    # a frozen copy computes with q and leaves it alone
    frozen = state.frozen()
    before = state.q.copy()
    family_multipliers(torch.ones(3, dtype=torch.float64), "groupdpo", groups=torch.tensor([2, 2, 5]), gather=False,
                       group_weights="eg", group_state=frozen)
    np.testing.assert_array_equal(frozen.q, before)
    np.testing.assert_array_equal(state.q, before)
    # state round trip through JSON is exact
    import json

    other = GroupEGState.from_data(data_groups, data_w, step=0.7)
    other.load_state_dict(json.loads(json.dumps(state.state_dict())))
    np.testing.assert_array_equal(other.q, state.q)


def test_group_eg_errors_are_clear():
    from drdpo_theory.llm.family import GroupEGState

    state = GroupEGState.from_data([0, 1, 1])
    with pytest.raises(ValueError, match=r"group label 4 is not among the groups of the training data \[0, 1\]"):
        family_multipliers(torch.ones(2), "groupdpo", groups=torch.tensor([0, 4]), gather=False,
                           group_weights="eg", group_state=state)
    with pytest.raises(ValueError, match="needs the group-weight state"):
        family_multipliers(torch.ones(2), "groupdpo", groups=torch.tensor([0, 1]), gather=False, group_weights="eg")
    with pytest.raises(ValueError, match="step must be a finite number > 0"):
        GroupEGState([0, 1], step=0.0)
    with pytest.raises(ValueError, match="group-weight state is for groups"):
        GroupEGState([0, 2]).load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="group_weights must be one of"):
        LossConfig(method="groupdpo", group_weights="max")


def _grouped_toy(n_groups=3):
    from drdpo_theory.llm.data import load_preferences

    return [{**r, "group": i % n_groups} for i, r in enumerate(load_preferences("toy"))]


def _align_setup(tmp_path, records, **kw):
    from drdpo_theory.llm.data import tokenize_preferences
    from drdpo_theory.llm.models import load_model
    from drdpo_theory.llm.trainer import TrainConfig

    model, tok = load_model("tiny-random")
    pairs = tokenize_preferences(tok, records, max_length=128, max_prompt_length=64)
    base = dict(output_dir=str(tmp_path), method="groupdpo", lr=1e-2, batch_size=4, max_steps=6, progress=False,
                beta=0.5, model_spec="tiny-random", export=False)
    base.update(kw)
    return TrainConfig(**base), model, tok, pairs


def test_align_groupdpo_eg_resume_equals_the_uninterrupted_run(tmp_path):
    """q is in the checkpoint; resuming from step 3 gives the uninterrupted run's losses, q and weights exactly."""
    import json

    from drdpo_theory.llm.trainer import train

    records = _grouped_toy()
    kw = dict(group_step=1.0, group_init="proportional", checkpoint_every=3, grad_accum=2)
    full = train(*_align_setup(tmp_path / "full", records, **kw))
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000003"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["group_weights"]
    assert saved["updates"] == 6 and saved["num_groups"] == 3  # one update per micro-batch: 3 steps x 2
    # the logged q of step 3 is the mean over its two micro-batches; the saved one is the last
    resumed = train(*_align_setup(tmp_path / "resumed", records, **kw), resume_from=ckpt)
    assert resumed.start_step == 3 and resumed.final_step == 6
    assert resumed.losses == full.losses[3:]  # bit-identical
    for a, b in zip(resumed.rows, full.rows[3:]):
        assert [a[f"groupdpo/q_{g}"] for g in range(3)] == [b[f"groupdpo/q_{g}"] for g in range(3)]
    end_full = json.loads((full.checkpoint / "trainer_state.json").read_text())["group_weights"]
    end_res = json.loads((resumed.checkpoint / "trainer_state.json").read_text())["group_weights"]
    assert end_full == end_res and end_full["updates"] == 12
    assert max(end_full["q"]) - min(end_full["q"]) > 1e-4  # q moved
    from safetensors.torch import load_file

    a = load_file(str(full.checkpoint / "trainable.safetensors"))
    b = load_file(str(resumed.checkpoint / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_align_groupdpo_resume_refuses_another_group_step(tmp_path):
    from drdpo_theory.llm.trainer import train

    records = _grouped_toy()
    train(*_align_setup(tmp_path, records, max_steps=2, group_step=1.0))
    with pytest.raises(ValueError, match=r"changed: group_step \(1.0 -> 0.5\)"):
        train(*_align_setup(tmp_path, records, max_steps=3, group_step=0.5), resume_from="auto")


def test_groupdpo_worst_mode_is_the_exact_worst_group_of_the_batch():
    """--group-weights worst: the loss is max_g of the p-weighted group means (numpy), its gradient that group's."""
    from drdpo_theory.llm.data import PreferenceCollator, tokenize_preferences
    from drdpo_theory.llm.losses import dpo_loss
    from drdpo_theory.llm.models import load_model
    from drdpo_theory.llm.logprobs import concatenated_logps
    from drdpo_theory.llm.objectives import preference_loss

    model, tok = load_model("tiny-random")
    pairs = tokenize_preferences(tok, _grouped_toy()[:9], max_length=128, max_prompt_length=64)
    batch = PreferenceCollator(tok.pad_token_id)(pairs)
    v = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 1.5, 0.0, 1.0, 2.0])
    inputs = {**{k: x for k, x in batch.items() if k not in ("index", "weight")}, "weight": v}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rc, rr = concatenated_logps(model, inputs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = LossConfig(method="groupdpo", beta=0.5, group_weights="worst")
    loss, metrics = preference_loss(model, inputs, rc, rr, cfg)
    loss.backward()
    g_worst = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    pc, pr = concatenated_logps(model, inputs)
    l = dpo_loss(pc, pr, rc, rr, 0.5)
    ln, vn, gn = l.detach().double().numpy(), v.double().numpy(), batch["group"].numpy()
    means = {g: float(np.sum(vn[gn == g] * ln[gn == g]) / np.sum(vn[gn == g])) for g in range(3)}
    worst = max(means, key=means.get)
    assert sorted(means.values())[-1] - sorted(means.values())[-2] > 1e-4  # a unique worst group
    np.testing.assert_allclose(float(loss), means[worst], rtol=1e-6)
    assert metrics["groupdpo/worst_group"] == worst
    mask = torch.as_tensor(gn == worst)
    ((v * l)[mask].sum() / v[mask].sum()).backward()
    g_ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((g_worst - g_ref).norm() / g_ref.norm()) < 1e-5
    # without a state, the default 'eg' mode refuses (the state lives in the trainer)
    with pytest.raises(ValueError, match="needs the group-weight state"):
        preference_loss(model, inputs, rc, rr, LossConfig(method="groupdpo", beta=0.5))


@pytest.mark.parametrize("flags, message", [
    (["--method", "dpo", "--group-step", "0.1"], "--group-step applies to groupdpo only"),
    (["--method", "groupdpo", "--group-weights", "worst", "--group-init", "proportional"],
     "--group-init applies to --group-weights eg only"),
    (["--method", "groupdpo", "--group-step", "-1"], "--group-step must be a finite number > 0"),
])
def test_align_group_flags_are_checked(tmp_path, capsys, flags, message):
    from drdpo_theory.llm.cli import register

    parser = argparse.ArgumentParser(prog="drdpo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["align", "--model", "tiny-random", *flags, "--data", "toy", "--output", str(tmp_path / "O")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_align_groupdpo_worst_and_eg_train_from_the_command_line(tmp_path):
    import json

    from drdpo_theory.llm.cli import register

    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _grouped_toy()))
    parser = argparse.ArgumentParser(prog="drdpo")
    register(parser.add_subparsers(dest="command", required=True))
    for mode, key in (("worst", "groupdpo/worst_group"), ("eg", "groupdpo/q_2")):
        out = tmp_path / mode
        args = parser.parse_args(["align", "--model", "tiny-random", "--method", "groupdpo", "--group-weights", mode,
                                  "--data", str(data), "--output", str(out), "--max-steps", "2", "--no-progress",
                                  "--no-export"])
        assert args.func(args) == 0
        with open(out / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and all(r[key] != "" for r in rows)


def _eg_batches():
    rng = np.random.default_rng(11)
    return [(rng.exponential(1.0, size=5), rng.uniform(0.5, 2.0, size=5), rng.integers(0, 3, size=5))
            for _ in range(4)]


def _eg_run(split=None):
    """q after each of four EG steps and the per-pair multipliers; ``split`` = this rank's pair slice."""
    from drdpo_theory.llm.family import GroupEGState

    state = GroupEGState([0, 1, 2], step=0.8)
    out = []
    for l, v, g in _eg_batches():
        sl = slice(None) if split is None else split
        m, value, _ = family_multipliers(torch.as_tensor(l[sl]), "groupdpo", groups=torch.as_tensor(g[sl]),
                                         weights=torch.as_tensor(v[sl]), group_weights="eg", group_state=state)
        out.append((state.q.copy(), m.numpy().copy(), value))
    return out


def _eg_worker(rank, world, init_file, out_dir):
    import datetime
    import pickle

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = _eg_run(slice(0, 3) if rank == 0 else slice(3, 5))  # unequal halves: 3 and 2 pairs
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(res, fh)
    finally:
        dist.destroy_process_group()


def test_group_eg_weights_are_the_same_on_every_rank_and_equal_one_process(tmp_path):
    """2 gloo processes, each with part of every batch: both hold the single-process q after every step."""
    import pickle

    import torch.multiprocessing as mp

    mp.spawn(_eg_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    two = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    one = _eg_run()
    for (q0, m0, v0), (q1, m1, v1), (q, m, v) in zip(*two, one):
        np.testing.assert_array_equal(q0, q1)  # every rank holds the same q
        np.testing.assert_array_equal(q0, q)  # computed from the same gathered batch as one process
        np.testing.assert_array_equal(np.concatenate([m0, m1]), m)
        assert v0 == v1 == v
    assert np.ptp(one[-1][0]) > 1e-3
