"""Reading a checkpoint or export directory through one `Checkpoint` object: the path is resolved and its links
checked once, config.yaml is parsed once, and every reader (model, tokenizer, data module, resume, export) takes it.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors

from xlab.checkpoint.layout import CONFIG, WEIGHTS, resolve_checkpoint
from xlab.errors import XLabError
from xlab.fsio import contained, opened_inside


class Checkpoint(PathLike):
    """A checkpoint or export directory, resolved (following `last`) and checked for links out of it once.
    `Checkpoint.of(x)` passes a Checkpoint through and opens a path; str(), `/` and os.fspath give the real path,
    so a Checkpoint goes wherever a path does."""

    def __init__(self, path: str | Path) -> None:
        self.path: Path = resolve_checkpoint(path)
        self._config: dict[str, Any] | None = None

    @classmethod
    def of(cls, path: str | Path | Checkpoint) -> Checkpoint:
        return path if isinstance(path, Checkpoint) else cls(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def file(self, name: str | Path) -> Path:
        """A file of the checkpoint, refused if a link leads it out of the directory."""
        return contained(self.path, name)

    @property
    def config(self) -> dict[str, Any]:
        """config.yaml as a dict (read once), or one line saying why it cannot be read."""
        if self._config is None:
            file = self.path / CONFIG
            try:
                with opened_inside(self.path, CONFIG) as opened:
                    config = OmegaConf.to_container(OmegaConf.load(opened))
            except XLabError:
                raise
            except Exception as exc:  # OSError, YAML and OmegaConf errors alike: the file is damaged
                reason = " ".join(str(exc).split())  # YAML errors span several lines
                raise XLabError(f"cannot read {file}: {reason}") from None
            if not isinstance(config, dict):
                raise XLabError(f"{file} is not a mapping of config groups (model, data, tokenizer, ...)")
            self._config = config
        return self._config

    def section(self, group: str, schema: type) -> Any:
        """One group of config.yaml as its typed config (schema: the group's dataclass), checked like a command
        line's, or one line naming the key or value that is wrong there."""
        values = self.config.get(group)
        if not isinstance(values, dict):
            raise XLabError(f"{self.path / CONFIG} has no {group}: mapping")
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
        except (OmegaConfBaseException, XLabError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise XLabError(f"{self.path / CONFIG}, {group}: {first}") from None

    def vocab_rows(self) -> int:
        """Rows of the token embedding stored in the weights (read from the header, no tensor loaded)."""
        weights = self.path / WEIGHTS
        try:
            with opened_inside(self.path, WEIGHTS) as opened, safe_open(str(opened), framework="pt") as f:
                # Tied embeddings are stored once, under either name.
                name = "tok_emb.weight" if "tok_emb.weight" in f.keys() else "lm_head.weight"
                return f.get_slice(name).get_shape()[0]
        except (SafetensorError, OSError, KeyError) as exc:
            raise XLabError(f"cannot read weights {weights}: {exc}") from None

    def weights_into(self, model: torch.nn.Module, device: str = "cpu") -> None:
        """Load model.safetensors into `model` (safetensors: no code runs), or a one-line error naming the first
        tensor that does not fit."""
        try:
            with opened_inside(self.path, WEIGHTS) as opened:
                load_safetensors(model, str(opened), device=device)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, not the generic header
            raise XLabError(f"weights in {self.path} do not fit the model in its config.yaml: {reason}") from None
