"""What model.path names, decided without importing torch (``kt plan`` / ``kt config`` use it)."""
from pathlib import Path


def is_gguf(path) -> bool:
    """Whether model.path names a GGUF file (not a Hugging Face folder)."""
    p = Path(str(path)).expanduser()
    return p.suffix.lower() == ".gguf" and not p.is_dir()
