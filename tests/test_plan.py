"""`llmbuild plan`: figures checked against values computed by hand (in the comments)
for SmolLM2-135M (the shipped recipe) and a Llama-3-8B-shaped config.json written here.
Config-only inputs: no weights exist, nothing heavy is imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmbuild.cli import cli
from llmbuild.plan import RUNTIME_RESERVE, GiB, format_plan, plan_recipe

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}


def config_only(dst: Path, config: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    config_only(root / "llama3-8b", LLAMA3_8B)
    recipe = root / "llama3.yaml"
    recipe.write_text(
        "name: llama3-8b\nmodel: {source: llama3-8b}\nprecision: bfloat16\n"
        "limits: {max_batch_size: 8, max_input_len: 1024, max_seq_len: 8192, max_num_tokens: 2048}\n"
        "engines: [{backend: tensorrt-rtx, weight_streaming: true}]\n"
    )
    return recipe


def gpu(plan: dict, name: str) -> dict:
    return next(g for g in plan["gpus"] if g["name"] == name)


def test_smollm2_figures(smollm2_path):
    [p] = plan_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml")
    # embed 49152*576 = 28,311,552 (tied); per layer q 576*576 + k,v 2*576*192 + o 576*576
    # + mlp 3*576*1536 + norms 2*576 = 3,540,096; x30 = 106,202,880; + final norm 576
    assert p["parameters"] == 134_515_008
    assert p["weight_bytes"] == p["weight_bytes_per_rank"] == 269_030_016  # fp16
    # 2 (K,V) * 30 layers * 3 kv heads * 64 * 2 bytes; the cache holds 4 x 2048 tokens
    assert p["kv_cache"]["bytes_per_token"] == 23_040
    assert p["kv_cache"]["bytes_at_limits"] == 188_743_680
    # prefill 4 x 512 = 2048 tokens: 2 * 2048 * (3*576 + 15*64 + 3*1536) = 29,884,416
    # + 2048 logit rows * 49152 * (2 + 4) = 603,979,776
    assert p["activations"]["bytes"] == 633_864_192
    assert p["activations"]["profiles"]["prefill"] == {"batch": 4, "tokens_per_sequence": 512, "tokens": 2048,
                                                       "logit_rows": 2048}
    assert p["gpu_memory_per_rank_bytes"] == 269_030_016 + 188_743_680 + 633_864_192 + RUNTIME_RESERVE
    assert p["engines"] == {"count": 1, "files": ["tensorrt-rtx-portable-rank0.engine"]}
    rtx3060 = gpu(p, "GeForce RTX 3060")
    # free for the cache: 12 GiB - 1 GiB - weights - activations = 10,908,265,856 bytes
    assert rtx3060["fits"] is True and rtx3060["engine"] == "tensorrt-rtx (portable)"
    assert rtx3060["max_batch_at_max_seq_len"] == 231  # / (23,040 * 2048)
    assert rtx3060["max_seq_len_at_max_batch"] == 8192  # 118,361 capped at max_position_embeddings
    assert rtx3060["max_cache_tokens"] == 473_449  # 10,908,265,856 // 23,040
    assert gpu(p, "H100 80GB")["engine"] is None  # TensorRT-RTX does not target sm90


def test_smollm2_int4_with_its_tied_lm_head_in_int8(smollm2_path):
    [p] = plan_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml", [
        "quantization={weights: {scheme: int4, group_size: 128}, overrides: [{match: lm_head, scheme: int8}]}"])
    # embeddings + norms fp16: 2 * (28,311,552 + 61 * 576) = 56,693,376
    # per layer, int4 g128 codes padded to whole blocks + fp16 scales [blocks, out]:
    #   576 rows -> 640 (5 blocks): q, o (576 out), k, v (192 out), gate, up (1536 out)
    #   q,o: 2 * (640*576/2 + 5*576*2) = 380,160; k,v: 2 * (640*192/2 + 5*192*2) = 126,720
    #   gate,up: 2 * (640*1536/2 + 5*1536*2) = 1,013,760; down 1536 rows (12 blocks): 1536*576/2 + 12*576*2 = 456,192
    #   = 1,976,832; x30 = 59,304,960
    # lm_head int8 per channel, its own copy of E^T: 576*49152 + 2*49152 = 28,409,856
    assert p["weight_bytes"] == 56_693_376 + 59_304_960 + 28_409_856


def test_quantization_key_overrides_on_a_recipe_without_the_section(smollm2_path):
    """`quantization.weights.scheme=int4` on the default recipe (no `quantization:` section)
    creates the section, as `quantization={...}` does; it was refused as "not a mapping"."""
    recipe = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
    [dotted] = plan_recipe(recipe, ["quantization.weights.scheme=int4", "quantization.weights.group_size=32"])
    [whole] = plan_recipe(recipe, ["quantization={weights: {scheme: int4, group_size: 32}}"])
    assert dotted["quantization"] == whole["quantization"] == "int4 g32"
    assert dotted["linear_bits_per_weight"] == 4.5  # every linear int4 g32 with fp16 scales (Q4_0's 4.5)
    [asym] = plan_recipe(recipe, ["quantization.weights.scheme=int4", "quantization.weights.group_size=32",
                                  "quantization.weights.symmetric=false"])
    [int8] = plan_recipe(recipe, ["quantization.weights.scheme=int8", "quantization.weights.group_size=32"])
    assert (asym["quantization"], asym["linear_bits_per_weight"]) == ("int4 g32 asym", 5.0)  # Q4_1's 5.0
    assert (int8["quantization"], int8["linear_bits_per_weight"]) == ("int8 g32", 8.5)  # Q8_0's 8.5
    assert "linears 4.50 bits/weight" in format_plan(dotted)
    assert dotted["weight_bytes"] == whole["weight_bytes"] < 269_030_016 / 2
    result = CliRunner().invoke(cli, ["validate", str(recipe), "quantization.weights.scheme=int8"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(cli, ["validate", str(recipe), "quantization.weights.shceme=int8"])
    assert bad.exit_code != 0 and "did you mean 'scheme'" in bad.output and "Traceback" not in bad.output


def test_llama3_8b_figures(llama3):
    [p] = plan_recipe(llama3)
    # 2 * 128256*4096 (untied) + 32 * (2*4096*4096 + 2*4096*1024 + 3*4096*14336 + 2*4096) + 4096
    assert p["parameters"] == 8_030_261_248
    assert p["weight_bytes_per_rank"] == 16_060_522_496  # bf16
    assert p["kv_cache"]["bytes_per_token"] == 131_072  # 2 * 32 * 8 * 128 * 2
    assert p["kv_cache"]["bytes_at_limits"] == 8_589_934_592  # x 8 x 8192
    # max_num_tokens 2048 / max_input_len 1024: prefill 2 sequences per pass
    # 2 * 2048 * (3*4096 + 48*128 + 3*14336) = 251,658,240 + 2048 * 128256 * 6 = 1,576,009,728
    assert p["activations"]["profiles"]["prefill"]["batch"] == 2
    assert p["activations"]["bytes"] == 1_827_667_968
    assert p["gpu_memory_per_rank_bytes"] == 27_551_866_880
    rtx4090, rtx5090 = gpu(p, "GeForce RTX 4090"), gpu(p, "GeForce RTX 5090")
    assert (rtx4090["fits"], rtx5090["fits"]) == (False, True)
    # 24 GiB - 1 GiB - weights - activations = 6,807,871,488 bytes for the cache
    assert rtx4090["max_batch_at_max_seq_len"] == 6 and rtx4090["max_seq_len_at_max_batch"] == 6492
    # weight streaming: 24 GiB - 1 GiB - KV 8,589,934,592 - activations = 14,278,459,392 resident
    assert rtx4090["weight_streaming_budget_bytes"] == 14_278_459_392 and rtx4090["fits_with_weight_streaming"]
    assert gpu(p, "GeForce RTX 3060")["weight_streaming_budget_bytes"] == 1_393_557_504
    assert rtx5090["weight_streaming_budget_bytes"] is None  # fits without streaming
    assert p["weight_streaming"] is True
    text = format_plan(p)
    assert "8.03 B" in text and "16.1 GB per rank" in text and "131.1 KB per token" in text
    assert "stream (14.3 GB resident)" in text


def test_llama3_8b_int4_weights(llama3):
    [p] = plan_recipe(llama3, ["quantization={weights: {scheme: int4, group_size: 128}, "
                               "overrides: [{match: lm_head, scheme: none}]}"])
    # per layer, int4 codes (1/2 byte) + fp16 scales per 128 input rows x output channel:
    #   q, o [4096 x 4096]: 8,388,608 + 2*32*4096 = 8,650,752
    #   k, v [4096 x 1024]: 2,097,152 + 2*32*1024 = 2,162,688
    #   gate, up [4096 x 14336], down [14336 x 4096]: 29,360,128 + 917,504 = 30,277,632
    #   = 112,459,776; x 32 layers = 3,598,712,832
    # + lm_head (override: none) and embeddings at bf16: 2 * 1,050,673,152; + norms 532,480
    assert p["weight_bytes"] == p["weight_bytes_per_rank"] == 5_700_591_616
    assert p["quantization"] == "int4 g128 (1 override)"
    assert p["parameters"] == 8_030_261_248  # quantization changes bytes, not parameters
    assert "bfloat16 + int4 g128 (1 override) weights 5.7 GB per rank" in format_plan(p)


def test_matrix_over_tensor_parallelism(llama3, tmp_path):
    recipe = tmp_path / "tp.yaml"
    recipe.write_text(llama3.read_text().replace("model: {source: llama3-8b}",
                                                 f"model: {{source: {llama3.parent / 'llama3-8b'}}}")
                      + "matrix:\n  parallel.tp: [1, 2]\n")
    one, two = plan_recipe(recipe)
    assert (one["name"], two["name"]) == ("llama3-8b-1", "llama3-8b-2")
    assert two["variant"] == {"of": "llama3-8b", "values": {"parallel.tp": "2"}}
    # layer matrices 6,979,321,856 / 2 + replicated 1,050,939,392 (embeddings, lm_head, norms)
    assert two["weight_bytes_per_rank"] == 2 * (6_979_321_856 // 2 + 1_050_939_392) == 9_081_200_640
    assert two["kv_cache"]["bytes_per_token"] == 65_536  # 4 KV heads per rank
    assert two["engines"]["files"] == ["tensorrt-rtx-portable-rank0.engine", "tensorrt-rtx-portable-rank1.engine"]
    assert one["weight_bytes_per_rank"] == 16_060_522_496


def test_70b_config_plans_without_weights_or_heavy_imports(tmp_path):
    config_only(tmp_path / "llama3-70b", LLAMA3_70B)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: big\nmodel: {source: llama3-70b}\nprecision: float16\n"
                      "limits: {max_batch_size: 1, max_input_len: 512, max_seq_len: 4096}\nengines: [tensorrt]\n")
    code = (
        "import sys, json; from llmbuild.plan import plan_recipe; [p] = plan_recipe(sys.argv[1]);"
        "print(json.dumps([p['parameters'], p['engines']['count'], sorted(m for m in ('torch', 'onnx', 'onnx_ir',"
        " 'onnxruntime', 'tensorrt_rtx', 'transformers', 'numpy') if m in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    params, engines, heavy = json.loads(out.stdout)
    assert params == 70_553_706_496 and engines == 1 and heavy == []


def test_cli_plan_json_and_bad_input(llama3):
    runner = CliRunner()
    result = runner.invoke(cli, ["plan", str(llama3), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parameters"] == 8_030_261_248
    text = runner.invoke(cli, ["plan", str(llama3), "limits.max_batch_size=1"])
    assert text.exit_code == 0 and "GeForce RTX 4090" in text.stdout and "24 GiB" in text.stdout
    bad = runner.invoke(cli, ["plan", str(llama3), "limits.max_num_tokens=8", "--json"])
    assert bad.exit_code == 2
    error = json.loads(bad.stdout)
    assert error["kind"] == "bad input" and error["problems"][0]["path"] == "limits.max_num_tokens"
    assert "expected at least 1024" in error["problems"][0]["message"]
    assert GiB == 1 << 30
