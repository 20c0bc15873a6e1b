"""Methods-table row of PILLOW (arXiv 2312.05621) with its matcher's equations on small tensors: the
policy π(d | x) = softmax_d(e_x^T W e_d), uniform at W = 0, and the REINFORCE step raising the
probability of a prompt whose reward beats the baseline. Its run on real tasks is in test_pillow.py."""
import math

import torch

from tests.methods.tester import Case


def pillow_equations(model, method):
    from lorabench.methods.combining.pillow import PromptMatcher, sample_without_replacement

    matcher = model.pillow_matcher
    assert isinstance(matcher, PromptMatcher) and not matcher.active   # nothing prepended before training
    torch.manual_seed(0)
    m = PromptMatcher(8, 5, 4)
    m.pool_emb.copy_(torch.nn.functional.normalize(torch.randn(5, 8), dim=-1))
    e_x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    lp = torch.log_softmax(m.scores(e_x), -1)
    torch.testing.assert_close(lp, torch.full((3, 5), -math.log(5)))             # W = 0: uniform policy
    with torch.no_grad():
        m.W.copy_(torch.randn(8, 8))
    torch.testing.assert_close(m.scores(e_x), e_x @ m.W @ m.pool_emb.T)           # e_x^T W e_d
    # REINFORCE: loss = -(R - b) log π(d | x); a step on it raises π(d) when R > b, lowers it when R < b
    for advantage in (1.0, -1.0):
        w0 = m.W.detach().clone()
        d = torch.tensor([2, 0, 4])
        p0 = torch.softmax(m.scores(e_x), -1).gather(1, d[:, None]).detach()
        logp = torch.log_softmax(m.scores(e_x), -1).gather(1, d[:, None]).squeeze(1)
        (-(advantage * logp).mean()).backward()
        with torch.no_grad():
            m.W -= 0.5 * m.W.grad
            m.W.grad = None
        p1 = torch.softmax(m.scores(e_x), -1).gather(1, d[:, None])
        assert ((p1 - p0) * advantage > 0).all(), (advantage, p0, p1)
        with torch.no_grad():
            m.W.copy_(w0)
    idx, _, _ = sample_without_replacement(m.scores(e_x), 2, greedy=True)
    assert (idx[:, 0] == m.scores(e_x).argmax(-1)).all() and (idx[:, 0] != idx[:, 1]).all()


CASES = [
    Case("pillow", {"rank": 4, "alpha": 8, "pool_size": 4}, equations=pillow_equations),
]
