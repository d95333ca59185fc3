"""One exception hierarchy: every error dsgraph raises names the thing, what was expected, and the fix."""


class DSGraphError(Exception):
    """Root of every error dsgraph raises on purpose."""


class ShapeError(DSGraphError):
    """A tensor type does not fit an op's rule (raised at graph-build time, naming the node)."""


class VerifyError(DSGraphError):
    """A graph breaks an IR invariant (SSA, types, topological order)."""


class ConfigError(DSGraphError):
    """A model config is missing a key or holds a value dsgraph cannot build."""


class CheckpointError(DSGraphError):
    """Checkpoint weights are missing, unexpected, or of the wrong shape or dtype."""


class InputError(DSGraphError):
    """A runtime input is out of range (token ids, lengths) or of the wrong type."""


class UnknownOpError(DSGraphError):
    """An op name that no registry (ops, lowerings, passes) knows."""


class BackendUnavailable(DSGraphError):
    """A backend or target cannot run on this machine; the message carries the install hint."""


class PassError(DSGraphError):
    """A pass failed or left an invalid graph; the message names the pass and those before it."""


class ArtifactError(DSGraphError):
    """A saved artifact is truncated, edited, or made for another backend, device or format."""


class DeviceMemoryError(DSGraphError):
    """A model's weights, or a benchmark's inputs, cannot fit the device's free memory (checked before anything
    is allocated)."""


class NumericsError(DSGraphError):
    """A run produced NaN or Inf where a model cannot (logits): usually a non-finite or overflowing weight."""


class TokenizerError(DSGraphError):
    """Tokenizer files are missing or unreadable, or a chat template refused its messages."""


class RankDivergence(DSGraphError):
    """The ranks of a sharded server no longer hold the same requests and tokens (their logits or sampling
    disagreed), so their next collectives would not match."""
