"""paper_repro.md's benchmark sections and the shift-map verdict come from committed JSON (issue 12):
the numbers rendered equal the ones recomputed here from the raw rows, and what is not committed says so."""

import json
from pathlib import Path

import pytest

from drdpo_theory import report as R
from drdpo_theory import report_bench as B

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / R.RESULTS_DIR


def _results(base):
    return R._Results(Path(base))


@pytest.mark.parametrize("bench", ["bench-vs-trl", "bench-vs-trl-rounds"])
def test_vs_trl_goals_and_ratios_recomputed_equal_the_benchmark_run(bench):
    path = RESULTS / "bench" / B.BENCH[bench][0]
    if bench != "bench-vs-trl" and not path.is_file():
        pytest.skip(f"{path.name} not committed")
    d = json.loads(path.read_text())
    # the verdicts the script printed when it ran equal the ones the document renders
    assert B.trl_goals(d["rows"]) == d["goals"]
    ratios = B.trl_ratios(d["rows"])
    for row in d["rows"]:
        sfx = "-lora" if row["config"].endswith("-lora") else ""
        trl = next(x for x in d["rows"] if x["config"] == "trl-dpo" + sfx)
        assert ratios[row["config"]]["vs_trl_dpo"] == pytest.approx(row["s_per_step"] / trl["s_per_step"], rel=1e-12)
        assert ratios[row["config"]]["vs_trl_dpo"] == pytest.approx(row["vs_trl_dpo"], rel=1e-9)
    block = B.block_vs_trl(_results(RESULTS), bench)
    for row in d["rows"]:
        assert f"| {row['path']} | {row['s_per_step']:.3f}" in block
        if row.get("s_per_step_rounds"):  # pooled steps: their median lies within the rounds' medians' range
            assert min(row["s_per_step_rounds"]) <= row["s_per_step"] <= max(row["s_per_step_rounds"]) + 1e-12
    met = sum(g["met"] for g in d["goals"])
    assert f"({met} of {len(d['goals'])} met)" in block


def test_goals_flip_with_the_numbers():
    rows = [dict(config="trl-dpo", s_per_step=2.0, peak_rss_mib=1000.0),
            dict(config="align-dpo", s_per_step=1.7, peak_rss_mib=990.0),
            dict(config="trl-wdpo", s_per_step=3.9, peak_rss_mib=1150.0),
            dict(config="align-wdpo", s_per_step=3.6, peak_rss_mib=1100.0)]
    g = {x["goal"]: x for x in B.trl_goals(rows)}
    assert g["drdpo align DPO (full) <= 0.90x TRL DPO s/step"] == {"goal": "drdpo align DPO (full) <= 0.90x TRL DPO s/step",
                                                                  "value": "0.85x", "met": True}
    assert g["TRL adapter WDPO, lm_head='fused' (full) <= 1.05x drdpo align WDPO s/step"]["met"] is False  # 3.9 / 3.6 = 1.083
    assert g["TRL adapter WDPO, lm_head='fused' (full) peak RSS <= 1.12x TRL DPO's"]["value"] == "1.15x"
    assert g["align WDPO finite-diff (full) <= 2.0x align DPO s/step"]["value"] == "2.12x"
    rows[3]["s_per_step"] = 3.8
    g = {x["goal"]: x for x in B.trl_goals(rows)}
    assert g["TRL adapter WDPO, lm_head='fused' (full) <= 1.05x drdpo align WDPO s/step"]["met"] is True  # 3.9 / 3.8 = 1.026


def test_train_step_block_ratios(tmp_path):
    def row(method, step, cpu, peak, alloc, saved):
        return dict(method=method, attn="sdpa", step_s=step, cpu_s=cpu, peak_bytes=peak, alloc_bytes=alloc,
                    saved_bytes=saved)

    doc = dict(device="cpu (1 threads)", torch="x", config=dict(dtype="float32", pairs=4, seq_len=128, steps=10),
               n_params=110_000, memory_kind="RSS", cos_fd_db=0.9999991, cos_fd_db_penalty=0.99, cos_fd_surrogate_db=1.0,
               rows=[row("DPO", 0.040, 0.030, 400.0, 10.0, 20.0), row("KLDPO (clamped)", 0.036, 0.029, 404.0, 10.0, 20.0),
                     row("WDPO fd two-pass", 0.080, 0.066, 428.0, 11.0, 20.0),
                     row("WDPO double-backward", 0.140, 0.105, 488.0, 42.0, 96.0)])
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "train_step.json").write_text(json.dumps(doc))
    r = _results(tmp_path)
    block = B.block_train_step(r)
    assert "| WDPO fd two-pass | sdpa | 0.080 s | 2.00 | 2.20 | 1.07 | 1.10 | 1.00 |" in block
    assert "| WDPO double-backward | sdpa | 0.140 s | 3.50 | 3.50 | 1.22 | 4.20 | 4.80 |" in block
    line = B.row_train_step(r)
    assert "KLDPO 0.90x (CPU 0.97x)" in line and "(two-pass) 2.00x (CPU 2.20x) / 1.10x" in line
    assert "cosine 0.999999" in line


def test_missing_benchmarks_render_as_not_regenerated(tmp_path):
    r = _results(tmp_path)
    for name, block in (("bench-solvers", B.block_solvers), ("bench-train-step", B.block_train_step),
                        ("bench-vs-trl", B.block_vs_trl), ("bench-vs-trl-rounds", R.BLOCKS["bench-vs-trl-rounds"])):
        text = block(r)
        assert R.NOT_REGENERATED in text and B.BENCH[name][1] in text
    for line in (B.row_solvers(r), B.row_train_step(r), B.row_vs_trl(r)):
        assert R.NOT_REGENERATED in line
    assert R.NOT_REGENERATED in R.block_shift_map(r)


def test_shift_map_verdict_counts_equal_the_summary():
    d = json.loads((RESULTS / "shift-map" / "shift_map.json").read_text())
    k = R._shift_map_numbers(_results(RESULTS))
    # the regions listed per shift and the win counts of the summary are two records of the same cells
    assert k["wins"] == sum(d["wins"][sh]["reward"] for sh in d["grid"]["shifts"])
    assert k["cells"] == 525 * 5 == d["cells_per_shift"] * len(d["grid"]["shifts"])
    small = d["grid"]["ns"][0]
    per_n = d["cells_per_shift"] // len(d["grid"]["ns"])
    assert k["loss_small"] == pytest.approx(
        sum(d["wins_by_n"][sh]["dpo_loss"][str(small)] for sh in d["grid"]["shifts"]) / (5 * per_n))
    assert k["adversarial"] == d["wins"]["adversarial"]["reward"]
    block = R.block_shift_map(_results(RESULTS))
    assert f"**{k['wins']} of {k['cells']}**" in block
    row = R._row_robustness_loglinear(_results(RESULTS))
    assert row.startswith("| 9 |") and f"measured in {k['wins']} of {k['cells']} cells" in row


def test_collect_only_names(monkeypatch, tmp_path, capsys):
    from drdpo_theory.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--only", "bench-vs-trl"]) == 2  # a summary name is not a study to run
    assert "unknown name bench-vs-trl" in capsys.readouterr().err
    (tmp_path / "docs" / "results").mkdir(parents=True)
    assert main(["reproduce", "--collect", "--only", "bench"]) == 0  # nothing measured here: every bench skipped
    out = capsys.readouterr().out
    assert all(f"[skip] {b}" in out for b in B.BENCH)


def test_row_12_quotes_both_log_prob_paths_of_the_rounds_run():
    """Row 12 quotes the adapter's WDPO through each log-prob path, recomputed from the rounds run's rows."""
    d = json.loads((RESULTS / "bench" / B.BENCH["bench-vs-trl-rounds"][0]).read_text())
    by = {x["config"]: x["s_per_step"] for x in d["rows"]}
    row = B.row_vs_trl(_results(RESULTS))
    for sfx, tag in (("", "full fine-tuning"), ("-lora", "LoRA")):
        full = by["trl-wdpo-fulllogits" + sfx] / by["align-wdpo" + sfx]
        fused = by["trl-wdpo" + sfx] / by["align-wdpo" + sfx]
        assert f"{tag} {full:.2f}x with `lm_head='full'` (the default on CPU), {fused:.2f}x through TRL's fused head" in row
