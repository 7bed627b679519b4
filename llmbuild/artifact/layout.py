"""Names inside an artifact directory."""

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
ENGINES_DIR = "engines"
TOKENIZER_DIR = "tokenizer"


def engine_file_name(backend: str, target: str, rank: int = 0) -> str:
    return f"{backend}-{target}-rank{rank}.engine"
