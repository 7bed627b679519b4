"""llama.cpp's own HF -> GGUF converter (`convert_hf_to_gguf.py` and its `gguf-py`), taken
from the `llama-cpp-python` sdist on PyPI once per test session (no compiler needed), and
the chat templates llama.cpp keeps for real checkpoints (`models/templates/*.jinja`).

The converter writes f32 / f16 / bf16 / q8_0 only (its `--outtype` choices; gguf-py 0.19.0,
the newest, dequantizes Q4_K / Q6_K but cannot quantize them): K-quant files come from
llama.cpp's `llama-quantize`, built from the same sdist (`build_quantize`: that one target,
portable CPU code, once per session). Nothing is vendored: if the sdist cannot be fetched,
the tests fail.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.16"
VENDOR = "vendor/llama.cpp/"
WANTED = ("convert_hf_to_gguf.py", "gguf-py/", "models/templates/")

# Run as the converter's process. Three things are not the converter's own (the config
# keys below, and):
# - the vocabulary: the tiny models' character-level tokenizer is not one llama.cpp knows
#   (its pre-tokenizer hash check refuses it), so a placeholder token list of vocab_size
#   single-character entries is written (the tests check tensors and hyperparameters, not this vocabulary);
# - `mistral_common`, which the converter imports at the top for Mistral-format checkpoints
#   only: empty stand-in modules, so it need not be installed.
_DRIVER = r"""
import sys, types
import transformers  # before the stand-ins: it probes for the real mistral_common
for name in ("mistral_common", "mistral_common.tokens", "mistral_common.tokens.tokenizers",
             "mistral_common.tokens.tokenizers.base", "mistral_common.tokens.tokenizers.multimodal",
             "mistral_common.tokens.tokenizers.tekken", "mistral_common.tokens.tokenizers.sentencepiece"):
    sys.modules.setdefault(name, types.ModuleType(name))
tok = sys.modules["mistral_common.tokens.tokenizers.base"]
tok.TokenizerVersion = type("TokenizerVersion", (), {})
mm = sys.modules["mistral_common.tokens.tokenizers.multimodal"]
mm.DATASET_MEAN, mm.DATASET_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
sys.modules["mistral_common.tokens.tokenizers.tekken"].Tekkenizer = type("Tekkenizer", (), {})
sys.modules["mistral_common.tokens.tokenizers.sentencepiece"].SentencePieceTokenizer = type("SPT", (), {})
sys.path.insert(0, sys.argv[1] + "/gguf-py")
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf as conv

def set_vocab(self):
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([chr(0x100 + i) for i in range(n)])  # one character each, no merges
    self.gguf_writer.add_token_types([1] * n)
    self.gguf_writer.add_token_scores([0.0] * n)
    self.gguf_writer.add_bos_token_id(1)
    self.gguf_writer.add_eos_token_id(2)
    self.gguf_writer.add_pad_token_id(0)  # else transformers takes Phi3Config's pad id 32000 (> vocab)

conv.TextModel.set_vocab = set_vocab

# This converter reads transformers 4's config keys (rope_theta, rope_scaling) from
# AutoConfig(...).to_dict(), which transformers 5 no longer has at the top level: add the
# file's own keys (tests.llama_cpp.legacy_config_dir wrote them) where missing.
_load_hparams = conv.ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    import json
    config = _load_hparams(dir_model, is_mistral_format)
    for key, value in json.loads((dir_model / "config.json").read_text()).items():
        config.setdefault(key, value)
    return config
conv.ModelBase.load_hparams = staticmethod(load_hparams)
for cls in list(conv.ModelBase._model_classes.get(conv.ModelType.TEXT, {}).values()):
    if "set_vocab" in cls.__dict__:
        cls.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
conv.main()
"""


def fetch_llama_cpp(dst: Path) -> Path:
    """Download the sdist with pip and extract the converter; returns the llama.cpp folder."""
    dst.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", LLAMA_CPP_PYTHON, "--no-deps", "--no-binary",
           "llama-cpp-python", "--quiet", "-d", str(dst)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dst.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not sdists:
        raise RuntimeError(f"pip download {LLAMA_CPP_PYTHON} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    out = dst / "llama.cpp"
    with tarfile.open(sdists[0]) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/")
            if rel.startswith(VENDOR) and rel[len(VENDOR):].startswith(WANTED) and (m.isfile() or m.isdir()):
                m.name = rel[len(VENDOR):]
                members.append(m)
        tar.extractall(out, members=members, filter="data")
    if not (out / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{sdists[0]} has no {VENDOR}convert_hf_to_gguf.py")
    return out


def build_quantize(sdist_dir: Path, dst: Path) -> Path:
    """Build llama.cpp's `llama-quantize` (only that target; -DGGML_NATIVE=OFF, no curl,
    no OpenMP; -O0: the tiny models quantize in milliseconds, and it compiles in a fraction
    of a Release build's CPU time) from the llama-cpp-python sdist `fetch_llama_cpp` left in `sdist_dir`;
    returns the binary. Takes a few minutes on 2 cores (benchmarks/families/RESULTS.md)."""
    return build_tool(sdist_dir, dst, "llama-quantize")


def build_tool(sdist_dir: Path, dst: Path, target: str, optimized: bool = False) -> Path:
    """Build one llama.cpp tool (`target`, e.g. llama-quantize, llama-perplexity) from the
    one llama-cpp-python sdist in `sdist_dir`, into `dst`; returns the binary. Static, no
    curl, no OpenMP, no tests/examples/server. `optimized`: a Release build for this CPU
    (-DGGML_NATIVE=ON, for measurements); else portable -O0 code (fast to compile)."""
    [sdist] = sorted(Path(sdist_dir).glob("llama_cpp_python-*.tar.gz"))
    src, build = dst / "src", dst / "build"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/")
            if rel.startswith(VENDOR) and rel != VENDOR and (m.isfile() or m.isdir()):
                m.name = rel[len(VENDOR):]
                members.append(m)
        tar.extractall(src, members=members, filter="data")
    mode = (["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"] if optimized else
            ["-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_C_FLAGS_DEBUG=-O0", "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
             "-DGGML_NATIVE=OFF"])
    steps = [["cmake", "-S", str(src), "-B", str(build), *mode,
              "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
             ["cmake", "--build", str(build), "--target", target, "-j2"]]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {result.returncode}):\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    binary = build / "bin" / target
    if not binary.is_file():
        raise RuntimeError(f"the {target} build left no {binary}")
    return binary


def quantize(binary: Path, src: Path, dst: Path, qtype: str) -> Path:
    """`llama-quantize SRC DST QTYPE` (e.g. Q4_K_M, Q6_K); returns dst."""
    result = subprocess.run([str(binary), str(src), str(dst), qtype], capture_output=True, text=True)
    if result.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"llama-quantize {qtype} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return dst


def legacy_config_dir(hf_dir: Path, dst: Path) -> Path:
    """A view of `hf_dir` whose config.json also has the transformers 4 keys this converter
    reads (`rope_theta`, `rope_scaling`; transformers 5 writes `rope_parameters`): the other
    files are symlinks."""
    import json

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(hf_dir).iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        cfg.setdefault("rope_scaling", {**{k: v for k, v in rope.items() if k != "rope_theta"},
                                        "type": rope["rope_type"]})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def convert(llama_cpp: Path, hf_dir: Path, dst: Path, outtype: str = "q8_0") -> Path:
    """Convert a tiny HF directory with llama.cpp's converter (`--outtype`); returns dst."""
    src = legacy_config_dir(hf_dir, dst.parent / f"{dst.name}.hf")
    cmd = [sys.executable, "-c", _DRIVER, str(llama_cpp), str(src), "--outfile", str(dst), "--outtype", outtype]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
    return dst


def template(llama_cpp: Path, name: str) -> str:
    """A real checkpoint's chat template as llama.cpp keeps it (models/templates/<name>.jinja)."""
    return (llama_cpp / "models" / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
