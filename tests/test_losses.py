"""Loss math against independent plain-Python evaluations of each formula on tiny tensors."""
from __future__ import annotations

import math
import random

import pytest
import torch

from selfplay.config import LearnerConfig
from selfplay.learner.losses import (
    PolicyLossInputs,
    adpo_eps_high,
    adpo_scale,
    aggregate_loss,
    compute_advantages,
    group_advantages,
    k3_kl,
    policy_loss,
)
from selfplay.types import Trajectory



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons need float64; restore the default so other test modules are unaffected."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def cfg(**kw) -> LearnerConfig:
    base = dict(kl_coef=0.0, tis_cap=None, dual_clip_c=None, entropy_control="none", adpo=False)
    base.update(kw)
    return LearnerConfig(**base)


# ----------------------------------------------------------------------------------- reference (plain Python)
def ref_group_adv(rewards, groups, scale=True, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        if len(members) == 1 or max(members) == min(members):
            out.append(0.0)
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


def ref_token_loss(lp, old, a, eps_low, eps_high, dual_c=None, ref=None, beta=0.0, beh=None, cap=None, w=1.0):
    lr = max(-20.0, min(20.0, lp - old))
    r = math.exp(lr)
    pg = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
    if dual_c is not None and a < 0:
        pg = min(pg, -a * dual_c)
    if beh is not None and cap is not None:
        pg *= min(math.exp(old - beh), cap)
    if ref is not None and beta:
        d = ref - lp
        pg += beta * (math.exp(d) - d - 1)
    return pg * w


def ref_aggregate(L, M, mode, max_len=None):
    if mode == "token-mean":
        return sum(l * m for row, mrow in zip(L, M) for l, m in zip(row, mrow)) / sum(sum(r) for r in M)
    if mode == "seq-mean-token-mean":
        return sum(sum(l * m for l, m in zip(row, mrow)) / max(1, sum(mrow)) for row, mrow in zip(L, M)) / len(L)
    return sum(l * m for row, mrow in zip(L, M) for l, m in zip(row, mrow)) / (len(L) * (max_len or len(L[0])))


def random_case(B=4, T=6, seed=0, spread=0.5):
    g = random.Random(seed)
    lp = [[math.log(g.uniform(0.05, 0.95)) for _ in range(T)] for _ in range(B)]
    old = [[x + g.uniform(-spread, spread) for x in row] for row in lp]
    ref = [[x + g.uniform(-spread, spread) for x in row] for row in lp]
    beh = [[x + g.uniform(-spread, spread) for x in row] for row in old]
    adv = [g.choice([-1.5, -0.4, 0.7, 1.2]) for _ in range(B)]
    mask = [[1 if g.random() < 0.75 else 0 for _ in range(T)] for _ in range(B)]
    mask[0][0] = 1
    return lp, old, ref, beh, adv, mask


def tensors(lp, old, ref, beh, adv, mask):
    t = torch.tensor
    return t(lp, requires_grad=True), t(old), t(ref), t(beh), t(adv), t(mask, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ advantages
def test_group_advantages_match_formula():
    rewards = [1.0, 0.0, 1.0, 0.5, -1.0, 2.0, 0.3, 0.3, 0.3, 7.0]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups)).tolist()
    assert got == pytest.approx(ref_group_adv(rewards, groups), abs=1e-12)
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), scale_by_std=False).tolist()
    assert got == pytest.approx(ref_group_adv(rewards, groups, scale=False), abs=1e-12)


def test_zero_variance_and_singleton_groups_get_exactly_zero():
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 5.0]), torch.tensor([3, 3, 3, 9]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_validates_shapes():
    with pytest.raises(ValueError, match="same shape"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def traj(group, reward, p_hat=None, structure=None, role="executor"):
    meta = {} if structure is None else {"structure": structure}
    return Trajectory(role=role, task_id="t", group_id=group, prompt_ids=[1], completion_ids=[2], loss_mask=[1],
                      behaviour_logprobs=[-0.1], reward=reward, p_hat=p_hat, meta=meta)


def test_compute_advantages_modes():
    ts = [traj("a", 1.0), traj("a", -1.0), traj("a", -1.0), traj("b", 1.0), traj("b", 1.0)]
    r, g = [t.reward for t in ts], [0, 0, 0, 1, 1]
    assert compute_advantages(ts, cfg(advantage="grpo")) == pytest.approx(ref_group_adv(r, g))
    assert compute_advantages(ts, cfg(advantage="drgrpo")) == pytest.approx(ref_group_adv(r, g, scale=False))
    # HRPO: groups by structure, not by prompt; one sample per prompt
    hs = [traj(f"p{i}", rw, structure=s) for i, (rw, s) in enumerate([(1, 2), (0, 2), (1, 3), (1, 3), (0, 3)])]
    exp = ref_group_adv([1, 0, 1, 1, 0], [2, 2, 3, 3, 3])
    assert compute_advantages(hs, cfg(advantage="hrpo")) == pytest.approx(exp)
    with pytest.raises(ValueError, match="structure"):
        compute_advantages([traj("a", 1.0)], cfg(advantage="hrpo"))


def test_compute_advantages_adpo_scales_by_p_hat():
    ts = [traj("a", 1.0, p_hat=0.4), traj("a", -1.0, p_hat=0.4), traj("b", 1.0, p_hat=0.9), traj("b", 0.0)]
    base = ref_group_adv([1.0, -1.0, 1.0, 0.0], [0, 0, 1, 1])
    m = 0.6
    s = [m + (1 - m) * min(1.0, max(0.0, (p - 0.3) / 0.5)) if p is not None else 1.0
         for p in (0.4, 0.4, 0.9, None)]
    got = compute_advantages(ts, cfg(adpo=True, adpo_s_min=m))
    assert got == pytest.approx([b * k for b, k in zip(base, s)])
    proposer = [traj("a", 1.0, p_hat=0.4, role="proposer"), traj("a", -1.0, p_hat=0.4, role="proposer")]
    assert compute_advantages(proposer, cfg(adpo=True)) == pytest.approx(ref_group_adv([1.0, -1.0], [0, 0]))


def test_adpo_functions():
    for p in [0.0, 0.3, 0.45, 0.8, 1.0]:
        assert float(adpo_scale(torch.tensor(p), 0.5)) == pytest.approx(0.5 + 0.5 * min(1, max(0, (p - 0.3) / 0.5)))
        assert float(adpo_eps_high(torch.tensor(p))) == pytest.approx(0.2 + 0.1 * min(1, max(0, (0.8 - p) / 0.5)))
    assert float(adpo_eps_high(torch.tensor(0.3))) == pytest.approx(0.3)
    assert float(adpo_eps_high(torch.tensor(0.8))) == pytest.approx(0.2)


def test_k3_kl_values_and_clamp():
    lp, ref = torch.tensor([-1.0, -0.5, -2.0, -30.0]), torch.tensor([-1.0, -1.5, -0.5, -0.1])
    got = k3_kl(lp, ref).tolist()
    for g, a, b in zip(got[:3], lp.tolist(), ref.tolist()):
        assert g == pytest.approx(math.exp(b - a) - (b - a) - 1)
    assert got[0] == 0.0 and got[3] == 10.0  # clamped like verl low_var_kl


# ----------------------------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("extras", [False, True])
def test_policy_loss_matches_reference(mode, extras):
    lp, old, ref, beh, adv, mask = random_case(seed=3, spread=0.6)
    kw = dict(loss_agg=mode, eps_low=0.2, eps_high=0.28)
    if extras:
        kw.update(dual_clip_c=3.0, kl_coef=0.05, tis_cap=1.5)
    c = cfg(**kw)
    w = [1.0, 0.5, 0.25, 1.0]
    L = [[ref_token_loss(lp[i][t], old[i][t], adv[i], 0.2, 0.28, c.dual_clip_c, ref[i][t], c.kl_coef,
                         beh[i][t] if extras else None, c.tis_cap, w[i] if extras else 1.0)
          for t in range(len(lp[0]))] for i in range(len(lp))]
    expected = ref_aggregate(L, mask, mode)
    tlp, told, tref, tbeh, tadv, tmask = tensors(lp, old, ref, beh, adv, mask)
    inp = PolicyLossInputs(tlp, told, tadv, tmask, ref_logp=tref if extras else None,
                           behaviour_logp=tbeh if extras else None, weights=torch.tensor(w) if extras else None)
    loss, metrics = policy_loss(inp, c)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert 0.0 <= metrics["clip_frac_low"] <= 1 and 0.0 <= metrics["clip_frac_high"] <= 1


def test_clip_fractions_and_dual_clip_on_handpicked_tokens():
    # ratios: 0.5 (A<0: low-clipped), 1.5 (A>0: high-clipped), 4.0 (A<0: dual-clipped), 1.0 (none)
    ratios, advs = [0.5, 1.5, 4.0, 1.0], [-1.0, 1.0, -1.0, 1.0]
    lp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 4)
    c = cfg(dual_clip_c=3.0, eps_low=0.2, eps_high=0.28, loss_agg="token-mean")
    inp = PolicyLossInputs(lp, old, torch.tensor([advs]), torch.ones(1, 4))
    loss, m = policy_loss(inp, c)
    # token 0: max(0.5, 0.8) = 0.8; token 1: max(-1.5, -1.28) = -1.28; token 2: min(max(4, 1.2), 3) = 3; token 3: -1
    assert loss.item() == pytest.approx((0.8 - 1.28 + 3.0 - 1.0) / 4)
    assert m["clip_frac_low"] == pytest.approx(0.25)
    assert m["clip_frac_high"] == pytest.approx(0.25)
    assert m["dual_clip_frac"] == pytest.approx(0.25)
    loss.backward()
    # clipped and dual-clipped tokens pass no gradient; unclipped token 3 has d(-A r)/dlogp = -A r = -1, / 4
    assert lp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 0.0, -0.25])


def test_per_sequence_eps_high_from_adpo():
    lp = torch.tensor([[math.log(1.25)], [math.log(1.25)]], requires_grad=True)
    inp = PolicyLossInputs(lp, torch.zeros(2, 1), torch.tensor([1.0, 1.0]), torch.ones(2, 1),
                           eps_high=torch.tensor([0.2, 0.3]))
    loss, m = policy_loss(inp, cfg(loss_agg="token-mean"))
    assert loss.item() == pytest.approx((-1.2 - 1.25) / 2)  # first clipped at 1.2, second under 1.3
    assert m["clip_frac_high"] == pytest.approx(0.5)


def test_log_ratio_clamped_to_20():
    lp = torch.tensor([[50.0]], requires_grad=True)
    inp = PolicyLossInputs(lp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    loss, m = policy_loss(inp, cfg(loss_agg="token-mean"))
    assert loss.item() == pytest.approx(math.exp(20.0))
    assert m["ratio_max"] == pytest.approx(math.exp(20.0))


def test_masked_tool_tokens_do_not_change_loss_or_get_gradient():
    lp, old, ref, beh, adv, mask = random_case(seed=5)
    c = cfg(kl_coef=0.1, tis_cap=2.0, dual_clip_c=3.0, loss_agg="seq-mean-token-mean")
    tlp, told, tref, tbeh, tadv, tmask = tensors(lp, old, ref, beh, adv, mask)
    loss1, _ = policy_loss(PolicyLossInputs(tlp, told, tadv, tmask, tref, tbeh), c)
    loss1.backward()
    assert torch.all(tlp.grad[tmask == 0] == 0)
    def junk(x, value):  # tool/pad tokens may carry anything, even inf or nan
        return torch.where(tmask == 0, torch.full_like(x, value), x.detach())

    tlp2 = junk(tlp, -float("inf")).requires_grad_()
    loss2, _ = policy_loss(PolicyLossInputs(tlp2, junk(told, float("nan")), tadv, tmask, junk(tref, 7.0),
                                            junk(tbeh, float("inf"))), c)
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-12)
    loss2.backward()
    assert torch.equal(tlp2.grad, tlp.grad)


def test_kl_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(PolicyLossInputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2)),
                    cfg(kl_coef=0.1))


def test_gradcheck_full_loss():
    lp, old, ref, beh, adv, mask = random_case(B=3, T=4, seed=11, spread=0.4)
    _, told, tref, tbeh, tadv, tmask = tensors(lp, old, ref, beh, adv, mask)
    c = cfg(kl_coef=0.05, tis_cap=2.0, dual_clip_c=3.0, loss_agg="seq-mean-token-mean")

    def f(x):
        return policy_loss(PolicyLossInputs(x, told, tadv, tmask, tref, tbeh, weights=torch.tensor([1, .5, 2.])),
                           c)[0]

    assert torch.autograd.gradcheck(f, (torch.tensor(lp, requires_grad=True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_full_batch(mode):
    lp, old, ref, beh, adv, mask = random_case(B=6, T=5, seed=7)
    c = cfg(kl_coef=0.02, tis_cap=2.0, dual_clip_c=3.0, loss_agg=mode)
    full_lp = torch.tensor(lp, requires_grad=True)
    _, told, tref, tbeh, tadv, tmask = tensors(lp, old, ref, beh, adv, mask)
    full, _ = policy_loss(PolicyLossInputs(full_lp, told, tadv, tmask, tref, tbeh), c)
    full.backward()
    micro_lp = torch.tensor(lp, requires_grad=True)
    total_tokens, total_seqs = float(tmask.sum()), 6.0
    acc = 0.0
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven micro-batches
        part, _ = policy_loss(PolicyLossInputs(micro_lp[sl], told[sl], tadv[sl], tmask[sl], tref[sl], tbeh[sl]), c,
                              total_tokens=total_tokens, total_seqs=total_seqs, max_len=5)
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(micro_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "seq-sum")


def test_truncated_is_weight_is_detached_and_capped():
    lp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    beh = torch.tensor([[-0.1, -5.0]])  # w = e^0.1 = 1.105, e^5 capped to 2
    loss, m = policy_loss(PolicyLossInputs(lp, old, torch.tensor([1.0]), torch.ones(1, 2), behaviour_logp=beh),
                          cfg(tis_cap=2.0, loss_agg="token-mean"))
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 2.0) / 2)
    assert m["is_truncated_frac"] == pytest.approx(0.5)
    loss.backward()  # gradient is -A * r * w per token: the weight scales it but does not get differentiated
    assert lp.grad.tolist()[0] == pytest.approx([-math.exp(0.1) / 2, -1.0])


# --------------------------------------------------------------------------------------- entropy control
def cov_reference(adv_tok, lp, mask):
    valid = [(i, t) for i in range(len(lp)) for t in range(len(lp[0])) if mask[i][t]]
    ma = sum(adv_tok[i][t] for i, t in valid) / len(valid)
    ml = sum(lp[i][t] for i, t in valid) / len(valid)
    return {(i, t): (adv_tok[i][t] - ma) * (lp[i][t] - ml) for i, t in valid}


def test_kl_cov_penalises_top_covariance_tokens():
    lp = [[-0.1, -3.0, -0.2], [-2.5, -0.3, -0.05]]
    old = [[-0.2, -2.9, -0.1], [-2.0, -0.4, -0.1]]
    adv = [2.0, -1.0]
    mask = [[1, 1, 1], [1, 1, 0]]
    c = cfg(entropy_control="kl_cov", kl_cov_ratio=0.4, kl_cov_coef=0.7, loss_agg="token-mean")
    cov = cov_reference([[a] * 3 for a in adv], lp, mask)
    k = max(int(0.4 * 5), 1)
    top = sorted(cov, key=cov.get, reverse=True)[:k]
    expected = sum(-adv[i] * math.exp(lp[i][t] - old[i][t]) + (0.7 * abs(lp[i][t] - old[i][t]) if (i, t) in top
                   else 0.0) for (i, t) in cov) / 5
    loss, m = policy_loss(PolicyLossInputs(torch.tensor(lp, requires_grad=True), torch.tensor(old),
                                           torch.tensor(adv), torch.tensor(mask, dtype=torch.float64)), c)
    assert loss.item() == pytest.approx(expected)
    assert m["kl_cov_frac"] == pytest.approx(k / 5)


def test_clip_cov_zeroes_only_candidate_tokens_and_exactly_k():
    g = random.Random(0)
    B, T = 4, 50
    lp = [[math.log(g.uniform(0.01, 0.99)) for _ in range(T)] for _ in range(B)]
    old = [[x + g.uniform(-0.05, 0.05) for x in row] for row in lp]  # small moves: few clipped tokens
    adv = [3.0, -3.0, 2.0, -2.0]
    mask = [[1] * T for _ in range(B)]
    cov = cov_reference([[a] * T for a in adv], lp, mask)
    lb, ub = 1.0, 5.0
    cands = {(i, t) for (i, t), v in cov.items() if lb < v < ub and abs(lp[i][t] - old[i][t]) < 0.05
             and not (math.exp(lp[i][t] - old[i][t]) > 1.28 or math.exp(lp[i][t] - old[i][t]) < 0.8)}
    assert len(cands) > 5  # the case exercises selection
    ratio = 0.01  # k = int(0.01 * 200) = 2 < number of candidates
    c = cfg(entropy_control="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub, loss_agg="token-mean")
    tlp = torch.tensor(lp, requires_grad=True)
    loss, m = policy_loss(PolicyLossInputs(tlp, torch.tensor(old), torch.tensor(adv),
                                           torch.tensor(mask, dtype=torch.float64)),
                          c, generator=torch.Generator().manual_seed(1))
    loss.backward()
    zeroed = {(i, t) for i in range(B) for t in range(T) if tlp.grad[i, t] == 0}
    assert len(zeroed) == 2 and zeroed <= cands
    assert m["clip_cov_frac"] == pytest.approx(2 / 200)
    # the remaining loss is the plain clipped loss over the other tokens
    expected = sum(ref_token_loss(lp[i][t], old[i][t], adv[i], 0.2, 0.28) for i in range(B) for t in range(T)
                   if (i, t) not in zeroed) / 200
    assert loss.item() == pytest.approx(expected)
    # seeded: the same generator seed picks the same tokens
    tlp2 = torch.tensor(lp, requires_grad=True)
    loss2, _ = policy_loss(PolicyLossInputs(tlp2, torch.tensor(old), torch.tensor(adv),
                                            torch.tensor(mask, dtype=torch.float64)),
                           c, generator=torch.Generator().manual_seed(1))
    loss2.backward()
    assert torch.equal(tlp2.grad == 0, tlp.grad == 0)
