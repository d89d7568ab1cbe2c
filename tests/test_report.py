"""paper_repro.md's numbers come from the committed full-run summaries (issue 12), and the
committed figures carry their message on their own (issue 13)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drdpo_theory import report as R

ROOT = Path(__file__).resolve().parents[1]


def test_committed_paper_repro_equals_the_generated_one():
    """`drdpo reproduce --report --check`: every generated block equals the text rendered from docs/results/."""
    assert R.check_documents(ROOT) == [], "run `drdpo reproduce --report` and commit paper_repro.md"


def test_report_check_cli(monkeypatch, capsys):
    from drdpo_theory.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["reproduce", "--report", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_every_block_of_paper_repro_has_a_generator_and_is_closed():
    text = (ROOT / "paper_repro.md").read_text()
    begins = [line.split(":", 1)[1].split()[0] for line in text.splitlines() if line.startswith("<!-- BEGIN generated:")]
    ends = [line.split(":", 1)[1].split()[0] for line in text.splitlines() if line.startswith("<!-- END generated:")]
    assert begins and begins == ends
    assert set(begins) <= set(R.BLOCKS)


def test_committed_summaries_are_small_and_listed_in_the_manifest():
    base = ROOT / R.RESULTS_DIR
    manifest = json.loads((base / "manifest.json").read_text())
    listed = {f for m in manifest.values() for f in m["files"]}
    folders = {f.split("/")[0] for f in listed}
    files = [p for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] in folders]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    for p in files:  # (folders of other studies, e.g. shift-map/, are theirs)
        rel = p.relative_to(base).as_posix()
        assert rel in listed or rel.endswith("/summary.json"), rel
    for m in manifest.values():  # a study command, or a benchmark script writing its JSON
        assert m["command"].startswith(("drdpo ", "python benchmarks/")), m["command"]


def test_committed_summaries_are_not_git_ignored():
    import subprocess

    for p in (ROOT / R.RESULTS_DIR).rglob("*"):
        if p.is_file():
            r = subprocess.run(["git", "check-ignore", "-q", str(p)], cwd=ROOT)
            assert r.returncode == 1, f"{p} is ignored by git"


def test_missing_summaries_render_as_not_regenerated(tmp_path):
    blocks = R.render_blocks(tmp_path)
    assert set(blocks) == set(R.BLOCKS)
    for name, text in blocks.items():
        assert R.NOT_REGENERATED in text, name


def test_update_document_replaces_only_the_blocks():
    doc = ("intro 0.123\n<!-- BEGIN generated:shift -->\nold 0.5\n<!-- END generated:shift -->\n"
           "outro\n<!-- BEGIN generated:summary -->\n<!-- END generated:summary -->\n")
    new = R.update_document(doc, {"shift": "new 0.7", "summary": "| a |"})
    assert new == ("intro 0.123\n<!-- BEGIN generated:shift -->\nnew 0.7\n<!-- END generated:shift -->\n"
                   "outro\n<!-- BEGIN generated:summary -->\n| a |\n<!-- END generated:summary -->\n")
    assert R.update_document(new, {"shift": "new 0.7", "summary": "| a |"}) == new
    with pytest.raises(KeyError, match="typo"):
        R.update_document("<!-- BEGIN generated:typo -->\n<!-- END generated:typo -->", {"shift": ""})


def test_collect_round_trip_reproduces_the_committed_blocks(tmp_path):
    """Put the committed summaries back where the full runs write them, collect them into a fresh
    folder: the generated text is the same (collect is idempotent on its own output)."""
    base = ROOT / R.RESULTS_DIR
    manifest = json.loads((base / "manifest.json").read_text())
    for study in manifest:
        src_dir, files, _ = R.STUDY_FILES[study]
        for name, _ in files:
            p = base / R._dest(study) / R._DEST_NAME.get(name, name)
            if p.is_file():
                (tmp_path / src_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(p, tmp_path / src_dir / name)
    R.collect(list(manifest), root=tmp_path, dest="out", log=lambda *_: None)
    got, want = R.render_blocks(tmp_path / "out"), R.render_blocks(base)
    import re

    strip = lambda t: re.sub(r" \(collected [^)]*\)", "", t)  # noqa: E731
    assert {k: strip(v) for k, v in got.items()} == {k: strip(v) for k, v in want.items()}


# ----------------------------------------------------------------------------- figures (issue 13)
@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Redraw every committed figure from the committed tables once; keep the matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drdpo_theory import io
    from drdpo_theory.llm.shift import pipeline as PL

    figs = {}

    def keep(fig, path, **kw):
        path = Path(path)
        if path.suffix == ".png":
            figs[path.stem] = fig
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "save_figure", keep)
        mp.setattr(PL, "save_figure", keep)
        mp.setattr(plt, "close", lambda *a, **k: None)
        R.regenerate_figures(ROOT, figdir=tmp_path_factory.mktemp("figs"), log=lambda *_: None)
    yield figs
    plt.close("all")


def _legends(fig):
    return [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)


def _overlaps_data(fig, legend) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not hasattr(fig.canvas, "get_renderer"):  # a closed figure: give it a canvas to lay out on
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    lb = legend.get_window_extent(r)
    for ax in fig.axes:
        ab = ax.get_window_extent(r)
        if lb.overlaps(ab):
            return True
    return False


NAMES = ["gradients_lam_path", "gradients_value_error", "shift_reward_vs_alpha", "sample_complexity_radius",
         "gradients_cosine_vs_tau", "gradients_sgd_endpoints"]


@pytest.mark.parametrize("name", NAMES)
def test_figure_legends_sit_outside_the_axes_and_a_title_says_the_takeaway(figures, name):
    if name not in figures:
        pytest.skip(f"{name}: table not committed")
    fig = figures[name]
    legends = _legends(fig)
    assert legends, f"{name} has no legend"
    for lg in legends:
        assert not _overlaps_data(fig, lg), f"{name}: a legend overlaps a panel"
    titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [a.get_title() for a in fig.axes]
    assert any(len(t) > 40 for t in titles), f"{name}: no takeaway title"
    axes = [ax for ax in fig.axes if ax.has_data()]
    assert all(ax.get_xlabel() or ax.get_shared_x_axes().get_siblings(ax) != [ax] for ax in axes), f"{name}: x label"
    assert any(ax.get_ylabel() for ax in axes) and any(ax.get_xlabel() for ax in axes), f"{name}: unlabelled axes"


def test_sgd_endpoint_ticks_are_words_not_code_names(figures):
    if "gradients_sgd_endpoints" not in figures:
        pytest.skip("sgd table not committed")
    ticks = [t.get_text() for t in figures["gradients_sgd_endpoints"].axes[0].get_xticklabels()]
    import re

    from drdpo_theory.plots_approx import ESTIMATOR_LABELS

    assert ticks and not any(t in ESTIMATOR_LABELS or re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", t) for t in ticks), ticks


def test_lines_of_a_figure_are_told_apart(figures):
    """No two labelled series of the shift figure, and no two policies of an LLM figure, share
    colour and line style; the collapsed radii are not drawn as data."""
    from matplotlib.colors import to_hex

    for name in ("shift_reward_vs_alpha", "llm_shift", "llm_shift_sweep", "llm_shift_seeds01"):
        if name not in figures:
            continue
        ax = figures[name].axes[0]
        styles = [(to_hex(line.get_color()), str(line.get_linestyle())) for line in ax.get_lines()
                  if not line.get_label().startswith("_") and "training" not in line.get_label()]
        assert len(styles) == len(set(styles)), (name, styles)
    if "sample_complexity_radius" in figures:
        for ax in figures["sample_complexity_radius"].axes:
            assert not any("COLLAPSED" in line.get_label() for line in ax.get_lines())


def test_llm_figures_have_distinct_titles(figures):
    got = [figures[n]._suptitle.get_text() for n in ("llm_shift", "llm_shift_seeds01", "llm_shift_sweep") if n in figures]
    assert len(got) == len(set(got))


def test_llm_plot_colours_and_titles_from_a_summary(monkeypatch, tmp_path):
    """Without committed LLM summaries: a sweep's KLDPO and WDPO runs get distinct colours, and the
    seed-0 and two-seed figures get different titles."""
    from matplotlib.colors import to_hex

    from drdpo_theory.llm.shift import pipeline as PL

    a = list(np.linspace(0, 1, 5))

    def pol(m, diff=True):
        e = {"mean": [m] * 5, "lo": [m - 0.1] * 5, "hi": [m + 0.1] * 5, "raw_mean": {}}
        e["diff"] = {"mean": [m] * 5, "lo": [m - 0.3] * 5, "hi": [m - 0.05] * 5} if diff else None
        return e

    pols = {"reference": pol(-0.1, False), "dpo": pol(0.2, False), "kldpo-tau0.1": pol(0.0), "kldpo-tau1": pol(0.1),
            "wdpo-rho0.005": pol(0.05), "wdpo-rho0.05": pol(-0.05)}
    figs = []
    monkeypatch.setattr(PL, "save_figure", lambda fig, path, **kw: figs.append(fig))
    base = {"model": "smollm2", "objectives": ["positivity", "calm"], "alpha0": 0.5, "alphas": a,
            "policies": pols, "n_test_prompts": 100}
    PL.plot_shift({**base, "seeds": [0]}, tmp_path / "a.png")
    PL.plot_shift({**base, "seeds": [0, 1]}, tmp_path / "b.png")
    lines = [line for line in figs[0].axes[0].get_lines() if not line.get_label().startswith(("_", "training"))]
    styles = [(to_hex(line.get_color()), str(line.get_linestyle())) for line in lines]
    assert len(lines) == 6 and len(set(styles)) == 6
    assert figs[0]._suptitle.get_text() != figs[2]._suptitle.get_text()
    assert "below it at some alpha" in figs[0]._suptitle.get_text()
    for lg in _legends(figs[0]):
        assert not _overlaps_data(figs[0], lg)


def test_llm_tables_of_the_docs_parse_into_summaries():
    """Without a committed results.json the LLM figures are drawn from docs/llm_shift.md's tables,
    and say so on the figure."""
    got = R.llm_tables_from_docs(ROOT / "docs/llm_shift.md")
    assert set(got) == {"llm_shift", "llm_shift_seeds01", "llm_shift_sweep"}
    sweep = got["llm_shift_sweep"]
    assert {"dpo", "kldpo-tau0.1", "kldpo-tau1", "wdpo-rho0.005", "wdpo-rho0.05", "reference"} == set(sweep["policies"])
    assert sweep["policies"]["dpo"]["mean"][0] == pytest.approx(0.238)
    assert sweep["policies"]["kldpo-tau0.1"]["diff"]["hi"][0] < 0
    assert got["llm_shift_seeds01"]["seeds"] == [0, 1]
    assert all(R.NOT_REGENERATED in s["provenance"] for s in got.values())


def _emotion_summary(lo_shift: float) -> dict:
    """A synthetic emotion summary: one KLDPO and one WDPO run; the WDPO run's seed-and-prompt interval
    is shifted by ``lo_shift`` (above 0 at alpha >= 0.5 when lo_shift > 0)."""
    alphas = [0.0, 0.5, 1.0]
    pol = {"reference": {"mean": [0.0] * 3, "lo": [-0.1] * 3, "hi": [0.1] * 3, "diff": None},
           "dpo": {"mean": [0.2] * 3, "lo": [0.1] * 3, "hi": [0.3] * 3, "diff": None}}
    diff_k = {"vs": "dpo", "mean": [-0.1] * 3, "lo": [-0.2] * 3, "hi": [-0.05] * 3,
              "per_seed": [[-0.1] * 3] * 3, "seed_prompt_lo": [-0.3] * 3, "seed_prompt_hi": [-0.01, 0.1, 0.1]}
    diff_w = {"vs": "dpo", "mean": [0.0, 0.1, 0.2], "lo": [-0.1, 0.05, 0.1], "hi": [0.1, 0.2, 0.3],
              "per_seed": [[0.0, 0.1, 0.2]] * 3,
              "seed_prompt_lo": [-0.1, -0.05 + lo_shift, -0.05 + lo_shift], "seed_prompt_hi": [0.1, 0.3, 0.4]}
    pol["kldpo-tau0.2"] = {"mean": [0.1] * 3, "lo": [0.0] * 3, "hi": [0.2] * 3, "diff": diff_k}
    pol["wdpo-tuple-rho0.003"] = {"mean": [0.2, 0.3, 0.4], "lo": [0.1] * 3, "hi": [0.5] * 3, "diff": diff_w}
    return {"model": "smollm2", "objectives": ["joy", "anger"], "alpha0": 0.5, "alphas": alphas, "n_pairs": 314,
            "n_train_prompts": 200, "n_test_prompts": 100, "eval_samples": 2, "seeds": [0, 1, 2],
            "objective_conflict": {"pearson": -0.16, "n_samples": 800, "n_pairs": 314, "pairs_opposite": 0.13,
                                   "pairs_one_tied": 0.74},
            "calibration": {"policy": "dpo-seed0", "n_pairs": 314, "mean_loss": 0.5, "loss_min": 0.1, "loss_max": 1.2,
                            "mean_sq_norm": {"rows": 30.0, "tuple": 25.0},
                            "kl": [{"rho": 0.05, "lambda": 0.2001, "tau": 0.2, "ess": 300.0, "weight_min": 0.5,
                                    "weight_max": 3.0}],
                            "wdpo": [{"fraction": 0.1, "rho0": 0.003, "penalty_rows": 0.09, "penalty_tuple": 0.075}]},
            "policies": pol, "timings_s": {"train:dpo-seed0": 3600.0}}


@pytest.mark.parametrize("lo_shift", [0.0, 0.1])
def test_emotion_verdict_follows_the_seed_and_prompt_intervals(tmp_path, lo_shift):
    """Row 10 and the emotion block read the two-level intervals: a run counts as above / below DPO exactly
    where its seed-and-prompt interval excludes 0, and the radius rule behind each run is named."""
    (tmp_path / "llm-shift").mkdir()
    (tmp_path / "llm-shift" / "emotion_results.json").write_text(json.dumps(_emotion_summary(lo_shift)))
    res = R._Results(tmp_path)
    row = R._row_llm_emotion(res)
    block = R.block_llm_shift_emotion(res)
    assert "KLDPO (tau = 0.2) below DPO at alpha in [0, 0]" in row  # only alpha = 0 has hi < 0
    if lo_shift > 0:
        assert row.split(" | ")[3].startswith("robust training pays here (two-level bootstrap over seeds and prompts): "
                                             "WDPO tuple (rho0 = 0.003) "
                                             "(penalty 0.1 x DPO loss) above DPO at alpha in [0.5, 1]")
    else:
        assert "does not pay here: none of the 2 robust runs" in row
    assert "KL rho = 0.05 -> tau = 0.2" in block and "| KLDPO (tau = 0.2) | KL rho = 0.05 |" in block
    assert "-0.10 / -0.10 / -0.10" in block  # per-seed means
