"""benchmarks/vs_trl.py runs (tiny-random, 2 steps, TRL DPO and drdpo align DPO) and writes the documented JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("datasets")

pytestmark = pytest.mark.llm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "vs_trl.py"


def _module():
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vs_trl_tiny_random_json(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny-random", "--steps", "2", "--warmup", "1",
           "--configs", "trl-dpo,align-dpo", "--json", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| TRL DPOTrainer, DPO |" in proc.stdout and "| drdpo align DPO |" in proc.stdout

    doc = json.loads(out.read_text())
    columns = _module().COLUMNS
    assert doc["columns"] == list(columns)
    assert (doc["model"], doc["threads"], doc["batch_size"], doc["max_length"]) == ("tiny-random", 1, 4, 128)
    assert [r["config"] for r in doc["rows"]] == ["trl-dpo", "align-dpo"]
    for r in doc["rows"]:
        assert "error" not in r, r
        assert set(columns) <= set(r), set(columns) - set(r)
        assert r["mode"] == "full" and r["timed_steps"] == 1 and r["threads"] == 1
        for k in columns[4:]:
            assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])
        assert len(r["step_seconds"]) == 2
    trl, align = doc["rows"]
    assert trl["vs_trl_dpo"] == 1.0 and align["vs_path_dpo"] == 1.0
    assert align["padded_tokens_per_step"] == trl["padded_tokens_per_step"]  # same data, same order, same padding
    # the children's logs and metrics stay in --workdir; drdpo align's checkpoint does not (disk)
    work = tmp_path / "work"
    assert (work / "align-dpo" / "log.txt").is_file() and (work / "align-dpo" / "align" / "metrics.csv").is_file()
    assert not list(work.rglob("checkpoints"))


def test_vs_trl_config_filter():
    mod = _module()
    assert mod.parse_args(["--configs", "align-*", "--steps", "3"]).configs == [
        "align-dpo", "align-kldpo", "align-wdpo", "align-dpo-lora", "align-kldpo-lora", "align-wdpo-lora",
        "align-wdpo-chunk2"]
    assert mod.parse_args(["--configs", "trl-wdpo,*-dpo-lora"]).configs == ["trl-wdpo", "trl-dpo-lora", "align-dpo-lora"]
    with pytest.raises(SystemExit):
        mod.parse_args(["--configs", "nope"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--steps", "2", "--warmup", "2"])


def test_vs_trl_rounds_pool_the_timed_steps():
    """--rounds: a configuration's rows merge into the median of all rounds' timed steps (warm-up
    steps dropped per round) and the median peak RSS; one failed round fails the configuration."""
    mod = _module()

    def run(secs, rss, tokens=100.0):
        return {"config": "align-dpo", "path": "drdpo align DPO", "mode": "full", "returncode": 0, "wall_s": 10.0,
                "process_peak_rss_mib": rss + 5, "timed_steps": len(secs) - 1, "s_per_step": sorted(secs[1:])[1],
                "s_per_1k_padded_tokens": 0.0, "padded_tokens_per_step": tokens, "peak_rss_mib": rss,
                "threads": 1, "step_seconds": secs}

    rounds = [run([9.0, 1.0, 2.0, 3.0], 3000.0), run([9.0, 4.0, 5.0, 6.0], 3040.0), run([9.0, 1.5, 2.5, 3.5], 3010.0)]
    row = mod.merge_rounds(rounds, warmup=1)
    assert row["rounds"] == 3 and row["timed_steps"] == 9
    assert row["s_per_step"] == 3.0  # median of 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6 (the 9.0 warm-ups dropped)
    assert row["s_per_step_rounds"] == [2.0, 5.0, 2.5]
    assert row["peak_rss_mib"] == 3010.0 and row["peak_rss_mib_rounds"] == [3000.0, 3040.0, 3010.0]
    assert row["s_per_1k_padded_tokens"] == pytest.approx(1000.0 * 28.5 / 900.0)
    assert mod.merge_rounds(rounds[:1], warmup=1) is rounds[0]
    failed = {**rounds[1], "error": "boom", "returncode": 1}
    assert "error" in mod.merge_rounds([rounds[0], failed], warmup=1)
    assert mod.parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        mod.parse_args(["--rounds", "0"])
