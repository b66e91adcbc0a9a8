"""What the installed torch was built for (CUDA, HIP, XPU or CPU only), read without importing it.

Importing torch takes most of a second; the device plugins' quick probes only need the build's
version strings, which torch writes as plain assignments in ``torch/version.py``. That file is
parsed (``ast``, never executed). Once torch is imported its live ``torch.version`` answers, so
every probe of a process sees the same values."""
from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FIELDS = ("__version__", "cuda", "hip", "xpu")


@dataclass(frozen=True)
class TorchBuild:
    version: str
    cuda: Optional[str] = None
    hip: Optional[str] = None
    xpu: Optional[str] = None

    @property
    def cpu_only(self) -> bool:
        """Built for no accelerator that this file names (a ``+cpu`` wheel, or no CUDA/HIP/XPU)."""
        return self.cuda is None and self.hip is None and self.xpu is None


def _from_file(path: Path) -> Optional[TorchBuild]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id in FIELDS and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None  # not a plain literal: let torch itself answer
            if value is not None and not isinstance(value, str):
                return None
            values[target.id] = value
    if not isinstance(values.get("__version__"), str):
        return None
    return TorchBuild(values["__version__"], values.get("cuda"), values.get("hip"), values.get("xpu"))


def torch_build() -> Optional[TorchBuild]:
    """The build of the installed torch, or None when it cannot be told without importing it
    (then a probe imports its plugin, which imports torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        v = torch.version
        return TorchBuild(str(torch.__version__), getattr(v, "cuda", None), getattr(v, "hip", None),
                          getattr(v, "xpu", None))
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        build = _from_file(Path(folder) / "version.py")
        if build is not None:
            return build
    return None
