"""bench.py's own machinery: every row group runs, medians are positive, ratios are ours / peer, and
the JSON file is written whole. No timing is asserted: the figures themselves belong to the README."""
import json

import pytest

import bench


def test_measure_interleaves_rotates_and_takes_medians():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = bench.measure(calls, repeats=3, sync=lambda: None, warmup=1)
    assert order == list("abc" "bca" "cab" "abc")  # one warm-up round, then 3 timed; start rotates
    assert set(times) == set("abc") and all(t > 0 for t in times.values())


def test_row_ratio_is_ours_over_peer():
    assert bench.row("g", "c", 3.0, "peer", 4.0)["ratio"] == 0.75
    assert bench.row("g", "c", 3.0)["ratio"] is None  # no peer, no ratio


def test_quick_run_of_every_group(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--quick", "--repeats", "1", "--json", str(out)])
    assert {r["group"] for r in rows} == set(bench.GROUPS)
    for r in rows:
        assert r["ours"] > 0, r
        if r["theirs"] is None:  # the reference row of a group, or a peer library not installed
            assert r["ratio"] is None
        else:
            assert r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"]), r
    # the training rows reuse one median per contender: "lora vs full" and "full" agree
    train = {(r["case"], r["peer"]): r for r in rows if r["group"] == "train"}
    assert train[("quick lora step", "our full")]["theirs"] == train[("quick full step", None)]["ours"]
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "ours/peer" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["machine"] in printed
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left over


def test_unknown_group_is_refused():
    with pytest.raises(SystemExit, match="--only"):
        bench.main(["--only", "nf4,warp"])
