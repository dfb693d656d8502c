"""Every bad input raises MoeOffloadError naming the thing at fault; the CLI prints one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload
from moe_offload import CheckpointError, ConfigError, ModelConfig, MoeOffloadError
from helpers import CFG, write_model
from moe_offload.options import OffloadConfig

# The published Mixtral configs, shipped with the package for the simulator.
FIXTURES = Path(__file__).resolve().parents[1] / "moe_offload" / "assets"
def test_fixture_configs_parse_in_both_spellings():
    c7 = ModelConfig.from_file(FIXTURES / "mixtral-8x7b-v0.1.config.json")
    assert (c7.hidden_size, c7.num_hidden_layers, c7.num_local_experts, c7.head_dim) == (4096, 32, 8, 128)
    assert c7.rope_theta == 1e6 and c7.torch_dtype == "bfloat16"
    assert 46.6e9 < c7.total_params < 46.8e9  # Mixtral-8x7B's published 46.7B
    c22 = ModelConfig.from_file(FIXTURES / "mixtral-8x22b-v0.1.config.json")
    assert c22.num_hidden_layers == 56 and 140e9 < c22.total_params < 142e9
    raw = json.loads((FIXTURES / "mixtral-8x7b-v0.1.config.json").read_text())
    theta = raw.pop("rope_theta")
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    raw["dtype"] = raw.pop("torch_dtype")
    raw["head_dim"] = None
    assert ModelConfig.from_dict(raw) == c7


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"hidden_size": None}, "missing required key(s): hidden_size"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds num_local_experts (4)"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_bad_config_is_named(tmp_path, change, needle):
    write_model(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        moe_offload.load(tmp_path, device="cpu")
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(MoeOffloadError, match="does not exist"):
        moe_offload.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json: file not found"):
        moe_offload.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        moe_offload.load(tmp_path)


def test_all_tensor_problems_reported_at_once(tmp_path):
    write_model(tmp_path)
    f = tmp_path / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 16)
    t["model.layers.0.extra.weight"] = torch.zeros(3)
    t["model.norm.weight"] = torch.zeros(16, dtype=torch.int32)
    save_file(t, f)
    with pytest.raises(CheckpointError) as e:
        moe_offload.load(tmp_path, device="cpu")
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "missing tensor model.layers.1.block_sparse_moe.experts.3.w2.weight (expected shape [16, 24])" in msg
    assert "model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has shape [5, 16], expected [16, 16]" in msg
    assert "unexpected tensor model.layers.0.extra.weight" in msg
    assert "model.norm.weight has dtype I32" in msg


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    write_model(tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shards[1].name}: truncated"):
        moe_offload.load(tmp_path, device="cpu")
    shards[1].write_bytes(data)
    shards[2].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage")
    with pytest.raises(CheckpointError, match=f"{shards[2].name}: corrupt safetensors header"):
        moe_offload.load(tmp_path, device="cpu")
    shards[2].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[2].name} listed in model.safetensors.index.json "
                                              "does not exist"):
        moe_offload.load(tmp_path, device="cpu")


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single = moe_offload.load(write_model(tmp_path / "a"), device="cpu")
    sharded = moe_offload.load(write_model(tmp_path / "b", max_shard_bytes=10_000), device="cpu")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 3
    ids = [1, 2, 3, 4, 5]
    assert torch.equal(single.logits(ids), sharded.logits(ids))


def test_bad_runtime_arguments(tmp_path):
    write_model(tmp_path)
    with pytest.raises(MoeOffloadError, match=r"dtype must be one of \['auto', 'float32', 'float16', 'bfloat16'\], got 'float64'"):
        moe_offload.load(tmp_path, device="cpu", dtype="float64")
    with pytest.raises(MoeOffloadError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        moe_offload.load(tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MoeOffloadError, match="CUDA is not available"):
            moe_offload.load(tmp_path, device="cuda")
    with pytest.raises(MoeOffloadError, match=r"unknown setting 'cache_size'; did you mean 'cache_gb'\?"):
        moe_offload.load(tmp_path, device="cpu", config=OffloadConfig.make(cache_size=3))
    with pytest.raises(MoeOffloadError, match=r"tuning.max_seq_len must be in \[1, \d+\] for this model \(its max_position_embeddings\), got 64"):
        moe_offload.load(tmp_path, device="cpu", config=OffloadConfig.make(max_seq_len=64))


def test_bad_prompts_and_sampling_settings(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu", config=OffloadConfig.make(max_seq_len=16))
    with pytest.raises(MoeOffloadError, match="prompt has 17 tokens but the context holds 16"):
        m.generate(list(range(1, 18)))
    with pytest.raises(MoeOffloadError, match="token id 50 at position 2 is out of range"):
        m.generate([1, 2, 50])
    with pytest.raises(MoeOffloadError, match="token id -1 at position 0"):
        m.logits([-1])
    with pytest.raises(MoeOffloadError, match="no tokenizer.json"):
        m.generate("hello")
    with pytest.raises(MoeOffloadError, match="non-empty"):
        m.generate([])
    for kw, needle in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                       ({"max_new_tokens": -2}, "max_new_tokens"), ({"seed": "x"}, "seed")]:
        with pytest.raises(MoeOffloadError, match=needle):
            m.generate([1, 2], **kw)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "moe_offload.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    write_model(tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    for name in list(t)[:30]:
        del t[name]
    save_file(t, tmp_path / "model.safetensors")
    cases = [
        (["generate", "--model", str(tmp_path / "missing")], "model folder does not exist"),
        (["generate", "--model", str(tmp_path)], "30 problem(s)"),
        (["info", "--model", str(tmp_path)], "... and 10 more"),
        (["generate", "--model", str(tmp_path), "--device", "tpu"], "got 'tpu'"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moe-offload: error: ") and needle in lines[0], r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_generate_json_and_info(tmp_path):
    write_model(tmp_path)
    r = run_cli("generate", "--model", str(tmp_path), "--prompt", "", "--json", "--max-new-tokens", "3")
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr  # text prompt without a tokenizer
    r = run_cli("info", "--model", str(tmp_path), "--json")
    info = json.loads(r.stdout)
    assert info["params"]["experts"] == 2 * 4 * 3 * 16 * 24
    assert info["one_expert_bytes"]["bfloat16"] == 2 * 3 * 16 * 24
    assert info["params"]["total"] == sum(t.numel() for t in load_file(tmp_path / "model.safetensors").values())
