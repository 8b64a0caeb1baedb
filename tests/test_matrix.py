"""The benchmark matrix runs end to end (a small slice of it: every tuning method, plain PyTorch and tiertune
on NVMe), writes its JSON, table and plot, and its systems train the same job (the same losses: tiertune
is bit for bit PyTorch here). It checks what the matrix measures, never how fast anything is."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_matrix_trains_one_job_per_row_on_every_system_and_reports_it(tmp_path):
    methods = ["full", "lora", "luc_lora", "s2a"]
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "matrix.py"),
            "--sizes",
            "tiny-llama",
            "--methods",
            ",".join(methods),
            "--systems",
            "pytorch,tiertune-host,tiertune-nvme",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--seq-len",
            "64",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "matrix.json").read_text())
    cells = {(c["method"], c["system"]): c for c in result["cells"]}
    assert set(cells) == {(m, s) for m in methods for s in ("pytorch", "tiertune-host", "tiertune-nvme")}
    for method in methods:
        ref, nvme = cells[method, "pytorch"], cells[method, "tiertune-nvme"]
        assert ref["status"] == nvme["status"] == "ok", (ref["reason"], nvme["reason"])
        assert len(ref["step_s"]) == len(nvme["step_s"]) == 3 and ref["tokens_per_step"] == 4 * 64
        assert nvme["losses"] == pytest.approx(ref["losses"], rel=1e-6), method  # the same job
        # The NVMe state really moved: the weights read every step, the optimizer state written.
        assert min(nvme["nvme_read_bytes"][1:]) > 0 and min(nvme["nvme_write_bytes"][1:]) > 0
        assert ref["peak_rss_bytes"] > 0 and nvme["peak_rss_bytes"] > 0
        host = cells[method, "tiertune-host"]  # without an accelerator: the plan of tiertune-ram, not rerun
        assert host["status"] == "skipped" and "host memory" in host["reason"]
    table = (tmp_path / "matrix.md").read_text()
    assert "CPU cores" in table and "python benchmarks/matrix.py" in table
    rows = [line for line in table.splitlines() if line.startswith("| tiny-llama |")]
    assert len(rows) == 3 * len(methods)
    assert (tmp_path / "matrix.png").stat().st_size > 10_000


def test_a_cell_reports_the_median_and_spread_of_its_timed_steps_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from matrix import Cell

    cell = Cell("tiny-llama", "full", "pytorch", steps=6, warmup=2, micro_batch=4, seq_len=64, nvme_dir="")
    cell.step_s = [9.0, 7.0, 1.0, 2.0, 3.0, 4.0]  # the two warm-up steps are left out
    assert cell.median_step_s == 2.5
    assert cell.step_quartiles == (1.75, 3.25)
    assert cell.step_spread == pytest.approx(0.6)  # (3.25 - 1.75) / 2.5
    cell.step_s = [9.0, 7.0, 1.0]
    assert cell.step_spread is None and cell.step_quartiles == (1.0, 1.0)
