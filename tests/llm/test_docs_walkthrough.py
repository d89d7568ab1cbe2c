"""docs/llm_training.md "From data to aligned model": its bash block runs as written, and only writes runs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.llm

DOC = Path(__file__).resolve().parents[2] / "docs" / "llm_training.md"


def _section_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## From data to aligned model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the walkthrough is one bash block"
    return blocks[0]


def test_walkthrough_runs_as_written(tmp_path):
    bindir = str(Path(sys.executable).parent)  # the venv's drdpo and python
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _section_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing outside runs/
    runs = tmp_path / "runs"
    assert (runs / "kl" / "final" / "model.safetensors").is_file()
    assert (runs / "wd" / "final" / "adapter_config.json").is_file()
    assert (runs / "wd" / "final-merged" / "model.safetensors").is_file()
    assert (runs / "wd-step4-merged" / "config.json").is_file()
    assert len((runs / "completions.jsonl").read_text().splitlines()) == 2
    assert "LlamaForCausalLM 261" in proc.stdout and "PeftModelForCausalLM" in proc.stdout
