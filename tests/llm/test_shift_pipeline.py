"""End-to-end ``drdpo llm-shift --quick`` (tiny random model) and the pipeline's pieces."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from numpy.testing import assert_allclose

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("vaderSentiment")

from drdpo_theory.cli import main  # noqa: E402
from drdpo_theory.llm.shift import pipeline as PL  # noqa: E402
from drdpo_theory.llm.shift.rewards import mixture_reward  # noqa: E402

pytestmark = pytest.mark.llm

ATOL = 1e-12


def _samples(texts_by_prompt):
    rows = []
    for pid, texts in texts_by_prompt.items():
        for k, t in enumerate(texts):
            rows.append({"prompt_id": pid, "sample": k, "prompt": f"p{pid}", "completion": t})
    return rows


def test_build_pairs_top_vs_bottom_and_ties():
    rows = _samples({0: ["a", "b", "c"], 1: ["x", "y", "z"], 2: ["u", "v", "w"]})
    z = np.array([[1, 0], [3, 0], [2, 0], [0, 1], [0, 5], [0, 2], [1, 1], [1, 1], [1, 1]], dtype=float)
    # alpha0 = 1: only z_1 counts; prompts 1 and 2 tie and are dropped
    pairs, dropped = PL.build_pairs(rows, z, alpha0=1.0)
    assert dropped == 2 and [p["prompt_id"] for p in pairs] == [0]
    assert pairs[0]["chosen"][0]["content"] == "b" and pairs[0]["rejected"][0]["content"] == "a"
    # alpha0 = 0: only z_2 counts; prompts 0 and 2 tie
    pairs, dropped = PL.build_pairs(rows, z, alpha0=0.0)
    assert [p["prompt_id"] for p in pairs] == [1] and dropped == 2
    assert pairs[0]["chosen"][0]["content"] == "y" and pairs[0]["rejected"][0]["content"] == "x"
    assert_allclose(pairs[0]["chosen_reward"], mixture_reward(z[4:5], 0.0)[0], atol=ATOL)
    pairs, dropped = PL.build_pairs(rows, z, alpha0=0.0, keep_ties=True)
    assert dropped == 0 and pairs[2]["chosen"][0]["content"] == "u" and pairs[2]["rejected"][0]["content"] == "w"
    assert set(pairs[0]) >= {"prompt", "chosen", "rejected"} and pairs[0]["prompt"][0]["role"] == "user"
    sys_pairs, _ = PL.build_pairs(rows, z, alpha0=0.0, system="Be brief.")
    assert sys_pairs[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p1"}]


def test_build_pairs_several_per_prompt():
    rows = _samples({0: ["a", "b", "c", "d"], 1: ["e", "f", "g", "h"]})
    # prompt 0 ranks b > d > a > c; prompt 1: e = f = g > h
    z = np.array([[2, 0], [4, 0], [1, 0], [3, 0], [1, 0], [1, 0], [1, 0], [0, 0]], dtype=float)
    pairs, dropped = PL.build_pairs(rows, z, alpha0=1.0, per_prompt=2)
    got = [(p["prompt_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    # prompt 1: pair 0 = e (first of the tied best) vs h; pair 1 = f vs g ties in reward and is dropped
    assert got == [(0, "b", "c"), (0, "d", "a"), (1, "e", "h")] and dropped == 1
    one, _ = PL.build_pairs(rows, z, alpha0=1.0)
    assert one == [pairs[0], pairs[2]]  # pair 0 of every prompt is the top-vs-bottom pair
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        PL.ShiftConfig(k=4, pairs_per_prompt=3)


def test_config_written_before_a_new_setting_is_still_accepted(tmp_path):
    cfg = PL.ShiftConfig(out=str(tmp_path))
    old = cfg.to_json()
    del old["pairs_per_prompt"], old["wdpo_penalties"]  # a config.json from before these settings
    (tmp_path / "config.json").write_text(json.dumps(old))
    PL._check_config(tmp_path, cfg)  # missing = default: accepted
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        PL._check_config(tmp_path, PL.ShiftConfig(out=str(tmp_path), pairs_per_prompt=2))


def test_bootstrap_interval_brackets_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(20, 2))
    big = rng.normal(size=(2000, 2))
    m, lo, hi = PL.bootstrap_mean_ci(small, 500)
    assert_allclose(m, small.mean(0), atol=ATOL)
    assert np.all(lo < m) and np.all(m < hi)
    _, lo2, hi2 = PL.bootstrap_mean_ci(big, 500)
    assert np.all(hi2 - lo2 < hi - lo)
    # ~ 2 * 1.96 / sqrt(n) for unit variance
    assert_allclose(hi2 - lo2, 2 * 1.96 / np.sqrt(2000), rtol=0.25)
    const = np.ones((10, 1))
    assert PL.bootstrap_mean_ci(const, 50)[1][0] == PL.bootstrap_mean_ci(const, 50)[2][0] == 1.0


def test_seed_and_prompt_bootstrap_covers_the_seed_spread():
    """Seeds that disagree widen the two-level interval; with identical seeds it matches the prompt bootstrap's width."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1, 400, 1)) * np.ones((3, 1, 1))  # three identical seeds
    lo, hi = PL.bootstrap_seeds_prompts_ci(base, 1000)
    _, plo, phi = PL.bootstrap_mean_ci(base[0], 1000)
    assert_allclose(hi - lo, phi - plo, rtol=0.15)
    shifted = base + np.array([-1.0, 0.0, 1.0])[:, None, None]  # seed effects of +-1
    lo2, hi2 = PL.bootstrap_seeds_prompts_ci(shifted, 1000)
    assert hi2[0] - lo2[0] > 5 * (hi[0] - lo[0])
    assert lo2[0] < shifted.mean() < hi2[0]
    # the seed means of the summary: policy seed s minus baseline seed s
    rows = lambda shift: [{"prompt_id": i, "scores": {"joy": 0.1 * i + shift, "anger": 0.0}, "n_tokens": 3} for i in range(4)]
    ev = {"dpo": [rows(0.0), rows(0.0)], "x": [rows(0.2), rows(0.4)]}
    from drdpo_theory.llm.shift.rewards import Normalizer

    out = PL.summarize(ev, ("joy", "anger"), Normalizer((0.0, 0.0), (1.0, 1.0)), (0.0, 1.0), [0, 1, 2, 3], 200)
    d = out["x"]["diff"]
    assert_allclose(d["per_seed"], [[0.0, 0.2], [0.0, 0.4]], atol=1e-12)  # r_alpha = alpha z_joy + (1-alpha) z_anger
    assert_allclose(d["mean"], [0.0, 0.3], atol=1e-12)
    assert d["seed_prompt_lo"][1] <= 0.2 + 1e-12 and d["seed_prompt_hi"][1] >= 0.4 - 1e-12


def test_config_validation():
    with pytest.raises(ValueError, match="objectives"):
        PL.ShiftConfig(objectives=("positivity", "positivity"))
    with pytest.raises(ValueError, match="alpha0"):
        PL.ShiftConfig(alpha0=1.5)
    with pytest.raises(ValueError, match="k must"):
        PL.ShiftConfig(k=1)
    with pytest.raises(ValueError, match="methods"):
        PL.ShiftConfig(methods=("robust",))
    cfg = PL.ShiftConfig(taus=(0.1, 1.0), rho0s=(0.5,))
    assert [r[0] for r in cfg.runs()] == ["dpo", "kldpo-tau0.1", "kldpo-tau1", "wdpo-rho0.5"]
    # both WDPO norms: the rows runs keep their names, the tuple runs get their own
    cfg = PL.ShiftConfig(methods=("dpo", "wdpo"), rho0s=(0.5, 0.1), wdpo_penalties=("rows", "tuple"))
    assert cfg.runs() == [
        ("dpo", "dpo", {}),
        ("wdpo-rho0.5", "wdpo", {"rho0": 0.5, "wdpo_penalty": "rows"}),
        ("wdpo-rho0.1", "wdpo", {"rho0": 0.1, "wdpo_penalty": "rows"}),
        ("wdpo-tuple-rho0.5", "wdpo", {"rho0": 0.5, "wdpo_penalty": "tuple"}),
        ("wdpo-tuple-rho0.1", "wdpo", {"rho0": 0.1, "wdpo_penalty": "tuple"}),
    ]
    assert PL._label("wdpo-tuple-rho0.1") == "WDPO tuple (rho0=0.1)"
    for bad in ((), ("rows", "rows"), ("prompt",)):
        with pytest.raises(ValueError, match="wdpo_penalties"):
            PL.ShiftConfig(wdpo_penalties=bad)
    assert "wdpo_penalties" in PL.RUN_SET_FIELDS  # adding the tuple runs reuses a directory's cached stages
    assert PL.ShiftConfig(objectives=("joy", "anger")).objectives == ("joy", "anger")


def test_objective_conflict_by_hand():
    from drdpo_theory.llm.shift.rewards import Normalizer

    rows = _samples({0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]})
    raw = {"a": (0.0, 1.0), "b": (1.0, 0.0), "c": (0.5, 0.5), "d": (0.2, 0.5), "e": (0.9, 0.1), "f": (0.1, 0.9)}
    for r in rows:
        r["scores"] = dict(zip(("joy", "anger"), raw[r["completion"]]))
    arr = np.array([raw[r["completion"]] for r in rows])
    norm = Normalizer.fit(arr)

    def pair(pid, c, r):
        return {"prompt_id": pid, "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}

    # pair 0: b over a -> joy +1, anger -1 (opposite); pair 1: c over d -> anger ties; pair 2: e over f: opposite
    pairs = [pair(0, "b", "a"), pair(1, "c", "d"), pair(2, "e", "f")]
    out = PL.objective_conflict(rows, pairs, ("joy", "anger"), norm)
    x, y = arr[:, 0] - arr[:, 0].mean(), arr[:, 1] - arr[:, 1].mean()
    assert_allclose(out["pearson"], (x @ y) / np.sqrt((x @ x) * (y @ y)), atol=ATOL)
    assert out["n_samples"] == 6 and out["n_pairs"] == 3
    assert_allclose(out["pairs_opposite"], 2 / 3, atol=ATOL)
    assert_allclose(out["pairs_one_tied"], 1 / 3, atol=ATOL)
    line = PL.conflict_line(("joy", "anger"), out)
    assert f"Pearson r(joy, anger) = {out['pearson']:+.3f} over 6 samples" in line
    assert "oppositely in 67%" in line and "ties in 33%" in line


def test_emotion_preset_quick_run(tmp_path, capsys, monkeypatch):
    """``--preset emotion --quick``: the NRC joy/anger objectives end to end, with both WDPO norms;
    everything is written under --out (run from an empty working directory, which stays empty)."""
    pytest.importorskip("nrclex")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "emo"
    argv = ["llm-shift", "--preset", "emotion", "--quick", "--out", str(out), "--no-progress", "--json",
            "--methods", "dpo,wdpo", "--wdpo-penalty", "rows,tuple"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["objectives"] == ["joy", "anger"]
    assert set(res["methods"]) == {"reference", "dpo", "wdpo-rho0.005", "wdpo-tuple-rho0.005"}
    conflict = res["objective_conflict"]
    assert conflict["n_samples"] == 6 * 3 and conflict["n_pairs"] == 6
    # the random bytes of the tiny model hold no lexicon word: both objectives are 0, the correlation undefined
    scores = json.loads((out / "scores.json").read_text())["samples"]
    assert all(s["scores"]["joy"] == s["scores"]["anger"] == 0.0 for s in scores)
    assert conflict["pearson"] is None and conflict["pairs_one_tied"] == 1.0
    assert set(scores[0]["scores"]) == {"positivity", "calm", "brevity", "joy", "anger"}
    summary = json.loads((out / "results.json").read_text())
    assert summary["objective_conflict"] == conflict and summary["config"]["objectives"] == ["joy", "anger"]
    table = (out / "results.md").read_text()
    assert "Pearson r(joy, anger) = undefined" in table and "WDPO tuple (rho0=0.005)" in table
    state = json.loads(next((out / "train" / "wdpo-tuple-rho0.005-seed0" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["config"]["wdpo_penalty"] == "tuple"
    assert list(work.iterdir()) == []
    # the preset is the objective pair: giving both is refused; the same preset again is all cached
    assert main(argv[:1] + ["--objectives", "joy,anger"] + argv[1:]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages_run"] == []


def _mtimes(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_quick_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    fig = tmp_path / "fig" / "llm_shift.png"
    argv = ["llm-shift", "--quick", "--out", str(out), "--figure", str(fig), "--no-progress", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = {"reference", "dpo", "kldpo-tau0.1", "wdpo-rho0.005"}
    assert set(res["methods"]) == names
    assert len(res["alphas"]) >= 5 and res["alpha0"] == 0.5
    stages = set(res["stages_run"])
    assert {"sample", "score", "pairs", "eval:reference"} <= stages
    assert {f"train:{n}-seed0" for n in names - {"reference"}} <= stages
    for name, e in res["methods"].items():
        assert len(e["mean"]) == len(res["alphas"])
        assert all(lo - 1e-9 <= m <= hi + 1e-9 for m, lo, hi in zip(e["mean"], e["lo"], e["hi"]))
        assert (e["diff_vs_dpo"] is None) == (name in ("dpo",))
    # the cached files are consistent with each other
    pairs = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    samples = json.loads((out / "scores.json").read_text())["samples"]
    assert len(samples) == 6 * 3 and len(pairs) == 6
    for n in names - {"reference"}:
        assert (out / "train" / f"{n}-seed0" / "metrics.csv").is_file()
        ev = [json.loads(l) for l in (out / "eval" / f"{n}-seed0.scored.jsonl").read_text().splitlines()]
        assert len(ev) == 4 and set(ev[0]["scores"]) == {"positivity", "calm", "brevity"}  # as before the presets
    summary = json.loads((out / "results.json").read_text())
    # the reported mean is the mean over test completions of r_alpha (one sample per prompt here)
    ref = [json.loads(l) for l in (out / "eval" / "reference.scored.jsonl").read_text().splitlines()]
    nm = summary["normalizer"]
    z = np.array([[(r["scores"][o] - nm["mean"][j]) / nm["std"][j] for j, o in enumerate(summary["objectives"])] for r in ref])
    assert_allclose(summary["policies"]["reference"]["mean"], mixture_reward(z, np.array(summary["alphas"])).mean(0), atol=1e-9)
    assert fig.is_file() and fig.with_suffix(".pdf").is_file()
    assert "alpha=0.5 (train)" in (out / "results.md").read_text()
    # the tiny random model checks the plumbing only: said in the JSON, the table and results.json
    assert res["smoke_test"] is True and summary["smoke_test"] is True
    assert (out / "results.md").read_text().startswith("**PIPELINE SMOKE TEST")

    # rerun: every stage is cached; nothing but the summary files is rewritten
    before = _mtimes(out)
    assert main(argv) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["stages_run"] == []
    assert res2["methods"] == res["methods"]
    after = _mtimes(out)
    summary_files = {"results.json", "results.csv", "results.md", "config.json"}
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= summary_files

    # a lost eval file of one method is recomputed from its finished checkpoint (no retraining)
    os.remove(out / "eval" / "dpo-seed0.scored.jsonl")
    os.remove(out / "eval" / "dpo-seed0.jsonl")
    assert main(argv) == 0
    res3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res3["stages_run"] == ["eval:dpo-seed0"]
    assert res3["methods"]["dpo"] == res["methods"]["dpo"]  # seeded sampling: same completions

    # adding a run (another tau) reuses every cached stage and trains only the new run
    assert main(argv + ["--tau", "0.1,1"]) == 0
    res4 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res4["stages_run"] == ["train:kldpo-tau1-seed0", "eval:kldpo-tau1-seed0"]
    assert set(res4["methods"]) == names | {"kldpo-tau1"}
    assert res4["methods"]["kldpo-tau0.1"] == res["methods"]["kldpo-tau0.1"]

    # other settings into the same directory are refused with exit code 2
    assert main(["llm-shift", "--quick", "--out", str(out), "--alpha0", "0.3", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_sampling_resumes_inside_the_stage(tmp_path):
    from drdpo_theory.llm.models import load_model
    from drdpo_theory.llm.shift.prompts import load_prompts

    model, tok = load_model("tiny-random")
    prompts = load_prompts("train", 5)
    kw = dict(max_new_tokens=4, temperature=1.0, gen_batch=4, seed=3, desc="t", progress=False)
    full = PL.generate_completions(model, tok, prompts, 2, tmp_path / "a.jsonl", **kw)
    assert len(full) == 10
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    # simulate a crash after the first chunk (2 prompts) plus a cut line
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])
    resumed = PL.generate_completions(model, tok, prompts, 2, tmp_path / "b.jsonl", **kw)
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(full, key=key)

    # a cut line right after a complete chunk: it is removed before new rows are appended, so no
    # readable row ends up behind it (formerly every row after it was lost on the next read)
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    resumed = PL.generate_completions(model, tok, prompts, 2, tmp_path / "c.jsonl", **kw)
    on_disk, clean = PL._read_jsonl_checked(tmp_path / "c.jsonl")
    assert clean and sorted(on_disk, key=key) == sorted(full, key=key) == sorted(resumed, key=key)



def test_calibrated_radii_and_workers_give_the_same_results(tmp_path, capsys):
    """--kl-radii / --penalty-fractions calibrate tau and rho0 at the seed-one DPO policy by the stated
    rules (checked here from the per-pair values recomputed independently), and --workers 2 reproduces
    --workers 1 exactly."""
    import torch

    from drdpo_theory.llm.losses import kl_dual_temperature

    res = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        argv = ["llm-shift", "--quick", "--out", str(out), "--no-progress", "--json", "--seeds", "0,1",
                "--kl-radii", "0.1,0.5", "--penalty-fractions", "0.5", "--wdpo-penalty", "rows,tuple",
                "--workers", str(workers)]
        assert main(argv) == 0
        res[workers] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        cal = json.loads((out / "calibration.json").read_text())
        assert cal["policy"] == "dpo-seed0" and cal["n_pairs"] == 6
        summary = json.loads((out / "results.json").read_text())
        assert summary["calibration"] == cal
        taus = [e["tau"] for e in cal["kl"]]
        rho0 = cal["wdpo"][0]["rho0"]
        assert set(res[workers]["methods"]) == {"reference", "dpo", f"kldpo-tau{taus[0]:g}", f"kldpo-tau{taus[1]:g}",
                                                f"wdpo-rho{rho0:g}", f"wdpo-tuple-rho{rho0:g}"}
        assert taus[0] > taus[1] > 0  # a larger ball, a colder worst case
        # the rules, from the reported per-pair statistics
        assert_allclose(rho0, 0.5 * cal["mean_loss"] / cal["mean_sq_norm"]["rows"], rtol=5e-3)
        assert_allclose(cal["wdpo"][0]["penalty_rows"], 0.5 * cal["mean_loss"], rtol=5e-3)
        for e in cal["kl"]:
            assert_allclose(e["tau"], e["lambda"], rtol=5e-3)
    # the calibration's losses, recomputed without the embedding probe: the trained DPO policy's
    # sequence log-probs against the run's cached reference, then the dual temperature of radius 0.1
    import copy

    from drdpo_theory.llm.logprobs import concatenated_logps
    from drdpo_theory.llm.losses import dpo_loss
    from drdpo_theory.llm.models import load_model
    from drdpo_theory.llm.shift.pipeline import ShiftConfig, _read_jsonl, _tokenize, _train_config
    from drdpo_theory.llm.trainer import Trainer

    out = tmp_path / "w1"
    cfg = ShiftConfig.preset("quick", out=str(out))
    model, tok = load_model("tiny-random", "fp32")
    trainer = Trainer(_train_config(cfg, out / "train" / "dpo-seed0", "dpo", 0, {}, False), copy.deepcopy(model), tok,
                      _tokenize(tok, _read_jsonl(out / "pairs.jsonl")), device=torch.device("cpu"))
    trainer.fit(resume_from="auto")
    trainer.precompute_reference()
    batch = trainer.collate(trainer.pairs)
    with torch.no_grad():
        pc, pr = concatenated_logps(trainer.model.eval(), {k: v for k, v in batch.items() if k not in ("index", "weight")})
    losses = dpo_loss(pc, pr, trainer.ref_cache[0][batch["index"]], trainer.ref_cache[1][batch["index"]], cfg.beta)
    cal = json.loads((out / "calibration.json").read_text())
    assert_allclose(float(losses.double().mean()), cal["mean_loss"], rtol=1e-5)
    assert_allclose(kl_dual_temperature(losses.double(), 0.1), cal["kl"][0]["lambda"], rtol=1e-4)
    assert res[1]["methods"] == res[2]["methods"]


def test_calibration_flags_are_checked(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["llm-shift", "--quick", "--out", out, "--tau", "0.1", "--kl-radii", "0.1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["llm-shift", "--quick", "--out", out, "--rho0", "0.1", "--penalty-fractions", "0.1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["llm-shift", "--quick", "--out", out, "--methods", "kldpo", "--kl-radii", "0.1"]) == 2
    assert "needs 'dpo'" in capsys.readouterr().err
    assert main(["llm-shift", "--quick", "--out", out, "--workers", "0"]) == 2


def test_sigterm_with_workers_checkpoints_the_running_jobs_and_leaves_no_process(tmp_path):
    """--workers 2: SIGTERM to `drdpo llm-shift` is sent on to the workers; each running trainer writes a
    checkpoint at the step it reached and stops; the command exits with the interrupt status and no process
    of its session is left; a rerun would resume from those checkpoints (read back here)."""
    import signal
    import subprocess
    import sys
    import time

    from drdpo_theory.llm.trainer import latest_checkpoint, read_checkpoint_state

    out = tmp_path / "run"
    steps = 100_000  # far more than the test waits for: the runs are mid-training when the signal comes
    argv = [sys.executable, "-m", "drdpo_theory.cli", "llm-shift", "--quick", "--out", str(out), "--no-progress",
            "--workers", "2", "--steps", str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: the workers' too
    try:
        deadline, running = time.monotonic() + 240, []
        while time.monotonic() < deadline and len(running) < 2:
            assert proc.poll() is None, proc.communicate()
            running = [m.parent for m in (out / "train").glob("*/metrics.csv") if len(m.read_text().splitlines()) >= 3]
            time.sleep(0.2)
        assert len(running) == 2, "two runs never got going"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "drdpo llm-shift: interrupted" in err
    deadline = time.monotonic() + 30  # no worker outlives the command (allowing them to finish exiting)
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        left = []
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and os.getpgid(int(d)) == proc.pid:
                    left.append(open(f"/proc/{d}/cmdline").read().replace("\0", " ")[:120])
            except OSError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"processes left in the command's group: {left}")
    for run_dir in running:
        ck = latest_checkpoint(run_dir)
        assert ck is not None, f"{run_dir.name}: no checkpoint after SIGTERM"
        step = read_checkpoint_state(ck)["step"]
        assert 2 <= step < steps, (run_dir.name, step)
