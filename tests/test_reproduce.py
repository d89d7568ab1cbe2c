"""`drdpo reproduce`: runs studies as subprocesses, stores their JSON, skips finished ones."""

import json

from drdpo_theory.cli import main
from drdpo_theory.commands.reproduce import STUDIES, report, study_args


def test_runs_then_skips_a_finished_study(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--only", "solver-check", "--out", str(out)]) == 0
    first = capsys.readouterr()
    summary = json.loads((out / "quick" / "solver-check.json").read_text())
    assert summary["certified"] == summary["runs"] > 0
    assert "[done] solver-check" in first.err + first.out
    assert "paper says" in first.out and "we measured: runs=" in first.out
    # a rerun finds the summary on disk and does not run the study again
    (out / "quick" / "solver-check.log").unlink()
    assert main(["reproduce", "--only", "solver-check", "--out", str(out)]) == 0
    second = capsys.readouterr()
    assert "[skip] solver-check" in second.err + second.out
    assert not (out / "quick" / "solver-check.log").exists()


def test_quick_mode_never_writes_committed_figures():
    for name, *_ in STUDIES:
        args = study_args(name, full=False)
        figure_args = [v for flag, v in zip(args, args[1:]) if flag.startswith("--figure")]
        assert all(a.startswith("figures/quick") for a in figure_args), (name, args)
        if name != "solver-check":
            assert figure_args, f"{name}: quick mode must redirect its figures"


def test_report_headlines():
    text = report({
        "sample-complexity": {"wdpo-w1": {"slope": -0.51, "slope_ci": [-0.53, -0.47], "bound_holds": True},
                              "kldpo": {"slope": -0.5, "slope_ci": [-0.6, -0.4], "bound_holds": True,
                                        "bound_vacuous_at_all_n": True}},
        "shift": {"worst_alpha_reward": {"dpo": 0.215, "kldpo": 0.034}},
    })
    assert "wdpo-w1 slope -0.51 [-0.53, -0.47], bound holds" in text
    assert "kldpo slope -0.50 [-0.60, -0.40], bound holds (vacuous)" in text
    assert "dpo 0.215, kldpo 0.034" in text
