"""Graph -> Graph rewrites for dsgraph, each proven against the interpreter.

    import dsgraph.passes as passes
    passes.list_passes()                                   # {name: one-line description}
    g, w, records = passes.run_pipeline(graph, weights, ["absorb_mla", "group_moe", "dce"])
    passes.check("absorb_mla", graph, weights).raise_if_failed()   # the proof harness

Writing a pass: docs/writing-a-pass.md.
"""
from dsgraph.pattern import ANY, Match, P, Roots, Var, match, match_region
from dsgraph.rewriter import Rewrite, RewriteBuilder, apply_rewrites

from . import cleanup, fusion, kvcache, legalize, mla, mla_fusion, moe, retype, shard  # noqa: F401  (registers them)
from .base import Pass, PassInfo, PassResult, get, info, list_passes, register, unregister
from .check import CheckResult, check
from .manager import PassRecord, resolve, run_pipeline, with_options
from .structural import assert_structural_equal, structural_equal

__all__ = [
    "ANY", "CheckResult", "Match", "P", "Pass", "PassInfo", "PassRecord", "PassResult", "Rewrite", "RewriteBuilder",
    "Roots", "Var", "apply_rewrites", "assert_structural_equal", "check", "get", "info", "list_passes", "match",
    "match_region", "register", "resolve", "run_pipeline", "structural_equal", "unregister", "with_options",
]
