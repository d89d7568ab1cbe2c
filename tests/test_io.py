"""drdpo_theory.io: atomic writes, verified cache cells, output-path checks."""

import os

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from drdpo_theory import io as dio


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    path = tmp_path / "t.csv"
    dio.write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with dio.atomic_write(path) as fh:
            fh.write("half of the new con")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "old\n"  # the old file, untouched
    assert _no_temp_files(tmp_path)
    dio.write_json(path.with_suffix(".json"), {"a": 1})
    assert dio.read_json(path.with_suffix(".json")) == {"a": 1}
    (tmp_path / "torn.json").write_text('{"a": ')
    assert dio.read_json(tmp_path / "torn.json") is None
    assert dio.read_json(tmp_path / "missing.json") is None


def test_csv_parquet_and_figure_round_trip(tmp_path):
    df = pd.DataFrame({"n": [1, 2, 3], "error": [0.5, 0.25, 0.125]})
    dio.write_csv(df, tmp_path / "a" / "t.csv")  # the folder is created
    assert_frame_equal(pd.read_csv(tmp_path / "a" / "t.csv"), df)
    dio.write_parquet(df, tmp_path / "t.parquet")
    assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), df)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    dio.save_figure(fig, tmp_path / "f.png", dpi=50)
    dio.save_figure(fig, tmp_path / "f.pdf")
    first_pdf = (tmp_path / "f.pdf").read_bytes()
    dio.save_figure(fig, tmp_path / "f.pdf")
    plt.close(fig)
    assert (tmp_path / "f.pdf").read_bytes() == first_pdf  # same figure, same bytes
    assert b"CreationDate" not in first_pdf  # (matplotlib stamps the time unless told not to)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert _no_temp_files(tmp_path)


def test_cell_is_trusted_only_when_complete(tmp_path):
    df = pd.DataFrame({"seed": range(10), "method": ["dpo"] * 10, "reward": [0.1 * i for i in range(10)]})
    path = tmp_path / "cells" / "c.csv"
    dio.write_cell(df, path)
    assert_frame_equal(dio.read_cell(path, columns=("seed", "reward")), df)
    assert dio.read_cell(path, columns=("alpha",)) is None  # a cell of another table
    full = path.read_text().splitlines(keepends=True)
    path.write_text("".join(full[:7]))  # torn: 6 of 10 rows (as after a SIGKILL of a plain to_csv)
    assert dio.read_cell(path) is None
    path.write_text("")  # empty
    assert dio.read_cell(path) is None
    path.write_text("".join(full))  # complete again, but the marker is gone: not trusted
    os.remove(tmp_path / "cells" / "c.csv.done")
    assert dio.read_cell(path) is None
    assert dio.read_cell(tmp_path / "missing.csv") is None
    dio.write_cell(df.iloc[:0], path)  # a cell with no row is never a finished cell
    assert dio.read_cell(path) is None


def test_output_dir_checks(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(dio.OutputPathError, match=r"--out .*afile is a file; expected a folder"):
        dio.check_output_dir(f, "--out")
    with pytest.raises(dio.OutputPathError, match="is a file, so no folder can be made under it"):
        dio.check_output_dir(f / "sub" / "deeper", "--figures")
    with pytest.raises(dio.OutputPathError, match="not writable"):
        dio.check_output_dir("/proc/drdpo-out", "--out")  # /proc refuses new files, even to root
    new = tmp_path / "new" / "folder"
    assert dio.check_output_dir(new, "--out") == new
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert _no_temp_files(tmp_path)
    with pytest.raises(dio.OutputPathError, match="is a folder; expected a file path"):
        dio.check_output_file(tmp_path, "--figure")
    with pytest.raises(dio.OutputPathError, match="afile is a file, so no file can be made under it"):
        dio.check_output_file(f / "x.png", "--figure")
    assert dio.check_output_file(tmp_path / "x" / "fig.png", "--figure").name == "fig.png"


def test_one_study_per_folder(tmp_path):
    dio.claim_output_dir(tmp_path / "o", "shift")
    dio.claim_output_dir(tmp_path / "o", "shift")  # the same study again: fine
    with pytest.raises(dio.OutputPathError, match="holds results of the 'shift' study, not 'gradients'"):
        dio.claim_output_dir(tmp_path / "o", "gradients")


def test_sigkill_during_writes_never_leaves_a_torn_file(tmp_path):
    """A process killed (SIGKILL) while rewriting a 1.4 MB table leaves the last complete version."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "table.csv"
    code = ("import sys\nfrom drdpo_theory.io import write_text\ni = 0\nwhile True:\n"
            "    write_text(sys.argv[1], f'{i}\\n' * 200000 + 'END\\n')\n    i += 1\n    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete write is on disk
        time.sleep(0.3)  # now it is somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = path.read_text().splitlines()
    assert lines[-1] == "END" and len(lines) == 200001 and len(set(lines[:-1])) == 1

