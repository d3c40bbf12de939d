"""The certainty's scale (docs/rl.md, "The certainty's scale"): Ĵ = 1 − u/S with S = log V
(the paper, ``vocabulary``) or S = κ·ū (``typical``), against hand computations; the weight
statistics the RL loss logs; the recipe keys."""

import math

import pytest
import torch

from tether.config import RecipeError, load_recipe
from tether.objectives.common import TYPICAL_MULTIPLE, certainty, uncertainty
from tether.objectives.kl import prioritized_kl_weights
from tether.objectives.rl import RLLossSettings, kl_weight_stats, rl_loss

KAPPA = TYPICAL_MULTIPLE


def _entropy(logits: list[float], t: float = 1.0) -> float:
    z = [math.exp(v / t) for v in logits]
    p = [v / sum(z) for v in z]
    return -sum(q * math.log(q) for q in p if q > 0)


def _min_entropy(logits: list[float], t: float) -> float:
    z = [math.exp(v / t) for v in logits]
    return -math.log(max(z) / sum(z))


ROWS = [[2.0, 1.0, 0.0, -1.0, 0.5], [6.0, 0.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0, 0.1]]


def test_the_uncertainty_is_the_entropy_or_the_min_entropy():
    logits = torch.tensor(ROWS)
    h = [_entropy(r) for r in ROWS]
    assert uncertainty(logits, "entropy").tolist() == pytest.approx(h, rel=1e-5, abs=1e-6)
    m4 = [_min_entropy(r, 4.0) for r in ROWS]  # max_prob's published temperature
    assert uncertainty(logits, "max_prob").tolist() == pytest.approx(m4, rel=1e-6)
    assert uncertainty(torch.zeros(7), "entropy").item() == pytest.approx(math.log(7))


def test_on_99_tokens_the_papers_form_is_unchanged():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 6, 99, generator=g)
    for form in ("entropy", "max_prob"):
        default = certainty(logits, form)
        assert torch.equal(certainty(logits, form, normalization="vocabulary"), default)
        w = prioritized_kl_weights(logits, 150.0, form)
        assert torch.equal(prioritized_kl_weights(logits, 150.0, form, None, "vocabulary"), w)
    # by hand: Ĵ = 1 − H / log 99 (the paper), w = Ĵ^150
    row = logits[1, 2].tolist()
    j = 1 - _entropy(row) / math.log(99)
    assert certainty(logits, "entropy")[1, 2].item() == pytest.approx(j, rel=1e-5)
    assert prioritized_kl_weights(logits, 150.0)[1, 2].item() == pytest.approx(j**150, rel=1e-4)


def test_typical_normalisation_by_hand():
    logits = torch.tensor(ROWS)
    h = [_entropy(r) for r in ROWS]
    u_bar = sum(h) / len(h)  # None: the mean over every position given
    expected = [max(0.0, 1 - x / (KAPPA * u_bar)) for x in h]
    got = certainty(logits, "entropy", normalization="typical")
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    w = prioritized_kl_weights(logits, 150.0, normalization="typical")
    assert w.tolist() == pytest.approx([j**150 for j in expected], rel=1e-5)
    # an explicit ū (the stage passes the mean over the batch's real tokens)
    given = 0.003
    expected = [max(0.0, 1 - x / (KAPPA * given)) for x in h]
    got = certainty(logits, "entropy", normalization="typical", typical=torch.tensor(given))
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected[0] == 0.0 and expected[1] > 0  # at or past κ·ū the weight is 0
    # the max-probability form: u = −log max softmax(ℓ/4)
    m = [_min_entropy(r, 4.0) for r in ROWS]
    mean = sum(m) / len(m)
    expected = [1 - x / (KAPPA * mean) for x in m]
    got = prioritized_kl_weights(logits, 50.0, "max_prob", normalization="typical")
    assert got.tolist() == pytest.approx([j**50 for j in expected], rel=1e-5)


def test_typical_weights_do_not_depend_on_the_vocabulary():
    """The same distribution written over 5 or 49,152 tokens (the rest at −inf): the typical
    weights are equal; the paper's form normalises by log of the support (the finite logits),
    so it is the same too, and the same 5 logits among 49,152 finite ones give higher
    certainties (log 49,152 > log 5)."""
    small = torch.tensor(ROWS)
    big = torch.full((3, 49152), -math.inf)
    big[:, :5] = small
    typical_small = prioritized_kl_weights(small, 150.0, normalization="typical")
    typical_big = prioritized_kl_weights(big, 150.0, normalization="typical")
    assert torch.allclose(typical_small, typical_big, rtol=1e-5, atol=0)
    paper_small = prioritized_kl_weights(small, 150.0)
    paper_big = prioritized_kl_weights(big, 150.0)
    assert torch.allclose(paper_big, paper_small, rtol=1e-4, atol=1e-10)
    whole = torch.full((3, 49152), -30.0)  # finite everywhere: log V over all 49,152
    whole[:, :5] = small
    assert bool((prioritized_kl_weights(whole, 150.0) >= paper_small).all())


def test_typical_edge_cases():
    one_hot = torch.full((2, 3, 11), -math.inf)
    one_hot[..., 4] = 0.0
    w = prioritized_kl_weights(one_hot, 150.0, normalization="typical")  # ū = 0: all certain
    assert torch.equal(w, torch.ones(2, 3))
    assert torch.all(prioritized_kl_weights(torch.zeros(2, 5), 0.0, normalization="typical") == 1)
    with pytest.raises(ValueError, match="unknown certainty normalization"):
        certainty(torch.zeros(5), "entropy", normalization="nats")  # type: ignore[arg-type]
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="typical uncertainty"):
            certainty(torch.zeros(5), "entropy", normalization="typical", typical=bad)
    logits = torch.randn(3, 7, requires_grad=True)
    assert not prioritized_kl_weights(logits, 2.0, normalization="typical").requires_grad


# ----------------------------------------------------------------------------- statistics


def test_weight_statistics_by_hand():
    w = torch.tensor([[0.01, 0.5, 0.97, 0.3], [0.99, 0.04, 0.2, 0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    # real weights: 0.01, 0.5, 0.97, 0.3, 0.99, 0.04 (padding's 0.2 and 0.9 ignored)
    stats = kl_weight_stats(w, mask)
    assert stats["kl_weight_mean"] == pytest.approx((0.01 + 0.5 + 0.97 + 0.3 + 0.99 + 0.04) / 6)
    # the lower middle of the six sorted values 0.01 0.04 0.3 0.5 0.97 0.99 (torch.median)
    assert stats["kl_weight_median"] == pytest.approx(0.3)
    assert stats["kl_weight_below_half"] == pytest.approx(3 / 6)  # 0.01, 0.3, 0.04
    assert stats["kl_weight_low"] == pytest.approx(2 / 6)  # 0.01, 0.04 (< 0.05)
    assert stats["kl_weight_high"] == pytest.approx(2 / 6)  # 0.97, 0.99 (> 0.95)
    # an explicit token count N (the stage's N / W across processes)
    halved = kl_weight_stats(w, mask, token_count=torch.tensor(12.0))
    assert halved["kl_weight_low"] == pytest.approx(2 / 12)
    assert kl_weight_stats(w, torch.zeros_like(mask))["kl_weight_median"] == 0.0


def test_the_rl_loss_logs_the_weight_statistics():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(2, 4, 6, generator=g), -1)
    tokens = torch.randint(0, 6, (2, 4), generator=g)
    logp = log_p.gather(-1, tokens[..., None])[..., 0]
    ref_log_p = torch.log_softmax(torch.randn(2, 4, 6, generator=g), -1)
    ref_logp = ref_log_p.gather(-1, tokens[..., None])[..., 0]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = torch.tensor([[0.01, 0.5, 0.97, 0.0], [0.99, 0.04, 0.2, 0.9]])
    settings = RLLossSettings(algorithm="rloo", group_size=2, kl_coef=0.1)
    _, stats = rl_loss(
        log_p, logp, ref_logp, ref_log_p, mask, torch.ones(2), settings, kl_weights=w
    )
    expected = kl_weight_stats(w, mask)
    assert {k: stats[k] for k in expected} == expected
    assert expected["kl_weight_low"] == pytest.approx(2 / 7)  # 0.01, 0.04
    assert expected["kl_weight_high"] == pytest.approx(2 / 7)  # 0.97, 0.99
    assert expected["kl_weight_median"] == pytest.approx(0.5)  # of 0.01 .04 .2 .5 .9 .97 .99
    _, unweighted = rl_loss(log_p, logp, ref_logp, ref_log_p, mask, torch.ones(2), settings)
    assert not any(k.startswith("kl_weight") for k in unweighted)


# ----------------------------------------------------------------------------- the recipe


def test_recipe_defaults_and_a_bad_value():
    rl = load_recipe(None).rl
    assert rl.certainty_normalization == "typical" and rl.temperature == 1.0
    paper = load_recipe(None, ["rl.certainty_normalization=vocabulary"]).rl
    assert paper.certainty_normalization == "vocabulary"
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["rl.certainty_normalization=nats"])
    assert "certainty_normalization" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the RL stage


@pytest.mark.usefixtures("one_thread")
def test_the_stage_takes_the_mean_over_real_completion_tokens_only(tiny_checkpoint):
    """The stage's weights, rebuilt by hand: each row alone through the reference (no
    padding), H at T = 1 of its own logits, H̄ over the real tokens of every row, w =
    (1 − H/(κ·H̄))^β_c. Rows of several lengths, so padding would change H̄."""
    from tether.engine.setup import build_policy
    from tether.stages.rl import RLStage

    recipe = load_recipe(
        None,
        [
            "task.name=first-digit",
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            "rl.certainty_exponent=40",
            "rl.temperature=1.5",
            "rl.prompts_per_step=12",
            "rl.max_new_tokens=60",
        ],
    )
    torch.manual_seed(0)
    policy, tokenizer = build_policy(recipe)
    stage = RLStage(recipe, tokenizer, policy, torch.device("cpu"))
    with torch.no_grad():  # a sharper reference: its entropies well below padding's log V
        stage.reference.model.norm.weight.mul_(8.0)
    rollout = stage.next_batch()
    lengths = rollout.mask.sum(1).long().tolist()
    assert len(set(lengths)) > 1  # some rows padded
    P = rollout.prompt_len
    entropies = []
    for i, n in enumerate(lengths):
        prompt = rollout.input_ids[i, :P][rollout.attention_mask[i, :P] > 0]
        ids = torch.cat([prompt, rollout.input_ids[i, P : P + n]])
        with torch.no_grad():
            logits = stage.reference(input_ids=ids[None]).logits[0, len(prompt) - 1 : -1]
        log_q = torch.log_softmax(logits.double(), -1)
        entropies.append(-(log_q.exp() * log_q).sum(-1))
    h_bar = float(torch.cat(entropies).mean())
    assert h_bar < 0.8 * math.log(99)
    for i, h in enumerate(entropies):
        expected = (1 - h / (KAPPA * h_bar)).clamp(0, 1) ** 40
        got = rollout.kl_weights[i, : lengths[i]].double()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got - expected).abs().max()
