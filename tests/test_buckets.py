"""Length buckets (tether.scoring) give the values and gradients of one masked pass."""

import pytest
import torch

from tether.models.loading import build_model, char_tokenizer
from tether.objectives import iqlearn_loss, mle_loss, shifted_token_logprobs
from tether.scoring import bucketed, length_buckets, right_padded

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(lengths, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 90, (n,), generator=g)
        mask[i, :n] = 1
    loss_mask = mask.float()
    loss_mask[:, :2] = 0  # a two-token "prompt"
    return ids, mask, loss_mask


def _model(arch):
    torch.manual_seed(0)
    return build_model(char_tokenizer(), arch, n_layer=2, n_head=2, n_embd=32, max_positions=64)


def test_length_buckets_cover_every_row_once_and_cut_only_where_it_pays():
    lengths = [50, 3, 48, 4, 49, 5, 2, 47]
    groups = length_buckets(lengths, pass_cost=20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[47, 48, 49, 50], [2, 3, 4, 5]]
    assert length_buckets(lengths, pass_cost=10**6) == [[0, 4, 2, 7, 5, 3, 1, 6]]
    assert length_buckets([7] * 5) == [[0, 1, 2, 3, 4]]
    assert length_buckets([]) == []


def test_right_padded_spots_left_padding_and_gaps():
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[1, 0, 1], [1, 1, 1]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bucketed_log_probs_and_gradients_equal_one_masked_pass(arch):
    model = _model(arch)
    ids, mask, loss_mask = _batch([40, 6, 38, 5, 39, 7, 21, 40])

    def loss_and_grads(logp):
        loss, _ = mle_loss(logp, loss_mask)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return logp.detach(), loss.detach(), grads

    plain = model(input_ids=ids, attention_mask=mask).logits
    ref_logp, ref_loss, ref_grads = loss_and_grads(shifted_token_logprobs(plain, ids))
    assert len(length_buckets(mask.sum(1).tolist(), pass_cost=20)) > 1
    got = bucketed(model, ids, mask, shifted_token_logprobs, pass_cost=20)
    logp, loss, grads = loss_and_grads(got)
    real = mask.bool()
    torch.testing.assert_close(logp[real], ref_logp[real], atol=2e-5, rtol=1e-5)
    assert bool((logp[~real] == 0).all())
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_bucketed_logits_feed_iqlearn_as_the_full_logits_do():
    model = _model("llama")
    ids, mask, loss_mask = _batch([30, 4, 29, 6, 12, 30])
    terminated = torch.tensor([True, False, True, True, False, True])

    def run(logits):
        loss, _ = iqlearn_loss(logits, ids, loss_mask, terminated, lam=0.5, gamma=1.0)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    ref_loss, ref_grads = run(model(input_ids=ids, attention_mask=mask).logits)
    loss, grads = run(bucketed(model, ids, mask, pass_cost=10))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wrapper", ["FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"])
def test_sharded_engines_get_one_mask_free_pass(wrapper):
    """FSDP (1 and 2) and DeepSpeed wrap the model on GPUs; their gradient hooks are written
    for one forward per backward, so a batch that would be cut into groups runs as one trimmed
    pass, with the same log-probs."""
    model = _model("llama")
    ids, mask, _ = _batch([40, 6, 38, 5], width=44)
    assert len(length_buckets(mask.sum(1).tolist(), pass_cost=20)) > 1
    engine = type(wrapper, (torch.nn.Module,), {})  # the class name is what counts
    sharded = type("Sharded", (engine,), {"forward": lambda self, **kw: model(**kw)})()
    calls = []
    sharded.register_forward_hook(lambda m, args, out: calls.append(m))
    got = bucketed(sharded, ids, mask, shifted_token_logprobs, pass_cost=20)
    assert len(calls) == 1
    want = bucketed(model, ids, mask, shifted_token_logprobs, pass_cost=20)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_a_left_padded_batch_takes_the_plain_masked_pass():
    model = _model("llama")
    ids, mask, _ = _batch([9, 5, 9])
    ids, mask = ids.flip(1), mask.flip(1)  # left padding
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(bucketed(model, ids, mask), plain)


def test_the_mle_and_dpo_stages_compute_the_plain_loss(tiny_checkpoint, monkeypatch):
    import tether.scoring
    from tether.config import load_recipe
    from tether.engine.setup import build_policy
    from tether.stages.base import make_stage

    for overrides in (
        ["train.stage=mle", "task.name=multistep"],
        ["train.stage=dpo", "task.name=multistep-prefs"],
    ):
        recipe = load_recipe(
            None, [f"model.init={tiny_checkpoint}", "train.batch_size=16", *overrides]
        )
        model, tokenizer = build_policy(recipe)
        stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
        monkeypatch.setattr(tether.scoring, "PASS_COST_POSITIONS", 1)  # many groups
        batch = stage.next_batch()
        tokens = batch.tokens
        assert len(length_buckets(tokens.attention_mask.sum(1).tolist())) > 1
        loss, _ = stage.loss(model, batch)
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
        logp = shifted_token_logprobs(logits, tokens.input_ids)
        if recipe.train.stage == "mle":
            expected, _ = mle_loss(logp, tokens.loss_mask)
        else:
            ref = stage.reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            ref_logp = shifted_token_logprobs(ref.logits, tokens.input_ids)
            torch.testing.assert_close(
                batch.ref_logp * tokens.loss_mask, ref_logp * tokens.loss_mask
            )
            # the sigmoid DPO loss written out: pairs are rows [0, b) chosen, [b, 2b) rejected
            b, beta = batch.pairs, recipe.preference.beta
            h = ((logp - ref_logp) * tokens.loss_mask).sum(1)
            expected = -torch.nn.functional.logsigmoid(beta * (h[:b] - h[b:])).mean()
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
        # and the gradient: the length groups' backward is the plain pass's
        params = list(model.parameters())
        for g, w in zip(
            torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True
        ):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_rows_longer_than_learned_positions_name_model_max_positions():
    from tether.config import RecipeError

    model = _model("gpt2")
    limit = model.config.n_positions
    ids = torch.ones(2, limit + 1, dtype=torch.long)
    with pytest.raises(RecipeError, match=f"{limit + 1} tokens does not fit the model's {limit}"):
        bucketed(model, ids, torch.ones_like(ids))
    bucketed(model, ids[:, :limit], torch.ones_like(ids[:, :limit]))  # the limit itself is fine
