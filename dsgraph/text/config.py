"""generation_config.json: the sampling defaults and stop ids a checkpoint ships (DeepSeek-V3 ships
`do_sample`, `temperature` 0.6 and `top_p` 0.95 there; `eos_token_id` may be one id or a list)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsgraph.errors import TokenizerError

FILE = "generation_config.json"


@dataclass
class GenerationConfig:
    """Defaults for `generate`; `do_sample=False` (transformers' default) makes the default greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> GenerationConfig:
        eos = d.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        known = {k: d[k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                   "max_new_tokens", "bos_token_id", "pad_token_id") if d.get(k) is not None}
        if not all(isinstance(e, int) for e in eos):
            raise TokenizerError(f"{FILE}: eos_token_id must be an int or a list of ints, "
                                 f"got {d.get('eos_token_id')!r}")
        return cls(**known, eos_token_id=eos)

    @classmethod
    def from_dir(cls, path) -> GenerationConfig | None:
        """The directory's generation_config.json, or None where it ships none."""
        f = Path(path) / FILE
        if not f.exists():
            return None
        try:
            return cls.from_dict(json.loads(f.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{f} is not a valid generation config ({e}); fix or delete it") from None

    def to_dict(self) -> dict:
        return asdict(self)
