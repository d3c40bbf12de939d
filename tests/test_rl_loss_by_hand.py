"""The RL stage's whole loss, rebuilt by hand (docs/methods.md §1–3).

One rollout of a tiny random Llama, then the policy is moved off the reference (so the KL, its
gradient and PPO's ratio are not trivially 0 or 1), the sequence rewards are replaced by
arbitrary numbers, and the stage's loss and gradients are compared with a recomputation that
uses none of ``tether.objectives``: each row run alone through the plain model, without padding,
and every term written out from its definition — the token log-probs at temperature T, the KL
estimators k1/k2/k3 and the exact KL, the prioritised weights Ĵ_ref^β_c (the reference's
entropy at T = 1 against κ times its mean over the batch's tokens, the default, or against
log V, the paper's), terminal rewards with the KL in the reward or in the loss,
REINFORCE with a batch-mean baseline, RLOO, A2C with GAE, PPO-clip, the value loss and the
entropy bonus, all as means over the batch's real completion tokens. The KL goes where its
gradient is right (the recipe refuses the rest): k2, k3 and exact in the loss, k1 in the reward.
The same hand computation checks the stage's loss and the pure function it calls,
:func:`tether.objectives.rl_loss`.
"""

import math

import pytest
import torch

from tether.config import load_recipe
from tether.engine.setup import build_policy
from tether.objectives import log_softmax_and_token_logprobs, rl_loss
from tether.objectives.common import TYPICAL_MULTIPLE
from tether.scoring import grouped_completion_logits
from tether.stages.rl import RLStage

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1.5  # sampling and scoring temperature (not 1: the division must happen)
ALPHA, C_H, C_V = 0.3, 0.05, 0.7
# β_c per certainty scale: weights well inside (0, 1) on the tiny random model
BETA_C = {"typical": 50.0, "vocabulary": 0.5}
GAMMA, LAM, CLIP = 0.9, 0.8, 0.05
GROUP = 2


def _stage(init, algorithm, estimator, placement, normalization="typical"):
    recipe = load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={init}",
            "train.stage=rl",
            f"rl.algorithm={algorithm}",
            f"rl.kl_estimator={estimator}",
            f"rl.kl_placement={placement}",
            f"rl.kl_coef={ALPHA}",
            f"rl.certainty_exponent={BETA_C[normalization]}",
            f"rl.certainty_normalization={normalization}",
            f"rl.temperature={T}",
            f"rl.entropy_coef={C_H}",
            f"rl.value_coef={C_V}",
            f"rl.gamma={GAMMA}",
            f"rl.gae_lambda={LAM}",
            f"rl.clip_eps={CLIP}",
            f"rl.group_size={GROUP}",
            "rl.prompts_per_step=3",
            "rl.max_new_tokens=5",
        ],
    )
    torch.manual_seed(0)
    policy, tokenizer = build_policy(recipe)
    policy.train()
    return RLStage(recipe, tokenizer, policy, torch.device("cpu")), policy


def _rows(stage, rollout):
    """Per row: its real tokens (prompt + completion, no padding) and completion length."""
    P = rollout.prompt_len
    rows = []
    for i in range(rollout.input_ids.shape[0]):
        prompt = rollout.input_ids[i, :P][rollout.attention_mask[i, :P] > 0]
        n = int(rollout.mask[i].sum())
        rows.append((torch.cat([prompt, rollout.input_ids[i, P : P + n]]), len(prompt), n))
    return rows


def _scores(model, ids, p, n, hidden=False):
    """Logits (unscaled) and last hidden states at the n positions predicting the completion."""
    out = model(input_ids=ids[None], output_hidden_states=hidden)
    logits = out.logits[0, p - 1 : p - 1 + n].float()
    h = out.hidden_states[-1][0, p - 1 : p - 1 + n].float() if hidden else None
    return logits, h


def _reference_entropy(stage, ids, p, n):
    """H(π_ref(·|s_t)) at T = 1 (the reference's own logits) at the n completion positions."""
    with torch.no_grad():
        ref_logits, _ = _scores(stage.reference, ids, p, n)
    q1 = torch.softmax(ref_logits, -1)
    return -(q1 * torch.log_softmax(ref_logits, -1)).sum(-1), ref_logits.shape[-1]


def _hand_loss(stage, policy, rollout, algorithm, estimator, placement):
    rows = _rows(stage, rollout)
    N = sum(n for _, _, n in rows)
    normalization = stage.cfg.certainty_normalization
    beta_c = BETA_C[normalization]
    # the certainty's scale S: log V (the paper), or κ·H̄ with H̄ the reference's mean entropy
    # over the batch's N real completion tokens
    entropies = [_reference_entropy(stage, ids, p, n) for ids, p, n in rows]
    h_bar = sum(float(h.sum()) for h, _ in entropies) / N
    V = entropies[0][1]
    S = math.log(V) if normalization == "vocabulary" else TYPICAL_MULTIPLE * h_bar
    per_row = []  # (logp, kl, entropy, values, old_logp, reward) per row
    for i, (ids, p, n) in enumerate(rows):
        logits, h = _scores(policy, ids, p, n, hidden=algorithm in ("a2c", "ppo"))
        with torch.no_grad():
            ref_logits, _ = _scores(stage.reference, ids, p, n)
        tokens = ids[p:]
        lp = torch.log_softmax(logits / T, -1)
        lq = torch.log_softmax(ref_logits / T, -1)
        logp = lp[torch.arange(n), tokens]
        ref_logp = lq[torch.arange(n), tokens]
        rho = logp - ref_logp
        if estimator == "k1":
            kl = rho
        elif estimator == "k2":
            kl = 0.5 * rho**2
        elif estimator == "k3":
            kl = torch.exp(-rho) - 1 + rho
        else:
            kl = (lp.exp() * (lp - lq)).sum(-1)
        # the certainty: 1 − H_ref/S of the reference at T = 1, to the power β_c
        H_ref = entropies[i][0]
        w = (1 - H_ref / S).clamp(0, 1) ** beta_c
        kl = w * kl
        entropy = -(lp.exp() * lp).sum(-1)
        values = stage.value_head(h).squeeze(-1) if h is not None else None
        old = rollout.old_logp[i, :n]
        per_row.append((logp, kl, entropy, values, old, float(rollout.seq_rewards[i])))

    def rewards(logp, kl, R):
        r = [0.0] * len(logp)
        r[-1] = R
        if placement == "reward":
            r = [r_t - ALPHA * float(k) for r_t, k in zip(r, kl.detach(), strict=True)]
        return r

    pg = torch.zeros(())
    if algorithm == "reinforce":
        returns = []
        for logp, kl, _, _, _, R in per_row:
            r, G, acc = rewards(logp, kl, R), [], 0.0
            for r_t in reversed(r):
                acc = r_t + GAMMA * acc
                G.insert(0, acc)
            returns.append(G)
        baseline = sum(sum(G) for G in returns) / N
        for (logp, *_), G in zip(per_row, returns, strict=True):
            pg = pg - sum((g - baseline) * lp_t for g, lp_t in zip(G, logp, strict=True)) / N
    elif algorithm == "rloo":
        totals = [sum(rewards(logp, kl, R)) for logp, kl, _, _, _, R in per_row]
        for i, (logp, *_) in enumerate(per_row):
            g = i // GROUP
            others = [totals[j] for j in range(g * GROUP, (g + 1) * GROUP) if j != i]
            adv = totals[i] - sum(others) / len(others)
            pg = pg - adv * logp.sum() / N
    else:
        for logp, kl, _, values, old, R in per_row:
            r, v = rewards(logp, kl, R), values.detach().tolist()
            n, A, next_a, next_v = len(r), [0.0] * len(r), 0.0, 0.0
            for t in reversed(range(n)):
                next_a = r[t] + GAMMA * next_v - v[t] + GAMMA * LAM * next_a
                next_v = v[t]
                A[t] = next_a
            A_t = torch.tensor(A)
            if algorithm == "a2c":
                pg = pg - (A_t * logp).sum() / N
            else:
                ratio = torch.exp(logp - old)
                surrogate = torch.minimum(ratio * A_t, ratio.clamp(1 - CLIP, 1 + CLIP) * A_t)
                pg = pg - surrogate.sum() / N
            target = A_t + torch.tensor(v)
            pg = pg + C_V * 0.5 * ((values - target) ** 2).sum() / N
    loss = pg
    if placement == "loss":
        loss = loss + ALPHA * sum(kl.sum() for _, kl, *_ in per_row) / N
    return loss - C_H * sum(e.sum() for _, _, e, *_ in per_row) / N


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


# where each estimator's gradient is the KL's (config.RLConfig refuses the other pairs)
PLACEMENTS = [("loss", "k2"), ("loss", "k3"), ("loss", "exact"), ("reward", "k1")]


def _moved_stage(init, algorithm, estimator, placement, normalization="typical"):
    """The stage and one rollout, with arbitrary rewards (not the checker's 0/1 pattern), and
    a policy moved off the reference and off the sampling policy."""
    stage, policy = _stage(init, algorithm, estimator, placement, normalization)
    rollout = stage.next_batch()
    assert rollout.mask.sum(1).min() >= 1
    rollout.seq_rewards = torch.tensor([0.9, -0.4, 0.3, 1.7, -1.1, 0.2])
    torch.manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
        if stage.value_head is not None:
            torch.nn.init.normal_(stage.value_head.weight, std=0.5)
            stage.value_head.bias.fill_(0.2)
    w = rollout.kl_weights
    assert w is not None and w.max() < 0.99 and w[rollout.mask > 0].min() > 0.01  # not 0 or 1
    return stage, policy, rollout


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "a2c", "ppo"])
@pytest.mark.parametrize(("placement", "estimator"), PLACEMENTS)
def test_rl_loss_and_gradient_match_a_hand_computation(
    algorithm, placement, estimator, tiny_checkpoint
):
    stage, policy, rollout = _moved_stage(tiny_checkpoint, algorithm, estimator, placement)

    params = [p for p in policy.parameters()] + stage.parameters()
    loss, _ = stage.loss(policy, rollout)
    expected = _hand_loss(stage, policy, rollout, algorithm, estimator, placement)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    got, want = _grads(loss, params), _grads(expected, params)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()
    if algorithm == "ppo":  # the clipped branch was exercised on some tokens
        _, stats = stage.loss(policy, rollout)
        assert 0 < stats["clip_active_fraction"] < 1


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "a2c", "ppo"])
@pytest.mark.parametrize(("placement", "estimator"), PLACEMENTS)
def test_the_objective_function_matches_the_hand_computation(
    algorithm, placement, estimator, tiny_checkpoint
):
    """``rl_loss`` itself, called directly on the rollout scored under the policy (and the
    value head), with the default denominators and baseline: the same hand computation."""
    stage, policy, rollout = _moved_stage(tiny_checkpoint, algorithm, estimator, placement)
    P = rollout.prompt_len
    hidden = stage.value_head is not None
    scored = grouped_completion_logits(
        policy, rollout.input_ids, rollout.attention_mask, P, T, hidden=hidden
    )
    logits, values = scored if hidden else (scored, None)
    if hidden:
        values = stage.value_head(values).squeeze(-1)
    log_p, logp = log_softmax_and_token_logprobs(logits, rollout.input_ids[:, P:])
    loss, stats = rl_loss(
        log_p,
        logp,
        rollout.ref_logp,
        rollout.ref_log_softmax,
        rollout.mask,
        rollout.seq_rewards,
        stage.settings,
        values=values,
        old_logp=rollout.old_logp,
        kl_weights=rollout.kl_weights,
        correct=rollout.correct,
    )
    expected = _hand_loss(stage, policy, rollout, algorithm, estimator, placement)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    params = [p for p in policy.parameters()] + stage.parameters()
    for g, w in zip(_grads(loss, params), _grads(expected, params), strict=True):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()


@pytest.mark.parametrize("algorithm", ["reinforce", "a2c"])
def test_the_papers_certainty_scale_matches_the_hand_computation(algorithm, tiny_checkpoint):
    """``rl.certainty_normalization: vocabulary``: Ĵ = 1 − H_ref / log V, the paper's form."""
    stage, policy, rollout = _moved_stage(tiny_checkpoint, algorithm, "k2", "loss", "vocabulary")
    params = [p for p in policy.parameters()] + stage.parameters()
    loss, _ = stage.loss(policy, rollout)
    expected = _hand_loss(stage, policy, rollout, algorithm, "k2", "loss")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    for g, w in zip(_grads(loss, params), _grads(expected, params), strict=True):
        if w is not None:
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()
