"""bench/admission.py's core at small lengths: both ways find the judge's cached prefix (the base request's
prompt and answer, whole blocks), and with donors the judge hashes only what it does not share (no timing
is checked)."""

import json

from bench.admission import admit_judge, main


def test_both_ways_find_the_base_blocks(monkeypatch):
    from jalora.engine import block_hasher

    given = []
    give = block_hasher.HashDonors.give
    monkeypatch.setattr(block_hasher.HashDonors, "give", lambda self, *a: given.append(give(self, *a)) or given[-1])
    row = admit_judge(200, 40, repeats=2, others=2)
    assert row["reused_tokens"] == 240 and row["judge_blocks"] == 15
    # With donors: the base request takes nothing (the pool is new), the two others the system prompt's 4
    # blocks, the judge its 15 base-keyed blocks; hashing all, every pool is empty. The ways alternate.
    donors, hash_all = [0, 4, 4, 15], [0, 0, 0, 0]
    assert given == donors + hash_all + hash_all + donors


def test_main_writes_a_row_per_length(tmp_path):
    out = tmp_path / "admission.json"
    main(["--lengths", "80", "300", "--answer", "20", "--repeats", "1", "--others", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["length"] for row in r["rows"]] == [80, 300]
    assert [row["reused_tokens"] for row in r["rows"]] == [96, 320]
    assert r["commit"] and r["device"]
