"""Graph -> Graph rewrites for dsgraph, each proven against the interpreter.

    import dsgraph.passes as passes
    passes.list_passes()                                   # {name: one-line description}
    g, w, records = passes.run_pipeline(graph, weights, ["absorb_mla", "group_moe", "dce"])
    passes.check("absorb_mla", graph, weights).raise_if_failed()   # the proof harness

Writing a pass: docs/writing-a-pass.md.
"""
from dsgraph.pattern import ANY, Match, P, Rewrite, Var, apply_rewrites, match
from dsgraph.rewriter import RewriteBuilder

from . import cleanup, fusion, legalize, mla, moe  # noqa: F401  (registers the built-in passes)
from .base import Pass, PassInfo, PassResult, get, info, list_passes, register, unregister
from .check import CheckResult, check
from .manager import DEFAULT_PIPELINES, PassRecord, default_pipeline, resolve, run_pipeline
from .structural import assert_structural_equal, structural_equal

__all__ = [
    "ANY", "CheckResult", "DEFAULT_PIPELINES", "Match", "P", "Pass", "PassInfo", "PassRecord", "PassResult",
    "Rewrite", "RewriteBuilder", "Var", "apply_rewrites", "assert_structural_equal", "check", "default_pipeline",
    "get", "info", "list_passes", "match", "register", "resolve", "run_pipeline", "structural_equal", "unregister",
]
