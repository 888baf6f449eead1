"""bench/micro/device_memory.py: a process past its RSS cap is killed and reported as "> cap" (a lower
bound, and ratios against it upper bounds), never as a failure; rows are really `seq` tokens long."""

import sys

from mobillm.bench.micro import device_memory as dm
from mobillm.bench.paths import TOKENIZER

HOG = "import time; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"


def test_a_process_past_its_cap_is_killed():
    rc, _, _, seen = dm.run_capped([sys.executable, "-c", HOG], cap_mb=150)
    assert rc == -9 and seen > 150


def test_a_process_under_its_cap_runs_to_the_end():
    rc, out, _, seen = dm.run_capped([sys.executable, "-c", "print('done')"], cap_mb=2000)
    assert rc == 0 and out.strip() == "done" and seen < 2000


def test_killed_reference_reads_as_bounds():
    results = [{"model": "opt-1.3b", "ort[int4]": {"peak_rss_mb": 1600.0, "seconds": 9.0, "s_per_batch": 4.0},
                "lora": {"over_cap_mb": 8000}}]
    ort_row, lora_row = dm.table_rows(results)
    assert "| 1600 | 1.00 | < 0.20 | 4.0 |" in ort_row
    assert "> 8000" in lora_row


def test_rows_reach_the_requested_length(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    opt = TOKENIZER
    dm.long_rows(tmp_path / "rows.tsv", 3, seq=256)
    lines = (tmp_path / "rows.tsv").read_text().splitlines()[1:]
    assert len(lines) == 3
    if (opt / "vocab.json").is_file():
        tok = ByteLevelBPETokenizer(str(opt / "vocab.json"), str(opt / "merges.txt"))
        assert all(len(tok.encode(ln.split("\t")[0]).ids) >= 256 for ln in lines)
    else:
        assert all(len(ln.split("\t")[0].split()) >= 256 for ln in lines)
