"""bench.py's own machinery: every row group runs, medians are positive, ratios are ours / peer,
each goal of TARGETS lands on the rows it names, every flag is checked when parsed, the JSON file
and the plot are written whole, and tests/gpu_check.sh refuses a machine without CUDA. No timing
is asserted: the figures belong to docs/benchmarks.md."""
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def keep_threads():
    """bench.py --threads sets torch's thread count for the whole process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_measure_interleaves_rotates_and_takes_medians():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = bench.measure(calls, repeats=3, sync=lambda: None, warmup=1)
    assert order == list("abc" "bca" "cab" "abc")  # one warm-up round, then 3 timed; start rotates
    assert set(times) == set("abc") and all(t > 0 for t in times.values())


def test_row_ratio_is_ours_over_peer():
    assert bench.row("g", "c", 3.0, "peer", 4.0)["ratio"] == 0.75
    assert bench.row("g", "c", 3.0)["ratio"] is None  # no peer, no ratio


@pytest.mark.parametrize("ours, met", [(1.30, True), (1.304, True), (1.306, False), (0.5, True),
                                       (1.4, False)])
def test_row_shows_its_goal_and_judges_the_ratio_as_printed(ours, met):
    r = bench.row("nf4", "dequantize float32 4096x4096", ours, "copy, new tensor", 1.0)
    assert r["target"] == "<= 1.3" and r["met"] is met  # 1.304 prints 1.30: met; 1.306: 1.31
    assert r["goal"] == ("issue 16: NF4 dequantize float32 / copy into a new tensor (4096x4096) "
                         "<= 1.3")
    cells = {header: cell(r) for header, cell, _ in bench.COLUMNS}
    assert (cells["target"], cells["met"]) == ("<= 1.3", "yes" if met else "no")


def test_strict_goals_and_rows_without_goals():
    faster = "round 1: LoRA faster than full fine-tuning (at 25M; the sweep shows from where) < 1.0"
    # "<" is strict: a ratio of 1.00 misses it
    assert bench.row("train", "25M lora step", 1.0, "our full", 1.0)["met"] is False
    assert bench.row("train", "25M lora step", 0.99, "our full", 1.0)["goal"] == faster
    assert bench.row("train", "tiny lora step", 0.9, "our full", 1.0)["target"] is None  # no goal
    assert bench.row("train", "quick vera step", 0.9, "peft vera", 1.0)["target"] is None
    no_peer = bench.row("nf4", "quantize float32 4096x4096", 1.0, "bitsandbytes", None)
    assert no_peer["target"] == "<= 0.5" and no_peer["met"] is None  # no bitsandbytes: no verdict


def test_every_goal_lands_on_rows_of_a_full_run(monkeypatch):
    """Each TARGETS entry names rows that a full run prints: the case names come from the row
    groups themselves, run on the tiny sizes' names with small models and one call per contender
    (the NF4 matrix is small too, its rows then renamed to the full side)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")

    def once(calls, *args, **kwargs):  # each call once (the optimizers then hold state): 1 ms
        for call in calls.values():
            call()
        return dict.fromkeys(calls, 1.0)
    monkeypatch.setattr(bench, "measure", once)
    ctx = SimpleNamespace(device=torch.device("cpu"), sync=lambda: None, repeats=1, vocab=50,
                          sizes={name: bench.QUICK for name in bench.SIZES}, nf4_side=64)
    full_side = f"{bench.NF4_SIDE}x{bench.NF4_SIDE}"
    rows = [bench.row(r["group"], r["case"].replace("64x64", full_side), r["ours"], r["peer"],
                      r["theirs"]) for r in bench.bench_nf4(ctx)]
    rows += [r for group in ("train", "infer", "paged") for r in bench.BENCHES[group](ctx)]
    assert {r["goal"] for r in rows} - {None} == set(bench.TARGETS)
    for r in (r for r in rows if r["goal"]):  # every ratio is 1.0
        relation, bound = r["target"].split()
        assert r["met"] is (relation == "<=" and float(bound) >= 1.0), r


def test_quick_run_of_every_group(tmp_path, capsys, monkeypatch, keep_threads):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(bench, "optional", lambda name: None if name == "matplotlib" else
                        bench.importlib.import_module(name))
    rows = bench.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out),
                       "--plot", str(tmp_path / "sweep.png")])
    assert {r["group"] for r in rows} == set(bench.GROUPS)
    for r in rows:
        assert r["ours"] > 0, r
        assert r["target"] is None and r["met"] is None  # goals are set for the full sizes
        if r["theirs"] is None:  # the reference row of a group, or a peer library not installed
            assert r["ratio"] is None
        else:
            assert r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"]), r
    # the training rows reuse one median per contender: "lora vs full" and "full" agree
    train = {(r["case"], r["peer"]): r for r in rows if r["group"] == "train"}
    full = train[("quick full step", None)]["ours"]
    assert train[("quick lora step", "our full")]["theirs"] == full
    sweep = [r for r in rows if r["group"] == "sweep"]
    assert [r["width"] for r in sweep] == [cfg.n_embd for cfg in bench.QUICK_SWEEP]
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "1-minute load average" in printed
    assert "ours/peer" in printed and "targets met: 0 of 0" in printed
    assert "sweep plot: not drawn, matplotlib is not installed (pip install matplotlib)" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["machine"] in printed
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no plot, no temporary file


def sweep_rows():
    note = "2 layers, 0.10M params, 8x64 tokens"
    return [bench.row("sweep", f"width {w} lora step", t, "our full", 10.0, note=note, width=w)
            for w, t in ((64, 12.0), (128, 10.5), (256, 8.0))]


def test_sweep_plot_is_a_png_written_whole(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    assert bench.plot_sweep(sweep_rows(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temporary file left over


def test_sweep_plot_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "optional", lambda name: None)
    assert bench.plot_sweep(sweep_rows(), str(tmp_path / "sweep.png")) is False
    assert list(tmp_path.iterdir()) == []


BAD_FLAGS = [  # argv, what the one line of the error must say
    (["--repeats", "0"], "argument --repeats: must be an int >= 1, got 0"),
    (["--repeats", "many"], "argument --repeats: must be an int >= 1, got 'many'"),
    (["--threads", "0"], "argument --threads: must be an int >= 1, got 0"),
    (["--threads", "-2"], "argument --threads: must be an int >= 1, got -2"),
    (["--only", "bogus"], "argument --only: must be one of 'nf4', 'train'"),
    (["--only", "nf4,warp"], "got 'warp'"),
    (["--only", ""], "argument --only: must be one of"),
    (["--device", "tpu"], "argument --device: must be one of 'auto', 'cpu', 'cuda'; got 'tpu'"),
    (["--json", "no-such-folder/out.json"], "argument --json: must name a file in an existing"),
    (["--json", "."], "argument --json: must name a file in an existing folder, got '.'"),
    (["--plot", "no-such-folder/sweep.png"], "argument --plot: must name a file in an existing"),
    (["--plot", ""], "argument --plot: must name a file in an existing folder, got ''"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_each_flag_is_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)  # parsing comes first: a bad flag costs no measurement
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("bench.py: ") and message in error, error
    assert error.count("\n") == 1 and "Traceback" not in error  # one line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_is_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.build_parser().parse_args(["--device", "cuda"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("bench.py: argument --device: cuda: torch finds no CUDA "
                                       "device here (use auto or cpu)\n")


def test_good_flags_parse():
    args = bench.build_parser().parse_args(["--only", "sweep, nf4,sweep", "--repeats", "3",
                                            "--device", "cpu", "--json", "out.json"])
    assert args.only == ("sweep", "nf4") and args.repeats == 3 and args.json == "out.json"
    assert bench.build_parser().parse_args([]).only == bench.GROUPS


def test_gpu_check_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    script = os.path.join(REPO, "tests", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run the script itself")
    out = tmp_path / "figures.md"
    done = subprocess.run(["bash", script, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu_check.sh: no CUDA device") and done.stderr.count("\n") == 1
    assert not out.exists()
