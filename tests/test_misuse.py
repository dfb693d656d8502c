"""The misuse suite: bad flags, bad API arguments, bad files. Each case must end in the project's one-line
error (MoeOffloadError, or argparse's usage error for a malformed flag), never a traceback, and leave no
partial file behind. CASES_CLI and CASES_API are counted in the issue note."""

import json
import shutil

import numpy as np
import pytest

from moe_offload import runtime
from moe_offload.cli import main
from moe_offload.errors import MoeOffloadError
from moe_offload.options import OffloadConfig

TEXT = str(runtime.bundled_heldout_text())


def _trace(tmp_path):
    out = tmp_path / "t.npz"
    assert main(["trace", "--text", TEXT, "--out", str(out), "--max-tokens", "64"]) == 0
    return out


CASES_CLI = {
    "cache-gb nan": ["generate", "--cache-gb", "nan"],
    "cache-gb inf": ["generate", "--cache-gb", "inf"],
    "cache-gb 0": ["generate", "--cache-gb", "0"],
    "cache-per-layer 0": ["generate", "--cache-per-layer", "0"],
    "cache-experts -1": ["generate", "--tuning", "cache_experts=-1"],
    "cache-per-layer 9 of 8": ["generate", "--cache-per-layer", "9"],
    "cache-per-layer below top-k": ["generate", "--cache-per-layer", "1"],
    "group-size with bf16 experts": ["generate", "--expert-dtype", "bf16", "--dtype", "bfloat16", "--tuning",
                                     "group_size=64"],
    "group-size 48": ["generate", "--expert-dtype", "int4", "--tuning", "group_size=48"],
    "tuning unknown key": ["generate", "--tuning", "polcy=lru"],
    "tuning bad value": ["generate", "--tuning", "lookahead=two"],
    "tuning no value": ["generate", "--tuning", "lookahead"],
    "tuning key twice": ["generate", "--cache-per-layer", "4", "--tuning", "cache_per_layer=4"],
    "tuning link chunk 0": ["generate", "--cache-per-layer", "4", "--tuning", "link_chunk_mb=0"],
    "unknown flag": ["generate", "--cache-per-layr", "4"],
    "seed 2**70": ["generate", "--seed", str(2**70)],
    "seed -1": ["generate", "--seed", "-1"],
    "temperature 1e-45": ["generate", "--temperature", "1e-45"],
    "temperature nan": ["generate", "--temperature", "nan"],
    "temperature -1": ["generate", "--temperature", "-1"],
    "top-p 0": ["generate", "--top-p", "0"],
    "top-p 1.5": ["generate", "--top-p", "1.5"],
    "max-new-tokens -1": ["generate", "--max-new-tokens", "-1"],
    "max-new-tokens abc": ["generate", "--max-new-tokens", "abc"],
    "max-seq-len 0": ["generate", "--tuning", "max_seq_len=0"],
    "max-seq-len too long": ["generate", "--tuning", "max_seq_len=100000"],
    "draft-tokens 0": ["generate", "--speculative", "--tuning", "draft_tokens=0"],
    "draft-tokens without speculative": ["generate", "--tuning", "draft_tokens=2"],
    "lookahead 0": ["generate", "--cache-per-layer", "2", "--tuning", "lookahead=0"],
    "lookahead 100": ["generate", "--cache-per-layer", "2", "--tuning", "lookahead=100"],
    "prefetch-window (retired)": ["generate", "--cache-per-layer", "2", "--tuning", "prefetch_window=2"],
    "prefetch-margin -1": ["generate", "--cache-per-layer", "2", "--tuning", "prefetch_margin=-1"],
    "two budgets": ["generate", "--cache-per-layer", "2", "--cache-gb", "1"],
    "missing model": ["generate", "--model", "/nonexistent/model"],
    "missing accelerator": ["generate", "--cache-per-layer", "2", "--accelerator", "/nonexistent.safetensors"],
    "bad device": ["generate", "--device", "tpu"],
    "trace out missing dir": None,  # built per test (tmp paths)
    "trace of an empty text": None,
    "trace out onto a fifo": None,
    "tuning file with a bad key": None,
    "cache setting with --no-offload": ["generate", "--no-offload", "--tuning", "policy=lfu"],
    "moved flag": ["generate", "--cache-experts", "12"],
    "tuning key twice": ["generate", "--tuning", "policy=lfu", "--tuning", "policy=lru"],
    "trace lookahead past next-gate": ["trace", "--text", TEXT, "--out", "t.npz", "--lookahead", "7"],
    "trace reads no speculative": ["trace", "--text", TEXT, "--out", "t.npz", "--tuning", "speculative=true"],
    "info reads no lookahead": ["info", "--tuning", "lookahead=3"],
    "train draft-exit past the layers": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors",
                                         "--draft-exit", "99"],
    "train lookahead past the layers": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors",
                                        "--lookahead", "1,9"],
    "serve max-batch past memory": ["serve", "--max-batch", "100000000", "--port", "0"],
    "prefetch setting with predictor none": ["generate", "--predictor", "none", "--tuning", "lookahead=2"],
    "adapters with next-gate": ["generate", "--predictor", "next-gate", "--accelerator",
                                str(runtime.bundled_accelerator_path())],
    "serve speculative": ["serve", "--tuning", "speculative=true", "--port", "0"],
    "speculative flag and tuning": ["generate", "--speculative", "--tuning", "speculative=false"],
    "link chunk below 1 KiB": ["generate", "--cache-per-layer", "4", "--tuning", "link_chunk_mb=0.0001"],
    "bench of an empty text": None,
    "simulate an empty trace": None,
    "bench an empty trace": None,
    "trace out is a dir": None,
    "trace missing text": ["trace", "--text", "/nonexistent.txt", "--out", "x.npz"],
    "bench capacities abc": ["bench", "cache", "--capacities", "abc", "--max-tokens", "32"],
    "bench capacities 0": ["bench", "cache", "--capacities", "0", "--max-tokens", "32"],
    "bench capacities 99": None,
    "bench max-tokens 0": ["bench", "cache", "--max-tokens", "0"],
    "bench unknown hardware": ["bench", "cache", "--hardware", "gtx480", "--max-tokens", "32"],
    "bench json onto a dir": None,
    "simulate max-tokens 0": None,
    "simulate truncated trace": None,
    "simulate missing trace": ["simulate", "--trace", "/nonexistent.npz", "--hardware", "t4-pcie3"],
    "simulate unknown model config": None,
    "train window 0": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--window", "0"],
    "train lr nan": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--lr", "nan"],
    "train lr 0": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--lr", "0"],
    "train heldout 1": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--heldout-fraction", "1"],
    "train lookaheads 0": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--lookaheads", "0,1"],
    "train out onto a dir": None,
    "train draft-only without file": None,
    "train draft-exit abc": ["train-accelerator", "--text", TEXT, "--out", "a.safetensors", "--draft-exit", "abc"],
    "info missing config": ["info", "--config", "/nonexistent.json"],
}


def _tmp_case(name, tmp_path):
    if name == "trace out missing dir":  # the folder is created (before work), so this one succeeds
        return None
    if name == "trace out onto a fifo":
        import os

        os.mkfifo(tmp_path / "fifo")
        return ["trace", "--text", TEXT, "--out", str(tmp_path / "fifo"), "--max-tokens", "8"]
    if name == "tuning file with a bad key":
        (tmp_path / "t.json").write_text('{"polcy": "lfu"}')
        return ["generate", "--tuning", str(tmp_path / "t.json")]
    if name in ("trace of an empty text", "bench of an empty text", "simulate an empty trace", "bench an empty trace"):
        empty = tmp_path / "empty.txt"
        empty.write_text("")
        if name == "trace of an empty text":
            return ["trace", "--text", str(empty), "--out", str(tmp_path / "e.npz")]
        if name == "bench of an empty text":
            return ["bench", "cache", "--text", str(empty), "--max-tokens", "8"]
        t = _trace(tmp_path)
        from moe_offload.analysis.trace import load_trace, save_trace, trace_prefix

        out = save_trace(tmp_path / "empty.npz", trace_prefix(load_trace(t), 0), {"note": "empty"})
        t.unlink()
        return (["simulate", "--trace", str(out), "--hardware", "t4-pcie3"] if name == "simulate an empty trace"
                else ["bench", "cache", "--trace", str(out)])
    if name == "trace out is a dir":
        return ["trace", "--text", TEXT, "--out", str(tmp_path), "--max-tokens", "16"]
    if name == "bench capacities 99":
        return ["bench", "cache", "--trace", str(_trace(tmp_path)), "--capacities", "99"]
    if name == "bench json onto a dir":
        return ["bench", "cache", "--json", str(tmp_path), "--max-tokens", "32"]
    if name == "simulate max-tokens 0":
        return ["simulate", "--trace", str(_trace(tmp_path)), "--hardware", "t4-pcie3", "--max-tokens", "0"]
    if name == "simulate truncated trace":
        t = _trace(tmp_path)
        cut = tmp_path / "cut.npz"
        cut.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
        return ["simulate", "--trace", str(cut), "--hardware", "t4-pcie3"]
    if name == "simulate unknown model config":
        return ["simulate", "--trace", str(_trace(tmp_path)), "--hardware", "t4-pcie3", "--model-config", "gpt5"]
    if name == "train out onto a dir":
        return ["train-accelerator", "--text", TEXT, "--out", str(tmp_path)]
    if name == "train draft-only without file":
        return ["train-accelerator", "--text", TEXT, "--out", str(tmp_path / "none.safetensors"),
                "--draft-exit", "1", "--draft-only"]
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(CASES_CLI))
def test_cli_misuse_ends_in_one_line_error(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = CASES_CLI[name] or _tmp_case(name, tmp_path)
    if argv is None:
        return
    before = set(p for p in tmp_path.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: one "error:" line naming the flag
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (name, rc, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err  # one line: no usage dump, no traceback
    left = set(p for p in tmp_path.rglob("*")) - before
    assert not [p for p in left if "partial" in p.name or p.suffix in (".npz", ".safetensors", ".json")], left


def test_trace_out_into_a_missing_folder_creates_it(tmp_path):
    out = tmp_path / "new" / "dir" / "t.npz"
    assert main(["trace", "--text", TEXT, "--out", str(out), "--max-tokens", "16"]) == 0
    assert out.is_file() and not list(out.parent.glob("*partial*"))


def test_train_out_checked_before_training(tmp_path, monkeypatch):
    import moe_offload.predict.train as train

    monkeypatch.setattr(train, "train_accelerator", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit):
        main(["train-accelerator", "--text", TEXT, "--out", str(tmp_path), "--window", "0"])
    assert main(["train-accelerator", "--text", TEXT, "--out", str(tmp_path)]) == 2


@pytest.fixture(scope="module")
def model():
    return runtime.load(device="cpu", offload=False)


CASES_API = {
    "load(123)": lambda m: runtime.load(123),
    "load(policy=[lru])": lambda m: runtime.load(device="cpu", cache_per_layer=2, config=OffloadConfig.make(policy=["lru"])),
    "load(offload='False')": lambda m: runtime.load(device="cpu", offload="False"),
    "load(max_seq_len=0)": lambda m: runtime.load(device="cpu", config=OffloadConfig.make(max_seq_len=0)),
    "load(max_seq_len=1.5)": lambda m: runtime.load(device="cpu", config=OffloadConfig.make(max_seq_len=1.5)),
    "load(cache_gb=nan)": lambda m: runtime.load(device="cpu", config=OffloadConfig.make(cache_gb=float("nan"))),
    "load(cache_per_layer=True)": lambda m: runtime.load(device="cpu", cache_per_layer=True),
    "load(speculative='yes')": lambda m: runtime.load(device="cpu", config=OffloadConfig.make(speculative="yes")),
    "load(unknown option)": lambda m: runtime.load(device="cpu", config=OffloadConfig.make(cache_size=3)),
    "load(config=dict)": lambda m: runtime.load(config={"device": "cpu"}),
    "load(OffloadConfig first)": lambda m: runtime.load(OffloadConfig()),
    "OffloadConfig(accelerator=123)": lambda m: OffloadConfig(accelerator=123),
    "OffloadConfig(cache_per_layer=9)": lambda m: runtime.load(device="cpu", cache_per_layer=9),
    "Tuning(policy=lru-lfu)": lambda m: OffloadConfig.make(policy="lru-lfu"),
    "load(dtype=int8)": lambda m: runtime.load(device="cpu", dtype="int8"),
    "load(expert_dtype=int3)": lambda m: runtime.load(device="cpu", expert_dtype="int3"),
    "generate(max_new_tokens=-1)": lambda m: m.generate("x", max_new_tokens=-1),
    "generate(max_new_tokens=2.0)": lambda m: m.generate("x", max_new_tokens=2.0),
    "generate(temperature=1e-45)": lambda m: m.generate("x", temperature=1e-45),
    "generate(temperature=inf)": lambda m: m.generate("x", temperature=float("inf")),
    "generate(top_p=0)": lambda m: m.generate("x", top_p=0),
    "generate(seed=2**70)": lambda m: m.generate("x", temperature=1.0, seed=2**70),
    "generate(seed='1')": lambda m: m.generate("x", temperature=1.0, seed="1"),
    "generate(prompt=[])": lambda m: m.generate([]),
    "generate(prompt=[-1])": lambda m: m.generate([-1]),
    "generate(prompt=[10**6])": lambda m: m.generate([10**6]),
    "generate(prompt=None)": lambda m: m.generate(None),
    "logits([[1, 2]])": lambda m: m.logits(np.array([[1, 2]])),
    "logits(too long)": lambda m: m.logits([1] * 100000),
}


@pytest.mark.parametrize("name", sorted(CASES_API))
def test_api_misuse_raises_the_project_error(name, model):
    with pytest.raises(MoeOffloadError):
        CASES_API[name](model)


def test_a_top_p_below_float32_range_samples_the_top_token(model):
    # 1e-300 is 0 in float32: the nucleus keeps the most likely token (greedy), never an empty distribution
    want = model.generate("In the", max_new_tokens=4).token_ids
    assert model.generate("In the", max_new_tokens=4, temperature=1.0, top_p=1e-300, seed=1).token_ids == want


def test_numpy_scalars_are_numbers(model):
    want = model.generate([1, 2, 3], max_new_tokens=3).token_ids
    got = model.generate(list(np.array([1, 2, 3], dtype=np.int64)), max_new_tokens=np.int64(3),
                         temperature=np.float32(0.0))
    assert got.token_ids == want
    r = model.generate("In the", max_new_tokens=3, temperature=np.float32(0.7), top_p=np.float64(0.9), seed=np.int64(5))
    assert len(r.token_ids) == 3


def test_accelerator_whose_metadata_disagrees_with_its_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moe_offload.predict.accelerator import META_KEY

    src = runtime.bundled_accelerator_path()
    with safe_open(str(src), "pt") as f:
        raw = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for field, value in (("rank", 999), ("lookaheads", [1, 2, 3, 4, 5]), ("hidden", "wide")):
        meta = json.loads(raw[META_KEY])
        meta[field] = value
        bad = tmp_path / f"acc_{field}.safetensors"
        save_file(tensors, str(bad), metadata={**raw, META_KEY: json.dumps(meta)})
        with pytest.raises(MoeOffloadError, match="disagrees|adapters are for"):
            runtime.load(device="cpu", cache_per_layer=2, config=OffloadConfig.make(accelerator=str(bad)))


def test_a_lookahead_past_the_adapters_range_is_refused_not_cut():
    import moe_offload

    with pytest.raises(MoeOffloadError, match=r"lookahead 5: the m2r2 adapters in .* were trained for lookaheads \[1, 2, 3\]"):
        moe_offload.load(device="cpu", cache_per_layer=4, predictor="m2r2", config=OffloadConfig.make(lookahead=5))
    m = moe_offload.load(device="cpu", cache_per_layer=4, predictor="m2r2", config=OffloadConfig.make(lookahead=3))  # within range: fine
    assert m.generate(m.encode("And God"), max_new_tokens=2).stats["predictor"] == "m2r2"
    # predictor auto picked the bundled adapters, the user did not: their range bounds the lookahead
    auto = moe_offload.load(device="cpu", cache_per_layer=4, config=OffloadConfig.make(lookahead=5))
    assert auto.generate(auto.encode("And God"), max_new_tokens=2).stats["lookahead"] == 3


def test_trace_and_bench_refuse_a_lookahead_past_the_adapters_range(tmp_path, capsys):
    acc = str(runtime.bundled_accelerator_path())  # lookaheads 1, 2, 3
    out = tmp_path / "t.npz"
    for argv in (["trace", "--text", TEXT, "--out", str(out), "--max-tokens", "16", "--accelerator", acc,
                  "--lookahead", "4"],
                 ["bench", "cache", "--max-tokens", "16", "--lookahead", "4", "--capacities", "2"]):
        assert main(argv) == 2
        assert "lookahead 4: the m2r2 adapters in" in capsys.readouterr().err
    assert not out.exists()
    # without m2r2 among the predictors, the adapters' range does not bound bench's lookahead
    assert main(["bench", "cache", "--max-tokens", "16", "--lookahead", "4", "--capacities", "2",
                 "--predictors", "none,next-gate"]) == 0
    # unasked, the trace records next-gate 3 ahead and m2r2 as far as the runtime would use it
    assert main(["trace", "--text", TEXT, "--out", str(out), "--max-tokens", "16", "--accelerator", acc]) == 0
    from moe_offload.analysis.trace import load_trace

    t = load_trace(out)
    assert t.meta["lookaheads"] == {"next-gate": 3, "m2r2": 3}
    assert t.preds["m2r2"].shape[2] == 3 and t.preds["next-gate"].shape[2] == 3


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_quantize_never_writes_into_its_source(tmp_path, capsys, where):
    import hashlib

    src = tmp_path / "m"
    shutil.copytree(runtime.bundled_model_path(), src)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    out = {"same": src, "inside": src / "q", "parent": tmp_path}[where]
    assert main(["quantize", "--model", str(src), "--out", str(out), "--expert-dtype", "int8", "--force"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the --model folder" in err, err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written beside it either


def test_errors_point_to_what_would_be_right(tmp_path, capsys):
    # a moved flag names its --tuning key; a JSON tuning file's error names the file; --tuning help
    # prints before a subcommand's required arguments are asked for
    with pytest.raises(SystemExit):
        main(["generate", "--cache-experts", "12"])
    assert "this setting is given as --tuning cache_experts=VALUE" in capsys.readouterr().err
    (tmp_path / "t.json").write_text('{"lookahead": "3"}')
    assert main(["generate", "--tuning", str(tmp_path / "t.json")]) == 2
    assert f"--tuning {tmp_path / 't.json'}: tuning.lookahead must be an integer" in capsys.readouterr().err
    assert main(["trace", "--tuning", "help"]) == 0
    assert "link_chunk_mb" in capsys.readouterr().out


def test_a_tuning_file_is_checked_with_the_flags_not_alone(tmp_path, capsys):
    (tmp_path / "t.json").write_text('{"draft_tokens": 2}')
    assert main(["generate", "--speculative", "--tuning", str(tmp_path / "t.json"), "--max-new-tokens", "2"]) == 0


def test_info_plans_for_any_runtime_setting(capsys):
    assert main(["info", "--expert-dtype", "int4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_plan"]["expert_bytes"] < 100_000  # int4, not float32


def test_a_cache_setting_turns_offloading_on_on_cpu_and_the_summary_says_which(capsys):
    assert main(["generate", "--max-new-tokens", "2", "--tuning", "policy=lfu"]) == 0
    assert "experts offloaded (set by tuning.policy)" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--port {port}: cannot listen there" in err, err


def test_option_counts_stay_small():
    # The product surface: generate lists at most 22 options; every subcommand together at most 111
    # option strings (-h/--help not counted; the 111th is --cpu-activations, exact against int8 activations on
    # the CPU, chosen by quant_ppl.json and cpu_vs_llamacpp.json); load() at most 10 keyword parameters and no
    # **kwargs.
    import argparse
    import inspect

    from moe_offload.cli import build_parser

    def parsers(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield sub
                    yield from parsers(sub)

    subs = {s.prog: s for s in parsers(build_parser())}
    listed = lambda p: [a for a in p._actions if a.option_strings and "--help" not in a.option_strings]  # noqa: E731
    assert len(listed(subs["moe-offload generate"])) <= 22
    strings = sum(len(a.option_strings) for s in subs.values() for a in listed(s))
    assert strings <= 111, strings
    params = inspect.signature(runtime.load).parameters.values()
    assert len(params) <= 10 and all(p.kind != p.VAR_KEYWORD for p in params)
