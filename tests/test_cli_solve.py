"""The `drdpo solve` CLI contract, including every bad-input case."""

import json
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

from drdpo_theory.cli import main
from drdpo_theory.data import load_npz
from drdpo_theory.solvers import solve
from tests.helpers import random_data

RTOL = 1e-9


@pytest.fixture
def data_file(tmp_path):
    d = random_data(3, n=50, d=3, theta_ref_norm=0.3)
    f = tmp_path / "data.npz"
    np.savez(f, x=d.x, y=d.y, theta_ref=d.theta_ref)
    return f


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_dpo_json_contract(data_file, capsys):
    code, out, err = run_cli(["solve", "--method", "dpo", "--data", str(data_file), "--beta", "1.5",
                              "--radius", "2", "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out.strip().splitlines()[-1])
    for key in ("theta", "objective", "duality_gap", "status", "solver", "seconds"):
        assert key in obj
    ref = solve("dpo", load_npz(data_file), 1.5, 2.0)
    assert_allclose(obj["theta"], ref.theta, rtol=RTOL, atol=1e-12)
    assert_allclose(obj["objective"], ref.objective, rtol=RTOL)
    assert obj["status"] == "optimal" and obj["duality_gap"] <= 1e-7


def test_console_script_runs(data_file):
    exe = [sys.executable, "-m", "drdpo_theory.cli"]
    res = subprocess.run(exe + ["solve", "--method", "dpo", "--data", str(data_file), "--beta", "1",
                                "--radius", "1", "--solver", "cvxpy", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert obj["solver"].startswith("cvxpy-")


def _bad(tmp_path, name, **arrays):
    f = tmp_path / f"{name}.npz"
    np.savez(f, **arrays)
    return str(f)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_key", "missing key"),
        ("nan", "NaN or inf"),
        ("labels", "must be 0 or 1"),
        ("shape", "shape mismatch"),
        ("empty", "empty"),
        ("neg_radius", "radius"),
        ("beta0", "beta"),
        ("neg_rho", "rho must be >= 0"),
        ("no_rho", "needs --rho"),
        ("no_file", "no such file"),
        ("bad_p", "invalid choice"),
        ("complex", "'x' is complex"),
        ("huge_entries", "where float64 overflows; rescale it"),
        ("huge_margin", "cannot certify a gap of 1e-07; rescale x"),
        ("huge_beta", "lower beta or B"),
        ("kappa_for_dpo", "--kappa applies to wdpo only (method is dpo); drop it or use --method wdpo"),
        ("p_for_kldpo", "--p applies to wdpo only (method is kldpo); drop it or use --method wdpo"),
        ("eps_for_kldpo", "--eps applies to wdpo/rdpo/cdpo only (method is kldpo); drop it"),
        ("npy", "is a single-array .npy file, not an .npz archive"),
        ("text", "is a text file, not an .npz archive; write one with numpy.savez"),
        ("binary", "has no zip header, not an .npz archive"),
        ("pickled", "holds Python objects (pickled), which are not loaded"),
        ("truncated", "corrupt or truncated .npz archive"),
        ("empty_file", "the file is empty"),
        ("directory", "is a directory"),
        ("strings", "must be a real numeric array"),
    ],
)
def test_bad_input_gives_clear_error(case, expect, tmp_path, data_file, capsys):
    x = np.zeros((3, 2))
    y = np.array([0, 1, 1])
    data = str(data_file)
    extra = []
    method, beta, radius = "dpo", "1", "1"
    if case == "missing_key":
        data = _bad(tmp_path, case, x=x)
    elif case == "nan":
        x[1, 0] = np.nan
        data = _bad(tmp_path, case, x=x, y=y)
    elif case == "labels":
        data = _bad(tmp_path, case, x=x, y=np.array([0, 2, 1]))
    elif case == "shape":
        data = _bad(tmp_path, case, x=x, y=np.array([0, 1]))
    elif case == "empty":
        data = _bad(tmp_path, case, x=np.zeros((0, 2)), y=np.zeros(0))
    elif case == "neg_radius":
        radius = "-1"
    elif case == "beta0":
        beta = "0"
    elif case == "neg_rho":
        method, extra = "kldpo", ["--rho", "-0.1"]
    elif case == "no_rho":
        method = "kldpo"
    elif case == "no_file":
        data = str(tmp_path / "absent.npz")
    elif case == "bad_p":
        method, extra = "wdpo", ["--eps", "0.1", "--p", "3"]
    elif case == "complex":
        data = _bad(tmp_path, case, x=x + 1j, y=y)
    elif case == "huge_entries":
        data = _bad(tmp_path, case, x=np.full((3, 2), 1e300), y=y)
    elif case == "huge_margin":  # representable, but beta (B + ||theta_ref||) max ||x|| = 1e9 * sqrt(2)
        data = _bad(tmp_path, case, x=np.full((3, 2), 1e9), y=y)
    elif case == "huge_beta":
        beta = "1e300"
    elif case == "kappa_for_dpo":
        extra = ["--kappa", "1"]
    elif case == "p_for_kldpo":
        method, extra = "kldpo", ["--rho", "0.1", "--p", "2"]
    elif case == "eps_for_kldpo":
        method, extra = "kldpo", ["--rho", "0.1", "--eps", "0.1"]
    elif case == "npy":
        data = str(tmp_path / "x.npy")
        np.save(data, x)
    elif case in ("text", "binary", "empty_file"):
        f = tmp_path / f"{case}.npz"
        f.write_bytes({"text": b"x,y\n0.1,1\n", "binary": bytes(range(256)), "empty_file": b""}[case])
        data = str(f)
    elif case == "pickled":
        data = _bad(tmp_path, case, x=np.array([[1.0], "a"], dtype=object), y=y)
    elif case == "truncated":
        f = tmp_path / "truncated.npz"
        f.write_bytes(data_file.read_bytes()[:300])
        data = str(f)
    elif case == "directory":
        (tmp_path / "dir.npz").mkdir()
        data = str(tmp_path / "dir.npz")
    elif case == "strings":
        data = _bad(tmp_path, case, x=np.array([["a", "b"]] * 3), y=y)
    argv = ["solve", "--method", method, "--data", data, "--beta", beta, "--radius", radius, *extra, "--json"]
    if case == "bad_p":  # argparse: SystemExit(2) and one line that points to --help
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert expect in err and "see 'drdpo solve --help'" in err
        assert err.count("\n") == 1
        return
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert expect in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_uncertified_answer_exits_3(data_file, capsys, monkeypatch):
    """A solver whose answer is not certified must say so (status and exit code 3)."""
    import drdpo_theory.solvers.dpo as dpo_mod

    real = dpo_mod.solve_dpo_native

    def sloppy(data, beta, radius, **kw):
        return real(data, beta, radius, max_iter=1)

    monkeypatch.setattr(dpo_mod, "solve_dpo_native", sloppy)
    code, out, err = run_cli(["solve", "--method", "dpo", "--data", str(data_file), "--beta", "3",
                              "--radius", "5", "--json"], capsys)
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["status"] == "inaccurate"
    assert obj["duality_gap"] > 1e-7
    assert code == 3


def test_solver_warnings_go_to_the_result_not_stderr(data_file, capsys, monkeypatch):
    """A warning raised while solving is reported in the JSON (``warnings``), stderr stays empty."""
    import warnings

    import drdpo_theory.solvers as solvers_mod

    real = solvers_mod.solve

    def noisy(*args, **kwargs):
        warnings.warn("overflow encountered in exp", RuntimeWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers_mod, "solve", noisy)
    code, out, err = run_cli(["solve", "--method", "dpo", "--data", str(data_file), "--beta", "1.5",
                              "--radius", "2", "--json"], capsys)
    assert code == 0 and err == ""
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["warnings"] == ["RuntimeWarning: overflow encountered in exp"]
    ref = real("dpo", load_npz(data_file), 1.5, 2.0)
    assert_allclose(obj["objective"], ref.objective, rtol=RTOL)


def test_kappa_and_p_defaults_apply_to_wdpo(data_file, capsys):
    """Without --kappa/--p, wdpo is continuous W1 with kappa = inf (closed form DPO + eps beta ||theta||)."""
    code, out, err = run_cli(["solve", "--method", "wdpo", "--data", str(data_file), "--beta", "1.5",
                              "--radius", "2", "--eps", "0.01", "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["kappa"] == "inf" and obj["p"] == 1 and obj["support"] == "continuous"
    data = load_npz(data_file)
    ref = solve("wdpo", data, 1.5, 2.0, eps=0.01, kappa=np.inf, p=1)
    assert_allclose(obj["objective"], ref.objective, rtol=RTOL)
    theta = np.array(obj["theta"])
    from drdpo_theory.losses import dpo_loss

    closed = data.weights @ dpo_loss(theta, data.x, data.y, 1.5, data.theta_ref) \
        + 0.01 * 1.5 * np.linalg.norm(theta - data.theta_ref)
    assert_allclose(obj["objective"], closed, rtol=RTOL)
