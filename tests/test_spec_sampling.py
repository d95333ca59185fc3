"""MTP speculative rejection sampling at temperature > 0 is distributed as plain sampling: the joint frequency of
the first three tokens over many seeded rows passes a chi-square test against the exact distribution computed
from the main model, and the same test rejects drafts accepted without the rejection step."""
from __future__ import annotations

import dsgraph.models as models
import pytest
import torch
from test_speculative import bigram_model

import dsgraph
from dsgraph.runtime import spec_verify
from dsgraph.runtime.sampling import SamplingParams, distribution

PROMPT = [[3, 14, 15, 92]]
KNOBS = {"temperature": 1.0, "top_k": 3}
ROWS, NEW, DEPTH = 1200, 3, 2


_EXES: dict[str, dsgraph.Executable] = {}


def compiled(kind: str):
    """Random weights (drafts mostly rejected: the residual path) or test_speculative's bigram model whose MTP
    branch is the main model's own distribution (drafts kept: the bonus-token path)."""
    if kind not in _EXES:
        model = models.build_model("deepseek-v3-tiny", seed=7) if kind == "random" else bigram_model(True)
        _EXES[kind] = dsgraph.compile(model, backend="eager", keep_mtp=True)
    return _EXES[kind]


@pytest.fixture(params=["random", "agreeing"])
def exe(request):
    return compiled(request.param)


def exact_joint(exe) -> dict[tuple, float]:
    """P(t1, t2, t3) under plain sampling, from full forwards over every continuation in the top-k support."""
    params = SamplingParams(**KNOBS)
    p1 = distribution(exe(torch.tensor(PROMPT))[:, -1], params)[0]
    firsts = p1.nonzero()[:, 0].tolist()
    seconds = {}
    for t1 in firsts:
        seconds[t1] = distribution(exe(torch.tensor([PROMPT[0] + [t1]]))[:, -1], params)[0]
    pairs = [(t1, t2) for t1 in firsts for t2 in seconds[t1].nonzero()[:, 0].tolist()]
    logits = exe(torch.tensor([PROMPT[0] + list(p) for p in pairs]))[:, -1]
    p3 = distribution(logits, params)
    return {(t1, t2, t3): float(p1[t1] * seconds[t1][t2] * p3[i, t3])
            for i, (t1, t2) in enumerate(pairs) for t3 in p3[i].nonzero()[:, 0].tolist()}


def chi_square_p(samples: torch.Tensor, joint: dict[tuple, float]) -> float:
    """p-value of the samples' joint frequencies against `joint`; cells expecting < 5 pooled, unseen-by-joint
    samples counted against it."""
    counts: dict[tuple, int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    n = samples.shape[0]
    big = [c for c, p in joint.items() if p * n >= 5]
    obs = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    exp = [joint[c] * n for c in big] + [n * (1 - sum(joint[c] for c in big))]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0) + sum(o * 1e6 for o, e in zip(obs, exp) if e <= 0)
    df = len(big)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def spec_samples(exe):
    return exe.generate(torch.tensor(PROMPT), NEW, speculative="mtp", draft_depth=DEPTH, n=ROWS, seed=0, **KNOBS)


def test_speculative_sampling_matches_plain_distribution(exe):
    joint = exact_joint(exe)
    assert abs(sum(joint.values()) - 1) < 1e-4
    plain = exe.generate(torch.tensor(PROMPT), NEW, n=ROWS, seed=0, **KNOBS)
    assert chi_square_p(plain, joint) > 1e-3                       # the statistic's calibration
    out, stats = exe.generate(torch.tensor(PROMPT), NEW, speculative="mtp", draft_depth=DEPTH, n=ROWS, seed=0,
                              return_stats=True, **KNOBS)
    assert out.shape == (ROWS, NEW)
    assert chi_square_p(out, joint) > 1e-3
    assert 0 < sum(stats.extra["row_acceptance"]) / ROWS            # drafts were kept
    again = exe.generate(torch.tensor(PROMPT), NEW, speculative="mtp", draft_depth=DEPTH, n=ROWS, seed=0, **KNOBS)
    assert torch.equal(out, again)                                 # same seed, same samples


def test_the_test_rejects_accepting_every_draft(monkeypatch):
    """Keeping every draft (no rejection) gives the MTP branch's distribution: the chi-square test must see it."""
    def accept_all(self, logits, drafts, qs):
        b, k = drafts.shape
        p = distribution(logits[:, k], self.params)
        return torch.full((b,), k), torch.cat([drafts, spec_verify.draw(p, self.gens)], dim=1), k
    monkeypatch.setattr(spec_verify.SampledVerifier, "verify", accept_all)
    exe = compiled("random")
    assert chi_square_p(spec_samples(exe), exact_joint(exe)) < 1e-3


def test_text_prompts_speculate_with_stop_rules(capsys):
    exe = compiled("agreeing")
    plain = exe.generate(["Hello!", "What is it?"], max_new_tokens=8, temperature=0)
    spec = exe.generate(["Hello!", "What is it?"], max_new_tokens=8, temperature=0, speculative="mtp", draft_depth=2)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain] and spec[0].extra["draft_depth"] == 2
    cut = plain[0].text[len(plain[0].text) // 2:][:2]
    assert len(cut) == 2
    out = exe.generate("Hello!", max_new_tokens=8, temperature=0, speculative="mtp", stop=[cut])
    assert out.finish_reason == "stop" and out.text == plain[0].text[:plain[0].text.find(cut)]
